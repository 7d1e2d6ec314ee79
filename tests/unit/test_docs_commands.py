"""Every `vchitect …` / `vchitect-curate …` command that README.md and docs/ show parses with our CLI,
and the cheap ones run as written (issue #15). The README walk-through runs end to end in
tests/e2e/test_readme.py; training, curation and export commands on paths that exist only on a
user's machine (runs/my-run, /lustre/…) are parsed, not run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDERS = ("CONFIG", "…", "[", "DIR", "CKPT", "OUT ", "PATH")
# cheap and self-contained: run as written from the checkout
RUN = ("vchitect config ", "vchitect-curate config ", "vchitect model-info ", "vchitect --version")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", page.read_text(), flags=re.S):
            block = re.sub(r"\\\n\s*", " ", block)  # join continuation lines
            for line in block.splitlines():
                line = re.sub(r"^\.venv/bin/", "", line.split("  #")[0].strip()).split(" | ")[0].strip()
                if re.match(r"^vchitect(-curate)? ", line) or line in ("vchitect", "vchitect-curate"):
                    found.append((page.name, line))
    return found


def _parse(line: str) -> None:
    argv = shlex.split(line)
    if argv[0] == "vchitect":
        from vchitect.cli import build_parser

        parser = build_parser()
    else:
        from data_pipeline.cli import build_parser

        parser = build_parser()
    parser.exit = lambda status=0, message=None: (_ for _ in ()).throw(SystemExit(status))  # noqa: E731
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code not in (0, None):  # --version / --help exit 0
            raise AssertionError(f"does not parse: {line}") from None


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 25
    assert {page for page, _ in COMMANDS} >= {"README.md", "curation.md", "export.md", "slurm.md", "training.md"}


@pytest.mark.parametrize("page,line", [c for c in COMMANDS if not any(p in c[1] for p in PLACEHOLDERS)])
def test_documented_command_parses(page, line, capsys):
    _parse(line)


@pytest.mark.parametrize("page,line", [c for c in COMMANDS if c[1].startswith(RUN)])
def test_cheap_documented_command_runs(page, line):
    argv = shlex.split(line)
    module = "vchitect.cli" if argv[0] == "vchitect" else "data_pipeline.cli"
    r = subprocess.run([sys.executable, "-m", module, *argv[1:]], cwd=REPO, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{page}: {line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def test_a_wrong_option_does_not_parse():
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("vchitect export runs/x out --no-such-option")
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("vchitect-curate run")

