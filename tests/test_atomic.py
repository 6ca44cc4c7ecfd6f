import os
import stat

import pytest

from eocausal import atomic


def test_a_write_replaces_the_file_readably_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic.write_json(target, {"b": 1, "a": 2}, sort_keys=True)
    assert target.read_text() == '{"a": 2, "b": 1}'
    assert stat.S_IMODE(os.stat(target).st_mode) == atomic.FILE_MODE
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic.write_bytes(target, b"old")

    def half_then_fail(fh):
        fh.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_with(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
