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
    (dict(engine=EngineConfig(intervals=(1, 2))), ValueError, r"intervals must include the server's interval \(3\)"),
    (dict(engine=EngineConfig(intervals=(1, 3)), cache=FastCacheConfig(schedule=[0, 2])), ValueError,
     "intervals need a uniform or quad-center schedule"),
    (dict(inpaint_model="/x", inpaint_preset="tiny-sd-inpaint"), ValueError,
     "inpaint_model and inpaint_preset are exclusive"),
    (dict(inpaint_preset="tiny-sd"), ValueError, r"inpaint_preset must be one of \['sd15-inpaint', 'tiny-sd-inpaint'"),
    (dict(inpaint_preset="tiny-sd-inpaint", engine=EngineConfig(edits=("img2img",))), ValueError,
     "engine.edits must include 'inpaint'"),
    (dict(level_labels={1: 2.0}), TypeError, "level_labels must map intervals to mappings"),
])
def test_service_options_check_themselves(fields, error, message):
    with pytest.raises(error, match=message):
        ServiceOptions(**fields)


def test_steps_the_scheduler_cannot_run_are_refused_before_serving():
    # DDIM (the tiny preset's) fails at 1000 steps, its training timesteps (IndexError), and refuses more
    options = ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(max_steps=1000))
    with pytest.raises(ValueError, match="max_steps must be below this model's 1000 training timesteps"):
        Service(options)


def test_a_size_that_the_loaded_model_cannot_make_is_refused_before_serving():
    # the tiny preset makes multiples of 8 pixels (its VAE scales by 2, its UNet downsamples by 4)
    options = ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((36, 36),),
                                                                                       pixel_multiple=4))
    with pytest.raises(ValueError, match="sizes must be multiples of 8 pixels for this model; got 36x36"):
        Service(options)


def test_the_compile_cache_identity_covers_compiled_code_only():
    service = Service(ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((32, 32),)),
                                     inpaint_preset="tiny-sd-inpaint", level_labels={3: {"speedup": 2.0}}))
    identity = service.identity()
    assert identity["cache"]["interval"] == 3 and identity["engine"] == {
        "batch_sizes": (1,), "sizes": ((32, 32),), "guidance": (True,), "edits": ("img2img", "inpaint")}
    assert identity["inpaint_preset"] == "tiny-sd-inpaint"  # its UNet's graphs are in the cache too
    assert "seed" not in identity and "cache_dir" not in identity  # weights' values and folders are not code
    assert "level_labels" not in identity and identity["torch"] and identity["device"] == "cpu"


def test_an_inpainting_model_gets_its_own_handle_and_the_metrics_add_both_up():
    service = Service(ServiceOptions(cache=FastCacheConfig(compile=False), inpaint_preset="tiny-sd-inpaint",
                                     engine=EngineConfig(sizes=((32, 32),), steps=2)))
    report = service.warm_up(progress=False)
    base, inpainting = service.engine.handles
    assert service.engine.targets["inpaint"].pipe.unet.config.in_channels == 9 and inpainting is not base
    assert base.counters.full > 0 and inpainting.counters.full > 0  # warm-up ran both models
    assert len(report["buckets"]) == 3 and report["intervals"] == [3]
    full = sum(handle.counters.full for handle in (base, inpainting))
    assert f'fastcache_unet_steps_total{{path="full"}} {float(full)}' in service.metrics.exposition().decode()


def test_a_base_model_as_inpainting_model_is_refused(tmp_path):
    from fastcache.models import build_pipeline

    build_pipeline("tiny-sd").save_pretrained(tmp_path)
    options = ServiceOptions(cache=FastCacheConfig(compile=False), inpaint_model=str(tmp_path),
                             engine=EngineConfig(sizes=((32, 32),)))
    with pytest.raises(ValueError, match="UNet takes 9 input channels; this one takes 4"):
        Service(options)
