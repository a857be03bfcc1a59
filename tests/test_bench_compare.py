"""The benchmark's CPU smoke mode: every peer runs, the table and chart are written, the numbers are sane."""

import json
import os
import tempfile

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def compare():
    return load_script("bench/compare.py")


@pytest.mark.slow  # every peer compiled (~3-5 min here): the pipelines smoke represents the sweeps in CI
def test_smoke_runs_every_peer_side_by_side(compare, tmp_path):
    cache = tmp_path / "inductor"
    results = compare.main(["--smoke", "--out", str(tmp_path), "--cache-dir", str(cache)])
    assert {r.peer for r in results} == set(compare.SMOKE_PEERS)
    by_peer = {r.peer: r for r in results}
    assert by_peer["eager"].rel_l2_latents is None
    assert by_peer["compile"].rel_l2_latents < 1e-4  # compiling alone does not change the result
    assert 0 < by_peer["deepcache"].rel_l2_latents < 0.5
    assert by_peer["fastcache"].extra["rel_l2_vs_deepcache"] < 1e-4
    assert by_peer["fastcache-tuned"].rel_l2_latents == pytest.approx(by_peer["deepcache"].rel_l2_latents, rel=1e-3)
    assert by_peer["fastcache"].extra["graphs_after_warmup"] == by_peer["fastcache-tuned"].extra[
        "graphs_after_warmup"] == 0
    assert by_peer["compile"].extra["graphs_after_warmup"] == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(results) and all(row["weights"].startswith("random") for row in rows)
    assert {row["extra"]["compile_cache"] for row in rows} == {"per-peer (cold)"}
    assert "| fastcache |" in (tmp_path / "results.md").read_text()
    assert "inductor cache: per-peer (cold)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0
    # each compiled peer compiled into its own kept cache (the profiler reuses it); uncompiled peers have none
    assert sorted(path.name for path in cache.iterdir() if any(path.iterdir())) == ["compile", "fastcache",
                                                                                    "fastcache-tuned"]


@pytest.mark.slow  # a compiled sweep: the pipelines smoke represents the sweeps in CI
def test_shared_mode_compiles_every_peer_into_one_cache_emptied_once(compare, tmp_path, monkeypatch):
    cache = tmp_path / "inductor"
    events = []  # in order: the in-memory kernel caches cleared, each peer measured with the cache it was given
    clear, measure_peer = compare.clear_inductor_caches, compare.measure_peer

    def cleared():
        events.append("cleared")
        clear()

    def measured(runner, pipe, peer):
        events.append((peer, os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]))
        return measure_peer(runner, pipe, peer)

    monkeypatch.setattr(compare, "clear_inductor_caches", cleared)
    monkeypatch.setattr(compare, "measure_peer", measured)
    results = compare.main(["--smoke", "--peers", "eager,compile,fastcache", "--cache-mode", "shared",
                            "--out", str(tmp_path), "--cache-dir", str(cache)])
    assert [r.peer for r in results] == ["eager", "compile", "fastcache"]
    shared = str(cache / "shared")
    # emptied at the start, on exit (the caches point into the root), never between peers: later peers reuse kernels
    assert events == ["cleared", ("compile", shared, f"{shared}/triton"), ("fastcache", shared, f"{shared}/triton"),
                      "cleared"]
    assert [path.name for path in cache.iterdir()] == ["shared"] and any((cache / "shared").iterdir())
    by_peer = {r.peer: r for r in results}
    assert by_peer["fastcache"].extra["graphs_after_warmup"] == by_peer["compile"].extra["graphs_after_warmup"] == 0
    assert by_peer["fastcache"].warmup_s > 0  # each peer's own warm-up is still measured
    mode = "shared (later peers may reuse earlier peers' kernels)"
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["extra"]["compile_cache"] for row in rows] == [mode] * 3
    assert f"inductor cache: {mode}" in (tmp_path / "results.md").read_text()


