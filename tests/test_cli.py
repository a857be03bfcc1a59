"""The ``fastcache`` command and ``python -m fastcache``: every bad argument is one line and exit code 2, before any
model is built; help explains every option; a folder saved from a preset loads and runs."""

import argparse

import numpy as np
import pytest
import torch
from conftest import cli_error, one_line_error
from PIL import Image

from fastcache import cli
from fastcache.__main__ import parse_args as main_job_args
from fastcache.models import build_pipeline

BAD = [
    (["generate", "x", "--interval", "0"], "--interval must be >= 1"),
    (["generate", "x", "--branch", "99"], "--branch must be between 0 and 8"),
    (["generate", "x", "--branch", "-1"], "--branch must be between 0 and 8"),
    (["generate", "x", "--size", "33"], "multiples of 8 pixels"),
    (["generate", "x", "--size", "0"], "multiples of 8 pixels"),
    (["generate", "x", "--size", "32x"], "N or WIDTHxHEIGHT"),
    (["generate", "x", "--steps", "0"], "--steps must be >= 1"),
    (["generate", "x", "--steps", "30", "--interval", "2", "--schedule", "quad-center"], "valid intervals"),
    (["generate", "x", "--batch", "0"], "--batch must be >= 1"),
    (["generate", "x", "--model", "/no/such/folder"], "no such folder"),
    (["generate", "x", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["generate", "x", "--steps", "many"], "invalid int value"),
    (["generate"], "required: PROMPT"),
    (["serve", "--sizes", "30"], "multiples of 8 pixels"),
    (["serve", "--batch-sizes", "0"], "--batch-sizes values must be >= 1"),
    (["serve", "--batch-sizes", "1,two"], "comma-separated integers"),
    (["serve", "--port", "70000"], "--port must be between 1 and 65535"),
    (["serve", "--batch-sizes", "1,8", "--max-queue", "4"], "--max-queue must be at least"),
    (["serve", "--steps", "30", "--max-steps", "20"], "--max-steps must be >= steps (30)"),
    (["warmup", "--guidance-modes", "maybe"], "--guidance-modes must be on, off or on,off"),
    (["warmup", "--guidance-modes", "on,on"], "--guidance-modes must be on, off or on,off"),
    (["warmup", "--report", "/no/such/dir/r.jsonl"], "does not exist"),
    (["warmup", "--cache-dir", "/etc/passwd"], "not a folder"),
    (["generate", "x", "--output-dir", "/etc/passwd/x"], "is not a writable folder"),
    (["generate", "x", "--seed", str(2**64)], "--seed must be between 0 and"),
    (["generate", "x", "--guidance", "nan"], "--guidance must be a finite number"),
    (["generate", "x", "--no-compile", "--mode", "default"], "--mode needs --compile"),
    (["warmup", "--no-compile", "--static-shapes"], "--static-shapes needs --compile"),
    (["serve", "--max-delay-ms", "inf"], "--max-delay-ms must be a finite number from 0 to 60000"),
    (["serve", "--max-delay-ms", "nan"], "--max-delay-ms must be a finite number"),
    (["serve", "--drain-seconds", "-1"], "--drain-seconds must be a finite number"),
    (["serve", "--replicas", "-1"], "--replicas must be >= 0"),
    (["serve", "--sizes", "64", "--max-size", "32"], "--max-size must be at least"),
    (["serve", "--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without an API key"),
    (["serve", "--host", "::"], "--allow-unauthenticated on a trusted network"),
    (["serve", "--api-key", "sk bad key"], "--api-key (or FASTCACHE_API_KEY) must be 1 to 256 visible ASCII"),
    (["serve", "--read-timeout", "0"], "--read-timeout must be a finite number from 0.1 to 3600"),
    (["serve", "--keep-alive-timeout", "nan"], "--keep-alive-timeout must be a finite number"),
    (["serve", "--max-connections", "0"], "--max-connections must be an integer from 1"),
    (["serve", "--max-body-mb", "-1"], "--max-body-mb must be a finite number"),
    (["serve", "--intervals", "1,2"], "--intervals must include the server's interval (3)"),
    (["serve", "--intervals", "0,3"], "--intervals values must be >= 1"),
    (["serve", "--intervals", "2,3", "--steps", "30", "--schedule", "quad-center"], "valid intervals"),
    (["serve", "--edits", "outpaint"], "--edits must be some of"),
    (["serve", "--edits", "img2img", "--inpaint-preset", "tiny-sd-inpaint"], "must include 'inpaint'"),
    (["serve", "--inpaint-preset", "tiny-sd"], "invalid choice"),
    (["serve", "--inpaint-model", "/etc"], "--inpaint-model /etc: not a diffusers pipeline folder"),
    (["serve", "--inpaint-model", "./missing"], "--inpaint-model ./missing: no such folder"),
    (["serve", "--video-sizes", "30"], "multiples of 8 pixels"),
    (["serve", "--video-frames", "0"], "--video-frames values must be >= 1"),
    (["warmup", "--video-frames", "2000"], "--video-frames must be integers from 1 to 1024"),
    (["serve", "--video-fps", "0"], "--video-fps must be an integer from 1 to 120"),
    (["serve", "--video-ttl", "0"], "--video-ttl must be a number of seconds above 0"),
    (["serve", "--max-video-jobs", "0"], "--max-video-jobs must be an integer from 1 to 100000"),
    (["serve", "--video-crf", "52"], "--video-crf must be an integer from 0 (lossless) to 51"),
    (["bench", "nothing"], "invalid choice"),
    (["dance"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)  # all of this is known before any model
    monkeypatch.delenv("FASTCACHE_API_KEY", raising=False)
    err = cli_error(argv, capsys)
    assert message in err, err
    assert "sk bad key" not in err  # a key is never repeated


def test_a_bad_key_in_the_environment_is_refused_without_showing_it(capsys, monkeypatch):
    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)
    monkeypatch.setenv("FASTCACHE_API_KEY", "sk-good-key,sk-bäd-key")
    err = cli_error(["serve", "--host", "0.0.0.0"], capsys)
    assert "key 2 is not" in err and "sk-" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys):
    assert "sees no CUDA device" in cli_error(["generate", "x", "--device", "cuda"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--interval", "0"], "--interval must be >= 1"), (["--branch", "99"], "--branch must be between 0 and 8"),
    (["--size", "33"], "multiples of 8"), (["--steps", "0"], "--steps must be >= 1"),
    (["--model", "./missing"], "no such folder"), (["--repeat", "0"], "--repeat must be >= 1"),
    (["--output", "/no/such/dir/x.png"], "its folder does not exist"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
])
def test_the_main_job_checks_every_argument_first(argv, message, capsys):
    assert message in one_line_error(lambda: main_job_args(argv), capsys)


def test_help_explains_every_option_with_its_default(capsys):
    _, commands = cli.build_parser()
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for expected in ("(default: 25)", "(default: 127.0.0.1)", "(default: tiny-sd)", "--cache-dir", "(default: 0)"):
        assert expected in text


def test_a_folder_saved_from_a_preset_loads_and_generates(tmp_path, caplog):
    for preset in ("tiny-sd", "tiny-sdxl"):
        folder = tmp_path / preset
        build_pipeline(preset).save_pretrained(folder)
        out = tmp_path / f"{preset}-images"
        assert cli.main(["generate", "a red house", "a blue boat", "--model", str(folder), "--steps", "3",
                         "--no-compile", "--batch", "2", "--seed", "4", "--output-dir", str(out)]) == 0
        files = sorted(p.name for p in out.iterdir())
        assert files == ["fastcache-000-seed4.png", "fastcache-000-seed5.png", "fastcache-001-seed4.png",
                         "fastcache-001-seed5.png"]
        images = [np.asarray(Image.open(out / name), dtype=np.float64) for name in files]
        assert images[0].shape == (32, 32, 3)
        # different seeds and different prompts give different images
        assert np.abs(images[0] - images[1]).mean() > 1 and np.abs(images[0] - images[2]).mean() > 1


def test_the_main_job_uses_the_prompt_for_presets(tmp_path):
    from fastcache.__main__ import main

    results = [main(["--prompt", prompt, "--steps", "2", "--repeat", "1", "--variant", "fastcache-eager",
                     "--output", str(tmp_path / f"{i}.png")]) for i, prompt in enumerate(("a cat", "a dog"))]
    images = [np.asarray(Image.open(r["output"]), dtype=np.float64) for r in results]
    assert np.abs(images[0] - images[1]).mean() > 1


@pytest.mark.parametrize(("benchmark", "option"), [("compare", "--peers"), ("serve-load", "--clients"),
                                                   ("serve-faults", "--soak-requests"), ("cold-start", "--modes")])
def test_bench_runs_a_script_of_bench(capsys, benchmark, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", benchmark, "--help"])
    assert exit_info.value.code == 0 and option in capsys.readouterr().out


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the arguments were checked")


def test_parser_errors_are_argparse_compatible():
    assert issubclass(cli.Parser, argparse.ArgumentParser)


def test_a_busy_port_is_one_line_before_any_model(capsys, monkeypatch):
    import socket

    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = cli_error(["serve", "--port", str(port), "--no-compile"], capsys)
    assert "cannot listen there" in err


@pytest.mark.parametrize("command", ["warmup", "serve"])
def test_static_shapes_turns_the_dynamic_batch_off(command):
    parser, commands = cli.build_parser()
    for flags, dynamic in (([], True), (["--static-shapes"], False)):
        options = cli.service_options(commands[command], parser.parse_args([command, *flags]))
        assert options.cache.dynamic_batch is dynamic


def test_the_video_flags_make_the_video_options(tmp_path):
    from fastcache.serving.video_options import VideoOptions

    parser, commands = cli.build_parser()
    args = parser.parse_args(["serve", "--video-sizes", "64x32,32", "--video-frames", "8,4", "--video-fps", "12",
                              "--data-dir", str(tmp_path), "--video-ttl", "60", "--max-video-jobs", "3",
                              "--video-crf", "0"])
    assert cli.service_options(commands["serve"], args).video == VideoOptions(
        sizes=((64, 32), (32, 32)), frames=(4, 8), fps=12, data_dir=str(tmp_path), ttl=60, max_jobs=3, crf=0)
    warmup = cli.service_options(commands["warmup"], parser.parse_args(["warmup", "--video-frames", "16"]))
    assert warmup.video.frames == (16,)


@pytest.mark.parametrize("model, argv, message", [
    ("animatediff", ["--replicas", "2"], "--replicas: video jobs live in one process's --data-dir; serve video from "
                                         "one process"),
    ("tiny-svd", ["--replicas", "2"], "--replicas: video jobs live"),
    ("animatediff", ["--data-dir", "/etc/passwd"], "--data-dir /etc/passwd: not a folder"),
])
def test_serving_a_video_model_is_checked_before_it_is_built(tiny_video_models, model, argv, message, capsys,
                                                              monkeypatch):
    monkeypatch.setattr("fastcache.serving.service.Service", _no_model)
    chosen = ["--model", str(tiny_video_models[model])] if model in tiny_video_models else ["--preset", model]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *chosen, *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_serving_video_without_pyav_is_one_line_naming_the_install(tiny_video_models, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av fails, as where the video extra is not installed
    monkeypatch.setattr("fastcache.serving.service.Service", _no_model)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(tiny_video_models["svd"])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert 'the video extra is not installed (no av): pip install "fastcache[video]"' in err


def test_a_lora_for_a_video_model_that_loads_none_is_one_line(lora_dir, capsys):
    from conftest import free_port, save_lora

    path = save_lora(build_pipeline("tiny-sd"), lora_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--preset", "tiny-svd", "--lora", f"style={path}", "--no-compile", "--port",
                  str(free_port())])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "lora: StableVideoDiffusionPipeline loads no LoRA adapters; serve it without --lora" in err


def test_a_video_pipeline_the_server_cannot_call_is_one_line(tmp_path, capsys):
    from conftest import free_port
    from diffusers import AnimateDiffVideoToVideoPipeline

    AnimateDiffVideoToVideoPipeline.from_pipe(build_pipeline("tiny-animatediff")).save_pretrained(tmp_path / "v2v")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(tmp_path / "v2v"), "--no-compile", "--port", str(free_port())])
    last = capsys.readouterr().err.splitlines()[-1]  # after diffusers' loading bar
    assert exit_info.value.code == 2 and last.startswith("fastcache serve: error: ")
    assert ("AnimateDiffVideoToVideoPipeline is not served; the video pipelines served are AnimateDiffPipeline, "
            "StableVideoDiffusionPipeline.") in last
