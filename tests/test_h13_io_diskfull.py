"""A full disk while an output is written (embedseg_deploy.io): a clear DiskFullError, nothing partial left.

Simulated (the file write raises ENOSPC, or numpy's errno-less short write), and real on a 1 MiB tmpfs
where mounting is permitted.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embedseg_deploy import io
from embedseg_deploy.io import (
    DiskFullError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_writer,
    is_disk_full,
    read_tiff,
    write_tiff_atomic,
)

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
NUMPY_SHORT_WRITE = OSError("16384 requested and 10072 written")  # ndarray.tofile on a full disk


class _FullFile:
    """A binary file whose writes store half the data, then fail as a full disk does."""

    def __init__(self, fh, exc: OSError):
        self.fh, self.exc = fh, exc

    def write(self, data) -> int:
        self.fh.write(bytes(data)[: len(data) // 2])
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _fill_disk_on_write(monkeypatch, exc: OSError) -> None:
    """Make every file atomic_writer opens behave as on a full disk."""
    real_open = open
    monkeypatch.setattr(io, "open", lambda *a, **k: _FullFile(real_open(*a, **k), exc), raising=False)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exc", [ENOSPC, NUMPY_SHORT_WRITE], ids=["enospc", "numpy-short-write"])
@pytest.mark.parametrize(
    "write",
    [
        lambda p: write_tiff_atomic(p, np.ones((16, 16), np.uint16), (0.5, 0.5), overwrite=True),
        lambda p: atomic_write_json(p, {"objects": 3}),
        lambda p: atomic_write_bytes(p, b"new content"),
    ],
    ids=["tiff", "json", "bytes"],
)
def test_full_disk_raises_disk_full_error_and_leaves_nothing_partial(tmp_path, monkeypatch, exc, write):
    old = atomic_write_bytes(tmp_path / "old.out", b"previous result")
    _fill_disk_on_write(monkeypatch, exc)
    for path in (old, tmp_path / "new.out"):
        with pytest.raises(DiskFullError) as err:
            write(path)
        assert str(err.value) == f"no space left on {tmp_path} (writing {path.name})"
        assert err.value.errno == errno.ENOSPC and err.value.path == path
    assert _names(tmp_path) == ["old.out"]  # no temp file, no partial new.out
    assert old.read_bytes() == b"previous result"


def test_full_disk_when_the_temp_file_cannot_be_created(tmp_path, monkeypatch):
    def no_inode_left(path, tag="tmp"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "temp_file_beside", no_inode_left)
    with pytest.raises(DiskFullError, match=r"^no space left on .* \(writing a\.json\)$"):
        atomic_write_json(tmp_path / "a.json", {})
    assert _names(tmp_path) == []


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    _fill_disk_on_write(monkeypatch, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error") as err:
        atomic_write_bytes(tmp_path / "a.bin", b"data")
    assert not isinstance(err.value, DiskFullError)
    assert _names(tmp_path) == []


def test_interrupt_inside_the_block_is_not_disk_full(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_writer(tmp_path / "a.bin") as fh:
        fh.write(b"half")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (ENOSPC, True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (NUMPY_SHORT_WRITE, True),
        (OSError(errno.EIO, "16384 requested and 10072 written"), False),  # has an errno, not ENOSPC
        (OSError("disk full"), False),
        (ValueError("16384 requested and 10072 written"), False),
    ],
)
def test_is_disk_full(exc, full):
    assert is_disk_full(exc) is full


# ---------------------------------------------------------------------------------------------- real


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at a fresh folder; skips when this process may not mount one."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount/umount command: cannot make a tiny file system to fill")
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode})")
    try:
        yield folder
    finally:
        subprocess.run([umount, str(folder)], check=True)


def test_real_full_disk(tiny_tmpfs):
    small = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    old = write_tiff_atomic(tiny_tmpfs / "labels.tif", small, (0.5, 0.5))
    big = np.ones((2048, 2048), np.uint16)  # 8 MiB on 1 MiB
    for path in (old, tiny_tmpfs / "new.tif"):
        with pytest.raises(DiskFullError) as err:
            write_tiff_atomic(path, big, (0.5, 0.5), overwrite=True)
        assert str(err.value) == f"no space left on {tiny_tmpfs} (writing {path.name})"
    with pytest.raises(DiskFullError, match=r"^no space left on .*tiny \(writing summary\.json\)$"):
        atomic_write_json(tiny_tmpfs / "summary.json", {"labels": list(range(300_000))})
    with pytest.raises(DiskFullError, match=r"\(writing blob\.bin\)$"):
        atomic_write_bytes(tiny_tmpfs / "blob.bin", bytes(2 << 20))
    assert _names(tiny_tmpfs) == ["labels.tif"]
    np.testing.assert_array_equal(read_tiff(old).data, small)
    atomic_write_json(tiny_tmpfs / "summary.json", {"ok": True})  # the space was given back
    assert _names(tiny_tmpfs) == ["labels.tif", "summary.json"]
