"""The persistent compile cache: PyTorch's own caches kept in one folder that a restart, or another replica, reuses.

Two mechanisms, both PyTorch's: inductor's and Triton's on-disk caches are pointed into the folder
(``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``), and after warm-up the process's cache artifacts
(``torch.compiler.save_cache_artifacts``: FX graphs, AOTAutograd, autotuning; Triton kernels ride along on CUDA) are
written to one file that the next process loads (``load_cache_artifacts``) before it compiles, so a fresh folder
(another machine's replica) warms up too. On CPU the artifacts hold generated C++ source, not binaries: keeping the
inductor folder itself is what makes a restart fast there. Dynamo still traces again in every process. The file's
name is a digest of everything the compiled code depends on (model, options, buckets, versions, card), so a
process never loads another configuration's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CompileCache:
    """The cache folder of one serving configuration. Creating it points inductor and Triton into the folder, so
    create it before anything compiles (it changes this process's environment)."""

    def __init__(self, directory: str | os.PathLike, identity: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.directory / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.directory / "triton")
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = self.directory / f"artifacts-{digest}.bin"
        self.loaded: int = 0  # artifacts loaded from the file

    def load(self) -> bool:
        """Load the artifacts a previous process saved for this configuration; whether there were any."""
        if not self.path.is_file():
            logger.info("fastcache: no compile cache at %s yet: cold warm-up", self.path)
            return False
        info = torch.compiler.load_cache_artifacts(self.path.read_bytes())  # None (and a warning) if unreadable
        self.loaded = _count(info)
        logger.info("fastcache: loaded %d compile cache artifacts from %s", self.loaded, self.path)
        return self.loaded > 0

    def save(self) -> int:
        """Write this process's cache artifacts (everything compiled so far); how many."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        data, info = saved
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(self.path)  # atomic: a replica starting now reads the old file or the new one
        count = _count(info)
        logger.info("fastcache: saved %d compile cache artifacts (%.1f MB) to %s", count, len(data) / 1e6, self.path)
        return count


def hits() -> dict[str, int]:
    """This process's compile cache hits and misses so far (inductor's FX graphs, AOTAutograd)."""
    from torch._dynamo.utils import counters

    return {f"{cache}_{kind}": counters[group][f"{cache}_cache_{kind}"]
            for group, cache in (("inductor", "fxgraph"), ("aot_autograd", "autograd")) for kind in ("hit", "miss")}


def _count(info) -> int:
    """Artifacts in a ``CacheInfo`` (``artifacts``: keys per kind of cache)."""
    return 0 if info is None else sum(len(keys) for keys in info.artifacts.values())
