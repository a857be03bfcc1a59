"""The optional parts of the install (pyproject's extras) and what each needs: a command or a feature whose extra is
missing says so in one line, naming the ``pip install`` that adds it. The one place that maps modules to extras."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

# the modules (import names) an extra brings that its commands cannot run without, checked before any work starts
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "h11", "python_multipart", "prometheus_client", "PIL"),  # and peft, for --lora
    "tune": ("torchmetrics",),
    "video": ("av",),
    "ray": ("ray",),
    "kernels": ("triton",),
}


class MissingExtra(ImportError):
    """A feature's extra is not installed; the message is one line with the ``pip install`` that fixes it."""


def install_command(extra: str) -> str:
    return f'pip install "fastcache[{extra}]"'


def missing(extra: str, modules: Sequence[str] = ()) -> str | None:
    """Why ``extra`` (or the ``modules`` of it that a feature needs) cannot be used here, naming the first module
    missing and the ``pip install`` to run; ``None`` when all are found (found, not imported: quick and silent)."""
    for module in modules or EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            return missing_module(extra, module)
    return None


def missing_module(extra: str, module: str | None) -> str:
    """The one line for ``module`` (of ``extra``) not installed."""
    return f"the {extra} extra is not installed (no {module}): {install_command(extra)}"


def require(extra: str, *modules: str) -> None:
    """``MissingExtra`` (one line, the ``pip install`` to run) unless ``extra``'s modules are installed."""
    problem = missing(extra, modules)
    if problem:
        raise MissingExtra(problem)
