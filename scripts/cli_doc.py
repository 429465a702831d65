"""Regenerates the engine-flag table of docs/cli.md from EngineConfig and nextserve.foreign_flags (run after adding
a flag)."""

from dataclasses import fields
from pathlib import Path

from nextserve.config import EngineConfig
from nextserve.foreign_flags import FOREIGN_FLAGS

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BEGIN, END = "<!-- engine-flags:begin -->", "<!-- engine-flags:end -->"


def table() -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool) and f.default:
            flag += f" / --no-{f.name.replace('_', '-')}"
        names = " ".join(f"`{n}`" for n in (flag, *f.metadata.get("aliases", ())))
        rows.append(f"| {names} | `{f.default}` | {f.metadata.get('help', '')} |")
    for f in FOREIGN_FLAGS:
        rows.append(f"| `{f.flag}` | | ({f.origin}) {f.help} |")
    return "\n".join(rows)


def main() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
