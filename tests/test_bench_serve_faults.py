"""bench/serve_faults.py at small sizes against launched tiny servers on 127.0.0.1 (no timings asserted): a soak, a
burst against a small queue, and (slow) a Ray replica killed under load. The full-size runs are the benchmark's; the
fuzz's share of the tests is in test_edge.py."""

import json

import pytest
from conftest import load_script

faults = load_script("bench/serve_faults.py")


def run(tmp_path, *arguments: str) -> dict:
    (name,) = [a for a in arguments if a in faults.RUNS]
    figures = faults.main([*arguments, "--out", str(tmp_path), "--ready-timeout", "300"])[name]
    assert json.loads((tmp_path / f"serve_faults_{name}.json").read_text())["targets"] == figures["targets"]
    assert "| target | held |" in (tmp_path / f"serve_faults_{name}.md").read_text()
    return figures


def test_a_soak_of_200_requests_has_no_error_no_memory_growth_and_exact_images(tmp_path):
    figures = run(tmp_path, "soak", "--soak-requests", "200", "--soak-clients", "8", "--soak-memory-at", "50")
    assert all(figures["targets"].values()), figures["targets"]
    assert figures["ok"] == 200 and figures["errors"] == 0 and figures["answered_200_by_metrics"] == 200
    assert set(figures["rss_mb_at"]) == {"50", "200"} and figures["images_checked"] == 20
    assert figures["queue_samples"] >= 1 and figures["p50_s"] <= figures["p99_s"]
    assert sum(figures["batches"].values()) < 200  # eight clients were batched


def test_a_burst_of_60_against_a_queue_of_8_gets_200_or_429_and_loses_none(tmp_path):
    figures = run(tmp_path, "burst", "--burst-requests", "60", "--burst-max-queue", "8")
    assert all(figures["targets"].values()), figures["targets"]
    outcomes = figures["outcomes"]
    assert outcomes.get("200", 0) + outcomes.get("429", 0) == 60
    assert outcomes.get("429", 0) >= 1 and outcomes.get("200", 0) >= 8  # the queue filled, and what it held was served
    assert figures["images_checked"] == outcomes["200"]


@pytest.mark.slow
def test_a_ray_replica_killed_under_load_is_replaced_warm_and_nothing_hangs(tmp_path):
    pytest.importorskip("ray.serve")
    figures = run(tmp_path, "ray")
    assert all(figures["targets"].values()), figures["targets"]
    assert figures["replacement_compile_cache"] == "warm" and figures["recovery_seconds"] > 0
    assert figures["killed_pid"] not in figures["pids_after"]
