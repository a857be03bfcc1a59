"""fastcache tune's measurements on the tiny preset: interval 1 gives identical images, the table is complete, FLOPs
are every UNet evaluation's, the drift is read after full steps only, --resume measures only what is missing, and
the compiled runtime measures what the eager one does."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TUNE
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastcache import cli
from fastcache.models import build_pipeline, random_prompt_embeds
from fastcache.tuning import sweep
from fastcache.tuning.report import Measurement


def rows(folder) -> dict[str, Measurement]:
    measured = (Measurement.from_dict(row) for row in json.loads((folder / "tune.json").read_text())["candidates"])
    return {row.name: row for row in measured}


def test_the_table_is_complete_and_interval_1_gives_identical_images(tiny_tune):
    folder, _ = tiny_tune
    measured = rows(folder)
    assert list(measured) == ["I1B0", "I2B0", "I2B1"]
    exact = measured["I1B0"]
    assert exact.psnr_db == exact.psnr_min_db == math.inf and exact.ssim == 1.0 and exact.flop_ratio == 1.0
    assert (exact.full_per_image, exact.shallow_per_image) == (4, 0)  # 4 steps, all full
    for name in ("I2B0", "I2B1"):
        cached = measured[name]
        assert (cached.full_per_image, cached.shallow_per_image, cached.fallbacks) == (2, 2, 0)  # steps 0, 2 full
        assert 10 < cached.psnr_min_db <= cached.psnr_db < math.inf and 0 < cached.ssim < 1
        assert cached.clip_score is not None and cached.seconds > 0 and cached.first_call_s > 0
        assert [step for step, _ in cached.drift] == [2]  # between the full steps 0 and 2, nowhere else
        assert -1 <= cached.drift[0][1] <= 1
    assert [step for step, _ in exact.drift] == [1, 2, 3]
    # a deeper branch recomputes more: more FLOPs, closer images
    assert measured["I2B0"].unet_tflop < measured["I2B1"].unet_tflop < exact.unet_tflop
    assert measured["I2B0"].psnr_db < measured["I2B1"].psnr_db
    table = (folder / "tune.md").read_text().splitlines()
    assert table[0].startswith("RANDOM WEIGHTS (tiny-sd): these fidelity numbers say nothing about real models")
    lines = [line for line in table if line.startswith("| I") or line.startswith("| uncached")]
    assert len(lines) == 4 and all(cell.strip() for line in lines for cell in line.split("|")[1:-2])
    assert "CLIP" in table[3] and "- no budget given" in table[-1]
    assert json.loads((folder / "tune.jsonl").read_text().splitlines()[0])["note"] == table[0]
    assert (folder / "tune.png").stat().st_size > 10_000


def test_unet_flops_are_every_evaluation_with_attention_counted(tiny_tune):
    """The reference's UNet FLOPs per image are exactly 4 steps of one UNet evaluation at its inputs (the CFG batch
    of 2), attention included on CPU too."""
    folder, _ = tiny_tune
    reference = json.loads((folder / "tune.json").read_text())["reference"]
    pipe = build_pipeline("tiny-sd")
    unet = pipe.unet
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(500),
                  encoder_hidden_states=random_prompt_embeds(pipe, 2)["prompt_embeds"])
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as direct:
            unet(**inputs)
        with sweep.unet_flops(unet) as counted:
            unet(**inputs)
            unet(**inputs)
        with FlopCounterMode(display=False) as fused:  # CPU's fused attention kernel is not counted by torch
            unet(**inputs)
    assert counted[0] == 2 * direct.get_total_flops() > 2 * fused.get_total_flops()
    assert reference["unet_tflop"] * 1e12 == pytest.approx(4 * direct.get_total_flops(), rel=1e-12)


def test_resume_measures_only_what_a_killed_run_left_out(tiny_tune, tmp_path, monkeypatch):
    folder, args = tiny_tune
    resumed = tmp_path / "out"
    shutil.copytree(folder, resumed)
    log = resumed / "tune.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # killed while writing its last line
    measured = []
    measure = sweep.Sweep.measure

    def recorded(self, candidate, *rest):
        measured.append(candidate.name)
        return measure(self, candidate, *rest)

    def no_reference(self):
        raise AssertionError("the reference was measured again")

    monkeypatch.setattr(sweep.Sweep, "measure", recorded)
    monkeypatch.setattr(sweep.Sweep, "reference", no_reference)
    assert cli.main([*args, "--out", str(resumed), "--resume"]) == 0
    assert measured == ["I2B1"]
    before, after = rows(folder), rows(resumed)
    assert list(after) == list(before)
    assert after["I2B1"].psnr_db == pytest.approx(before["I2B1"].psnr_db, rel=1e-9)  # same seeds, same images
    assert after["I2B0"] == before["I2B0"]  # kept as logged
    images = np.load(resumed / "reference.npz")["images"]
    assert images.shape == (2, 32, 32, 3)


def test_the_compiled_runtime_measures_what_the_eager_one_does(tiny_tune, tmp_path):
    """The tool's own path: compile_pipeline with torch.compile (what a GPU run uses), one candidate."""
    folder, _ = tiny_tune
    out = tmp_path / "compiled"
    argv = [*TINY_TUNE[:-4], "--intervals", "2", "--branches", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    compiled, eager = rows(out)["I2B0"], rows(folder)["I2B0"]
    assert (compiled.full_per_image, compiled.shallow_per_image, compiled.fallbacks) == (2, 2, 0)
    assert compiled.psnr_db == pytest.approx(eager.psnr_db, abs=0.5)
    assert compiled.drift[0][1] == pytest.approx(eager.drift[0][1], abs=1e-4)
    assert compiled.unet_tflop == eager.unet_tflop  # counted eagerly, whatever the candidate ran with
    assert compiled.first_call_s > compiled.seconds  # the first call compiled; it is not in the median
    assert json.loads((out / "tune.json").read_text())["identity"]["compile"] == "reduce-overhead"
