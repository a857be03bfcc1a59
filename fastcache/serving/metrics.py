"""Prometheus metrics of one serving process, in its own registry (several apps can live in one process, as in tests).

What the service does (requests, latency, queue, batches, images, warm-up) is recorded as it happens; what the
runtime does (UNet steps by path, fallbacks, compile failures) is read from the handles' ``Counters`` at scrape time,
as are the served LoRA adapters' images per adapter set and hot-swaps, and GPU memory from torch, so nothing is
counted twice.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# Counters fields exported, as (metric suffix, label or None, help)
_RUNTIME = {
    "full": ("unet_steps", "full", "UNet evaluations by path, since start (warm-up included)"),
    "shallow": ("unet_steps", "shallow", "UNet evaluations by path, since start (warm-up included)"),
    "fallbacks": ("unet_fallbacks", None, "UNet evaluations that ran the original forward (unsupported arguments)"),
    "compile_failures": ("compile_failures", None, "(shape, path) pairs whose compile or capture failed; they run "
                                                   "eagerly"),
    "compiles": ("compiles", None, "(shape, path) pairs compiled"),
    "captures": ("captures", None, "CUDA graphs captured by hand"),
}


class ServeMetrics:
    """The metrics ``GET /metrics`` exposes, for one engine and the fastcache handles of its pipelines (the base
    model's, an inpainting model's), whose counters are added up, and the LoRA adapters it serves (``ServedLoras``)."""

    def __init__(self, handles=(), loras=None):
        self.registry = registry = CollectorRegistry()
        self.latency = Histogram("fastcache_request_seconds", "Time from request to response of answered "
                                 "generations (200), seconds",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("fastcache_requests", "Image requests answered, by HTTP status", ["status"],
                                registry=registry)
        self.queue_depth = Gauge("fastcache_queue_depth", "Images waiting for a pipeline call (--max-queue bounds it)",
                                 registry=registry)
        self.batch_images = Histogram("fastcache_batch_images", "Images per pipeline call (without padding)",
                                      buckets=BATCH_BUCKETS, registry=registry)
        self.padded_images = Counter("fastcache_padding_images", "Images computed only to fill a warmed batch size",
                                     registry=registry)
        self.images = Counter("fastcache_images", "Images generated for requests", registry=registry)
        self.warmup_seconds = Gauge("fastcache_warmup_seconds", "Seconds the warm-up took, by compile cache state "
                                    "(cold: nothing loaded; warm: artifacts loaded from --cache-dir)", ["cache"],
                                    registry=registry)
        self.eager_buckets = Gauge("fastcache_eager_buckets", "Warmed buckets whose compile failed, served eagerly",
                                   registry=registry)
        registry.register(_RuntimeCollector(list(handles), loras))

    def on_batch(self, images: int, padded_to: int) -> None:
        self.batch_images.observe(images)
        self.images.inc(images)
        self.padded_images.inc(padded_to - images)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeCollector:
    """The handles' counters (added up), the served LoRAs' counts and the GPU's memory, read when scraped. Images per
    LoRA adapter set are labelled by the set's names sorted: only loaded names can appear, at most ``--lora-slots``
    in a set, so the labels are bounded."""

    def __init__(self, handles: list, loras=None):
        self.handles, self.loras = handles, loras

    def collect(self):
        if self.handles:
            families = {}  # one family per metric name, a sample per path
            for name, (suffix, path, help_text) in _RUNTIME.items():
                if suffix not in families:
                    families[suffix] = CounterMetricFamily(f"fastcache_{suffix}", help_text,
                                                           labels=["path"] if path else [])
                value = sum(getattr(handle.counters, name) for handle in self.handles)
                families[suffix].add_metric([path] if path else [], value)
            yield from families.values()
        if self.loras is not None:
            images = CounterMetricFamily("fastcache_lora_images", "Images generated for requests, by LoRA adapter set "
                                         "(names sorted, comma-separated; none: no adapter)", labels=["adapters"])
            for label, count in self.loras.images.copy().items():  # a copy: the engine's thread adds sets
                images.add_metric([label], count)
            yield images
            yield CounterMetricFamily("fastcache_lora_switches", "Pipeline calls whose LoRA adapters or weights "
                                      "differ from the previous call's (no compile: slots hot-swapped, scalings set)",
                                      value=self.loras.switches)
            yield CounterMetricFamily("fastcache_lora_hotswaps", "LoRA adapters copied into a slot (a call's set "
                                      "named one that no slot held)", value=self.loras.hotswaps)
        if torch.cuda.is_available():
            memory = GaugeMetricFamily("fastcache_gpu_memory_bytes", "GPU memory held by torch", labels=["kind"])
            memory.add_metric(["allocated"], torch.cuda.memory_allocated())
            memory.add_metric(["reserved"], torch.cuda.memory_reserved())
            yield memory
