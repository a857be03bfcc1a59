"""bench/device_check.sh's control flow on CPU: fake python3 and nvidia-smi first on PATH log each call and write
what the real stage would into $OUT, so the stage order, arguments, budget and output handling are checked without a
GPU (the one device call a session gets must not be spent finding a shell mistake)."""

import gzip
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = "eager,deepcache,compile,fastcache,fastcache-static-fused"
STAGE_OF = {"pytest": "tests", "bench/compare.py": "bench", "tools/profile_steps.py": "profile",
            "fastcache.cli": "warmup", "bench/serve_load.py": "serve-load", "bench/cold_start.py": "cold-start"}

# one line a call (the import check's code has a newline); the inductor cache it was given at the end
FAKE_PYTHON = r"""#!/bin/sh
printf '%s ' python3 "$@" "cache=${TORCHINDUCTOR_CACHE_DIR:-none}" | tr '\n' ' ' >> "$FAKE_LOG"
echo >> "$FAKE_LOG"
while [ $# -gt 0 ]; do
    case "$1" in
        tune) FAKE_TUNE=1 ;;
        pytest) echo "fake pytest: 1 passed" | tee "$OUT/fake_pytest.txt"
                [ -z "${FAKE_PYTEST_SLEEP:-}" ] || exec sleep "$FAKE_PYTEST_SLEEP" ;;
        --out) mkdir -p "$2"; echo '{"peer": "eager"}' > "$2/results.jsonl"; echo "fake bench: 1 peer"
               [ -z "${FAKE_TUNE:-}" ] || for f in tune.md tune.json tune.jsonl tune.png reference.npz; do
                   echo fake > "$2/$f"; done ;;
        --cache-dir) mkdir -p "$2/shared" ;;
        --trace) echo '{"traceEvents": []}' > "$2"; echo "fake profile" ;;
        --report) echo '{"cache": "cold"}' >> "$2"; echo "fake warm-up" ;;
    esac
    shift
done
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
echo "nvidia-smi $*" >> "$FAKE_LOG"
echo "NVIDIA H100 80GB HBM3, 570.00, 81559 MiB"
"""


class Run:
    def __init__(self, tmp_path: Path, *stages: str, timeout: float = 60, **env: str):
        bin_dir, self.out, self.scratch = tmp_path / "bin", tmp_path / "out", tmp_path / "scratch"
        bin_dir.mkdir()
        for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        log = tmp_path / "calls.log"
        ours = ("BUDGET_S", "PEERS", "SUBSET", "VARIANT", "VIDEO", "VIDEO_PEERS", "VIDEO_REPEAT")
        environment = {k: v for k, v in os.environ.items() if k not in ours}
        environment.update(PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(self.out), SCRATCH=str(self.scratch),
                           WHEELS=str(tmp_path / "no-wheels"), FAKE_LOG=str(log))
        environment.update(env)
        # output to files, not pipes: a sleeping fake left behind by a timeout cannot hold this test up
        stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
        start = time.monotonic()
        with open(stdout, "w") as out, open(stderr, "w") as err:
            self.returncode = subprocess.run(["bash", "bench/device_check.sh", *stages], cwd=ROOT, env=environment,
                                             stdout=out, stderr=err, timeout=timeout).returncode
        self.seconds = time.monotonic() - start
        self.stdout, self.stderr = stdout.read_text(), stderr.read_text()
        self.calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    @property
    def stages(self) -> list[str]:
        return [STAGE_OF[word] for call in self.calls for word in call[1:3] if word in STAGE_OF]

    def args(self, stage: str) -> list[str]:
        return next(call for call in self.calls if any(STAGE_OF.get(word) == stage for word in call[1:3]))


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_default_is_the_gpu_tests_then_the_bench_of_five_peers_in_one_shared_cache(tmp_path):
    run = Run(tmp_path)
    assert run.returncode == 0, run.stderr
    assert "install skipped" in run.stdout
    assert run.calls[0][0] == "nvidia-smi"
    assert run.calls[1][:3] == ["python3", "-c", "import"]  # the import check goes through the same python3
    assert run.stages == ["tests", "tests", "bench"]  # the GPU tests, then their settings tests as a row of their own
    tests = [" ".join(call) for call in run.calls if "pytest" in call]
    assert "-k not settings " in tests[0] and "-k settings " in tests[1]
    bench = run.args("bench")
    assert option(bench, "--subset") == "gpu-check"
    assert option(bench, "--peers") == DEFAULT_PEERS
    assert option(bench, "--cache-mode") == "shared"
    assert option(bench, "--out") == str(run.out)
    # each stage's output is kept in $OUT beside what it wrote there itself
    assert (run.out / "gpu_tests.log").read_text().count("fake pytest: 1 passed") == 2
    assert (run.out / "fake_pytest.txt").exists()
    assert "fake bench: 1 peer" in (run.out / "bench.log").read_text()
    assert (run.out / "results.jsonl").exists()
    assert not (run.out / "profile.log").exists()
    assert "device_check:" in run.stdout


def test_profile_runs_only_when_asked_and_reuses_the_bench_cache(tmp_path):
    run = Run(tmp_path, "bench", "profile", PEERS="compile,fastcache")
    assert run.returncode == 0, run.stderr
    assert run.stages == ["bench", "profile"]
    assert option(run.args("bench"), "--peers") == "compile,fastcache"
    profile = run.args("profile")
    assert option(profile, "--variant") == "fastcache-tuned"
    assert profile[-1] == f"cache={run.scratch / 'inductor' / 'shared'}"
    assert "fake profile" in (run.out / "profile.log").read_text()
    assert gzip.decompress((run.out / "trace.json.gz").read_bytes()).startswith(b'{"traceEvents"')


