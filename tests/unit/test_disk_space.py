"""A disk without room for the export: a structured error before the write, ENOSPC named, exit code 73."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import torch

from mofserve import cli
from mofserve.core import disk_space
from mofserve.core.disk_space import EXIT_NO_SPACE, InsufficientDiskSpaceError, require_free_space, room_for
from mofserve.export import onnx_export
from mofserve.export.configs import CLIP_VISION_EXPORT

_Usage = namedtuple("_Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: _Usage(10 * free, 9 * free, free))


def test_a_write_larger_than_the_free_space_is_refused_with_what_where_and_how_much(tmp_path, monkeypatch):
    _free(monkeypatch, 1024**3)
    with pytest.raises(InsufficientDiskSpaceError) as raised:
        require_free_space(tmp_path / "not" / "made" / "yet", 2 * 1024**3, "the ONNX graph of clip_vision")
    error = raised.value
    assert error.errno == errno.ENOSPC and error.free == 1024**3 and error.needed > 2 * 1024**3
    assert error.folder == tmp_path / "not" / "made" / "yet" and error.what == "the ONNX graph of clip_vision"
    assert "1.00 GiB free" in str(error) and "MOFSERVE_HOME" in str(error)


def test_a_write_that_fits_with_headroom_passes(tmp_path, monkeypatch):
    _free(monkeypatch, 1024**3)
    require_free_space(tmp_path, 512 * 1024**2, "a checkpoint")  # 0.55 GiB + 0.25 GiB margin < 1 GiB


def test_enospc_while_writing_becomes_the_structured_error_and_other_os_errors_pass(tmp_path):
    with pytest.raises(InsufficientDiskSpaceError) as raised, room_for(tmp_path, 0, "a graph"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.what == "a graph" and isinstance(raised.value.__cause__, OSError)
    with pytest.raises(PermissionError), room_for(tmp_path, 0, "a graph"):
        raise PermissionError(errno.EACCES, "denied")


def test_tensor_bytes_counts_each_tensor_in_its_own_dtype():
    assert disk_space.tensor_bytes([torch.zeros(4, 4), torch.zeros(8, dtype=torch.bfloat16)]) == 64 + 16


def test_onnx_export_checks_the_room_before_tracing(tiny_profile, tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    _free(monkeypatch, 1024)
    with pytest.raises(InsufficientDiskSpaceError) as raised:
        onnx_export.export_vision(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, log=lambda _: None)
    assert raised.value.what == "the ONNX graph of clip_vision"
    assert not list((tmp_path / "onnx").iterdir())  # nothing half-written left behind


def test_mofserve_export_on_a_full_disk_exits_73_naming_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    _free(monkeypatch, 1024)
    code = cli.main(["export", "--profile", "tiny"])
    assert code == EXIT_NO_SPACE == 73
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mofserve: error: not enough disk space for the seeded CLIP checkpoint")
    assert str(tmp_path / "checkpoints") in last
