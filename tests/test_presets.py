"""The presets and what a model's configs say, known without diffusers' pipelines: the command line checks its
arguments with this module alone."""

import subprocess
import sys

import diffusers
import pytest

from fastcache.presets import INPAINT_PRESETS, PRESETS, model_geometry, preset_spec, size_problem


def test_every_preset_names_a_diffusers_pipeline_class():
    for name in [*PRESETS, *INPAINT_PRESETS]:
        kind = getattr(diffusers, preset_spec(name)["pipeline"])
        assert issubclass(kind, diffusers.DiffusionPipeline), name


def test_geometry_and_sizes():
    geometry = model_geometry(None, "tiny-sd")
    assert (geometry.pixel_multiple, geometry.native_size, geometry.branches) == (8, 32, 9)
    assert size_problem(32, 48, 8) is None
    assert size_problem(33, 32, 8) == "width and height must be multiples of 8 pixels, from 8 to 33; got 33x32."
    assert "from 8 to 64" in size_problem(80, 32, 8, max_size=64)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_spec("sd9")


def test_reading_presets_imports_no_diffusers():
    code = ("import sys, fastcache.presets, fastcache.cli_options\n"
            "print(sorted(name for name in ('diffusers', 'transformers') if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
