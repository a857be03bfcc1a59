"""The Pareto front and the pick on a hand-made table, the budget, the report, and the tune file's pick and levels."""

import json
import math

import pytest

from fastcache.tuning import report as tune_report
from fastcache.tuning.report import Budget, Measurement, Report


def row(name: str, speedup: float, psnr_db: float, ssim: float, clip: float | None = None) -> Measurement:
    interval, branch = (int(part) for part in name[1:].split("B"))
    return Measurement(interval, branch, "uniform", seconds=1 / speedup, speedup=speedup, first_call_s=5.0,
                       unet_tflop=1 / speedup, flop_ratio=1 / speedup, psnr_db=psnr_db, psnr_min_db=psnr_db - 1,
                       ssim=ssim, clip_score=clip, drift=[[3, 0.99], [6, 0.97]], full_per_image=2,
                       shallow_per_image=4)


TABLE = [row("I2B0", 2.0, 30, 0.90), row("I3B0", 3.0, 25, 0.80), row("I2B1", 1.5, 35, 0.95),
         row("I3B1", 1.8, 28, 0.93),  # dominated by I2B0 (slower, less close), though its SSIM is higher
         row("I1B0", 1.2, math.inf, 1.0), row("I5B0", 3.0, 20, 0.70)]  # I5B0: as fast as I3B0, less close


def names(rows) -> list[str]:
    return [r.name for r in rows]


def test_the_pareto_front_is_every_undominated_candidate_fastest_first():
    assert names(tune_report.pareto_front(TABLE)) == ["I3B0", "I2B0", "I2B1", "I1B0"]
    assert tune_report.dominates(TABLE[0], TABLE[3]) and not tune_report.dominates(TABLE[0], TABLE[1])


@pytest.mark.parametrize("budget, expected", [
    (Budget(min_psnr=28), "I2B0"),
    (Budget(min_psnr=28, min_ssim=0.94), "I2B1"),
    (Budget(min_ssim=0.92), "I3B1"),  # off the PSNR front, but the fastest at this SSIM
    (Budget(min_psnr=10), "I3B0"),  # tied on speed with I5B0: the closer one
    (Budget(min_psnr=40), "I1B0"),  # identical images meet any PSNR
    (Budget(), None),  # no budget: no pick, the front
])
def test_the_pick_is_the_fastest_candidate_meeting_every_limit(budget, expected):
    chosen = tune_report.pick(TABLE, budget)
    assert (chosen and chosen.name) == expected


def test_a_budget_no_candidate_meets_has_the_closest_candidate():
    budget = Budget(min_psnr=33, min_ssim=0.99)
    rows = [r for r in TABLE if r.name != "I1B0"]
    assert tune_report.pick(rows, budget) is None
    # I2B1: SSIM 0.04 short of 0.99 (4%), PSNR met; every other is further off on one of the two
    assert tune_report.closest(rows, budget).name == "I2B1"
    # no CLIP measured: all equally far, the fastest
    assert tune_report.closest(rows, Budget(min_clip=30)).name == "I3B0"
    report = Report("note", "tiny-sd", {}, {}, {}, rows, budget)
    assert report.verdict().startswith("no candidate meets --min-psnr 33 dB, --min-ssim 0.99; the closest is I2B1")


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_ssim=1.5), "--min-ssim must be a finite number from -1 to 1"),
    (dict(min_psnr=math.nan), "--min-psnr must be a finite number"),
    (dict(min_clip=-1), "--min-clip must be a finite number from 0 to 100"),
])
def test_a_budget_checks_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_the_grid_measures_interval_1_once():
    grid = tune_report.Candidate.grid((1, 2, 3), (0, 1), ("uniform", "quad-center"))
    assert [c.name for c in grid] == ["I1B0", "I2B0", "I2B1", "I3B0", "I3B1", "I2B0 quad-center", "I2B1 quad-center",
                                      "I3B0 quad-center", "I3B1 quad-center"]


