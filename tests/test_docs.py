"""Docs stay true to the code: every engine flag is documented in docs/cli.md."""

from dataclasses import fields
from pathlib import Path

from nextserve.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent


def test_every_engine_flag_is_in_cli_doc():
    doc = (ROOT / "docs" / "cli.md").read_text()
    missing = [f.name for f in fields(EngineConfig) if "--" + f.name.replace("_", "-") not in doc]
    assert not missing, f"flags missing from docs/cli.md: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
