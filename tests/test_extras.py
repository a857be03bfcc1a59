"""The extras: each names a real extra of pyproject.toml, and a missing one is one line naming its pip install."""

from pathlib import Path

import pytest
import tomllib

from fastcache import extras
from fastcache.extras import EXTRAS, MissingExtra, install_command, missing, require

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def test_every_extra_checked_is_an_extra_of_pyproject_and_all_holds_them_all():
    optional = PYPROJECT["optional-dependencies"]
    assert set(EXTRAS) <= set(optional)
    (everything,) = optional["all"]
    assert set(everything.removeprefix("fastcache[").removesuffix("]").split(",")) == set(optional) - {"all"}
    assert "fastcache[serve]" in optional["ray"]


def test_the_core_is_what_compile_pipeline_and_the_main_job_need():
    names = {requirement.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for requirement in
             PYPROJECT["dependencies"]}
    assert names == {"torch", "diffusers", "transformers", "numpy", "tqdm"}


def test_a_missing_module_names_the_extra_and_its_pip_install(monkeypatch):
    assert missing("serve") is None and missing("tune") is None  # installed here
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    assert missing("serve") == 'the serve extra is not installed (no uvicorn): pip install "fastcache[serve]"'
    assert missing("serve", ("peft",)) is None
    with pytest.raises(MissingExtra, match=r'pip install "fastcache\[serve\]"'):
        require("serve")
    assert install_command("video") == 'pip install "fastcache[video]"'
