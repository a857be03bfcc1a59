"""What each install of fastcache can do, run by .ci/run with the python of a fresh venv holding that install alone:

    python .ci/extras_check.py core    # pip install -e .            (torch, diffusers, transformers, numpy, tqdm)
    python .ci/extras_check.py serve   # pip install -e ".[serve]"   ... and so on for tune, video, ray

core: none of the extras' packages is installed, yet the main job (python -m fastcache, eager) and compile_pipeline
run, and a command whose extra is missing is one line naming its pip install (exit code 2). Each extra: its commands
run as a user runs them (a served generation, a tune, an MP4, Ray Serve's imports). Every wait is bounded; the only
processes stopped are this script's own, by pid.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its import-time notices (torchvision) would bury the log

EXTRA_PACKAGES = ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "peft", "torchmetrics", "matplotlib",
                  "ray", "av")
TINY = ["--preset", "tiny-sd", "--no-compile"]


def run(*args: str, timeout: float = 900, expect: int = 0, cwd: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if out.returncode != expect:
        raise SystemExit(f"{' '.join(args)}: exit code {out.returncode}, not {expect}\n{out.stdout[-3000:]}\n"
                         f"{out.stderr[-5000:]}")
    return out


def one_line_naming(extra: str, *command: str) -> None:
    """``fastcache COMMAND`` without ``extra``: exit code 2 and one line naming its pip install, no traceback."""
    err = run("-m", "fastcache.cli", *command, expect=2).stderr
    assert err.count("\n") == 1 and f'pip install "fastcache[{extra}]"' in err, err
    print(f"fastcache {' '.join(command)} without the {extra} extra: {err.strip()}")


def core() -> None:
    installed = [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is not None]
    assert not installed, f"the core install brought {installed}"
    # NOTE: the main job as the README runs it, but eager: its default compiles both UNet paths with inductor, which
    # needs nothing the core install lacks (torch's own) and takes minutes of CPU here (the compiled tests cover it)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        out = run("-m", "fastcache", "--variant", "fastcache-eager", "--output", str(Path(folder) / "fastcache.png"),
                  cwd=folder)
    print(f"python -m fastcache --variant fastcache-eager: {time.monotonic() - start:.0f} s\n{out.stdout.strip()}")
    code = ("import sys\n"
            "import fastcache\n"
            "from fastcache.models import build_pipeline, random_prompt_embeds\n"
            "pipe = build_pipeline('tiny-sd')\n"
            "handle = fastcache.compile_pipeline(pipe, interval=2, compile=False)\n"
            "pipe(num_inference_steps=4, height=32, width=32, **random_prompt_embeds(pipe))\n"
            "assert handle.counters.fallbacks == 0 and handle.counters.shallow > 0, handle.counters\n"
            f"loaded = [name for name in {('fastapi', 'uvicorn', 'torchmetrics', 'peft', 'prometheus_client')!r} "
            "if name in sys.modules]\n"
            "assert not loaded, loaded\n"
            "print('compile_pipeline ran', handle.counters.full, 'full and', handle.counters.shallow, 'shallow "
            "evaluations; loaded none of fastapi, uvicorn, torchmetrics, peft, prometheus_client')\n")
    print(run("-c", code).stdout.strip())
    one_line_naming("serve", "serve", *TINY)
    one_line_naming("serve", "warmup", *TINY)
    one_line_naming("tune", "tune", *TINY, "--out", tempfile.mkdtemp())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve() -> None:
    """A real ``fastcache serve`` on loopback: ready, one generation answered with an image, stopped by SIGTERM."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "fastcache.cli", "serve", *TINY, "--sizes", "32", "--steps", "2",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"fastcache serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "fastcache serve was not ready in 600 s"
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        body = json.dumps({"prompt": "a lighthouse", "seed": 1}).encode()
        request = urllib.request.Request(f"{url}/v1/images/generations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            image = json.loads(response.read())["data"][0]["b64_json"]
        assert response.status == 200 and len(image) > 100
        print(f"fastcache serve: ready, answered a generation ({len(image)} base64 characters)")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            output = proc.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, f"fastcache serve exited with {proc.returncode} after SIGTERM:\n{output[-3000:]}"
    import peft  # noqa: F401 (serve --lora)

    import fastcache.serving.loras  # noqa: F401


def tune() -> None:
    with tempfile.TemporaryDirectory() as folder:
        run("-m", "fastcache.cli", "tune", *TINY, "--size", "32", "--steps", "2", "--num-prompts", "1", "--intervals",
            "1,2", "--branches", "0", "--out", folder)
        written = sorted(path.name for path in Path(folder).iterdir())
    assert {"tune.json", "tune.jsonl", "tune.md", "tune.png"} <= set(written), written
    print(f"fastcache tune: wrote {', '.join(written)}")


def video() -> None:
    import av
    import numpy as np

    from fastcache.extras import missing

    assert missing("video") is None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for index in range(4):
                frame = np.full((32, 32, 3), index * 60, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        with av.open(str(path)) as container:
            frames = sum(1 for _ in container.decode(video=0))
    assert frames == 4, frames
    print(f"PyAV {av.__version__}: wrote and read back a 4-frame MP4")


def ray() -> None:
    import ray.serve  # noqa: F401

    import fastcache.serving.ray_serve  # noqa: F401
    from fastcache.extras import missing

    assert missing("ray") is None and missing("serve") is None
    print("ray.serve and fastcache.serving.ray_serve import")


if __name__ == "__main__":
    {"core": core, "serve": serve, "tune": tune, "video": video, "ray": ray}[sys.argv[1]]()
