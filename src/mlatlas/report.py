"""Claims, reports and their writers.

An experiment returns a :class:`Report`: named metrics, the :class:`Claim` objects that say in
numbers whether the paper's headline claim held, the figures it saved and free-text notes. The
writers turn one report into ``metrics.json`` + ``report.md`` and a list of reports (a tour)
into a ``report.md``; the tour's HTML is the site of :mod:`mlatlas.site`. Nothing here imports
torch.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["FAILS", "HOLDS", "NOT_MEASURED", "Claim", "Report", "claims_summary", "write_run",
           "write_tour"]

_OPS = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}


#: The three outcomes of a claim.
HOLDS, FAILS, NOT_MEASURED = "holds", "fails", "not measured"


@dataclass
class Claim:
    """A headline claim measured in numbers: ``measured <op> target``.

    A claim has three outcomes (:attr:`status`): it holds, it fails, or it was not measured
    (``measured is None``; ``detail`` then says why — a missing reference library, no GPU).
    A claim that was not measured never counts as holding.

    Args:
        name: What is claimed, in words (``"DDIM-50 SW / DDPM-1000 SW"``).
        measured: The measured value, or ``None`` when it could not be measured.
        target: The target fixed before the run (from the paper or the issue).
        op: One of ``"<="``, ``"<"``, ``">="``, ``">"``, ``"=="``.
        unit: Unit of ``measured`` and ``target`` (``"x"``, ``"s"``, ``""``).
        holds: Whether the claim held. Computed from ``measured op target`` when left
            ``None``; pass it explicitly only for claims a single comparison cannot express.
            Always False when not measured (a NaN measurement fails).
        detail: One line of context (how it was measured, or why it was not).
        target_source: The ``Config`` field the target came from, if any (``"tolerance"``);
            the runner marks the claim when a ``--set`` changed that field.
        target_changed: True when the target was changed from the run mode's default by a
            ``--set`` override (filled by the runner).

    Raises:
        ValueError: if ``op`` is not a supported comparison.
    """

    name: str
    measured: float | None
    target: float
    op: str = ">="
    unit: str = ""
    holds: bool | None = None
    detail: str = ""
    target_source: str = ""
    target_changed: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Claim op must be one of {sorted(_OPS)}, got {self.op!r}")
        self.target = float(self.target)
        if self.measured is None:
            if not self.detail:
                raise ValueError(f"claim {self.name!r} was not measured: detail must say why")
            self.holds = False
            return
        self.measured = float(self.measured)
        if self.holds is None:
            self.holds = (not math.isnan(self.measured)) and bool(
                _OPS[self.op](self.measured, self.target)
            )
        self.holds = bool(self.holds)

    @property
    def status(self) -> str:
        """``"holds"``, ``"fails"`` or ``"not measured"``."""
        if self.measured is None:
            return NOT_MEASURED
        return HOLDS if self.holds else FAILS

    def describe(self) -> str:
        """``"name: 0.93 >= 0.9 x — holds"`` (or ``— not measured: why``)."""
        unit = f" {self.unit}" if self.unit else ""
        if self.measured is None:
            return f"{self.name}: {self.op} {_fmt(self.target)}{unit} — not measured: {self.detail}"
        verdict = "holds" if self.holds else "DOES NOT HOLD"
        changed = " (target changed by --set)" if self.target_changed else ""
        return (f"{self.name}: {_fmt(self.measured)} {self.op} {_fmt(self.target)}{unit}"
                f"{changed} — {verdict}")


@dataclass
class Report:
    """What one experiment run (or benchmark) produced.

    Experiments fill ``metrics``, ``claims``, ``figures`` and ``notes``; the runner fills the
    provenance (``method``, ``config``, ``seed``, ``elapsed_s``, ``machine``, ``versions``).
    """

    method: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metric_units: dict[str, str] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    smoke: bool = False
    mode: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = "run"
    elapsed_s: float = float("nan")
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    commit: str | None = None  # git commit of the code that ran ("+dirty" if changed)
    date: str = ""  # when it started, ISO 8601
    out: Path | None = None  # where the runner wrote it (not serialised)

    # -- filling -------------------------------------------------------------------------
    def metric(self, name: str, value: float, unit: str = "") -> float:
        """Record a scalar metric (with its unit, e.g. ``"s"``, ``"bytes"``) and return it."""
        self.metrics[name] = float(value)
        if unit:
            self.metric_units[name] = unit
        return float(value)

    def claim(self, name: str, measured: float, target: float, op: str = ">=", unit: str = "",
              detail: str = "", holds: bool | None = None, target_source: str = "") -> Claim:
        """Record a measured :class:`Claim` and return it (``target_source``: the Config
        field the target came from, so that a ``--set`` of it is shown)."""
        c = Claim(name, measured, target, op, unit, holds, detail, target_source)
        self.claims.append(c)
        return c

    def not_measured(self, name: str, target: float, op: str = ">=", unit: str = "", *,
                     reason: str, target_source: str = "") -> Claim:
        """Record a claim that could not be measured in this run, with the reason."""
        c = Claim(name, None, target, op, unit, None, reason, target_source)
        self.claims.append(c)
        return c

    def figure(self, path: str | Path) -> Path:
        """Record a saved figure."""
        self.figures.append(Path(path))
        return Path(path)

    def note(self, text: str) -> None:
        """Record a free-text note (what was measured, why a claim may not hold)."""
        self.notes.append(text)

    # -- reading -------------------------------------------------------------------------
    @property
    def holds(self) -> bool:
        """True when the run finished and every claim was measured and held."""
        return self.error is None and all(c.status == HOLDS for c in self.claims)

    @property
    def unmeasured(self) -> list[Claim]:
        """The claims that were not measured in this run."""
        return [c for c in self.claims if c.status == NOT_MEASURED]

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready dict (figure paths relative to ``relative_to`` when given)."""

        def rel(p: Path) -> str:
            if relative_to is not None:
                try:
                    return str(Path(p).resolve().relative_to(Path(relative_to).resolve()))
                except ValueError:
                    pass
            return str(p)

        return {
            "method": self.method,
            "kind": self.kind,
            "smoke": self.smoke,
            "mode": self.mode,
            "seed": self.seed,
            "overrides": _jsonable(self.overrides),
            "config": _jsonable(self.config),
            "metrics": {k: _num(v) for k, v in self.metrics.items()},
            "metric_units": dict(self.metric_units),
            "claims": [{**asdict(c), "measured": _num(c.measured), "target": _num(c.target),
                        "status": c.status} for c in self.claims],
            "holds": self.holds,
            "figures": [rel(p) for p in self.figures],
            "notes": list(self.notes),
            "elapsed_s": _num(self.elapsed_s),
            "error": self.error,
            "commit": self.commit,
            "date": self.date,
            "machine": self.machine,
            "versions": self.versions,
        }


