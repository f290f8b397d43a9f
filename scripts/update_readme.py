"""Regenerate the method table of README.md from the catalog.

    python scripts/update_readme.py          # rewrite the table in place
    python scripts/update_readme.py --check  # exit 1 if the README's table is stale

The table lives between the markers ``<!-- methods:start -->`` and ``<!-- methods:end -->``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mlatlas import catalog  # noqa: E402

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def method_table() -> str:
    """The markdown table of every catalog row, grouped by field."""
    built = sum(m.built for m in catalog.METHODS)
    lines = [f"{built} of {len(catalog.METHODS)} methods built "
             "(✓ = component, parity test and experiment on `main`).", "",
             "| id | field | built | method | paper | reference | claim |",
             "|---|---|---|---|---|---|---|"]
    for m in catalog.METHODS:
        cells = [f"`{m.id}`", m.field, "✓" if m.built else "", m.title, m.paper, m.reference,
                 m.claim]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`method_table`."""
    try:
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"README.md lacks the markers {START} … {END}") from None
    return f"{head}{START}\n{method_table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args()
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md method table is stale: run `make readme`", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
