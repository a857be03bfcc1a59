"""The profiling tool's CPU smoke mode: the step breakdown follows the schedule and the trace is written."""

import json

from conftest import load_script


def test_smoke_profile_breaks_a_call_into_steps(tmp_path):
    trace, jsonl = tmp_path / "trace.json", tmp_path / "profile.jsonl"
    result = load_script("tools/profile_steps.py").main(["--smoke", "--trace", str(trace), "--json", str(jsonl)])
    steps = result["steps"]
    assert (steps["full"]["count"], steps["shallow"]["count"], steps["outside_unet"]["count"]) == (2, 4, 5)
    assert 0 < steps["shallow"]["tflop"] < steps["full"]["tflop"]
    assert steps["shallow"]["device_ms"] > 0 and result["vae_decode_ms"] > 0
    assert trace.stat().st_size > 0
    assert json.loads(jsonl.read_text())["config"] == "tiny-sd 32 b1 I3B0"
