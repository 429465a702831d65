"""Regenerates the engine-flag table of docs/cli.md from EngineConfig (run after adding a flag)."""

from dataclasses import fields
from pathlib import Path

from nextserve.config import EngineConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BEGIN, END = "<!-- engine-flags:begin -->", "<!-- engine-flags:end -->"


def table() -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool) and f.default:
            flag += f" / --no-{f.name.replace('_', '-')}"
        rows.append(f"| `{flag}` | `{f.default}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def main() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
