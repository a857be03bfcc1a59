"""bench/serve_load.py end to end on CPU: both phases measured against a launched tiny server (no timings asserted)."""

import json

from conftest import load_script


def test_serve_load_measures_both_phases_side_by_side(tmp_path, capsys):
    serve_load = load_script("bench/serve_load.py")
    results = serve_load.main(["--launch", "--preset tiny-sd --no-compile --sizes 32 --batch-sizes 1,2,4 --steps 2 "
                               "--max-delay-ms 200", "--clients", "4", "--requests", "8", "--out", str(tmp_path),
                               "--ready-timeout", "300"])
    batched, sequential = results
    assert batched["ok"] == sequential["ok"] == 8 and batched["failed"] == sequential["failed"] == 0
    assert sequential["batches"] == {"<=1": 8}  # one image per pipeline call
    assert sum(batched["batches"].values()) < 8  # concurrent clients were batched
    assert batched["card"] and batched["torch"]
    lines = [json.loads(line) for line in (tmp_path / "serve_load.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines] == ["batched", "sequential batch-1"]
    table = (tmp_path / "serve_load.md").read_text()
    assert "throughput, batched / sequential" in table and "| batched | 4 | 8/8 |" in table
    assert table.strip() in capsys.readouterr().out