IDENTITY = dict(model="tiny-sd", size=[32, 32], steps=4, scheduler="default", guidance=7.5, prompts=["a", "b"],
                seeds=[0], device="cpu", compile=False, repeat=1, lpips=False, clip_model=None)
REFERENCE = dict(seconds=1.0, first_call_s=2.0, unet_tflop=1.0, clip_score=None)


def report(budget: Budget, identity=IDENTITY) -> Report:
    return Report(tune_report.random_weights_note("tiny-sd"), "tiny-sd (RANDOM)", identity, {"card": "x86_64"},
                  REFERENCE, TABLE, budget, ["CLIP score skipped: no --clip-model"])


def test_every_output_of_a_random_weight_model_says_so_in_its_first_line(tmp_path):
    made = report(Budget(min_psnr=28))
    path = made.write(tmp_path)
    first = path.read_text().splitlines()[0]
    assert first.startswith('{"note": "RANDOM WEIGHTS (tiny-sd): these fidelity numbers say nothing about real')
    assert json.loads(path.read_text())["pick"]["interval"] == 2
    table = made.markdown().splitlines()
    assert table[0] == made.note
    rows = [line for line in table if line.startswith("| I")]
    assert len(rows) == len(TABLE) and all("—" not in line.split("|")[1:-2] for line in rows)
    assert "| I2B0 | 2.00x |" in made.markdown() and "**pick** front" in next(r for r in rows if "I2B0" in r)
    assert "0.9700 (6)" in rows[0]  # the worst drift and its step
    assert table[-1] == "- pick: I2B0 (2.00x, PSNR 30.00 dB, SSIM 0.900), the fastest with --min-psnr 28 dB"


def test_the_chart_is_written_with_identical_images_drawn_on_top(tmp_path):
    assert report(Budget(min_psnr=28)).chart(tmp_path / "tune.png") is None
    assert (tmp_path / "tune.png").stat().st_size > 10_000


def test_serving_reads_the_pick_and_the_levels_at_its_branch(tmp_path):
    path = report(Budget(min_psnr=28)).write(tmp_path)
    chosen = tune_report.tuned_pick(path, model=None, preset="tiny-sd", size=(32, 32), steps=4)
    assert (chosen.interval, chosen.branch, chosen.schedule, chosen.size) == (2, 0, "uniform", (32, 32))
    # every interval measured at the pick's branch and schedule, and interval 1 (no cache: any branch)
    assert list(chosen.levels) == [1, 2, 3, 5]
    assert chosen.levels[3] == dict(speedup=3.0, psnr_db=25, ssim=0.80, seconds=1 / 3)
    assert list(tune_report.levels(path, branch=1, schedule="uniform")) == [1, 2, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="tiny-sdxl"), "was tuned for tiny-sd, not tiny-sdxl"),
    (dict(size=(64, 64)), "was tuned at 32x32, not 64x64"),
    (dict(steps=25), "was tuned for 4 steps, not 25 (pass --steps 4)"),
])
def test_a_tune_file_for_another_model_size_or_steps_is_refused(tmp_path, kwargs, message):
    path = report(Budget(min_psnr=28)).write(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tune_report.tuned_pick(path, **dict(dict(model=None, preset="tiny-sd", size=(32, 32), steps=4), **kwargs))


def test_a_tune_file_without_a_pick_or_not_a_tune_file_is_refused(tmp_path):
    path = report(Budget()).write(tmp_path)
    with pytest.raises(ValueError, match="has no pick .* fastcache tune --resume"):
        tune_report.tuned_pick(path, model=None, preset="tiny-sd", size=None, steps=4)
    (tmp_path / "other.json").write_text("[1, 2]")
    for bad, message in ((tmp_path / "other.json", "not a fastcache tune file"), (tmp_path / "none.json",
                                                                                  "cannot read it")):
        with pytest.raises(ValueError, match=message):
            tune_report.levels(bad)
