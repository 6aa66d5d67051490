"""Prompts of any count: a prompts file indexed by row, encoded inside the step.

A prompts file is one of

- text (``.txt`` or any other suffix): one prompt per non-empty line;
- JSON lines (``.jsonl``/``.json``): one object per non-empty line with a ``caption``,
  ``prompt`` or ``text`` string;
- an Arrow IPC file (``.arrow``/``.feather``, memory-mapped) or a Parquet file (``.parquet``,
  read one row group at a time) with a string column (``--prompt-column``, or the first of
  caption/prompt/text).

:class:`PromptFile` scans a text or JSONL file once (checking every row: a bad one is refused
before anything is written) and keeps only two small arrays, where each row starts and how long
it is (12 bytes a prompt); a row is read from disk when a step draws it. Arrow and Parquet
files carry their own index.

:class:`PromptConditions` turns row indices into the condition tensors the teacher's denoiser
takes: by running the frozen text encoders on the drawn prompts (``encoded``; what DMD2's code
does every step), or, for small prompt sets, by looking rows up in a table of embeddings
computed once (``cached``; memory-mapped). ``--prompt-cache auto`` caches when the table is at
most :data:`AUTO_CACHE_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import DataError, UserError

TEXT_FIELDS = ("caption", "prompt", "text")
JSONL_SUFFIXES = (".jsonl", ".json")
ARROW_SUFFIXES = (".arrow", ".feather")
PARQUET_SUFFIXES = (".parquet",)
EMBEDDINGS_FILE = "prompt-embeddings.safetensors"
AUTO_CACHE_BYTES = 1 << 30  # --prompt-cache auto: a table up to 1 GiB is cached
SCAN_CHUNK = 1 << 24  # bytes read at a time while indexing


def _jsonl_text(raw: bytes) -> str:
    """The text of one JSON line; ValueError says what is wrong with it."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg})") from None
    text = next((row[k] for k in TEXT_FIELDS if k in row), None) if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise ValueError("has no 'caption', 'prompt' or 'text' string field")
    return text


