"""The metric catalogue in docs/ is the one the code exports, and every name follows the conventions."""

from __future__ import annotations

import re

from alphaengine.metrics import catalogue
from tests.conftest import REPO


def test_docs_metrics_is_the_generated_catalogue() -> None:
    assert (REPO / "docs" / "metrics.md").read_text() == catalogue(), (
        "regenerate: .venv/bin/python -m alphaengine.metrics > docs/metrics.md"
    )


def test_metric_names_follow_the_conventions() -> None:
    rows = [line for line in catalogue().splitlines() if line.startswith("| `alphaengine_")]
    assert len(rows) > 60
    for row in rows:
        name, kind, labels = (cell.strip(" `") for cell in row.split("|")[1:4])
        assert re.fullmatch(r"alphaengine_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), name
        assert not re.search(r"_(ms|milliseconds|minutes|kb|mb)(_|$)", name), f"{name}: base units"
        # Labels bounded by configuration: nothing per order, trade or signal.
        assert not re.search(r"(order|trade|signal|fill)_id", labels), f"{name}: unbounded label"
