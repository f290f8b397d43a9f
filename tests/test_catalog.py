"""The catalog: all 43 methods, consistent rows, files where the conventions put them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlatlas import catalog

ROOT = Path(__file__).resolve().parents[1]


def test_all_methods_of_methods_md_are_listed():
    assert len(catalog.METHODS) == 43
    assert len({m.id for m in catalog.METHODS}) == 43


@pytest.mark.parametrize("m", catalog.METHODS, ids=lambda m: m.id)
def test_row_is_well_formed(m):
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", m.id), "ids are kebab-case"
    assert m.field in catalog.FIELDS
    assert m.title and m.paper and m.reference and m.claim
    assert re.search(r"(19|20)\d\d", m.paper), "the paper cites a year"


@pytest.mark.parametrize("m", [m for m in catalog.METHODS if m.built], ids=lambda m: m.id)
def test_built_row_follows_the_naming_convention(m):
    name = m.id.replace("-", "_")
    assert m.experiment == f"mlatlas.experiments.{m.field}.{name}"
    assert (ROOT / "src" / "mlatlas" / "experiments" / m.field / f"{name}.py").is_file()
    tests = list((ROOT / "tests" / m.field).glob(f"test_{name}*.py"))
    assert tests, f"no tests/{m.field}/test_{name}.py"


def test_get_suggests_close_ids():
    with pytest.raises(catalog.UnknownMethodError) as exc:
        catalog.get("flash-atention")
    assert "flash-attention" in exc.value.suggestions
    assert "did you mean flash-attention" in str(exc.value)
    with pytest.raises(catalog.UnknownMethodError) as exc:
        catalog.get("flash")
    assert exc.value.suggestions[0] == "flash-attention"


def test_by_field():
    assert {m.field for m in catalog.by_field("rl")} == {"rl"}
    assert len(catalog.by_field()) == 43
    with pytest.raises(ValueError, match="unknown field 'astrology'; expected one of"):
        catalog.by_field("astrology")