class PromptFile:
    """The rows of a prompts file, read by index (see the module docstring)."""

    def __init__(self, path: Path | str, column: str | None = None, flag: str = "--prompts"):
        self.path = Path(path).expanduser()
        self.flag = flag
        if not self.path.is_file():
            raise UserError(f"{flag} {self.path}: prompts file not found")
        suffix = self.path.suffix.lower()
        self.format = (
            "arrow"
            if suffix in ARROW_SUFFIXES
            else "parquet"
            if suffix in PARQUET_SUFFIXES
            else "jsonl"
            if suffix in JSONL_SUFFIXES
            else "text"
        )
        self._fd: int | None = None
        self._pid = None
        if self.format in ("arrow", "parquet"):
            self._open_columnar(column)
        else:
            if column is not None:
                raise UserError(
                    f"--prompt-column is for Arrow and Parquet prompt files, not {self.path.name}"
                )
            self._index_lines()
        if len(self) == 0:
            raise UserError(f"{flag} {self.path} holds no prompt")

    # --- text and JSON lines --------------------------------------------------------------
    def _index_lines(self) -> None:
        """One pass over the file: where each non-empty line starts and its length, every row
        checked (UTF-8; for JSONL a text field), memory flat in the file's size."""
        starts, lengths = [], []
        jsonl = self.format == "jsonl"
        offset, line_no, carry = 0, 0, b""
        try:
            with open(self.path, "rb") as f:
                while True:
                    chunk = f.read(SCAN_CHUNK)
                    if not chunk and not carry:
                        break
                    data = carry + chunk
                    base = offset - len(carry)
                    if chunk:
                        cut = data.rfind(b"\n") + 1
                        if cut == 0:  # no line end in this chunk yet: read on
                            carry, offset = data, offset + len(chunk)
                            continue
                    else:
                        cut = len(data)  # the last line has no newline
                    block, carry = data[:cut], data[cut:]
                    offset += len(chunk)
                    self._index_block(block, base, line_no, jsonl, starts, lengths)
                    line_no += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        except OSError as e:
            raise UserError(
                f"{self.flag} {self.path}: could not read ({e.strerror or e})"
            ) from None
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.uint32)

    def _index_block(self, block: bytes, base: int, line_no: int, jsonl: bool, starts, lengths):
        a = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(a == 10)
        if len(block) and block[-1:] != b"\n":
            ends = np.append(ends, len(block))
        begins = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends
        lens = ends - begins
        # a trailing \r (Windows line ends) is not part of the prompt
        cr = lens > 0
        cr[cr] = a[np.minimum(ends[cr] - 1, len(a) - 1)] == 13
        lens = lens - cr
        try:
            block.decode("utf-8")  # every row is text
        except UnicodeDecodeError as e:
            n = line_no + block.count(b"\n", 0, e.start) + 1
            raise UserError(f"{self.path}:{n} is not UTF-8 text") from None
        keep = lens > 0
        # short lines may be blank (spaces only): checked one by one, they are few
        for i in np.flatnonzero(keep & (lens <= 16)):
            if not block[begins[i] : begins[i] + lens[i]].strip():
                keep[i] = False
        if jsonl:
            for i in np.flatnonzero(keep):
                try:
                    _jsonl_text(block[begins[i] : begins[i] + lens[i]])
                except ValueError as e:
                    raise UserError(f"{self.path}:{line_no + int(i) + 1} {e}") from None
        starts.append((begins[keep] + base).astype(np.int64))
        lengths.append(lens[keep].astype(np.uint32))

    def _read_line(self, i: int) -> str:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        start, length = int(self.starts[i]), int(self.lengths[i])
        try:
            raw = os.pread(self._fd, length, start)
        except OSError as e:
            raise DataError(f"{self.path}: could not read prompt {i} ({e.strerror or e})") from None
        if len(raw) != length:
            raise DataError(
                f"{self.path} changed while in use (prompt {i} is cut short): the file a run "
                "reads must stay as it was when the run started"
            )
        if self.format == "jsonl":
            try:
                return _jsonl_text(raw)
            except ValueError as e:
                raise DataError(f"{self.path} changed while in use: row {i} {e}") from None
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{self.path} changed while in use: row {i} is not UTF-8") from None

    # --- Arrow / Parquet ----------------------------------------------------------------
    def _open_columnar(self, column: str | None) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(
                f"{self.path.name}: Arrow and Parquet prompt files need pyarrow"
            ) from None
        try:
            if self.format == "arrow":
                self._mmap = pa.memory_map(str(self.path), "r")
                try:
                    table = pa.ipc.open_file(self._mmap).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_stream(self._mmap).read_all()
                schema = table.schema
            else:
                self._parquet = pq.ParquetFile(str(self.path))
                schema = self._parquet.schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise UserError(
                f"{self.flag} {self.path}: not a readable {self.format} file ({e})"
            ) from None
        names = list(schema.names)
        if column is None:
            column = next((n for n in TEXT_FIELDS if n in names), None)
            if column is None:
                raise UserError(
                    f"{self.path} has no caption/prompt/text column (columns: {', '.join(names)}); "
                    "name one with --prompt-column"
                )
        elif column not in names:
            raise UserError(f"{self.path} has no column '{column}' (columns: {', '.join(names)})")
        if not (
            pa.types.is_string(schema.field(column).type)
            or pa.types.is_large_string(schema.field(column).type)
        ):
            raise UserError(
                f"{self.path}: column '{column}' holds {schema.field(column).type}, not text"
            )
        self.column = column
        if self.format == "arrow":
            self._col = table.column(column)
            if self._col.null_count:
                raise UserError(
                    f"{self.path}: column '{column}' has {self._col.null_count} empty (null) rows"
                )
            self._rows = len(self._col)
        else:
            md = self._parquet.metadata
            counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            self._group_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._rows = int(self._group_start[-1])
            self._groups: OrderedDict[int, list] = OrderedDict()

    def _read_columnar(self, i: int) -> str:
        if self.format == "arrow":
            return self._col[i].as_py()
        g = int(np.searchsorted(self._group_start, i, side="right") - 1)
        rows = self._groups.get(g)
        if rows is None:
            rows = self._parquet.read_row_group(g, columns=[self.column]).column(0).to_pylist()
            self._groups[g] = rows
            while len(self._groups) > 4:  # a few row groups in memory at most
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(g)
        text = rows[i - int(self._group_start[g])]
        if text is None:
            raise UserError(f"{self.path}: row {i} of column '{self.column}' is empty (null)")
        return text

    # --- rows ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._rows if self.format in ("arrow", "parquet") else len(self.starts)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._read_columnar(i) if self.format in ("arrow", "parquet") else self._read_line(i)

    def texts(self, idx) -> list[str]:
        return [self[int(i)] for i in idx]

    def fingerprint(self) -> str:
        """What the rows depend on, cheaply: the file's resolved path, size and mtime."""
        st = self.path.stat()
        return (
            f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.format}:"
            f"{getattr(self, 'column', '')}"
        )

    def __getstate__(self):  # picklable for DataLoader workers: descriptors are reopened
        d = dict(self.__dict__)
        d["_fd"] = None
        return d

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def read_prompts(path: Path, column: str | None = None) -> list[str]:
    """Every prompt of a file, in memory: for commands that take few prompts (``sample``)."""
    f = PromptFile(path, column)
    return f.texts(range(len(f)))


