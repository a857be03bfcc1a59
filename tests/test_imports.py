"""The package's shape, read from its source with ``ast``: no import circle among fastcache's modules, the runtime core
imports neither wing (``serving/``, ``tuning/``) nor an extra's package, and importing the core and calling
``compile_pipeline`` loads none of the extras' packages."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastcache"
WINGS = ("fastcache.serving", "fastcache.tuning")
# what the extras install (import names): the core never imports them where it is imported
EXTRA_PACKAGES = ("fastapi", "starlette", "uvicorn", "h11", "python_multipart", "multipart", "prometheus_client",
                  "peft", "torchmetrics", "matplotlib", "ray", "av", "httpx", "triton")
# ... and those no import of the core may load (h11, httpx and triton are left out: huggingface_hub and torch load
# them where installed; peft too: diffusers imports it where installed)
NEVER_LOADED = ("fastapi", "starlette", "uvicorn", "python_multipart", "prometheus_client", "torchmetrics",
                "matplotlib", "ray", "av")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, tree: ast.Module, everywhere: bool) -> set[str]:
    """The modules ``name`` imports when it is imported (``everywhere``: also inside its functions, when they run),
    ``if TYPE_CHECKING:`` blocks left out; ``from . import x`` counts as module ``x`` where ``x`` is one."""
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if is_package(base)
                             and (PACKAGE.parent / base.replace(".", "/") / f"{alias.name}.py").is_file())
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not everywhere:
                continue  # a class body runs at import, its methods when called
            visit([child for child in ast.iter_child_nodes(node) if isinstance(child, (ast.stmt, ast.excepthandler))])

    visit(tree.body)
    return found


def graph(everywhere: bool) -> dict[str, set[str]]:
    """fastcache's modules and the fastcache modules each imports (with the packages that importing them runs)."""
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        targets = set()
        for target in imports(name, ast.parse(path.read_text()), everywhere):
            parts = target.split(".")
            if parts[0] == "fastcache":
                targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # a.b.c runs a and a.b too
        edges[name] = {target for target in targets if target != name and not name.startswith(target + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return groups


def core(name: str) -> bool:
    return not name.startswith(WINGS)


@pytest.mark.parametrize("everywhere", [False, True], ids=["module level", "with the imports inside functions"])
def test_no_import_circle_among_fastcache_modules(everywhere):
    edges = graph(everywhere)
    assert len(edges) > 40 and {"fastcache.cli", "fastcache.cli_options", "fastcache.tuning.command"} <= set(edges)
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    circle = graph(everywhere=True)
    circle["fastcache.cli_options"].add("fastcache.cli")  # as tune_command and cli once imported each other
    assert any({"fastcache.cli", "fastcache.cli_options"} <= set(group) for group in cycles(circle))


def test_the_core_imports_no_wing_and_no_extra_at_module_level():
    edges = graph(everywhere=False)
    wings = {name: sorted(target for target in targets if not core(target)) for name, targets in edges.items()
             if core(name)}
    assert {name: found for name, found in wings.items() if found} == {}
    extras = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if core(name):
            found = {target.split(".")[0] for target in imports(name, ast.parse(path.read_text()), False)}
            extras[name] = sorted(found & set(EXTRA_PACKAGES))
    assert {name: found for name, found in extras.items() if found} == {}


def test_the_wings_are_where_the_design_says():
    edges = graph(everywhere=False)
    assert {"fastcache.tuning.sweep", "fastcache.tuning.fidelity", "fastcache.tuning.report",
            "fastcache.tuning.command", "fastcache.serving.server"} <= set(edges)
    assert not {"fastcache.sweep", "fastcache.tune", "fastcache.fidelity", "fastcache.tune_command"} & set(edges)


def test_compile_pipeline_loads_no_extra_package():
    """In a process of its own: the core imported and a pipeline compiled (eagerly) and called loads none of the
    extras' packages (the CI's core venv, which has none of them, proves the core runs without them)."""
    code = ("import sys\n"
            "import fastcache\n"
            "from fastcache.models import build_pipeline, random_prompt_embeds\n"
            "pipe = build_pipeline('tiny-sd')\n"
            "handle = fastcache.compile_pipeline(pipe, interval=2, compile=False)\n"
            "pipe(num_inference_steps=2, height=32, width=32, **random_prompt_embeds(pipe))\n"
            "assert handle.counters.fallbacks == 0 and handle.counters.shallow > 0\n"
            f"print(sorted(name for name in {NEVER_LOADED!r} if name in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
