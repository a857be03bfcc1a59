"""FastCacheConfig (config.py): every option checked at construction, with a message naming what is valid;
``replace`` checks again; ``describe`` and ``plan``. (That a bad option leaves the pipeline untouched is test_handle's;
the branch's range needs the UNet and is checked there too.)"""

import dataclasses

import numpy as np
import pytest

from fastcache import FastCacheConfig
from fastcache.config import OPTION_NAMES
from fastcache.graphs import COMPILE_MODES
from fastcache.schedule import SCHEDULE_KINDS


@pytest.mark.parametrize("fields, error, message", [
    (dict(interval=0), ValueError, "interval must be an int >= 1; got 0."),
    (dict(interval=2.5), TypeError, r"interval must be an int >= 1; got 2.5 \(float\)."),
    (dict(branch=-1), ValueError, "branch must be an int >= 0; got -1."),
    (dict(branch=True), TypeError, "branch must be an int"),
    (dict(schedule="quad-center", center=-1), ValueError, "center must be an int >= 0"),
    (dict(schedule="quad-center", pow=1.0), ValueError, "quad-center needs a real pow > 1; got pow=1.0"),
    (dict(schedule="sometimes"), ValueError, r"schedule must be one of \('uniform', 'quad-center'\) or a list"),
    (dict(schedule=None), TypeError, "schedule must be one of"),
    (dict(schedule=5), TypeError, "schedule must be one of"),
    (dict(schedule=[0, False]), TypeError, "every explicit schedule entry must be an int"),
    (dict(schedule=[0, 2.0]), TypeError, "every explicit schedule entry must be an int"),
    (dict(schedule=[2, 4]), ValueError, "an explicit schedule must contain step 0, which fills the cache"),
    (dict(mode="fastest"), ValueError, "mode must be one of"),
    (dict(compile="yes"), TypeError, "compile must be True or False; got 'yes'."),
    (dict(compile_vae=1), TypeError, "compile_vae must be True or False; got 1."),
    (dict(dynamic_batch="no"), TypeError, "dynamic_batch must be True or False"),
    (dict(inductor_options=[("conv_1x1_as_mm", True)]), TypeError,
     "inductor_options must be a mapping of torch._inductor.config settings to values, or None; got list."),
    (dict(inductor_options={"conv_1x1_as_mm": True, "go_fast": True}), ValueError,
     r"unknown inductor options: 1 name \(go_fast\)"),
    (dict(mode="static-cudagraphs", inductor_options={"go_fast": True}), ValueError, "unknown inductor options"),
    (dict(compile=False, compile_vae=True), ValueError, "inductor_options and compile_vae need compile=True."),
    (dict(compile=False, inductor_options={"conv_1x1_as_mm": True}), ValueError, "need compile=True"),
])
def test_invalid_options_raise_at_construction_naming_what_is_valid(fields, error, message):
    with pytest.raises(error, match=message):
        FastCacheConfig(**fields)


def test_the_messages_list_every_valid_mode_and_schedule():
    with pytest.raises(ValueError) as mode:
        FastCacheConfig(mode="fastest")
    with pytest.raises(ValueError) as schedule:
        FastCacheConfig(schedule="sometimes")
    assert all(repr(name) in str(mode.value) for name in COMPILE_MODES), mode.value
    assert all(repr(kind) in str(schedule.value) for kind in SCHEDULE_KINDS), schedule.value


def test_numpy_integers_become_ints_and_an_explicit_schedule_a_tuple():
    config = FastCacheConfig(interval=np.int64(2), branch=np.int32(1), schedule=[0, np.int64(3)])
    assert (config.interval, config.branch, config.schedule) == (2, 1, (0, 3))
    assert type(config.interval) is int and type(config.branch) is int
    assert config == FastCacheConfig(interval=2, branch=1, schedule=(0, 3))
    assert hash(config) == hash(FastCacheConfig(interval=2, branch=1, schedule=(0, 3)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 4


def test_replace_checks_the_new_values_and_names_the_valid_options():
    config = FastCacheConfig(interval=4, branch=2)
    assert config.replace(interval=2) == FastCacheConfig(interval=2, branch=2)
    assert config.interval == 4, "a copy: the config itself never changes"
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        config.replace(interval=0)
    with pytest.raises(ValueError, match="need compile=True"):
        config.replace(compile=False, compile_vae=True)
    with pytest.raises(TypeError) as error:
        config.replace(cache_size=4, interval=2)
    assert str(error.value) == ("unknown fastcache options: 1 name (cache_size); valid: 10 options (e.g. interval, "
                                "branch, schedule, center, pow)."), "a count and five examples, in the options' order"
    assert OPTION_NAMES == ("interval", "branch", "schedule", "center", "pow", "compile", "mode", "inductor_options",
                            "compile_vae", "dynamic_batch")


def test_describe_is_one_line_of_every_option_that_changes_what_runs():
    assert FastCacheConfig().describe() == ("interval=3, branch=0, schedule=uniform, compile=reduce-overhead, "
                                            "inductor_options={}, compile_vae=False, dynamic_batch=True")
    tuned = FastCacheConfig(interval=5, branch=1, schedule="quad-center", mode="static-cudagraphs",
                            inductor_options={"conv_1x1_as_mm": True}, compile_vae=True, dynamic_batch=False)
    assert tuned.describe() == ("interval=5, branch=1, schedule=quad-center, compile=static-cudagraphs, "
                                "inductor_options={'conv_1x1_as_mm': True}, compile_vae=True, dynamic_batch=False")
    assert "schedule=explicit, compile=eager," in FastCacheConfig(schedule=[0, 2], compile=False).describe()


def test_plan_is_the_schedule_of_full_steps_the_options_describe():
    assert FastCacheConfig(interval=3).plan.full_steps(8) == {0, 3, 6}
    assert FastCacheConfig(interval=1).plan.full_steps(4) == {0, 1, 2, 3}
    assert FastCacheConfig(schedule=[0, 2, 3]).plan.full_steps(6) == {0, 2, 3}
    quad = FastCacheConfig(interval=5, schedule="quad-center", center=15, pow=1.4).plan
    assert sorted(quad.full_steps(50)) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]  # DeepCache's published list
    assert (quad.kind, quad.interval, quad.center, quad.pow) == ("quad-center", 5, 15, 1.4)