def text_identity(teacher) -> str:
    """What prompt embeddings depend on: the pipeline, and whether SD3's T5 is used."""
    return teacher.sha256 + ("" if teacher.config.get("t5", True) else ":no-t5")


def embedding_bytes(teacher) -> int:
    """Bytes of one prompt's float32 condition tensor for this teacher: its token count (the
    CLIP encoders' context, plus SD3's T5 tokens and the pooled row of SDXL/SD3; FLUX: T5's tokens
    and the pooled row; Wan: UMT5's 512 tokens) times width."""
    cfg = teacher.config
    arch = cfg.get("arch", "sd")
    tokens = 77  # what CLIP's tokenizer pads to, unless the pipeline's tokenizer says otherwise
    folder = getattr(teacher, "folder", None)
    tok = Path(folder) / "tokenizer" / "tokenizer_config.json" if folder is not None else None
    if tok is not None and tok.is_file():
        length = json.loads(tok.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 100_000:
            tokens = length
    if arch == "flux":
        return (int(cfg.get("max_sequence_length", 512)) + 1) * int(cfg["joint_attention_dim"]) * 4
    if arch == "sd3":
        return (
            (tokens + int(cfg.get("max_sequence_length", 256)) + 1)
            * int(cfg["joint_attention_dim"])
            * 4
        )
    if arch == "wan":  # UMT5's tokens only
        return int(cfg["max_sequence_length"]) * int(cfg["text_dim"]) * 4
    width = int(cfg.get("unet_config", {}).get("cross_attention_dim", 768))
    return (tokens + (1 if arch == "sdxl" else 0)) * width * 4


class EmbeddingTable:
    """Prompt embeddings computed once (``[N, L, D]`` float32 and the unconditional branch),
    memory-mapped from a safetensors file: rows are paged in when a step touches them."""

    def __init__(self, embeddings: torch.Tensor, uncond: torch.Tensor, path: Path | None = None):
        self.embeddings, self.uncond, self.path = embeddings, uncond, path

    def __len__(self) -> int:
        return len(self.embeddings)

    @classmethod
    def load(cls, path: Path) -> EmbeddingTable:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{path} is damaged ({e}); make it again") from None
        return cls(data["embeddings"], data["uncond"], Path(path))


class PromptConditions:
    """Condition tensors for rows of a prompt source (see the module docstring): looked up in
    an :class:`EmbeddingTable`, or encoded by ``encoder`` (the teacher's frozen text encoders,
    on the device in the run's compute dtype). ``uncond`` is guidance's unconditional branch."""

    def __init__(self, source, device, encoder=None, table: EmbeddingTable | None = None):
        self.source = source
        self.device = torch.device(device)
        self.encoder = encoder
        self.table = table
        self.mode = "cached" if table is not None else "encoded"
        if table is not None:
            self.uncond = table.uncond.float().to(self.device)
        else:
            self.uncond = encoder.uncond(self.device).float()

    def __len__(self) -> int:
        return len(self.table if self.table is not None else self.source)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 conditions ``[n, L, D]`` on the device for row indices ``idx``."""
        if self.table is not None:
            return self.table.embeddings[idx.cpu()].float().to(self.device, non_blocking=True)
        return self.encode(self.source.texts(idx.tolist()))

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Conditions for texts that are not rows of this source (the real data's captions)."""
        if self.encoder is None:
            raise RuntimeError("these prompt conditions are a table; no encoder was loaded")
        return self.encoder(texts, self.device).float()


def cache_key(teacher, source: PromptFile) -> str:
    return hashlib.sha256((source.fingerprint() + text_identity(teacher)).encode()).hexdigest()


def build_cache(teacher, source: PromptFile, path: Path, device, batch_size: int = 64) -> dict:
    """Encode every row once (in batches: memory flat but for the table itself) and write the
    table to ``path`` (safetensors, read back memory-mapped)."""
    from dmdctl.files import atomic_save_safetensors

    key = cache_key(teacher, source)
    encoder = teacher.text_encoder()
    table = None  # filled in place: the table is the only thing that grows with the rows
    for i in range(0, len(source), batch_size):
        rows = encoder(source.texts(range(i, min(i + batch_size, len(source)))), device).cpu()
        if table is None:
            table = torch.empty((len(source), *rows.shape[1:]), dtype=rows.dtype)
        table[i : i + len(rows)] = rows
    uncond = encoder.uncond(device).cpu()
    del encoder
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"embeddings": table.contiguous(), "uncond": uncond.contiguous()},
        path,
        {"key": key, "source": str(source.path), "rows": str(len(source))},
    )
    return {"embeddings": table, "uncond": uncond}


