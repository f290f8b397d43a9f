"""Build the atlas site: ``index.html`` by field and ``<id>.html`` per method, from run folders.

    from mlatlas.site.builder import build_site
    index = build_site([Path("runs/default"), Path("runs/full")], Path("runs/default"))

The pages are rendered from the Jinja2 templates next to this module with the runs'
``metrics.json`` (see :mod:`mlatlas.site.runs`) and the catalog rows. Figures are linked by
relative path (the runs' PNGs are not copied), so the site opens from ``file://`` as long as
the run folders stay where they are. Every claim is shown with its outcome — holds, fails or
not measured — and nothing hides the ones that do not hold.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2

import mlatlas
from mlatlas import catalog
from mlatlas.site.runs import NoRunsError, Run, group_runs, load_runs, modes_present

__all__ = ["NoRunsError", "build_site", "claim_value", "metric_label", "reproduce_command",
           "tolerances"]

_TEMPLATES = Path(__file__).parent / "templates"
_SRC = Path(mlatlas.__file__).resolve().parent  # src/mlatlas
_ROOT = _SRC.parents[1]  # the checkout (has tests/) or site-packages
_INFRA = {"report", "plots", "runtime", "measure", "datasets", "experiments", "training_state",
          "catalog", "runner", "cli", "site"}
_ARXIV = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5})")
_STATUS_CLASS = {"holds": "ok", "fails": "fail", "not measured": "nm"}


def build_site(run_dirs: list[Path], out: Path) -> Path:
    """Write the site for the runs under ``run_dirs`` into ``out``; return ``out/index.html``.

    Raises:
        NoRunsError: no ``metrics.json`` under ``run_dirs``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs([Path(d) for d in run_dirs])
    grouped = group_runs(runs)
    modes = modes_present(runs)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    site = _site_context(runs, modes)
    pages = {}
    for method in catalog.METHODS:
        if method.id in grouped:
            ctx = _method_context(method, grouped[method.id], modes, out)
            (out / f"{method.id}.html").write_text(
                env.get_template("method.html.j2").render(site=site, m=ctx))
            pages[method.id] = ctx
    fields = [{"name": f, "rows": [_index_row(m, pages.get(m.id), modes)
                                   for m in catalog.by_field(f)]}
              for f in catalog.FIELDS if catalog.by_field(f)]
    attention = [a for ctx in pages.values() for a in ctx["attention"]]
    index = out / "index.html"
    index.write_text(env.get_template("index.html.j2").render(
        site=site, fields=fields, attention=attention, modes=modes))
    return index


# ------------------------------------------------------------------------------ contexts
def _site_context(runs: list[Run], modes: list[str]) -> dict[str, Any]:
    def common(values: list[Any]) -> Any:
        values = [v for v in values if v]
        return Counter(values).most_common(1)[0][0] if values else "—"

    summary = []
    for mode in modes:
        claims = [c for r in runs if r.mode == mode for c in r.claims]
        counts = Counter(c.get("status") for c in claims)
        summary.append({"mode": mode, "total": len(claims), "holds": counts["holds"],
                        "fails": counts["fails"], "nm": counts["not measured"],
                        "errors": sum(bool(r.error) for r in runs if r.mode == mode)})
    dates = sorted(r.data.get("date") or "" for r in runs if r.data.get("date"))
    return {"modes": modes, "summary": summary, "commit": common([r.data.get("commit")
                                                                 for r in runs]),
            "date": f"{dates[0][:10]} – {dates[-1][:10]}" if dates and dates[0][:10] !=
            dates[-1][:10] else (dates[0][:10] if dates else "—"),
            "machine": common([_machine(r) for r in runs]), "version": mlatlas.__version__}


