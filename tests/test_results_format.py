"""Every committed result file (bench/results/**/*.json) is a list of rows with the keys
the GPU issues ask for, so that anyone can check the figures by script."""

import json
from pathlib import Path

import pytest

from mpiring.bench.common import REQUIRED

pytestmark = pytest.mark.serial
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def problems(rows) -> list[str]:
    """What is wrong with one file's content (empty: nothing)."""
    if not isinstance(rows, list) or not rows:
        return ["not a non-empty list of rows"]
    found = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            found.append(f"row {i} is not an object")
            continue
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            found.append(f"row {i} misses {missing}")
        if row.get("bench") == "ring" and "efficiency" not in row:
            found.append(f"ring row {i} misses 'efficiency'")
    return found


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_file_rows(path):
    assert problems(json.loads(path.read_text())) == []


def test_the_check_can_fail():
    good = {k: None for k in REQUIRED}
    assert problems([good]) == []
    assert problems({"rows": [good]}) and problems([])
    assert problems([{**good, "bench": "ring"}]) == ["ring row 0 misses 'efficiency'"]
    assert problems([{k: v for k, v in good.items() if k != "card"}]) == ["row 0 misses ['card']"]
