"""The command line's shared options and checks: a bad argument is refused before diffusers' pipelines or
transformers are imported, once, on one line; a command whose extra is missing names the pip install that adds it."""

import subprocess
import sys

import pytest
from conftest import MAX_ERROR_CHARS, ROOT, cli_error

from fastcache import cli, extras
from fastcache.cli_options import quiet_imports

HEAVY = ("transformers", "diffusers.models", "diffusers.pipelines", "fastcache.handle", "fastapi", "torchmetrics")


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the arguments were checked")


def test_a_bad_argument_is_refused_before_anything_heavy_is_imported():
    """In a process of its own (imports are per process): each command's argument checks, and the main job's, run
    with none of diffusers' models and pipelines, transformers or a wing's extras imported."""
    code = ("import sys\n"
            "from fastcache import cli, __main__\n"
            "for argv in (['serve', '--port', '0'], ['warmup', '--sizes', '33'], ['generate', 'x', '--interval', '0'],"
            " ['tune', '--branches', '0,99'], ['dance']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 2, argv\n"
            "try:\n"
            "    __main__.parse_args(['--steps', '0'])\n"
            "except SystemExit as exit:\n"
            "    assert exit.code == 2\n"
            f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    assert len(out.stderr.strip().splitlines()) == 6, out.stderr  # one line per bad command line, nothing else


def test_an_argument_checked_after_the_serving_wing_is_imported_is_still_one_line():
    """``--max-queue`` is checked by the engine's own config, once the serving wing (and with it diffusers'
    pipelines, whose transformers log notices at import) is imported: the process's whole stderr is that one line."""
    out = subprocess.run([sys.executable, "-m", "fastcache.cli", "serve", "--batch-sizes", "1,2", "--max-queue", "0"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and len(out.stderr) - 1 <= MAX_ERROR_CHARS, out.stderr
    assert out.stderr.startswith("fastcache serve: error: --max-queue must be at least the largest batch size (2)")


@pytest.fixture
def without(monkeypatch):
    """``without(*modules)``: those modules look uninstalled to the extras' checks (and no model may be built)."""
    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)
    real = extras.importlib.util.find_spec

    def hide(*modules):
        monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name in modules else real(name))

    return hide


@pytest.mark.parametrize("argv, hidden, extra", [
    (["serve"], "fastapi", "serve"),
    (["serve"], "prometheus_client", "serve"),
    (["warmup"], "prometheus_client", "serve"),
    (["serve", "--replicas", "2"], "ray", "ray"),
    (["warmup", "--lora", "a=/no/such/lora"], "peft", "serve"),
    (["tune"], "torchmetrics", "tune"),
])
def test_a_missing_extra_is_one_line_naming_its_pip_install(argv, hidden, extra, without, capsys, tmp_path):
    without(hidden)
    err = cli_error([*argv, *(["--out", str(tmp_path)] if argv[0] == "tune" else [])], capsys)
    assert err == f'fastcache {argv[0]}: error: the {extra} extra is not installed (no {hidden}): pip install ' \
                  f'"fastcache[{extra}]"\n'


def test_a_feature_that_finds_its_extra_missing_is_one_line(monkeypatch, capsys):
    def run_replicas(*args, **kwargs):
        extras.require("video", "no_such_module_here")

    monkeypatch.setattr("fastcache.serving.ray_serve.run_replicas", run_replicas)
    monkeypatch.setattr("fastcache.models.build_pipeline", _no_model)
    err = cli_error(["serve", "--replicas", "1", "--no-compile"], capsys)
    assert err.endswith('(no no_such_module_here): pip install "fastcache[video]"\n')


def test_quiet_imports_silences_transformers_only_while_importing():
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity()
    with quiet_imports():
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert transformers_logging.get_verbosity() == before


def test_the_help_names_the_serving_wings_default_slots(capsys):
    from fastcache.serving.loras import DEFAULT_MAX_SLOTS

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert f"at most {DEFAULT_MAX_SLOTS})" in " ".join(capsys.readouterr().out.split())
