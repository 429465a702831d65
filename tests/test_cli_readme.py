"""The README's commands run as written on a fresh clone: `make` installs into .venv without activating it, so every
nextserve command says `.venv/bin/nextserve`, and each one's flags exist. `make serve ARGS=...` passes its flags."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from nextserve import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks (continuations joined, comments dropped), and inline `...` commands."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line.removesuffix("&").strip())
    commands += re.findall(r"`((?:\S*/)?nextserve (?:serve|generate|bench|eval)\b[^`]*)`", text)
    return commands


NEXTSERVE = [c for c in shell_commands(README) if re.match(r"(\S*/)?nextserve ", c)]


def test_readme_has_nextserve_commands() -> None:
    assert len(NEXTSERVE) >= 6


@pytest.mark.parametrize("command", NEXTSERVE)
def test_readme_command_runs_from_a_fresh_clone(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/nextserve", "not on PATH after `make`: say .venv/bin/nextserve"
    args = argv[1:]
    if args[-1:] == ["--help"]:
        args = args[:-1]
    try:
        parsed = cli.build_parser(args).parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{command!r} does not parse (exit {e.code})")
    assert hasattr(parsed, "_module")


def test_make_serve_passes_args() -> None:
    out = subprocess.run(
        ["make", "-n", "serve", "ARGS=--port 8001 --log-level debug"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert ".venv/bin/nextserve serve --port 8001 --log-level debug" in out.stdout
