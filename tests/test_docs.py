"""The documentation: the site builds with ``mkdocs build --strict``, its examples run, the README stays small.

Examples are what a reader copies, so they run here, under the README's test command:

- every ```` ```python ```` block of README.md and docs/ runs, a page's blocks in order in one namespace (a page
  reads as one script), in a temporary folder, on the tiny presets (random weights, CPU);
- a block whose title starts with "Not run" (```` ```python title="Not run: needs a GPU" ````) is skipped: the title
  says why, above the code, on the site and on GitHub alike (both read the language from the first word);
- a block whose title starts with "Slow" runs alone, in a namespace of its own, under ``-m slow`` (compiling on a CPU
  takes minutes);
- every ``--flag`` of a shell example of fastcache's commands, benchmarks and tools is checked against that
  command's own parser (its usage line): an option renamed or removed fails here, not in a reader's terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from fastcache import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README_LIMIT = 12 * 1024  # bytes
# The README's two fresh-machine commands: .ci/run and CI run the second; neither may change.
FRESH_MACHINE = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && python -m fastcache",
    'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q',
)
BUILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    title: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (inside lists too), with their language and title."""
    found = []
    for token in MarkdownIt("commonmark").parse(page.read_text()):
        if token.type != "fence" or not token.map:
            continue
        lang, _, options = token.info.strip().partition(" ")
        title = re.search(r'title="([^"]*)"', options)
        found.append(Block(page, token.map[0] + 2, lang, title.group(1) if title else "", token.content))
    return found


def _run(block_list: list[Block], namespace: dict) -> None:
    for block in block_list:
        # blank lines first, so that a traceback names the page's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
        exec(code, namespace)


def _python(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "py")]


RUN_PAGES = [p for p in PAGES if any(not b.title.startswith(("Not run", "Slow")) for b in _python(p))]
SLOW_BLOCKS = [b for p in PAGES for b in _python(p) if b.title.startswith("Slow")]


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_examples_of_a_page_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write images
    runnable = [b for b in _python(page) if not b.title.startswith(("Not run", "Slow"))]
    _run(runnable, {"__name__": "__docs__"})


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW_BLOCKS, ids=lambda b: b.where)
def test_a_slow_example_runs_alone(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run([block], {"__name__": "__docs__"})


def test_every_python_example_that_is_not_run_says_why():
    titles = {b.title for p in PAGES for b in _python(p) if b.title.startswith("Not run")}
    assert all(re.match(r"Not run[^:]*: \S", title) for title in titles), titles


# -- shell examples ------------------------------------------------------------------------------------------------

def _usage(run) -> str:
    """The usage line(s) of a parser that ``run`` makes print its help: every option it takes, and nothing of its
    description (whose examples may name options of other commands)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run()
    return out.getvalue().split("\n\n", 1)[0]


def _script_usage(relative: str) -> str:
    def run():
        argv = sys.argv
        sys.argv = [relative, "--help"]
        try:
            runpy.run_path(str(ROOT / relative), run_name="__main__")
        finally:
            sys.argv = argv

    return _usage(run)


def _command_usage(words: list[str]) -> tuple[str, list[str]] | None:
    """(the usage of the command a shell line runs, the words given to it), for fastcache's commands, benchmarks and
    tools; None for any other command."""
    from fastcache import __main__ as main_job

    if words[:3] == ["python", "-m", "fastcache"]:
        return _usage(lambda: main_job.parse_args(["--help"])), words[3:]
    if words[:1] == ["fastcache"] and len(words) > 1:
        if words[1] == "bench" and len(words) > 2:
            return _script_usage(cli.BENCHMARKS[words[2]]), words[3:]
        return _usage(lambda: cli.main([words[1], "--help"])), words[2:]
    if words[:1] == ["python"] and len(words) > 1 and words[1].startswith(("bench/", "tools/")):
        return _script_usage(words[1]), words[2:]
    return None


def shell_lines(page: Path) -> list[tuple[str, list[str]]]:
    """Each command line of a page's bash blocks (continuations joined, comments dropped), split as the shell would,
    at ``&&``, ``;`` and ``|`` too."""
    lines = []
    for block in blocks(page):
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, ";"]:
                if word in ("&&", ";", "|", "||"):
                    if command:
                        lines.append((f"{block.where}: {line.strip()}", command))
                    command = []
                else:
                    command.append(word)
    return lines


SHELL_PAGES = [p for p in PAGES if shell_lines(p)]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_of_a_shell_example_is_one_its_command_takes(page):
    unknown = []
    for where, words in shell_lines(page):
        found = _command_usage(words)
        if found is None:
            continue
        usage, given = found
        taken = set(re.findall(r"--[\w-]+", usage)) | {"--help"}
        flags = [word.split("=")[0] for word in given if re.fullmatch(r"--[\w-]+(=.*)?", word)]
        unknown += [f"{where}: {flag}" for flag in flags if flag not in taken]
    assert not unknown, "options no command takes:\n" + "\n".join(unknown)


# -- the site and the README -------------------------------------------------------------------------------------

def test_the_site_builds_strictly_with_no_broken_link_or_reference(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # a fence whose options Material's superfences cannot read (```python notest) is printed as text, without a
    # warning: every fence of a page must come out as a code block
    unread = []
    for page in (p for p in PAGES if p.name != "README.md" and blocks(p)):  # the reference: signatures, no fences
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        code_blocks = built.read_text().count("<pre")
        if code_blocks != len(blocks(page)):
            unread.append(f"{page.relative_to(ROOT)}: {len(blocks(page))} fences, {code_blocks} code blocks")
    assert not unread, unread
    assert 'class="mermaid"' in (site / "how-it-works" / "index.html").read_text(), "the diagram was not rendered"
    reference = (site / "reference" / "index.html").read_text()
    assert "compile_pipeline" in reference and "ServiceOptions" in reference  # mkdocstrings rendered the API


def test_the_readme_is_at_most_12_kb_and_keeps_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT, f"README.md is {len(readme.encode())} bytes"
    for command in FRESH_MACHINE:
        assert command in readme, command


def test_the_readme_links_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to no page of the site"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
