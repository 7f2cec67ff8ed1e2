"""The one report writer: strict JSON, atomic writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mofserve.core import reports as bench


def test_json_safe_turns_nan_into_null():
    value = {"a": math.nan, "b": [1.0, math.inf, np.float32(2.5)], "c": (np.float64(math.nan),), "d": "x"}
    safe = bench.json_safe(value)
    assert safe == {"a": None, "b": [1.0, None, 2.5], "c": [None], "d": "x"}
    json.dumps(safe, allow_nan=False)


def test_write_json_is_strict_and_leaves_no_temporary_file(tmp_path):
    bench.write_json(tmp_path / "r" / "report.json", {"x": np.float32(1.5), "nan": math.nan, "p": Path("a/b"),
                                                      "arr": np.arange(3)})
    assert json.loads((tmp_path / "r" / "report.json").read_text()) == {"x": 1.5, "nan": None, "p": "a/b",
                                                                        "arr": [0, 1, 2]}
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.json"]
