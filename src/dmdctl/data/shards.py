"""Resumable sharded stores: fixed shards written in any order, a manifest kept in step.

What the pairs store (``dmdctl make-pairs``) and the real-data store (``dmdctl prepare-real``)
share. A store is a folder::

    manifest.json        the store's settings, one entry per complete shard (file, sha256, ...)
    PREFIX-00000.EXT     shard 0, then 1, 2 ...: shard k always holds the same fixed range of
    ...                  the store's items, so shards can be made in any order, by any process
    .progress/           while a run is going: one small record per shard written but not yet
                         in the manifest (gone when the manifest has caught up)

Writing a shard: the data go to ``PREFIX-NNNNN.EXT.tmp`` (the subclass's write hook), renamed
when complete; then a record ``.progress/PREFIX-NNNNN.json`` (the manifest entry) is written
atomically. Only the main process writes ``manifest.json``: it merges the records (its own
after each of its shards, everybody's at the end, and any left over by a killed run at the
start of the next one), with an atomic rename. A shard file without a record is made again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dmdctl.errors import UserError
from dmdctl.files import atomic_write_bytes, describe_os_error, sha256_file

MANIFEST = "manifest.json"
PROGRESS = ".progress"


def write_failed(
    path: Path, e: BaseException, again: str = "run the same command again"
) -> UserError:
    return UserError(
        f"could not write {path}: {describe_os_error(e)}; {again} to continue after the last "
        "complete shard"
    )


class ShardWriter:
    """Writes shards (any order, any process) and keeps manifest.json in step with the disk.

    ``main`` marks the one process that writes the manifest; the others only write shards and
    their records. A subclass sets the file names (``prefix``, ``suffix``), the manifest's
    ``format``, and provides :meth:`num_shards`, :meth:`entry_fits` (does a record describe
    shard ``index`` of these settings), :meth:`write_file` (the write hook), and may override
    :meth:`read_manifest` / :meth:`verify_shard` for its own messages.
    """

    prefix = "shard"
    suffix = ".bin"
    format = "dmdctl.shards"
    what = "shards"  # in messages: "... already holds {what} made with ..."
    write_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, folder: Path, settings: dict, main: bool = True):
        self.folder = Path(folder)
        self.settings = settings
        self.main = main
        self._file_re = re.compile(rf"^{re.escape(self.prefix)}-(\d+){re.escape(self.suffix)}$")
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder} is a file, not a folder; choose another --out")
        existing = self.read_manifest()
        if existing is not None:
            self.check_same_settings(existing)
        self.shards: dict[int, dict] = {}
        if existing is not None:
            self.shards = {self.shard_index(e): e for e in existing["shards"]}
        self.remade: list[int] = []
        if main:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_failed(self.folder, e) from None
            for index, entry in sorted(self.shards.items()):
                try:
                    self.verify_shard(entry)
                except UserError:  # deleted or damaged since: make it again
                    self.remade.append(index)
                    del self.shards[index]
            if self.remade:
                self._write_manifest()
            for stale in self.folder.glob(f"{self.prefix}-*{self.suffix}.tmp"):
                stale.unlink(missing_ok=True)  # a shard cut short by a crash
            self.merge(verify=True)  # records left by an interrupted run

    # --- what a subclass provides ------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        raise NotImplementedError

    def entry_fits(self, index: int, entry: dict) -> bool:
        """Whether a progress record describes shard ``index`` of these settings."""
        raise NotImplementedError

    def write_file(self, index: int, tmp: Path, data) -> dict:
        """Write shard ``index``'s ``data`` to ``tmp``; return the manifest entry's fields
        (besides ``file`` and ``sha256``)."""
        raise NotImplementedError

    def read_manifest(self) -> dict | None:
        return read_manifest(self.folder, self.format, self.what)

    def verify_shard(self, entry: dict) -> Path:
        return verify_shard(self.folder, entry, self.what)

    # --- the generic part --------------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}{self.suffix}"

    def shard_index(self, entry: dict) -> int:
        m = self._file_re.match(entry.get("file", ""))
        if not m:
            raise UserError(f"bad shard entry in {self.folder / MANIFEST}: {entry!r}")
        return int(m.group(1))

    def check_same_settings(self, existing: dict) -> None:
        for key, value in self.settings.items():
            if existing.get(key) != value:
                raise UserError(
                    f"{self.folder} already holds {self.what} made with a different '{key}' "
                    f"({existing.get(key)!r} there, {value!r} now); use another --out or the same settings"
                )

    def reload(self) -> None:
        """Re-read the manifest (non-main processes, after the main one has merged)."""
        existing = self.read_manifest()
        self.shards = {self.shard_index(e): e for e in existing["shards"]} if existing else {}

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if i not in self.shards]

    @property
    def next_shard(self) -> int:
        """The first shard not made yet (``num_shards`` when complete)."""
        todo = self.missing()
        return todo[0] if todo else self.num_shards

    def write_shard(self, index: int, data) -> dict:
        path = self.folder / self.shard_name(index)
        tmp = path.with_name(path.name + ".tmp")
        try:
            fields = self.write_file(index, tmp, data)
            tmp.replace(path)
        except self.write_errors as e:
            tmp.unlink(missing_ok=True)
            raise write_failed(path, e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry = {"file": path.name, **fields, "sha256": sha256_file(path)}
        progress = self.folder / PROGRESS
        try:
            progress.mkdir(exist_ok=True)
        except OSError as e:
            raise write_failed(progress, e) from None
        atomic_write_bytes(progress / f"{path.stem}.json", json.dumps(entry).encode())
        if self.main:
            self.merge()
        return entry

    def merge(self, verify: bool = False) -> int:
        """Fold the progress records into manifest.json (main process only); return how many."""
        if not self.main:
            raise RuntimeError("only the main process writes the manifest")
        progress = self.folder / PROGRESS
        records = sorted(progress.glob(f"{self.prefix}-*.json")) if progress.is_dir() else []
        added = 0
        for record in records:
            try:
                entry = json.loads(record.read_text())
                index = self.shard_index(entry)
            except (json.JSONDecodeError, UnicodeDecodeError, UserError, AttributeError):
                continue  # a damaged record: its shard is made again
            if index in self.shards or index >= self.num_shards:
                continue
            if not self.entry_fits(index, entry):
                continue
            if verify:
                try:
                    self.verify_shard(entry)
                except UserError:
                    continue  # listed nowhere yet, so it is simply made again
            self.shards[index] = entry
            added += 1
        if added or not (self.folder / MANIFEST).is_file():
            self._write_manifest()
        for record in records:  # merged now, or useless
            record.unlink(missing_ok=True)
        if progress.is_dir() and not any(progress.iterdir()):
            progress.rmdir()
        return added

    def manifest_extra(self) -> dict:
        """Fields a subclass adds to the manifest, computed from the shards (e.g. totals)."""
        return {}

    def _write_manifest(self) -> None:
        data = {
            "format": self.format,
            "version": 1,
            **self.settings,
            "complete": len(self.shards) == self.num_shards,
            "shards": [self.shards[i] for i in sorted(self.shards)],
            **self.manifest_extra(),
        }
        atomic_write_bytes(self.folder / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


def read_manifest(folder: Path, fmt: str, what: str) -> dict | None:
    """The manifest of a ``fmt`` store in ``folder``, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); delete the folder and make the {what} again"
        ) from None
    except OSError as e:
        raise UserError(f"{path} is unreadable ({e.strerror or e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{path} is not a dmdctl {what} manifest")
    return data


def verify_shard(folder: Path, entry: dict, what: str, command: str = "command") -> Path:
    """The shard's path, after checking its sha256 against the manifest entry."""
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise UserError(
            f"{what} shard {path} is listed in the manifest but missing; run the same "
            f"{command} again to remake it"
        )
    if sha256_file(path) != entry["sha256"]:
        raise UserError(
            f"{what} shard {path} is corrupt or truncated (sha256 differs from the manifest); "
            f"run the same {command} again to remake it"
        )
    return path
