"""``mlatlas`` — the command line: list, run, bench, tour, site.

    mlatlas list [--field F] [--built] [--long | --json]
    mlatlas run ID [--full | --smoke] [--set k=v ...] [--seed N] [--out DIR] [--strict]
    mlatlas bench ID [--full | --smoke] [--set k=v ...] [--seed N] [--out DIR] [--strict]
    mlatlas tour [ID ...] [--field F] [--full | --smoke] [--no-bench] [--out DIR] [--strict]
    mlatlas site RUN_DIR ... [--out DIR]
    mlatlas train llama [--strategy ddp|zero1|zero2|fsdp2] [--nproc N] [--steps K] … (its --help)

Exit codes: 0 ok; 1 a claim did not hold (or was not measured) under ``--strict``, or a tour
run failed; 2 usage errors — every bad argument gets one line on stderr naming it, never a
traceback. Only ``catalog`` is imported at start-up so that ``mlatlas list`` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mlatlas import __version__, catalog

EXIT_OK, EXIT_CLAIM, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument found after parsing (a path that cannot be used, an unknown id …)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mlatlas run: error: argument --seed: …``."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``mlatlas``."""
    p = _Parser(prog="mlatlas", description="An atlas of modern ML methods: components, parity "
                "proofs and claim-reproducing experiments.")
    p.add_argument("--version", action="version", version=f"mlatlas {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="show every method of the atlas and what is built")
    ls.add_argument("--field", choices=catalog.FIELDS, help="only this field")
    ls.add_argument("--built", action="store_true", help="only methods with an experiment")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--long", action="store_true", help="add paper, reference and claim")
    fmt.add_argument("--json", action="store_true", help="every field of every row, as JSON")

    run = sub.add_parser("run", help="run one method's experiment")
    run.add_argument("id", help="method id, e.g. gridworld")
    _modes(run)
    _common(run)

    bench = sub.add_parser("bench", help="speed/memory benchmark, side by side")
    bench.add_argument("id", help="method id, e.g. flash-attention")
    _modes(bench)
    _common(bench)

    tour = sub.add_parser("tour", help="run every built experiment and its benchmark, and "
                          "write the atlas site (index.html)")
    tour.add_argument("ids", nargs="*", metavar="ID", help="only these methods (default: all)")
    tour.add_argument("--field", choices=catalog.FIELDS, help="only this field")
    _modes(tour)
    tour.add_argument("--no-bench", dest="bench", action="store_false",
                      help="skip the benchmarks")
    tour.add_argument("--out", help="output folder (default runs/tour/<timestamp>)")
    tour.add_argument("--strict", action="store_true",
                      help="exit 1 if a claim does not hold or was not measured")

    train = sub.add_parser("train", add_help=False, help="train the tiny Llama on 1 … N "
                           "processes: DDP, ZeRO-1/2, FSDP2 (`mlatlas train --help`)")
    train.add_argument("argv", nargs=argparse.REMAINDER)  # main() hands them to mlatlas.train

    site = sub.add_parser("site", help="rebuild the atlas site from existing run folders")
    site.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="tour or run folders (a default and a --full tour side by side)")
    site.add_argument("--out", help="site folder (default: the first RUN_DIR)")
    return p