def test_fidelity_adds_ssim_beside_psnr_under_a_random_weights_first_line(compare, tmp_path):
    results = compare.main(["--smoke", "--peers", "eager,deepcache", "--fidelity", "--out", str(tmp_path)])
    by_peer = {r.peer: r for r in results}
    assert by_peer["eager"].ssim is None and by_peer["eager"].psnr_db is None  # the reference itself
    cached = by_peer["deepcache"]
    assert 0 < cached.ssim < 1 and 0 < cached.psnr_db < float("inf")
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == compare.FIDELITY_NOTE and table[0].startswith("RANDOM WEIGHTS")
    assert "| PSNR dB | SSIM |" in table[3] and f"| {cached.ssim:.4f} |" in table[-1]
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])["ssim"] == cached.ssim


def test_the_full_benchmark_refuses_to_run_on_cpu(compare, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--subset", "gpu-check", "--out", str(tmp_path)])


def test_a_failing_peer_is_logged_and_the_others_still_run(compare, tmp_path, monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(compare, "measure_compile", out_of_memory)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "caller's")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    results = compare.main(["--smoke", "--peers", "eager,compile,deepcache", "--out", str(tmp_path)])
    assert [r.peer for r in results] == ["eager", "deepcache"]
    assert "compile failed at tiny-sd" in caplog.text
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    # without --cache-dir the peers' caches are temporary, and the caller's cache settings are left as they were
    assert not any((tmp_path / "tmp").iterdir())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "caller's" and "TRITON_CACHE_DIR" not in os.environ


@pytest.mark.slow  # a compiled sweep: the pipelines smoke represents the sweeps in CI
def test_controlnet_smoke_counts_what_caching_saves(compare, tmp_path):
    """The ControlNet subset on CPU: the shallow ControlNet's saving shows in FLOPs per call, and the compiled
    runtime computes what the helper computes."""
    results = compare.main(["--smoke", "--subset", "controlnet", "--peers", "eager,deepcache,fastcache",
                            "--out", str(tmp_path)])
    by_peer = {r.peer: r for r in results}
    assert {r.config for r in results} == {"tiny-sd +1 ControlNet 32 b1 I3B1"}
    tflop = {peer: by_peer[peer].extra["tflop_per_call"] for peer in ("eager", "deepcache", "fastcache")}
    assert tflop["fastcache"] < tflop["deepcache"] < tflop["eager"]
    assert by_peer["fastcache"].extra["rel_l2_vs_deepcache"] < 1e-4
    assert by_peer["fastcache"].extra["counters"]["controlnet_shallow"] > 0
    assert "TFLOP/call" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # ~3 min of compiled features: CI's representative of the smokes is the video smoke
def test_pipelines_smoke_measures_each_feature_and_what_a_change_costs(compare, tmp_path, monkeypatch):
    """The pipelines subset on CPU: a LoRA (hot-swap and per-call scale), FreeU, an IP-Adapter, PAG, each peer side
    by side, and the first call after a change with the graphs it made. Dynamo without inductor (backend "eager"):
    what is checked is which change compiles, and the cached path's result, not kernels."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend="eager", fullgraph=True,
                                                                         dynamic=False))
    results = compare.main(["--smoke", "--subset", "pipelines", "--peers", "eager,deepcache,fastcache",
                            "--out", str(tmp_path)])
    by = {(r.config.split(" +")[1].split()[0], r.peer): r for r in results}
    assert {feature for feature, _ in by} == set(compare.FEATURES) and len(results) == 12
    for feature in compare.FEATURES:
        fastcache = by[feature, "fastcache"]
        assert fastcache.extra["rel_l2_vs_deepcache"] < 1e-4, feature
        assert fastcache.extra["counters"]["fallbacks"] == 0 and fastcache.extra["counters"]["shallow"] > 0
        assert fastcache.extra["ms_per_image"] > 0 and fastcache.extra["change_s"] > 0
    # a hot-swap with a new per-call scale, and PAG's next call, compile nothing; new FreeU values and a new IP-Adapter
    # scale are constants: one graph per path
    assert {f: by[f, "fastcache"].extra["graphs_on_change"] for f in compare.FEATURES} == {
        "lora": 0, "pag": 0, "freeu": 2, "ip-adapter": 2}
    assert "change: first call s (graphs)" in (tmp_path / "results.md").read_text()


# -- video: seconds per video, compile seconds, and the fidelity over every frame and its consecutive differences -----

def test_the_video_subset_is_animatediff_at_512_then_svd_xt_at_1024x576_25_steps_and_needs_a_gpu(compare, tmp_path):
    assert [(c.name, c.steps) for c in compare.SUBSETS["video"]] == [("animatediff 512 16 frames b1 I3B0", 25),
                                                                      ("svd-xt 1024x576 14 frames b1 I3B0", 25)]
    assert compare.SUBSETS["video-svd"] == compare.SUBSETS["video"][1:]  # one model per device call
    with pytest.raises(SystemExit):
        compare.main(["--subset", "video", "--out", str(tmp_path)])


def test_video_smoke_times_each_video_and_scores_every_frame_and_the_flicker(compare, tmp_path):
    """Both tiny video presets (AnimateDiff from prompt embeddings, SVD from an image), eager and the DeepCache helper
    side by side: the helper's video against the uncached one on every frame and on consecutive-frame differences."""
    results = compare.main(["--smoke", "--subset", "video", "--peers", "eager,deepcache", "--steps", "3",
                            "--fidelity", "--out", str(tmp_path)])
    by = {(r.config, r.peer): r for r in results}
    configs = ["tiny-animatediff 16 4 frames b1 I3B1", "tiny-svd 16 4 frames b1 I3B1"]
    assert list(by) == [(config, peer) for config in configs for peer in ("eager", "deepcache")]
    for config in configs:
        eager, cached = by[config, "eager"], by[config, "deepcache"]
        assert eager.psnr_db is None and "temporal_psnr_db" not in eager.extra  # the reference itself
        assert 0 < cached.rel_l2_latents < 1  # two of three steps reuse the deep feature
        assert cached.extra["psnr_min_db"] <= cached.psnr_db < float("inf") and 0 < cached.ssim < 1
        assert cached.extra["temporal_psnr_min_db"] <= cached.extra["temporal_psnr_db"] < float("inf")
        assert cached.extra["s_per_video"] == cached.seconds and cached.extra["frames"] == 4
        assert cached.extra["compile_s"] >= 0 and cached.extra["steps"] == 3
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == compare.FIDELITY_NOTE
    assert table[3] == ("| config | steps | peer | s/video | speed-up vs eager | vs DeepCache | vs compile | "
                        "compile s | rel L2 | PSNR dB (worst frame) | SSIM | temporal PSNR dB (worst pair) | "
                        "peak reserved GiB | graphs after warm-up |")
    svd = by[configs[1], "deepcache"]
    assert table[-1].startswith(f"| {configs[1]} | 3 | deepcache | {svd.seconds:.3f} | ")
    assert (f"| {svd.psnr_db:.1f} ({svd.extra['psnr_min_db']:.1f}) | {svd.ssim:.4f} | "
            f"{svd.extra['temporal_psnr_db']:.1f} ({svd.extra['temporal_psnr_min_db']:.1f}) |") in table[-1]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["steps"] for row in rows] == [3] * 4 and rows[-1]["extra"]["temporal_psnr_db"] == svd.extra[
        "temporal_psnr_db"]


@pytest.mark.slow  # every peer through dynamo on both tiny video presets (minutes here)
def test_video_smoke_runs_every_video_peer_and_fastcache_equals_the_helper(compare, tmp_path, monkeypatch):
    """The four video peers on CPU, dynamo without inductor (backend "eager"): torch.compile alone leaves the video
    as it was, fastcache makes the helper's video, and nothing compiles after the warm-up."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend="eager", fullgraph=True,
                                                                         dynamic=False))
    results = compare.main(["--smoke", "--subset", "video", "--out", str(tmp_path)])
    assert {r.peer for r in results} == set(compare.VIDEO_PEERS) and len(results) == 8
    for r in results:
        assert r.extra["graphs_after_warmup"] == 0, (r.config, r.peer)
        if r.peer == "compile":
            assert r.rel_l2_latents < 1e-4 and r.extra["compile_s"] > 0
        if r.peer == "fastcache":
            assert r.extra["rel_l2_vs_deepcache"] < 1e-4
            assert r.extra["counters"]["fallbacks"] == 0 and r.extra["counters"]["shallow"] > 0
    assert "| fastcache |" in (tmp_path / "results.md").read_text()
