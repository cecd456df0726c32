"""The one atomic-write helper every writer uses: a failed write leaves the earlier file and no debris."""

import numpy as np
import pytest

from fewshot_core.atomic import atomic_write, atomic_write_text


def test_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.txt"
    atomic_write_text(target, "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["table.txt"]


def test_writers_that_append_a_suffix_and_file_mode(tmp_path):
    out = atomic_write(tmp_path / "bank.npz", lambda tmp: np.savez(tmp, a=np.arange(3)), suffix=".npz")
    assert np.load(out)["a"].tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == ["bank.npz"]
    report = atomic_write_text(tmp_path / "report.html", "<html/>", mode=0o644)
    assert report.stat().st_mode & 0o777 == 0o644
