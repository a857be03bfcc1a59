"""One serving process's options: checked where they live, so Python and Ray callers get the command line's checks;
the compile cache's identity covers what the compiled code depends on and nothing else."""

import pytest

from fastcache import FastCacheConfig
from fastcache.serving.engine import EngineConfig
from fastcache.serving.service import Service, ServiceOptions


@pytest.mark.parametrize("fields, error, message", [
    (dict(preset="sd99"), ValueError, "preset must be one of"),
    (dict(device="tpu"), ValueError, "device must be cpu, cuda or cuda:N"),
    (dict(device="cuda:x"), ValueError, "device must be cpu, cuda or cuda:N"),
    (dict(cache={"interval": 3}), TypeError, "cache must be a FastCacheConfig"),
    (dict(engine=None), TypeError, "engine must be a EngineConfig"),
    (dict(seed=-1), ValueError, "seed must be an integer >= 0"),
])
def test_service_options_check_themselves(fields, error, message):
    with pytest.raises(error, match=message):
        ServiceOptions(**fields)


def test_a_size_that_the_loaded_model_cannot_make_is_refused_before_serving():
    # the tiny preset makes multiples of 8 pixels (its VAE scales by 2, its UNet downsamples by 4)
    options = ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((36, 36),),
                                                                                       pixel_multiple=4))
    with pytest.raises(ValueError, match="sizes must be multiples of 8 pixels for this model; got 36x36"):
        Service(options)


def test_the_compile_cache_identity_covers_compiled_code_only():
    service = Service(ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((32, 32),))))
    identity = service.identity()
    assert identity["cache"]["interval"] == 3 and identity["engine"] == {
        "batch_sizes": (1,), "sizes": ((32, 32),), "guidance": (True,)}
    assert "seed" not in identity and "cache_dir" not in identity  # weights' values and folders are not code
    assert identity["torch"] and identity["device"] == "cpu"
