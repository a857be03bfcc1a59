"""``fastcache tune``'s arguments (one line and exit code 2 before any model is built), its budget (exit 1 naming the
closest candidate), and ``fastcache warmup/serve --tuned`` applying a tune file's pick."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import cli_error

from fastcache import cli
from fastcache.tuning import report as tune_report


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)
    monkeypatch.setattr("fastcache.models.load_pipeline", _no_model)




BAD = [
    (["--prompts", "{empty}"], "no prompts in it (one per line)"),
    (["--prompts", "/no/such/prompts.txt"], "--prompts /no/such/prompts.txt: cannot read it (No such file"),
    (["--clip-model", "/no/such/clip"], "--clip-model /no/such/clip: no such folder"),
    (["--branches", "0,9"], "--branches must be between 0 and 8 for this model; got 9"),
    (["--branches", "-1"], "--branches values must be >= 0"),
    (["--intervals", "2,30"], "--intervals must be between 1 and --steps (25); got 30"),
    (["--intervals", "0"], "--intervals values must be >= 1"),
    (["--intervals", "two"], "--intervals takes comma-separated integers"),
    (["--steps", "30", "--intervals", "2", "--schedules", "quad-center"], "valid intervals for 30 steps"),
    (["--schedules", "sometimes"], "--schedules must be of uniform, quad-center; got sometimes"),
    (["--min-clip", "30"], "--min-clip needs --clip-model"),
    (["--min-ssim", "2"], "--min-ssim must be a finite number from -1 to 1; got 2"),
    (["--min-psnr", "nan"], "--min-psnr must be a finite number"),
    (["--num-prompts", "17"], "--num-prompts must be between 1 and 16"),
    (["--seeds", "-1"], "--seeds values must be >= 0"),
    (["--size", "33"], "multiples of 8 pixels"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--out", "/etc/passwd"], "--out /etc/passwd: not a folder"),
    (["--no-compile", "--mode", "default"], "--mode needs --compile"),
    (["--scheduler", "lms"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_code_2_before_any_model(argv, message, tmp_path, capsys, no_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = [part.replace("{empty}", str(empty)) for part in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path)]
    assert message in cli_error(["tune", *argv, *out], capsys)


def test_resume_refuses_a_run_made_with_other_settings(tiny_tune, tmp_path, capsys, no_model):
    folder, args = tiny_tune
    shutil.copytree(folder, tmp_path / "out")
    argv = [*args, "--out", str(tmp_path / "out"), "--resume"]
    err = cli_error([*argv[:argv.index("--steps") + 1], "5", *argv[argv.index("--steps") + 2:]], capsys)
    assert "--resume:" in err and "was measured with steps 4 (now 5): pass the same options" in err


def test_a_budget_no_candidate_meets_names_the_closest_and_exits_1_without_measuring(tiny_tune, tmp_path, caplog,
                                                                                     no_model):
    folder, args = tiny_tune
    shutil.copytree(folder, tmp_path / "out")
    argv = [*args, "--out", str(tmp_path / "out"), "--resume"]
    assert cli.main([*argv, "--min-clip", "100"]) == 1
    rows = [tune_report.Measurement.from_dict(row) for row in
            json.loads((tmp_path / "out" / "tune.json").read_text())["candidates"]]
    closest = max(rows, key=lambda row: row.clip_score)
    assert f"no candidate meets --min-clip 100; the closest is {closest.name}" in caplog.text
    # a budget that some meet: the fastest of those, picked from the log alone (no model: nothing measured again)
    assert cli.main([*argv, "--min-psnr", "40"]) == 0
    data = json.loads((tmp_path / "out" / "tune.json").read_text())
    fastest = max((row for row in rows if row.psnr_db >= 40), key=lambda row: row.speedup)
    assert data["pick"]["interval"] == fastest.interval and data["pick"]["branch"] == fastest.branch
    assert data["verdict"].startswith(f"pick: {fastest.name} (")


@pytest.fixture
def picked(tiny_tune, tmp_path, no_model) -> tuple:
    """The tiny tune, re-picked for --min-psnr 40, and the options warmup would serve with (no model is built)."""
    folder, args = tiny_tune
    shutil.copytree(folder, tmp_path / "out")
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--resume", "--min-psnr", "40"]) == 0
    return tmp_path / "out" / "tune.json"


@pytest.fixture
def served(monkeypatch):
    """The options ``fastcache warmup`` would serve with: a stand-in Service records them and warms nothing."""
    served = []

    class Service:
        def __init__(self, options):
            served.append(options)

        def warm_up(self, progress):
            return {}

    monkeypatch.setattr("fastcache.serving.service.Service", Service)
    return served


def test_warmup_tuned_serves_the_pick_at_the_tuned_size(picked, served, caplog):
    assert cli.main(["warmup", "--tuned", str(picked), "--steps", "4", "--no-compile"]) == 0
    pick = json.loads(picked.read_text())["pick"]
    (options,) = served
    assert (options.cache.interval, options.cache.branch, options.cache.schedule) == (pick["interval"], pick["branch"],
                                                                                  "uniform")
    assert options.engine.sizes == ((32, 32),)
    assert options.level_labels == tune_report.levels(picked) and 1 in options.level_labels  # shown by /v1/models
    assert "RANDOM WEIGHTS (tiny-sd)" in caplog.text and "measured levels: I1: " in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--steps", "25"], "was tuned for 4 steps, not 25 (pass --steps 4)"),
    (["--steps", "4", "--preset", "tiny-sdxl"], "was tuned for tiny-sd, not tiny-sdxl"),
    (["--steps", "4", "--sizes", "64"], "was tuned at 32x32, which --sizes leaves out"),
    (["--steps", "4", "--interval", "3"], "--tuned sets --interval, --branch and --schedule from its pick; drop "
                                          "--interval"),
    (["--steps", "4", "--schedule", "uniform"], "drop --schedule"),
])
def test_serve_refuses_a_tune_file_made_for_another_model_size_or_steps(picked, argv, message, capsys):
    assert message in cli_error(["serve", "--tuned", str(picked), *argv], capsys)


def test_serve_refuses_an_unreadable_tune_file_or_one_without_a_pick(tiny_tune, capsys, no_model):
    err = cli_error(["serve", "--tuned", "/no/such/tune.json"], capsys)
    assert "--tuned /no/such/tune.json: cannot read it" in err
    folder, _ = tiny_tune  # tuned without a budget: the front, no pick
    assert "has no pick" in cli_error(["serve", "--tuned", str(folder / "tune.json"), "--steps", "4"], capsys)


# -- video ------------------------------------------------------------------------------------------------------------

VIDEO_BAD = [
    (["--preset", "tiny-animatediff", "--frames", "40"],
     "--frames must be from 2 to 32 (its motion adapter's motion_max_seq_length) for this model; got 40"),
    (["--preset", "tiny-svd", "--frames", "1"], "--frames must be at least 2 for this model; got 1"),
    (["--frames", "4"], "--frames is for a video model (AnimateDiffPipeline, StableVideoDiffusionPipeline); tiny-sd "
                        "is StableDiffusionPipeline"),
    (["--min-temporal-psnr", "30"], "--min-temporal-psnr is for a video model"),
    (["--preset", "tiny-animatediff", "--min-temporal-psnr", "inf"], "--min-temporal-psnr must be a finite number"),
    (["--preset", "tiny-animatediff", "--images", "{images}"], "--images is for an image-to-video model (SVD); "
                                                               "tiny-animatediff makes videos from prompts"),
    (["--preset", "tiny-svd", "--images", "/no/such/folder"], "--images /no/such/folder: no such folder"),
    (["--preset", "tiny-svd", "--images", "{empty}"], "no image in it (.png, .jpg, .jpeg, .webp files)"),
    (["--preset", "tiny-svd", "--images", "{images}", "--prompts", "{prompts}"], "--images replaces --prompts"),
    (["--preset", "tiny-svd", "--images", "{images}", "--num-prompts", "3"],
     "--num-prompts must be between 1 and 2 (the images there are); got 3"),
    (["--preset", "tiny-svd", "--clip-model", "/no/such/clip"], "makes videos from images, with no prompt to score"),
    (["--preset", "tiny-svd", "--size", "18"], "multiples of 4 pixels"),
]


@pytest.mark.parametrize("argv, message", VIDEO_BAD, ids=[" ".join(argv) for argv, _ in VIDEO_BAD])
def test_a_bad_video_argument_is_one_line_and_exit_code_2_before_any_model(argv, message, tmp_path, capsys, no_model):
    from PIL import Image

    folders = {name: tmp_path / name for name in ("images", "empty")}
    for folder in folders.values():
        folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(folders["images"] / name)
    (folders["empty"] / "notes.txt").write_text("not an image")
    (tmp_path / "prompts.txt").write_text("a boat\n")
    paths = {"{images}": folders["images"], "{empty}": folders["empty"], "{prompts}": tmp_path / "prompts.txt"}
    argv = [str(paths.get(part, part)) for part in argv]
    assert message in cli_error(["tune", *argv, "--out", str(tmp_path / "out")], capsys)


def test_resume_refuses_a_video_run_made_with_another_frame_count(tiny_video_tune, tmp_path, capsys, no_model):
    folder, args = tiny_video_tune
    shutil.copytree(folder, tmp_path / "out")
    err = cli_error([*args, "--frames", "3", "--out", str(tmp_path / "out"), "--resume"], capsys)
    assert "was measured with frames 4 (now 3): pass the same options" in err


@pytest.fixture
def video_picked(tiny_video_tune, tmp_path, no_model) -> Path:
    """The tiny video tune, re-picked with a temporal budget (no model is built)."""
    folder, args = tiny_video_tune
    shutil.copytree(folder, tmp_path / "out")
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--resume", "--min-temporal-psnr", "30"]) == 0
    return tmp_path / "out" / "tune.json"


def test_warmup_tuned_on_a_video_model_serves_the_pick_at_the_tuned_size_and_frames(video_picked, served, caplog):
    assert cli.main(["warmup", "--preset", "tiny-animatediff", "--tuned", str(video_picked), "--steps", "4",
                     "--no-compile"]) == 0
    pick = json.loads(video_picked.read_text())["pick"]
    (options,) = served
    assert (options.cache.interval, options.cache.branch) == (pick["interval"], pick["branch"])
    assert (options.video.sizes, options.video.frames) == (((16, 16),), (4,))
    assert options.level_labels[pick["interval"]]["temporal_psnr_db"] == pick["temporal_psnr_db"]
    assert f"temporal PSNR {pick['temporal_psnr_db']:.2f} dB" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--video-frames", "8"], "was tuned at 4 frames, which --video-frames leaves out"),
    (["--video-sizes", "32"], "was tuned at 16x16, which --video-sizes leaves out"),
    (["--preset", "tiny-svd"], "was tuned for tiny-animatediff, not tiny-svd"),
])
def test_serve_refuses_a_video_tune_file_for_other_buckets_or_another_model(video_picked, argv, message, capsys):
    argv = ["--preset", "tiny-animatediff", *argv] if "--preset" not in argv else argv
    assert message in cli_error(["serve", "--tuned", str(video_picked), "--steps", "4", *argv], capsys)