PAIRS_PROMPTS = "prompts"  # a pairs folder keeps its prompts file as prompts<suffix>


def pairs_prompt_source(folder: Path, manifest: dict):
    """The prompts a pairs folder's ``cond`` indices point into: its copy of the prompts file,
    or (folders made before prompts were streamed) its table of embeddings."""
    folder = Path(folder)
    made = manifest.get("sampler", {}).get("prompts", {})
    if made.get("file"):
        path = folder / made["file"]
        if not path.is_file():
            raise UserError(
                f"{path} is missing: the pairs' conditions index into it; make the pairs again"
            )
        return PromptFile(path, made.get("column"), flag="--pairs prompts")
    legacy = folder / EMBEDDINGS_FILE
    if legacy.is_file():
        return EmbeddingTable.load(legacy)
    raise UserError(
        f"{folder} holds no prompts: it was not made from a text-to-image teacher by "
        "`dmdctl make-pairs --prompts FILE`"
    )


def copy_prompts(source: PromptFile, folder: Path) -> dict:
    """Keep ``source`` in a pairs folder (its rows are what the pairs' conditions index);
    what the manifest records about it."""
    import shutil

    from dmdctl.files import sha256_file

    name = PAIRS_PROMPTS + source.path.suffix.lower()
    target = Path(folder) / name
    if not (target.is_file() and sha256_file(target) == sha256_file(source.path)):
        tmp = target.with_name(name + ".tmp")
        shutil.copyfile(source.path, tmp)
        tmp.replace(target)
    return {
        "file": name,
        "count": len(source),
        "column": getattr(source, "column", None),
        "sha256": sha256_file(target),
    }


def wants_cache(mode: str, source, teacher) -> bool:
    """--prompt-cache: on, off, or auto (a table of at most AUTO_CACHE_BYTES)."""
    if isinstance(source, EmbeddingTable):
        return True
    if mode == "auto":
        return len(source) * embedding_bytes(teacher) <= AUTO_CACHE_BYTES
    return mode == "on"


def setup_prompt_conditions(
    teacher, gen_source, pair_source, mode, out: Path, state, compute, need_encoder=False
):
    """The generator's and the pairs' :class:`PromptConditions` and a line for the log.

    Tables (small prompt sets) are written by the main process into ``out`` once and read
    memory-mapped by every process; anything encoded in the step shares one encoder, loaded on
    each process's device in the compute dtype (``need_encoder``: the real data's captions)."""
    device = state.device
    sources = {"prompt": gen_source}
    if pair_source is not None and pair_source is not gen_source:
        sources["pair"] = pair_source
    tables: dict[str, EmbeddingTable] = {}
    for name, source in sources.items():
        if not wants_cache(mode, source, teacher):
            continue
        if isinstance(source, EmbeddingTable):
            tables[name] = source
            continue
        from dmdctl.files import load_cached_safetensors

        path = Path(out) / (EMBEDDINGS_FILE if name == "prompt" else f"pair-{EMBEDDINGS_FILE}")
        key = cache_key(teacher, source)
        if state.is_main_process and load_cached_safetensors(path, key) is None:
            build_cache(teacher, source, path, device)
        state.wait_for_everyone()
        tables[name] = EmbeddingTable.load(path)
    encoder = None
    if need_encoder or len(tables) < len(sources):
        encoder = teacher.text_encoder().to(device, compute)
    conds = {
        name: PromptConditions(source, device, encoder, tables.get(name))
        for name, source in sources.items()
    }
    gen = conds["prompt"]
    if encoder is not None and gen.table is not None:
        gen.encoder = encoder  # captions are encoded; prompts come from the table
    pair = conds.get("pair", gen if pair_source is not None else None)
    how = {
        "cached": f"a table of their embeddings ({gen.table.path if gen.table else ''})",
        "encoded": "encoded in each step by the frozen text encoders",
    }
    line = f"prompts: {len(gen):,} rows, {how[gen.mode]}"
    if pair is not None and pair is not gen:
        line += f"; the pairs' prompts: {len(pair):,} rows, {how[pair.mode]}"
    return gen, pair, line