def _method_context(method: catalog.Method, by_key: dict[tuple[str, str], Run],
                    modes: list[str], out: Path) -> dict[str, Any]:
    id_ = method.id.replace("-", "_")
    experiment = (f"src/mlatlas/experiments/{method.field}/{id_}.py"
                  if method.experiment else None)
    test = f"tests/{method.field}/test_{id_}.py"
    runs = [by_key[k] for k in sorted(by_key, key=lambda k: (k[0] != "run", _mode_rank(k[1])))]
    ctx: dict[str, Any] = {
        "id": method.id, "field": method.field, "title": method.title, "claim": method.claim,
        "paper": _paper(method.paper), "reference": method.reference,
        "components": _components(method), "experiment": experiment, "test": test,
        "tolerance": tolerances(_ROOT / test), "modes": modes,
        "sections": [], "runs": [], "attention": [],
    }
    for kind, heading in (("run", "Experiment claims"), ("bench", "Benchmark claims")):
        mine = {mode: by_key.get((kind, mode)) for mode in modes}
        if not any(mine.values()):
            continue
        ctx["sections"].append({"kind": kind, "heading": heading,
                                "claims": _claim_rows(mine, modes),
                                "metrics": _metric_rows(mine, modes),
                                "errors": [(m, r.error) for m, r in mine.items()
                                           if r and r.error]})
    for run in runs:
        ctx["runs"].append(_run_context(method, run, out))
        for c in run.claims:
            if c.get("status") != "holds":
                ctx["attention"].append({"id": method.id, "kind": run.kind, "mode": run.mode,
                                         "claim": c, "text": claim_value(c),
                                         "target": _target(c)})
        if run.error:
            ctx["attention"].append({"id": method.id, "kind": run.kind, "mode": run.mode,
                                     "claim": None, "text": f"run failed: {run.error}"})
    return ctx


def _run_context(method: catalog.Method, run: Run, out: Path) -> dict[str, Any]:
    d = run.data
    figures = []
    for path in run.figure_paths():
        figures.append({"src": Path(os.path.relpath(path.resolve(), out.resolve())).as_posix(),
                        "caption": path.stem.replace("_", " ")})
    versions = d.get("versions") or {}
    return {
        "kind": run.kind, "mode": run.mode, "command": reproduce_command(run),
        "figures": figures, "notes": d.get("notes") or [], "error": run.error,
        "date": d.get("date") or "—", "commit": d.get("commit") or "—",
        "machine": _machine(run), "elapsed": _fmt_seconds(d.get("elapsed_s")),
        "seed": d.get("seed"), "python": (d.get("machine") or {}).get("python", "—"),
        "torch": versions.get("torch", "—"),
        "overrides": d.get("overrides") or {},
        "config": sorted((d.get("config") or {}).items()),
        "folder": Path(os.path.relpath(run.folder.resolve(), out.resolve())).as_posix(),
    }


def _index_row(method: catalog.Method, page: dict[str, Any] | None,
               modes: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": method.id, "title": method.title, "built": method.built,
                           "reference": method.reference, "page": None, "cells": [],
                           "bench": None, "components": [], "tolerance": ""}
    if page is None:
        return row
    row.update(page=f"{method.id}.html", components=page["components"],
               tolerance=page["tolerance"])
    section = {s["kind"]: s for s in page["sections"]}
    for mode in modes:
        rows = section["run"]["claims"] if "run" in section else []
        cells = [r["cells"][mode] for r in rows if r["cells"][mode]]
        err = dict(section["run"]["errors"]).get(mode) if "run" in section else None
        row["cells"].append(_tally(mode, cells, err))
    if "bench" in section:
        head = next((m for m in reversed(modes)
                     if any(r["cells"][m] for r in section["bench"]["claims"])), None)
        if head:
            cells = [r["cells"][head] for r in section["bench"]["claims"] if r["cells"][head]]
            first = next(r for r in section["bench"]["claims"] if r["cells"][head])
            row["bench"] = {**_tally(head, cells, None), "first": first["name"],
                            "value": first["cells"][head]["text"], "target": first["target"]}
        else:
            err = next((e for _, e in section["bench"]["errors"]), None)
            row["bench"] = {**_tally(modes[-1], [], err), "first": "", "value": "",
                            "target": ""}
    return row


