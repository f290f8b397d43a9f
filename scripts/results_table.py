"""Build docs/results.md — every built method's claims in its default and --full runs.

    mlatlas tour --out runs/default            # the default runs (≤ 30 s each)
    mlatlas tour --full --out runs/full        # the headline runs
    python scripts/results_table.py runs/full runs/default

    # a method added later: run it both ways and merge its rows into the table
    mlatlas tour ddim --full --out runs/full-ddim && mlatlas tour ddim --out runs/default-ddim
    python scripts/results_table.py --update runs/full-ddim runs/default-ddim

The RUN_DIRs are tour (or run) folders; every ``metrics.json`` under them is read, its mode
(default / full / smoke) and kind (run / bench) taken from the file. The numbers are kept in
``docs/results.json`` (what ``--update`` merges into) and rendered to ``docs/results.md``: per
claim the target, the default and the full value, whether it holds in the full run, and the
run's wall time; the commit, date and machine at the top. Given only smoke runs, the table is
built from them with a banner saying the numbers are not results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mlatlas import catalog  # noqa: E402

DOCS = ROOT / "docs"
_VERDICT = {"holds": "✓ holds", "fails": "✗ fails", "not measured": "not measured"}


def collect(run_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """``{method: {"<kind>/<mode>": run}}`` from every metrics.json under ``run_dirs``.

    A run keeps what the table needs: claims, wall time, error, commit, date and machine.
    Later folders win when two hold the same method, kind and mode.
    """
    found: dict[str, dict[str, Any]] = {}
    for d in run_dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            data = json.loads(path.read_text())
            if not data.get("method"):
                continue
            key = f"{data.get('kind', 'run')}/{data.get('mode', 'default')}"
            machine = data.get("machine") or {}
            found.setdefault(data["method"], {})[key] = {
                "claims": [{k: c.get(k) for k in ("name", "measured", "target", "op", "unit",
                                                   "status", "detail", "target_changed")}
                           for c in data.get("claims", [])],
                "elapsed_s": data.get("elapsed_s"),
                "error": data.get("error"),
                "commit": data.get("commit"),
                "date": data.get("date", ""),
                "machine": f"{machine.get('processor', '?')}, {machine.get('cpu_count', '?')} "
                           f"cores, torch threads {machine.get('torch_threads', '?')}",
            }
    return found


def headline_mode(results: dict[str, dict[str, Any]]) -> str:
    """``"full"``, or ``"smoke"`` when no full run is in the results (a placeholder)."""
    keys = {k for runs in results.values() for k in runs}
    return "full" if any(k.endswith("/full") for k in keys) or not keys else "smoke"


def render(results: dict[str, dict[str, Any]], command: str) -> str:
    """docs/results.md from the collected results."""
    head = headline_mode(results)
    runs = [r for m in results.values() for k, r in m.items() if k.endswith(f"/{head}")]
    commits = Counter(r["commit"] or "unknown" for r in runs)
    commit = commits.most_common(1)[0][0] if commits else "—"
    dates = sorted(r["date"] for r in runs if r["date"])
    machines = Counter(r["machine"] for r in runs)
    defaults = Counter(r["commit"] or "unknown" for m in results.values()
                       for k, r in m.items() if k.endswith("/default"))
    default_commit = defaults.most_common(1)[0][0] if defaults else None
    lines = ["# Results: every built method's claims, default and --full", ""]
    if head == "smoke":
        lines += ["> **Placeholder built from smoke runs (a few steps each): these numbers are "
                  "not results.** The table from a `mlatlas tour --full` run replaces it "
                  "(commands below).", ""]
    lines += [
        f"- {head} runs at commit `{commit}`"
        + (f", {dates[0][:10]}" if dates else "")
        + (f" to {dates[-1][:10]}" if dates and dates[-1][:10] != dates[0][:10] else "")
        + (f" on {machines.most_common(1)[0][0]}" if machines else ""),
        *([f"- default column: runs at commit `{default_commit}` (others listed below the "
             "table)"] if default_commit else []),
        f"- generated on {datetime.now().astimezone():%Y-%m-%d} by `{command}`",
        "- regenerate: `mlatlas tour --out runs/default && mlatlas tour --full --out runs/full "
        "&& python scripts/results_table.py runs/full runs/default` (a single method: "
        "`--update`, see the script's docstring)",
        "- shared 2-core VM: wall times and speed ratios move by tens of percent between runs",
    ]
    built = [m.id for m in catalog.METHODS if m.built]
    with_head = [i for i in built if any(k.endswith(f"/{head}") for k in results.get(i, {}))]
    if len(with_head) < len(built):
        lines.append(f"- {head} runs for {len(with_head)} of {len(built)} built methods; the "
                     f"others show the run they have, named in the verdict")
    lines += [
        "",
        f"| method | claim | target | default | {head} | holds ({head}) | wall time ({head}) |",
        "|---|---|---|---|---|---|---|",
    ]
    others = []
    for m in catalog.METHODS:
        if not m.built:
            continue
        runs_of = results.get(m.id, {})
        # the headline run where there is one, else the default run (else a smoke run),
        # marked as such in the verdict: a method never hides the numbers it has
        fallbacks = [head] + [mode for mode in ("default", "smoke") if mode != head]
        mode_of = {kind: next((mode for mode in fallbacks if f"{kind}/{mode}" in runs_of), None)
                   for kind in ("run", "bench")}
        if not any(mode_of.values()):
            lines.append(f"| `{m.id}` | not run yet | | | | | |")
            continue
        for kind in ("run", "bench"):
            if mode_of[kind] is None:
                continue
            main = runs_of[f"{kind}/{mode_of[kind]}"]
            default = runs_of.get(f"{kind}/default")
            stand_in = "" if mode_of[kind] == head else f" ({mode_of[kind]} run; no {head} run)"
            if main["commit"] != commit:
                others.append(f"`{m.id}` {kind}: commit `{main['commit']}`, {main['date'][:10]}")
            if default and default is not main and default["commit"] != default_commit:
                others.append(f"`{m.id}` {kind} (default column): commit "
                              f"`{default['commit']}`, {default['date'][:10]}")
            label = f"`{m.id}`" + (" (bench)" if kind == "bench" else "")
            wall = _seconds(main["elapsed_s"])
            if main["error"]:
                lines.append(f"| {label} | run failed: {_cell(main['error'])} | | | | ✗ | |")
                continue
            base = {c["name"]: c for c in (default or {}).get("claims", [])}
            for i, c in enumerate(main["claims"]):
                unit = f" {c['unit']}" if c.get("unit") else ""
                d = base.get(c["name"])
                verdict = _VERDICT.get(c["status"], c["status"]) + stand_in
                if c["status"] == "not measured":
                    verdict += f": {_cell(c.get('detail') or '')}"
                changed = " (changed by --set)" if c.get("target_changed") else ""
                lines.append(
                    f"| {label} | {_cell(c['name'])} | {c['op']} {_fmt(c['target'])}{unit}"
                    f"{changed} | {_value(d, unit)} | {_value(c if not stand_in else None, unit)}"
                    f" | {verdict} | "
                    f"{wall if i == 0 else ''} |")
    if others:
        lines += ["", "Runs from another commit (merged with `--update`): " + "; ".join(others)
                  + "."]
    return "\n".join(lines) + "\n"


def _value(c: dict[str, Any] | None, unit: str) -> str:
    if c is None:
        return "—"
    if c.get("measured") is None:
        return "not measured"
    return f"{_fmt(c['measured'])}{unit}"


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3e}"
    return f"{x:.4g}"


def _seconds(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="tour or run folders (full and default runs)")
    p.add_argument("--update", action="store_true",
                   help="merge into docs/results.json instead of replacing it")
    p.add_argument("--docs", type=Path, default=DOCS, help="where results.md/.json go")
    args = p.parse_args(argv)
    for d in args.run_dirs:
        if not d.is_dir():
            p.error(f"RUN_DIR {str(d)!r} is not a folder")
    new = collect(args.run_dirs)
    if not new:
        p.error("no metrics.json under " + ", ".join(map(str, args.run_dirs)))
    store = args.docs / "results.json"
    results = json.loads(store.read_text()) if args.update and store.exists() else {}
    for method, runs in new.items():
        results[method] = {**results.get(method, {}), **runs} if args.update else runs
    args.docs.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    command = "python scripts/results_table.py " + " ".join(
        (["--update"] if args.update else []) + [str(d) for d in args.run_dirs])
    (args.docs / "results.md").write_text(render(results, command))
    print(f"wrote {args.docs / 'results.md'} ({len(results)} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