def _modes(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the headline run (Config.full())")
    mode.add_argument("--smoke", action="store_true", help="a few steps only (Config.smoke())")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="override a Config field (repeatable)")
    p.add_argument("--seed", type=_seed, help="random seed (overrides Config.seed)")
    p.add_argument("--out", help="output folder (default runs/<id>/<timestamp>)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a claim does not hold or was not measured")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlatlas`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser: options before the model name, --help
        from mlatlas.train import main as train_main

        return train_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and argument errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "tour":
            return _tour(args)
        if args.command == "site":
            return _site(args)
        return _run(args)
    except (catalog.UnknownMethodError, UsageError) as exc:
        return _usage(args.command, str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _usage(command: str, message: str) -> int:
    print(f"mlatlas {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------ list
def _list(args: argparse.Namespace) -> int:
    rows = catalog.by_field(args.field)
    if args.built:
        rows = [m for m in rows if m.built]
    if args.json:
        print(json.dumps([_row_dict(m) for m in rows], indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        from rich.console import Console

        Console().print(list_table(rows, long=args.long))
    else:  # a pipe or a file: one tab-separated row per method, never cut
        for m in rows:
            cells = [m.id, m.field, "built" if m.built else "-", m.title]
            if args.long:
                cells += [m.paper, m.reference, m.claim]
            print("\t".join(c.replace("\t", " ") for c in cells))
    return EXIT_OK


def _row_dict(m: catalog.Method) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(m), "built": m.built}


def list_table(rows: Sequence[catalog.Method], *, long: bool = False) -> Any:
    """The rich table of ``mlatlas list`` on a terminal: id, field and built never wrap."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"mlatlas — {sum(m.built for m in rows)} of {len(rows)} methods built",
                  show_lines=long, pad_edge=False)
    table.add_column("id", no_wrap=True, style="bold")
    table.add_column("field", no_wrap=True)
    table.add_column("built", no_wrap=True, justify="center")
    table.add_column("title", ratio=1, overflow="fold")
    if long:
        table.add_column("claim", ratio=1, overflow="fold")
    for m in rows:
        cells = [m.id, m.field, "✓" if m.built else "·", m.title]
        if long:
            cells.append(m.claim)
        table.add_row(*(escape(c) for c in cells))
    return table


# ------------------------------------------------------------------------------ run, bench
def _run(args: argparse.Namespace) -> int:
    catalog.get(args.id)  # unknown id → exit 2 before anything heavy is imported
    if args.out is not None:
        _check_creatable(args.out, "--out")
    from mlatlas import runner

    kw = dict(out=args.out, smoke=args.smoke, full=args.full, overrides=args.overrides,
              seed=args.seed)
    try:
        if args.command == "bench":
            report = runner.run_bench(args.id, **kw)
        else:
            report = runner.run_method(args.id, **kw)
    except (runner.ConfigError, runner.NotBuiltError) as exc:
        raise UsageError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        if not args.overrides:
            raise
        # an out-of-range --set value the experiment's components refused
        raise UsageError(f"the run refused --set {' '.join(args.overrides)}: "
                         f"{type(exc).__name__}: {exc}") from None
    _print_report(report)
    if args.strict and not report.holds:
        return EXIT_CLAIM
    return EXIT_OK


def _print_report(report: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mlatlas.report import claims_summary

    console = Console()
    if report.metrics:
        t = Table(title=f"{report.method} — {report.kind} metrics")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in report.metrics.items():
            t.add_row(escape(k), f"{v:.6g}")
        console.print(t)
    for c in report.claims:
        mark = {"holds": "[green]✓[/green] ", "fails": "[red]✗[/red] "}.get(
            c.status, "[yellow]?[/yellow] ")
        console.print(mark + escape(c.describe()), highlight=False)
    for n in report.notes:
        console.print(f"[dim]note:[/dim] {escape(n)}", highlight=False)
    console.print(f"{claims_summary([report])}; {len(report.figures)} figure(s); "
                  f"{report.elapsed_s:.1f} s; metrics.json and report.md written under "
                  f"{report.out}", highlight=False)


# ------------------------------------------------------------------------------ tour, site
def _tour(args: argparse.Namespace) -> int:
    ids = [catalog.get(i).id for i in args.ids]  # unknown id → exit 2
    if args.field and ids:
        other = [i for i in ids if catalog.get(i).field != args.field]
        if other:
            raise UsageError(f"--field {args.field} excludes {', '.join(other)}")
    if args.out is not None:
        _check_creatable(args.out, "--out")
    from mlatlas import runner

    mode = "smoke" if args.smoke else "full" if args.full else "default"
    reports, index = runner.run_tour(args.field, args.out, mode=mode, bench=args.bench,
                                     ids=ids or None, echo=print)
    from mlatlas.report import claims_summary

    runs = sum(r.kind == "run" for r in reports)
    print(f"{claims_summary(reports)} across {runs} methods and {len(reports) - runs} "
          "benchmarks")
    print("the atlas site — open it in a browser:")
    print(index.resolve())
    if any(r.error for r in reports):
        return EXIT_CLAIM
    if args.strict and not all(r.holds for r in reports):
        return EXIT_CLAIM
    return EXIT_OK


def _site(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"RUN_DIR {str(d)!r} is not a folder")
    out = Path(args.out) if args.out else dirs[0]
    _check_creatable(out, "--out")
    from mlatlas.site.builder import NoRunsError, build_site

    try:
        index = build_site(dirs, out)
    except NoRunsError as exc:
        raise UsageError(str(exc)) from None
    print("the atlas site — open it in a browser:")
    print(index.resolve())
    return EXIT_OK


def _check_creatable(path: str | Path, flag: str) -> None:
    """Fail early, before torch is imported, on a folder that cannot be created."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is not "
                         "a folder")
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is not "
                         "writable")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
