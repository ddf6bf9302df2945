"""analysis/ladder_table.py: the ladder's table and pre-registered tests on a fabricated results.csv."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

_SPEC = importlib.util.spec_from_file_location(
    "ladder_table", Path(__file__).resolve().parents[1] / "analysis" / "ladder_table.py")
lt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lt)


def _results():
    acc = {("static-subset", 0.5): [0.60, 0.70, 0.65], ("random", 0.5): [0.70, 0.72, 0.74],
           ("dpquant", 0.5): [0.80, 0.78, 0.82], ("fp32", 0.0): [0.90, 0.91, 0.92]}
    rows = []
    for (kind, b), accs in acc.items():
        for seed, a in enumerate(accs):
            pid = f"{kind}{b}{seed}"
            for epoch, x in ((0, 0.1), (1, a)):  # only the last epoch counts
                for hw in ("h100_sxm", "b200"):  # accuracy rows repeat per accelerator
                    rows.append({"point_id": pid, "schedule_kind": kind, "budget": b, "seed": seed,
                                 "target_epsilon": 8.0, "epoch": epoch, "test_acc": x, "accelerator": hw,
                                 "complete": True})
    return pd.DataFrame(rows), acc


def test_table_and_holm_corrected_one_sided_welch(tmp_path):
    res, acc = _results()
    res.to_csv(tmp_path / "results.csv", index=False)
    md = lt.main([str(tmp_path)])
    table = pd.read_csv(tmp_path / "ladder_table.csv").set_index("schedule")
    assert table.loc["dpquant", "acc_mean"] == pytest.approx(0.80)
    assert table.loc["static-subset", "acc_std"] == pytest.approx(0.05)
    assert table.loc["static-subset", "rung"] == "static" and table.loc["fp32", "seeds"] == 3
    tests = pd.read_csv(tmp_path / "ladder_tests.csv").set_index("comparison")
    want = [stats.ttest_ind(acc[a, 0.5], acc[b, 0.5], equal_var=False, alternative="greater").pvalue
            for a, b in (("dpquant", "random"), ("random", "static-subset"))]
    assert list(tests["p"]) == pytest.approx(want)
    lo, hi = sorted(want)
    assert sorted(tests["p_holm"]) == pytest.approx([2 * lo, max(2 * lo, hi)])  # Holm by hand, 2 tests
    assert tests.loc["dpquant > random", "se"] == pytest.approx(math.sqrt(0.0004 / 3 + 0.0004 / 3))
    assert "| 8 | 0.5 | +prioritization | dpquant | 80.0 +- 2.0 | 3 |" in md
    assert "| 8 | - | fp32 | fp32 | 91.0 +- 1.0 | 3 |" in md


def test_missing_results_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="results.csv does not exist"):
        lt.main([str(tmp_path)])
