"""Room on disk for what the export writes: checked before a write, and ENOSPC named when it happens.

The paper-shaped profile writes ~7 GB under ``$MOFSERVE_HOME`` (seeded CLIP ViT-L/14-336 1.7 GB, DINOv2-L
1.2 GB, a bf16 7B-wide LM of 2 layers 1.4 GB, then ONNX graphs of 1.2 + 1.2 + 0.5 GB). On a shared disk
that ran short, ``torch.onnx.export`` died half-way with a bare ``OSError: [Errno 28]`` from deep inside
its serialiser (a CI run, 2026-12). What a user needs instead is the folder, the size it needs and what
its filesystem has, before minutes of tracing are spent, and the same words if space runs out anyway
(another process filled the disk meanwhile). Callers and tests read the fields, never the message.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at run time: the CLI imports this module to name the error
    import torch

MARGIN_BYTES = 256 * 1024**2  # headers, tokenizer files, the manifest, the temp folder's own use
HEADROOM = 1.1  # an ONNX graph's initialisers are the module's weights plus a few folded constants
EXIT_NO_SPACE = 73  # sysexits' EX_CANTCREAT: `mofserve export` exits with it, so scripts and tests can tell


class InsufficientDiskSpaceError(OSError):
    """Not enough free space in ``folder`` for ``what``: ``needed`` and ``free`` are bytes."""

    def __init__(self, what: str, folder: Path, needed: int, free: int) -> None:
        self.what, self.folder, self.needed, self.free = what, folder, needed, free
        super().__init__(errno.ENOSPC, f"not enough disk space for {what}: it needs ~{_gb(needed)} in {folder} "
                                       f"and that filesystem has {_gb(free)} free; free some space or point "
                                       f"MOFSERVE_HOME at a larger disk")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


def _existing(folder: Path) -> Path:
    """The nearest folder that exists: disk_usage needs one, and the target may not be made yet."""
    folder = folder.resolve()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(_existing(folder)).free


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """What ``tensors`` take written out as they are (safetensors and ONNX store them raw)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _needed(nbytes: int) -> int:
    return int(nbytes * HEADROOM) + MARGIN_BYTES


def require_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Raise InsufficientDiskSpaceError unless ``folder``'s filesystem can take ``nbytes`` (with headroom)."""
    needed = _needed(nbytes)
    free = free_bytes(folder)
    if free < needed:
        raise InsufficientDiskSpaceError(what, folder, needed, free)


@contextmanager
def room_for(folder: Path, nbytes: int, what: str) -> Iterator[None]:
    """Check the room before writing ``what``, and turn an ENOSPC raised while writing into the same
    structured error (the partial files are the caller's to remove; its temp folders do)."""
    require_free_space(folder, nbytes, what)
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC or isinstance(error, InsufficientDiskSpaceError):
            raise
        raise InsufficientDiskSpaceError(what, folder, _needed(nbytes), free_bytes(folder)) from error
