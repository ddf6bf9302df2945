"""Atomic writes: a result file is complete or absent, never half-written."""

import os

import pandas as pd
import pytest

from dpquant_sim.io import atomic_write, atomic_write_df, atomic_write_json, atomic_write_text


def test_failed_writer_leaves_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "result.txt"
    atomic_write_text(target, "finished")

    def broken(p):
        p.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "finished"
    assert sorted(os.listdir(tmp_path)) == ["result.txt"]


def test_mode_follows_umask_and_formats_roundtrip(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    for name in ("t.csv", "t.parquet"):
        atomic_write_df(tmp_path / name, df)
        back = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        pd.testing.assert_frame_equal(back, df)
