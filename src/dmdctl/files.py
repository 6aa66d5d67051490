"""File helpers shared by every command: hashes, atomic writes, the reason a write failed."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from dmdctl.errors import UserError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_os_error(e: BaseException) -> str:
    """A short reason for a failed write, with a hint when the disk is full."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason += " (free some space first)"
        return reason
    text = str(e)  # safetensors reports I/O errors as SafetensorError
    return text + (" (free some space first)" if "No space left" in text else "")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def atomic_save_safetensors(
    tensors: dict, path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` under a temporary name, renamed when complete.

    On failure (a full disk) the temporary file is removed and the error re-raised for the
    caller to report.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_cached_safetensors(path: Path, key: str) -> dict | None:
    """The tensors of a cache file written with ``metadata={"key": key, ...}``, or None when it is
    missing, was made from other inputs (another key) or is damaged (then it is simply made
    again)."""
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any damage means "make it again"
        return None
