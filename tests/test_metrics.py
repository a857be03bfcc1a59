"""ServeMetrics: what the service does is recorded as it happens, what the runtime did is read from the handles'
counters when scraped (added up over the base and an inpainting model), in a registry of its own."""

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from fastcache.counters import Counters
from fastcache.serving.metrics import ServeMetrics


def scrape(metrics: ServeMetrics) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_runtime_counters_are_read_when_scraped_and_added_up_over_handles():
    base, inpainting = SimpleNamespace(counters=Counters(full=3, shallow=5)), SimpleNamespace(
        counters=Counters(full=1, fallbacks=2, compile_failures=1))
    metrics = ServeMetrics([base, inpainting])
    first = scrape(metrics)
    assert first["fastcache_unet_steps_total{path=full}"] == 4
    assert first["fastcache_unet_steps_total{path=shallow}"] == 5
    assert first["fastcache_unet_fallbacks_total"] == 2 and first["fastcache_compile_failures_total"] == 1
    base.counters.full += 10
    assert scrape(metrics)["fastcache_unet_steps_total{path=full}"] == 14


def test_batches_count_images_and_padding():
    metrics = ServeMetrics()
    metrics.on_batch(3, 4)
    metrics.on_batch(1, 1)
    samples = scrape(metrics)
    assert samples["fastcache_images_total"] == 4 and samples["fastcache_padding_images_total"] == 1
    assert samples["fastcache_batch_images_count"] == 2 and samples["fastcache_batch_images_sum"] == 4
    assert not any(name.startswith("fastcache_unet_steps") for name in samples), "no handle, no runtime metrics"


def test_each_service_has_a_registry_of_its_own():
    first, second = ServeMetrics(), ServeMetrics()  # the same names twice in one process (tests, Ray replicas)
    first.requests.labels("200").inc()
    assert scrape(first)["fastcache_requests_total{status=200}"] == 1
    assert "fastcache_requests_total{status=200}" not in scrape(second)
