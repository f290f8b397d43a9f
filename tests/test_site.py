"""The atlas site: built from run folders, and checked in a real headless Chromium.

The browser test drives Debian's ``chromium`` through Playwright for Python
(``executable_path``: Playwright never downloads a browser here). Playwright rather than
Chromium's own ``--headless --dump-dom``/``--screenshot`` because the test needs what only a
driven browser reports: console errors, failed requests, whether each image decoded
(``naturalWidth``) and the text of table cells. Without a Chromium the test skips, saying how to
get one — except under ``CI``, where it fails (``.ci/run`` installs the package).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from mlatlas import catalog
from mlatlas.cli import EXIT_OK, EXIT_USAGE, main
from mlatlas.site.builder import claim_value, metric_label, reproduce_command, tolerances
from mlatlas.site.runs import Run

IN_CI = bool(os.environ.get("CI"))
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """``$MLATLAS_CHROMIUM``, or the first Chromium/Chrome on PATH."""
    explicit = os.environ.get("MLATLAS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((p for p in map(shutil.which, _BROWSERS) if p), None)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """A smoke tour of gridworld (a real experiment), fake-method (+ bench, with a claim not
    measured) and fake-broken (raises): the site it wrote and its folder."""
    import fake_experiment

    from mlatlas import runner

    out = tmp_path_factory.mktemp("tour")
    grid = catalog.get("gridworld")
    with pytest.MonkeyPatch.context() as mp:
        fakes = fake_experiment.register(mp)
        mp.setattr(catalog, "METHODS", (grid, *fakes))
        mp.setattr(catalog, "_BY_ID", {m.id: m for m in (grid, *fakes)})

        def half_measured(cfg, out_):
            rep = fake_experiment.run(cfg, out_)
            rep.not_measured("same as the reference library", 0.0, "<=",
                             reason="the reference is not importable")
            return rep

        mp.setattr(runner.load_experiment("fake-method"), "run", half_measured)
        reports, index = runner.run_tour(out=out, mode="smoke",
                                         ids=["gridworld", "fake-method", "fake-broken"])
        yield out, index, reports


def test_tour_writes_index_and_a_page_per_method(tour):
    out, index, reports = tour
    assert index == out / "index.html" and index.is_file()
    for method in ("gridworld", "fake-method", "fake-broken"):
        assert (out / f"{method}.html").is_file()
    html = index.read_text()
    assert 'href="gridworld.html"' in html and 'href="fake-method.html"' in html
    assert "run failed" in html and "not measured" in html  # visible, never filtered
    page = (out / "fake-method.html").read_text()
    assert "mlatlas run fake-method --seed 0 --smoke" in page
    assert "mlatlas bench fake-method --seed 0 --smoke" in page
    assert 'src="fake-method/curve.png"' in page and "the reference is not importable" in page
    assert "prefers-color-scheme: dark" in page and 'name="viewport"' in page
    grid = (out / "gridworld.html").read_text()
    assert "https://arxiv.org/abs/" not in grid  # gridworld cites a book, no arXiv id
    assert "src/mlatlas/rl/gridworld.py" in grid and "tests/rl/test_gridworld.py" in grid


def test_site_rebuilds_default_and_full_side_by_side(fake_method, tmp_path, capsys):
    assert main(["tour", "fake-method", "--out", str(tmp_path / "d")]) == EXIT_OK
    assert main(["tour", "fake-method", "--full", "--out", str(tmp_path / "f"),
                 "--no-bench"]) == EXIT_OK
    capsys.readouterr()
    assert main(["site", str(tmp_path / "d"), str(tmp_path / "f"),
                 "--out", str(tmp_path / "site")]) == EXIT_OK
    index = tmp_path / "site" / "index.html"
    assert str(index.resolve()) in capsys.readouterr().out.splitlines()[-1]
    page = (tmp_path / "site" / "fake-method.html").read_text()
    assert "<th>default</th>" in page and "<th>full</th>" in page
    assert "mlatlas run fake-method --seed 0 --full" in page
    assert 'src="../f/fake-method/curve.png"' in page  # figures linked, not copied
    assert main(["site", str(tmp_path / "nowhere")]) == EXIT_USAGE
    (tmp_path / "empty").mkdir()
    assert main(["site", str(tmp_path / "empty")]) == EXIT_USAGE
    assert "no run folder" in capsys.readouterr().err


def test_set_target_marking_shows_on_the_page(fake_method, tmp_path):
    assert main(["run", "fake-method", "--set", "target=0.5", "--out", str(tmp_path / "r")]) == 0
    assert main(["site", str(tmp_path / "r")]) == EXIT_OK
    page = (tmp_path / "r" / "fake-method.html").read_text()
    assert "changed by --set" in page and "--set target=0.5" in page


def test_metric_labels_and_units():
    assert metric_label("peak_bytes") == ("peak", "bytes")
    assert metric_label("step_time_s") == ("step time", "s")
    assert metric_label("rm_rms_error (a_k = 1/k)") == ("rm rms error (a_k = 1/k)", "")
    assert metric_label("tokens_per_s", "tok/s") == ("tokens per s", "tok/s")
    assert metric_label("speedup_x") == ("speedup", "×")


def test_tolerances_are_read_from_the_test(tmp_path):
    test = tmp_path / "test_x.py"
    test.write_text("assert_close(a, b, atol=1e-5, rtol=0)\nATOL = 1e-6\nassert_close(a, b, "
                    "atol=ATOL, rtol=1.3e-6)\n")
    assert tolerances(test) == "atol 1e-06 – 1e-05, rtol 0 – 1.3e-06"
    assert tolerances(tmp_path / "missing.py") == ""


def test_reproduce_command():
    run = Run(Path("."), {"method": "ddim", "kind": "bench", "mode": "full", "seed": 3,
                          "overrides": {"n_subsets": 5, "steps": [1, 2]}})
    assert reproduce_command(run) == ("mlatlas bench ddim --seed 3 --full --set n_subsets=5 "
                                      "--set steps=1,2")


# ------------------------------------------------------------------------------ the browser
def test_site_in_headless_chromium(tour):
    browser_path = find_chromium()
    if browser_path is None:
        msg = ("no Chromium found: install Debian's `chromium` package (apt-get install -y "
               "chromium) or set MLATLAS_CHROMIUM to a Chrome/Chromium binary")
        if IN_CI:
            pytest.fail(msg + " — CI requires it (.ci/run installs it)")
        pytest.skip(msg)
    sync_api = pytest.importorskip("playwright.sync_api")
    out, index, _ = tour
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

        page.goto(index.as_uri())
        assert page.title().startswith("mlatlas")
        linked = _check_page(page, out, problems)
        pages = sorted({p for p in linked if p.suffix == ".html" and p.name != "index.html"})
        assert {p.name for p in pages} == {"gridworld.html", "fake-method.html",
                                           "fake-broken.html"}
        page.screenshot(path=str(out / "site-index.png"), full_page=True)
        for p in pages:
            page.goto(p.as_uri())
            _check_page(page, out, problems)
            _check_claims_match_metrics(page, out / p.stem)
        browser.close()
    assert not problems, "\n".join(problems)
    assert (out / "site-index.png").stat().st_size > 10_000


def _check_page(page, out: Path, problems: list[str]) -> set[Path]:
    """Every image decoded and every local link points at a file; returns the linked files."""
    for src, ok in page.eval_on_selector_all(
            "img", "els => els.map(e => [e.src, e.complete && e.naturalWidth > 0])"):
        if not ok:
            problems.append(f"{page.url}: broken image {src}")
    linked = set()
    for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
        url = urlparse(href)
        if url.scheme in ("http", "https"):
            continue  # external (the arXiv links): not reachable offline, not checked
        assert url.scheme == "file", href
        target = Path(unquote(url.path))
        if not target.exists():
            problems.append(f"{page.url}: broken link {href}")
        elif target.resolve().is_relative_to(out.resolve()):
            linked.add(target.resolve())
    return linked


def _check_claims_match_metrics(page, folder: Path) -> None:
    """The claim table of a method page shows what its metrics.json says, run and bench."""
    for kind, path in (("run", folder / "metrics.json"), ("bench", folder / "bench" /
                                                           "metrics.json")):
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        mode = data["mode"]
        for claim in data["claims"]:
            name = claim["name"].replace("\\", "\\\\").replace('"', '\\"')
            cell = page.locator(f'table.claims[data-kind="{kind}"] '
                                f'tr[data-claim="{name}"] td[data-mode="{mode}"]')
            assert cell.count() == 1, (folder.name, kind, claim["name"])
            assert cell.get_attribute("data-status") == claim["status"]
            assert cell.locator(".value").inner_text().strip() == claim_value(claim)
        shown = page.locator(f'table.claims[data-kind="{kind}"] tbody tr').count()
        assert shown == len(data["claims"]), (folder.name, kind)
