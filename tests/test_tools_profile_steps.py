"""The profiling tool: the CPU smoke mode's step breakdown, and NVML readings taken while the work runs."""

import json
import sys
import time
import types

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def profile_steps():
    return load_script("tools/profile_steps.py")


def test_smoke_profile_breaks_a_call_into_steps(profile_steps, tmp_path):
    trace, jsonl = tmp_path / "trace.json", tmp_path / "profile.jsonl"
    result = profile_steps.main(["--smoke", "--trace", str(trace), "--json", str(jsonl)])
    steps = result["steps"]
    assert (steps["full"]["count"], steps["shallow"]["count"], steps["outside_unet"]["count"]) == (2, 4, 5)
    assert 0 < steps["shallow"]["tflop"] < steps["full"]["tflop"]
    assert steps["shallow"]["device_ms"] > 0 and result["vae_decode_ms"] > 0
    assert result["energy_j_per_image"] is None  # no NVML on CPU: reported as missing, not as zero
    assert trace.stat().st_size > 0
    assert json.loads(jsonl.read_text())["config"] == "tiny-sd 32 b1 I3B0"


def fake_pynvml(watts: float) -> types.ModuleType:
    """nvidia-ml-py's calls that the tool makes, on a card drawing ``watts`` on average (100 W, 3x that, ...)."""
    nvml = types.ModuleType("pynvml")
    start, polls = time.perf_counter(), []
    nvml.NVML_CLOCK_SM = 1
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda handle: int((time.perf_counter() - start) * watts * 1e3)  # mJ
    nvml.nvmlDeviceGetClockInfo = lambda handle, clock: 1980 if clock == nvml.NVML_CLOCK_SM else 0
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=len(polls) * 2**30)  # grows

    def power_mw(handle):
        polls.append(handle)
        return watts * 1e3 * (0.5 if len(polls) % 2 else 1.5)

    nvml.nvmlDeviceGetPowerUsage = power_mw
    return nvml


def test_nvml_readings_are_polled_while_the_work_runs(profile_steps, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(watts=200))
    nvml = profile_steps.NVML(torch.device("cuda", 0), period_s=0.005)
    with nvml.sampling() as readings:
        begin = time.perf_counter()
        time.sleep(0.2)
        seconds = time.perf_counter() - begin
        assert readings == {}  # filled on exit
    assert readings["energy_j"] == pytest.approx(200 * seconds, rel=0.25)
    samples = readings["nvml_samples"]
    assert samples >= 10
    assert readings["power_w_max"] == 300 and 100 <= readings["power_w_mean"] < 300
    assert readings["sm_clock_mhz_mean"] == 1980 and readings["memory_used_gib_max"] == samples


def test_without_nvml_there_are_no_readings(profile_steps, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    with profile_steps.NVML(torch.device("cuda", 0)).sampling() as readings:
        pass
    assert readings == {}


def test_readings_a_card_does_not_support_are_left_out(profile_steps, monkeypatch, caplog):
    nvml = fake_pynvml(watts=200)

    def unsupported(handle):
        raise RuntimeError("Not Supported")

    nvml.nvmlDeviceGetPowerUsage = unsupported
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with profile_steps.NVML(torch.device("cuda", 0), period_s=0.005).sampling() as readings:
        time.sleep(0.05)
    assert set(readings) == {"energy_j"} and readings["energy_j"] > 0
    assert "Not Supported" in caplog.text
