"""``mlatlas`` — the command line: list, run, tour, bench.

    mlatlas list [--field F]
    mlatlas run ID [--full] [--smoke] [--set k=v ...] [--seed N] [--out DIR] [--strict]
    mlatlas tour [--field F] [--out DIR] [--smoke] [--strict]
    mlatlas bench ID [--set k=v ...] [--out DIR]

Exit codes: 0 ok; 1 a claim did not hold under ``--strict`` (or a tour run failed);
2 usage errors (unknown id or field, bad ``--set``, method not built).
Only ``catalog`` is imported at start-up so that ``mlatlas list`` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlatlas import __version__, catalog

EXIT_OK, EXIT_CLAIM, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``mlatlas``."""
    p = argparse.ArgumentParser(
        prog="mlatlas", description="An atlas of modern ML methods: components, parity "
        "proofs and claim-reproducing experiments.")
    p.add_argument("--version", action="version", version=f"mlatlas {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="show every method of the atlas and what is built")
    ls.add_argument("--field", choices=catalog.FIELDS, help="only this field")
    ls.add_argument("--built", action="store_true", help="only methods with an experiment")

    run = sub.add_parser("run", help="run one method's experiment")
    run.add_argument("id", help="method id, e.g. gridworld")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the headline run (Config.full())")
    mode.add_argument("--smoke", action="store_true", help="a few steps only")
    _common(run)
    run.add_argument("--strict", action="store_true", help="exit 1 if a claim does not hold")

    tour = sub.add_parser("tour", help="run every built experiment and write report.html")
    tour.add_argument("--field", choices=catalog.FIELDS, help="only this field")
    tour.add_argument("--out", help="output folder (default runs/tour/<timestamp>)")
    tour.add_argument("--smoke", action="store_true", help="smoke runs only")
    tour.add_argument("--strict", action="store_true", help="exit 1 if a claim does not hold")

    bench = sub.add_parser("bench", help="speed/memory benchmark, side by side")
    bench.add_argument("id", help="method id, e.g. flash-attention")
    _common(bench)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="override a Config field (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (overrides Config.seed)")
    p.add_argument("--out", help="output folder (default runs/<id>/<timestamp>)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlatlas`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "tour":
            return _tour(args)
        return _run(args)
    except catalog.UnknownMethodError as exc:
        return _usage(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _usage(message: str) -> int:
    print(f"mlatlas: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = catalog.by_field(args.field)
    if args.built:
        rows = [m for m in rows if m.built]
    table = Table(title=f"mlatlas — {sum(m.built for m in rows)} of {len(rows)} methods built",
                  show_lines=False)
    for col in ("id", "field", "built", "title", "claim"):
        table.add_column(col, overflow="fold")
    for m in rows:
        table.add_row(*(escape(c) for c in (m.id, m.field, "✓" if m.built else "·", m.title,
                                            m.claim)))
    Console().print(table)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from mlatlas import runner

    catalog.get(args.id)  # unknown id → exit 2 before anything heavy is imported
    try:
        if args.command == "bench":
            report = runner.run_bench(args.id, out=args.out, overrides=args.overrides,
                                      seed=args.seed)
        else:
            report = runner.run_method(args.id, out=args.out, smoke=args.smoke, full=args.full,
                                       overrides=args.overrides, seed=args.seed)
    except (runner.ConfigError, runner.NotBuiltError) as exc:
        return _usage(str(exc))
    _print_report(report)
    if getattr(args, "strict", False) and not report.holds:
        return EXIT_CLAIM
    return EXIT_OK


def _tour(args: argparse.Namespace) -> int:
    from mlatlas import runner

    reports, page = runner.run_tour(args.field, args.out, smoke=args.smoke, echo=print)
    from mlatlas.report import claims_summary

    print(f"{claims_summary(reports)} across {len(reports)} methods → {page}")
    if any(r.error for r in reports):
        return EXIT_CLAIM
    if args.strict and not all(r.holds for r in reports):
        return EXIT_CLAIM
    return EXIT_OK


def _print_report(report) -> None:  # noqa: ANN001 - a mlatlas.report.Report
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if report.metrics:
        t = Table(title=f"{report.method} — {report.kind} metrics")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in report.metrics.items():
            t.add_row(escape(k), f"{v:.6g}")
        console.print(t)
    for c in report.claims:
        mark = {"holds": "[green]✓[/green] ", "fails": "[red]✗[/red] "}.get(c.status,
                                                                          "[yellow]?[/yellow] ")
        console.print(mark + escape(c.describe()), highlight=False)
    for n in report.notes:
        console.print(f"[dim]note:[/dim] {escape(n)}", highlight=False)
    console.print(f"{len(report.figures)} figure(s); {report.elapsed_s:.1f} s; metrics.json and "
                  f"report.md written under {report.out}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