# ------------------------------------------------------------------------------ writers
def write_run(report: Report, out: Path) -> None:
    """Write ``metrics.json`` and ``report.md`` for one run into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report.to_dict(out), indent=2) + "\n")
    (out / "report.md").write_text(_markdown([report], out, title=f"mlatlas {report.method}"))


def write_tour(reports: list[Report], out: Path, title: str = "mlatlas tour") -> Path:
    """Write ``report.md`` summarising several runs (the site is :mod:`mlatlas.site`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(_markdown(reports, out, title))
    return md


def _markdown(reports: list[Report], out: Path, title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{claims_summary(reports)} across {len(reports)} run(s).", "",
              "| method | claim | measured | target | holds |", "|---|---|---|---|---|"]
    for r in reports:
        if r.error:
            lines.append(f"| {_label(r)} | run failed: {_md_cell(r.error)} | | | ✗ |")
        for c in r.claims:
            unit = f" {c.unit}" if c.unit else ""
            lines.append(f"| {_label(r)} | {_md_cell(c.name)} | {_measured(c)}{unit} | "
                         f"{c.op} {_fmt(c.target)}{unit}{_changed(c)} | {_VERDICT[c.status]} |")
    for r in reports:
        lines += ["", f"## {_label(r)}", "",
                  f"{r.mode} run, seed {r.seed}, {_fmt(r.elapsed_s)} s"
                  f"{f', commit {r.commit}' if r.commit else ''}{f', {r.date}' if r.date else ''}",
                  ""]
        if r.metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {_md_cell(k)} | {_fmt(v)} |" for k, v in r.metrics.items()]
            lines.append("")
        lines += [f"- {n}" for n in r.notes]
        lines += [f"![{Path(p).stem}]({_rel(p, out)})" for p in r.figures]
    return "\n".join(lines) + "\n"


def _label(r: Report) -> str:
    return r.method + (" (bench)" if r.kind == "bench" else "")


# ------------------------------------------------------------------------------ helpers
_VERDICT = {HOLDS: "✓", FAILS: "✗", NOT_MEASURED: "not measured"}


def claims_summary(reports: list[Report]) -> str:
    """``"12 of 14 claims hold, 1 not measured"`` over the claims of ``reports``."""
    claims = [c for r in reports for c in r.claims]
    held = sum(c.status == HOLDS for c in claims)
    missing = sum(c.status == NOT_MEASURED for c in claims)
    text = f"{held} of {len(claims)} claims hold"
    return text + (f", {missing} not measured" if missing else "")


def _measured(c: Claim) -> str:
    return "—" if c.measured is None else _fmt(c.measured)


def _changed(c: Claim) -> str:
    return " (changed by --set)" if c.target_changed else ""


def _fmt(x: float) -> str:
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3e}"
    return f"{x:.4g}"


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _rel(p: Path, out: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(p)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