def _tally(mode: str, cells: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    held = sum(c["status"] == "holds" for c in cells)
    nm = sum(c["status"] == "not measured" for c in cells)
    if error:
        cls, text = "fail", "run failed"
    elif not cells:
        cls, text = "none", "—"
    else:
        cls = "ok" if held == len(cells) else "nm" if held + nm == len(cells) else "fail"
        text = f"{held}/{len(cells)}" + (f" ({nm} not measured)" if nm else "")
    return {"mode": mode, "class": cls, "text": text, "error": error}


# ------------------------------------------------------------------------------ claims
def _claim_rows(runs: dict[str, Run | None], modes: list[str]) -> list[dict[str, Any]]:
    names: dict[str, dict[str, Any]] = {}
    for mode in reversed(modes):  # the headline mode's order and target first
        run = runs[mode]
        for c in run.claims if run else []:
            names.setdefault(c["name"], c)
    rows = []
    for name, ref in names.items():
        cells: dict[str, Any] = {}
        for mode in modes:
            run = runs[mode]
            c = next((c for c in run.claims if c["name"] == name), None) if run else None
            cells[mode] = None if c is None else {
                "status": c["status"], "class": _STATUS_CLASS.get(c["status"], "nm"),
                "text": claim_value(c), "measured": c.get("measured"),
                "target": _target(c),
                "changed": bool(c.get("target_changed")), "detail": c.get("detail") or ""}
        targets = {c["target"] for c in cells.values() if c}
        for c in cells.values():  # a target computed by the run (or --set) differs per mode
            if c:
                c["own_target"] = len(targets) > 1
        rows.append({"name": name, "target": _target(ref) if len(targets) == 1 else
                     "per run (below)", "cells": cells, "gauge": _gauge(ref, cells, modes)})
    return rows


def claim_value(c: dict[str, Any]) -> str:
    """A claim's measured value as the site shows it (``"2.3 x"``, ``"not measured"``)."""
    if c.get("measured") is None:
        return "not measured"
    unit = f" {c['unit']}" if c.get("unit") else ""
    return f"{_fmt(c['measured'])}{unit}"


def _gauge(ref: dict[str, Any], cells: dict[str, Any], modes: list[str]) -> dict[str, Any] | None:
    """Where the measured values lie against the target, on a 160 × 30 strip (None: nothing
    measured). The side of the target where the claim holds is shaded."""
    target = ref.get("target")
    points = [(m, cells[m]["measured"], cells[m]["class"]) for m in modes
              if cells[m] and cells[m]["measured"] is not None
              and math.isfinite(cells[m]["measured"])
              and cells[m]["target"] == _target(ref)]  # only the values judged by this target
    if target is None or not points or not math.isfinite(target):
        return None
    xs = [target] + [v for _, v, _ in points]
    log = min(xs) > 0 and max(xs) / min(xs) > 50
    tr = [math.log10(x) if log else x for x in xs]
    lo, hi = min(tr), max(tr)
    pad = (hi - lo) * 0.15 or (abs(lo) * 0.2 or 1.0)
    lo, hi = lo - pad, hi + pad
    width, left, right = 160, 6, 154

    def px(x: float) -> float:
        t = math.log10(x) if log else x
        return round(left + (t - lo) / (hi - lo) * (right - left), 1)

    tx = px(target)
    good = {">=": (tx, right), ">": (tx, right), "<=": (left, tx), "<": (left, tx)}.get(
        ref["op"])
    return {"width": width, "target_x": tx, "log": log,
            "good": None if good is None else {"x": good[0], "w": round(good[1] - good[0], 1)},
            "points": [{"x": px(v), "mode": m, "class": cls, "label": f"{m}: {_fmt(v)}"}
                       for m, v, cls in points]}


# ------------------------------------------------------------------------------ metrics
_UNIT_SUFFIXES = (("_tokens_per_s", "tokens/s"), ("_per_s", "/s"), ("_bytes", "bytes"),
                  ("_ms", "ms"), ("_seconds", "s"), ("_s", "s"), ("_pct", "%"),
                  ("_percent", "%"), ("_ratio", "×"), ("_speedup", "×"), ("_x", "×"),
                  ("_mib", "MiB"), ("_mb", "MB"))


def metric_label(name: str, unit: str = "") -> tuple[str, str]:
    """A readable label and unit for a metric name: ``"peak_bytes"`` → ``("peak", "bytes")``.

    A unit the experiment declared (``unit``) wins over the one read from the name's suffix.
    Underscores become spaces before the first space or bracket (``"rm_rms_error (a_k = 1)"``
    → ``"rm rms error (a_k = 1)"``).
    """
    cut = re.search(r"[ (\[]", name)
    head, tail = (name[:cut.start()], name[cut.start():]) if cut else (name, "")
    if not unit:
        for suffix, u in _UNIT_SUFFIXES:
            if head.lower().endswith(suffix) and len(head) > len(suffix):
                head, unit = head[: -len(suffix)], u
                break
    return (head.replace("_", " ").strip() + tail).strip(), unit


def _metric_rows(runs: dict[str, Run | None], modes: list[str]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}
    for mode in modes:
        run = runs[mode]
        if run:
            units = run.data.get("metric_units") or {}
            for k in run.data.get("metrics") or {}:
                names.setdefault(k, units.get(k, ""))
    rows = []
    for name, declared in names.items():
        label, unit = metric_label(name, declared)
        cells = {}
        for mode in modes:
            run = runs[mode]
            v = (run.data.get("metrics") or {}).get(name, "absent") if run else "absent"
            cells[mode] = ("—" if v == "absent" else "NaN/inf" if v is None
                           else _fmt_unit(v, unit))
        rows.append({"name": name, "label": label, "unit": unit, "cells": cells})
    return rows


def _fmt_unit(v: float, unit: str) -> str:
    if unit == "bytes" and abs(v) >= 1024:
        for scale, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(v) >= scale:
                return f"{v / scale:.3g} {u}"
    return _fmt(v) + (f" {unit}" if unit and unit not in ("×", "%") else unit)


# ------------------------------------------------------------------------------ sources
def tolerances(test_file: Path) -> str:
    """The atol/rtol values a parity test passes (``"atol 0 – 1e-05, rtol 0 – 1e-06"``), read
    from its source; ``""`` when the file is not there (an installed package) or names none."""
    try:
        text = test_file.read_text()
    except OSError:
        return ""
    parts = []
    for name in ("atol", "rtol"):
        values = []
        for m in re.finditer(rf"(?i)\b{name}\s*=\s*([0-9][0-9.]*(?:e-?[0-9]+)?)\b", text):
            try:
                values.append(float(m.group(1)))
            except ValueError:
                continue
        if values:
            lo, hi = min(values), max(values)
            parts.append(f"{name} {_fmt(lo)}" + (f" – {_fmt(hi)}" if hi != lo else ""))
    return ", ".join(parts)


def _components(method: catalog.Method) -> list[dict[str, str]]:
    """The mlatlas modules (not the infrastructure) the experiment imports, with their files."""
    if not method.experiment:
        return []
    path = _SRC.joinpath(*method.experiment.split(".")[1:]).with_suffix(".py")
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return []
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
            continue
        parts = node.module.split(".")
        if parts[0] != "mlatlas" or len(parts) < 2 or parts[1] in _INFRA:
            continue
        # `from mlatlas.rl import gridworld` names the module mlatlas.rl.gridworld
        subs = [parts + [a.name] for a in node.names if _module_file(parts[1:] + [a.name])]
        for mod in subs or [parts]:
            file = _module_file(mod[1:])
            if file:
                found[".".join(mod)] = f"src/mlatlas/{file}"
    return [{"module": k, "file": v} for k, v in found.items()]


def _module_file(parts: list[str]) -> str | None:
    rel = Path(*parts)
    for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
        if (_SRC / candidate).is_file():
            return candidate.as_posix()
    return None


def _paper(text: str) -> list[dict[str, str | None]]:
    """The catalog's paper field split into citations, each with its arXiv link (if any)."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        m = _ARXIV.search(part)
        out.append({"text": part, "url": f"https://arxiv.org/abs/{m.group(1)}" if m else None})
    return out


def reproduce_command(run: Run) -> str:
    """The command that reproduces ``run``: ``mlatlas run ddim --seed 0 [--full] [--set k=v]``."""
    d = run.data
    argv = ["mlatlas", "bench" if run.kind == "bench" else "run", run.method]
    if d.get("seed") is not None:
        argv += ["--seed", str(d["seed"])]
    if run.mode in ("full", "smoke"):
        argv.append(f"--{run.mode}")
    for k, v in sorted((d.get("overrides") or {}).items()):
        value = ",".join(map(str, v)) if isinstance(v, list) else str(v)
        argv += ["--set", f"{k}={value}"]
    return shlex.join(argv)


# ------------------------------------------------------------------------------ formatting
def _machine(run: Run) -> str:
    m = run.data.get("machine") or {}
    if not m:
        return ""
    text = f"{m.get('processor', '?')}, {m.get('cpu_count', '?')} cores"
    if m.get("torch_threads"):
        text += f", {m['torch_threads']} torch threads"
    if m.get("gpu"):
        text += f", {m['gpu']}"
    return text


def _mode_rank(mode: str) -> int:
    return {"smoke": 0, "default": 1, "full": 2}.get(mode, 3)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


_OP_SIGN = {"<=": "≤", ">=": "≥", "<": "<", ">": ">", "==": "="}


def _target(c: dict[str, Any]) -> str:
    unit = f" {c['unit']}" if c.get("unit") else ""
    return f"{_OP_SIGN.get(c['op'], c['op'])} {_fmt(c['target'])}{unit}"


def _fmt_seconds(x: Any) -> str:
    return "—" if x is None else f"{float(x):.1f} s"