def test_wheels_are_installed_when_there_are_some(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").touch()
    run = Run(tmp_path, "tests", WHEELS=str(wheels))
    assert run.returncode == 0, run.stderr
    pip = next(call for call in run.calls if call[1:4] == ["-m", "pip", "install"])
    assert option(pip, "--target") == str(run.scratch / "site")
    assert str(wheels / "diffusers-0.42.1-py3-none-any.whl") in pip


def test_an_unknown_stage_exits_2_before_anything_runs(tmp_path):
    run = Run(tmp_path, "tests", "bnech")
    assert run.returncode == 2
    assert "unknown stage bnech" in run.stderr
    assert run.calls == []


def test_a_stage_is_cut_at_the_budget_and_the_next_skipped(tmp_path):
    # the GPU tests hang: they get what is left of 32 s, then the bench has under 30 s and is skipped
    run = Run(tmp_path, BUDGET_S="32", FAKE_PYTEST_SLEEP="300")
    assert run.stages == ["tests"]
    assert "skipped, " in run.stdout and "s of the budget left: python3 bench/compare.py" in run.stdout
    assert "fake pytest: 1 passed" in (run.out / "gpu_tests.log").read_text()
    assert 25 < run.seconds < 40


def test_serve_measures_cold_and_warm_starts_dynamic_and_static_then_loads_a_server_from_the_cache(tmp_path):
    run = Run(tmp_path, "serve", BATCHES="1,2")
    assert run.returncode == 0, run.stderr
    assert any("fastapi" in " ".join(call) for call in run.calls)  # the serving packages are checked first
    assert run.stages == ["cold-start", "serve-load"]
    cold_start = run.args("cold-start")
    assert [option(cold_start, name) for name in ("--preset", "--device", "--batch-sizes", "--steps", "--tag")] == [
        "sd21", "cuda", "1,2", "50", "gpu"]
    assert "--single=" in cold_start and "--modes" not in cold_start  # no baseline run; both modes (the default)
    assert 400 < int(option(cold_start, "--budget-s")) <= 440  # within what the stage's timeout gives it
    cache = str(run.scratch / "cold-start")
    assert option(cold_start, "--scratch") == cache and option(cold_start, "--out") == str(run.out)
    load = run.args("serve-load")
    assert "--cache-dir" in load and f"{cache}/dynamic-all" in load  # the launched server's arguments
    assert "fake bench" in (run.out / "serve.log").read_text()


def test_tune_measures_nine_candidates_on_sd21_512_resumably_and_brings_back_its_report(tmp_path):
    run = Run(tmp_path, "tune")
    assert run.returncode == 0, run.stderr
    (call,) = [call for call in run.calls if call[1:4] == ["-m", "fastcache.cli", "tune"]]
    assert [option(call, name) for name in ("--preset", "--device", "--size", "--steps", "--num-prompts")] == [
        "sd21", "cuda", "512", "50", "8"]
    assert option(call, "--intervals") == "2,3,5" and option(call, "--branches") == "0,1,2"
    assert option(call, "--out") == str(run.scratch / "tune") and "--resume" in call  # a warm machine resumes
    assert call[-1] == f"cache={run.scratch / 'inductor' / 'tune'}"
    for name in ("tune.md", "tune.json", "tune.jsonl", "tune.png", "tune.log"):
        assert (run.out / name).exists(), name
    assert not (run.out / "reference.npz").exists()  # the reference images stay on the machine


def test_video_runs_animatediff_then_svd_each_in_its_folder_with_the_video_peers(tmp_path):
    run = Run(tmp_path, "video")
    assert run.returncode == 0, run.stderr
    imports = next(" ".join(call) for call in run.calls if call[1] == "-c" and "transformers" in " ".join(call))
    assert "CLIPVisionModelWithProjection" in imports and "fastcache.video_models" in imports  # checked first
    benches = [call for call in run.calls if "bench/compare.py" in call]
    assert [option(call, "--subset") for call in benches] == ["video-animatediff", "video-svd"]
    for call, model in zip(benches, ("animatediff", "svd"), strict=True):
        assert option(call, "--peers") == "eager,deepcache,compile,fastcache"
        assert option(call, "--repeat") == "2" and option(call, "--cache-mode") == "shared"
        assert option(call, "--out") == str(run.out / f"video-{model}")
        assert (run.out / f"video-{model}" / "results.jsonl").exists()
        assert "fake bench: 1 peer" in (run.out / f"video-{model}" / "video.log").read_text()
    assert not (run.out / "results.jsonl").exists() and not (run.out / "gpu_tests.log").exists()  # opt-in, alone


def test_video_measures_the_models_asked_for_and_refuses_an_unknown_one_before_anything_runs(tmp_path):
    for name in ("one", "bad"):
        (tmp_path / name).mkdir()
    run = Run(tmp_path / "one", "video", VIDEO="svd", VIDEO_PEERS="eager,fastcache", VIDEO_REPEAT="3")
    assert run.returncode == 0, run.stderr
    (call,) = [call for call in run.calls if "bench/compare.py" in call]
    assert [option(call, name) for name in ("--subset", "--peers", "--repeat")] == ["video-svd", "eager,fastcache", "3"]
    bad = Run(tmp_path / "bad", "video", VIDEO="animatediff,sdv")
    assert bad.returncode == 2 and "unknown VIDEO model sdv (animatediff, svd)" in bad.stderr
    assert bad.calls == []
