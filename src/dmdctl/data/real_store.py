"""The real-data store: DMD2's real images, prepared once by ``dmdctl prepare-real``, read by row.

Why Apache Arrow IPC files (``pyarrow``):

- Arrow is the on-disk format of Hugging Face ``datasets``, which diffusers' training scripts
  use: the files open with any Arrow reader, and the tooling is already in that ecosystem.
- A file is memory-mapped (``pa.memory_map``) and its columns are zero-copy views of the
  mapping, so a process reads only the pages of the rows it draws: memory does not grow with
  the store (DMD2's 500k LAION latents are ~16 GB of float16).
- Strings (captions) and fixed-size tensors (``fixed_size_list``) live in one row-addressable
  table: row ``i`` of every column is the same record.
- The files are plain and immutable once written, so every process of a multi-node run reads
  them from a shared (network) filesystem, read-only, with no locks. LMDB (DMD2's choice) needs
  lock files, or ``lock=False``, and is awkward on network filesystems; WebDataset tars are
  read sequentially unless an index is built next to them.

Layout of a store folder::

    manifest.json        {"format": "dmdctl.real", "version": 1, "sample_shape": [C, H, W],
                          "dtype": "float16"|"uint8", "kind": "latents"|"pixels",
                          "identity": what the rows depend on (the VAE's sha256 and scaling
                          for latents; resolution and channels for pixels),
                          "conditioning": "captions"|"labels"|"none", "num_classes": K or 0,
                          "source": {"path" (resolved), "kind", "records", "key"},
                          "records", "shard_size", "complete", "rows",
                          "shards": [{"file", "first_record", "count", "skipped", "bytes",
                                      "sha256"}]}
    real-00000.arrow     Arrow IPC file, one record batch: x fixed_size_list<float16|uint8>
    ...                  [C*H*W], caption string | label int64, record int64, name string

Shard k holds the source records ``[k*shard_size, (k+1)*shard_size)`` (less those skipped with
``--skip-bad-records``), so shards can be made in any order by any process, and a re-run makes only the
missing ones, byte-identical (the writing is :class:`dmdctl.data.shards.ShardWriter`'s).
The reader is :func:`dmdctl.data.real.open_real_store`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmdctl.data.shards import ShardWriter
from dmdctl.errors import UserError
from dmdctl.files import sha256_file

STORE_FORMAT = "dmdctl.real"
SHARD_PREFIX = "real"
SHARD_SUFFIX = ".arrow"
CAPTIONS_FILE = "captions.jsonl"
CAPTION_COLUMNS = ("caption", "text", "prompt")
# decoding (PIL releases the GIL) runs on a few threads while the main one encodes
DECODE_THREADS = 4


# --- what the rows depend on --------------------------------------------------------------------
def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1] (videos: ``[N, F, H, W, C]``
    -> ``[N, C, F, H, W]``)."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, 1).float() / 127.5 - 1


def prepare_image(im, mode: str, size: int | None = None) -> np.ndarray:
    """A PIL image in ``mode``, centre-cropped and resized (bicubic) to ``size`` x ``size``."""
    from PIL import Image

    im = im.convert(mode)
    if size is not None and im.size != (size, size):
        side = min(im.size)  # centre crop, then resize (as dataset tools do)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(im)


def prepare_frame(im, height: int, width: int) -> np.ndarray:
    """An RGB video frame centre-cropped to the aspect ``height:width`` and resized (bicubic)."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    if w * height > h * width:  # too wide: crop the sides
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    left, top = (w - cw) // 2, (h - ch) // 2
    im = im.crop((left, top, left + cw, top + ch))
    if im.size != (width, height):
        im = im.resize((width, height), Image.BICUBIC)
    return np.asarray(im)


def decode_video(path, size: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``[F, H, W, 3]``: the first F frames of a video file (imageio's ffmpeg plugin),
    each as :func:`prepare_frame` makes it. ValueError for a video with fewer frames."""
    import imageio.v3 as iio
    from PIL import Image

    frames, height, width = size
    out = []
    for frame in iio.imiter(path):
        out.append(prepare_frame(Image.fromarray(frame), height, width))
        if len(out) == frames:
            return np.stack(out)
    raise ValueError(f"it has {len(out)} frames; the teacher's videos have {frames}")


def read_images(files: list[Path], channels: int, size: int | None = None) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"--real-data images need 1 or 3 channels; this teacher has {channels}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = prepare_image(im, mode, size)
        except OSError as e:
            raise UserError(f"could not read image {f} ({e})") from None
        out.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(out)


@functools.lru_cache(maxsize=8)
def _vae_sha256(config_path: Path, weights: Path, stamp: tuple) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(json.loads(config_path.read_text()), sort_keys=True).encode())
    h.update(sha256_file(weights).encode())
    return h.hexdigest()


def store_identity(teacher) -> dict:
    """What a store made for ``teacher`` depends on, beyond its source: the VAE (its config
    and weights, and the latent scaling) for latent teachers; resolution and channels for
    pixel teachers."""
    shape = [int(s) for s in teacher.sample_shape]
    if not teacher.codec.latent:
        return {"resolution": shape[-1], "channels": shape[0]}
    cfg = teacher.config
    own = getattr(teacher.codec, "identity", None)
    files = teacher.vae_files() if hasattr(teacher, "vae_files") else teacher.codec.vae_files()
    config, weights = (f.resolve() for f in files)
    st = weights.stat()
    vae_sha = _vae_sha256(config, weights, (st.st_size, st.st_mtime_ns))
    if callable(own):  # a codec that names its own latent mapping (EDM2's scale and bias)
        return {"vae_sha256": vae_sha, "resolution": image_resolution(teacher), **own()}
    video = [cfg.get(k) for k in ("num_frames", "height", "width")]
    return {
        "vae_sha256": vae_sha,
        "resolution": int(cfg["resolution"]) if "resolution" in cfg else video,
        "scaling_factor": float(cfg.get("scaling_factor", 1.0)),
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "latents_mean": cfg.get("latents_mean"),
        "latents_std": cfg.get("latents_std"),
    }


def image_resolution(teacher) -> int:
    """The side of the images a latent teacher's VAE encodes (its config's ``resolution``, or
    what the codec says for the teacher's latent side)."""
    fn = getattr(teacher.codec, "image_resolution", None)
    if callable(fn):
        return int(fn(int(teacher.sample_shape[-1])))
    return int(teacher.config["resolution"])


def store_kind(teacher) -> tuple[str, str]:
    """(kind, dtype) of the rows a teacher's store holds."""
    return ("latents", "float16") if teacher.codec.latent else ("pixels", "uint8")


def teacher_conditioning(teacher) -> str:
    if teacher.text_conditioned:
        return "captions"
    return "labels" if teacher.num_classes else "none"


# --- decoding one image -----------------------------------------------------------------------
def image_mode(channels: int) -> str:
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"real images need 1 or 3 channels; this teacher has {channels}")
    return mode


def decode_image(src, mode: str, size: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` of an image file (path) or its encoded bytes, centre-cropped and
    resized to ``size`` as :func:`prepare_image` does. Raises OSError (or
    PIL's errors) for an image that does not decode."""
    import io

    from PIL import Image

    if isinstance(size, tuple):  # a video teacher's (frames, height, width)
        return decode_video(src, size)
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        a = prepare_image(im, mode, size)
    return a[..., None] if a.ndim == 2 else a


# --- sources ------------------------------------------------------------------------------------
@dataclass
class Record:
    """One source record as read for a shard: ``image`` uint8 [H, W, C], or ``why`` it failed."""

    record: int
    name: str
    where: str  # for messages: "captions.jsonl:17", "row 17"
    image: np.ndarray | None = None
    why: str | None = None
    caption: str | None = None
    label: int | None = None


def _decode_all(items, mode: str, size: int) -> list[tuple[np.ndarray | None, str | None]]:
    """Decode (record, source) pairs on a few threads, in order."""

    def one(src):
        try:
            return decode_image(src, mode, size), None
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; the record names it
            from PIL import UnidentifiedImageError

            if isinstance(e, UnidentifiedImageError):  # its text holds the resolved path
                return None, "not an image PIL can decode"
            return None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        return list(pool.map(one, items))


@dataclass
class Source:
    """Where the real images come from; checked whole when made (nothing is written before)."""

    kind: str
    path: Path  # resolved
    shown: str  # as the user gave it, for messages
    records: int
    conditioning: str  # what it can give: "captions", "labels", "none"
    key: str = ""  # a fingerprint of the listing (changes when the source does)
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "records": self.records,
            "key": self.key,
            **self.extra,
        }

    def read(self, first: int, count: int, mode: str, size: int) -> list[Record]:
        raise NotImplementedError


class CaptionedFolder(Source):
    def __init__(self, folder: Path, shown: str):
        path = folder / CAPTIONS_FILE
        where = f"{shown.rstrip('/')}/{CAPTIONS_FILE}"
        self.files: list[Path] = []
        self.names: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where} is unreadable ({e})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(
                    f'{where}:{n}: not JSON; each line must be {{"file": ..., "caption": ...}}'
                ) from None
            if not isinstance(row, dict) or "file" not in row or "caption" not in row:
                raise UserError(f"{where}:{n}: needs a JSON object with 'file' and 'caption'")
            if not isinstance(row["caption"], str):
                raise UserError(
                    f"{where}:{n}: 'caption' must be a string, got {type(row['caption']).__name__}"
                )
            if not isinstance(row["file"], str) or not row["file"]:
                raise UserError(f"{where}:{n}: 'file' must be a file name")
            f = folder / row["file"]
            if not f.is_file():
                raise UserError(f"{where}:{n}: image {row['file']} not found in {shown}")
            self.files.append(f)
            self.names.append(row["file"])
            self.captions.append(row["caption"])
            self.lines.append(n)
        if not self.files:
            raise UserError(f"{where} lists no image")
        self.where = where
        super().__init__(
            "captioned-folder", folder, shown, len(self.files), "captions", sha256_file(path)
        )

    def read(self, first, count, mode, size):
        idx = range(first, first + count)
        decoded = _decode_all([self.files[i] for i in idx], mode, size)
        return [
            Record(i, self.names[i], f"{self.where}:{self.lines[i]}", img, why, self.captions[i])
            for i, (img, why) in zip(idx, decoded, strict=True)
        ]


class ImageFolder(Source):
    def __init__(self, folder: Path, shown: str):
        from dmdctl.metrics.images import list_images

        self.files = list_images(folder)
        self.names = [f.relative_to(folder).as_posix() for f in self.files]
        key = hashlib.sha256("\n".join(self.names).encode()).hexdigest()
        super().__init__("image-folder", folder, shown, len(self.files), "none", key)

    def read(self, first, count, mode, size):
        idx = range(first, first + count)
        decoded = _decode_all([self.files[i] for i in idx], mode, size)
        return [
            Record(i, self.names[i], f"{self.shown}/{self.names[i]}", img, why)
            for i, (img, why) in zip(idx, decoded, strict=True)
        ]


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    if version == (2, 0):
        return fmt.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


class NpzSource(Source):
    """ADM/EDM-style npz, read in slices of ``arr_0`` (seek in the zip member; a compressed
    member is decompressed forward), never whole; ``arr_1`` (labels) is read whole."""

    def __init__(self, path: Path, shown: str, num_classes: int):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    raise UserError(
                        f"{shown} has no arr_0 (it holds {', '.join(n.removesuffix('.npy') for n in names) or 'nothing'}); "
                        "an ADM/EDM-style npz keeps the images in arr_0"
                    )
                with zf.open("arr_0.npy") as f:
                    shape, fortran, dtype = _npy_header(f)
                    self.offset = f.tell()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{shown}: not a readable npz ({e})") from None
        if dtype != np.uint8 or len(shape) != 4:
            raise UserError(
                f"{shown}: arr_0 must be uint8 images [N, H, W, C], got {dtype} {list(shape)}"
            )
        if fortran:
            raise UserError(f"{shown}: arr_0 is stored in Fortran order; save it C-ordered")
        self.shape = tuple(int(s) for s in shape)
        self.labels = None
        conditioning = "none"
        if "arr_1.npy" in names and num_classes:
            try:
                with np.load(path, allow_pickle=False) as data:
                    labels = np.asarray(data["arr_1"])
            except (OSError, ValueError) as e:
                raise UserError(f"{shown}: arr_1 is unreadable ({e})") from None
            k = num_classes
            if labels.ndim != 1 or len(labels) != self.shape[0] or labels.dtype.kind not in "iu":
                raise UserError(
                    f"{shown}: arr_1 must hold {self.shape[0]} integer labels, got {labels.dtype} "
                    f"{list(labels.shape)}"
                )
            bad = np.flatnonzero((labels < 0) | (labels >= k))
            if len(bad):
                raise UserError(
                    f"{shown}: arr_1[{bad[0]}] = {labels[bad[0]]} is not a label in 0..{k - 1}"
                )
            self.labels = labels.astype(np.int64)
            conditioning = "labels"
        self._zip = self._member = None
        st = path.stat()
        key = hashlib.sha256(json.dumps([list(self.shape), st.st_size]).encode()).hexdigest()
        super().__init__("npz", path, shown, self.shape[0], conditioning, key)

    def rows(self, first: int, count: int) -> np.ndarray:
        row = math.prod(self.shape[1:])
        start = self.offset + first * row
        if self._member is None or self._member.tell() > start:
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._member = self._zip.open("arr_0.npy")
        self._member.seek(start)  # forward only after the first shard of a process
        buf = self._member.read(count * row)
        if len(buf) != count * row:
            raise UserError(f"{self.shown}: arr_0 is truncated (rows {first}..{first + count - 1})")
        return np.frombuffer(buf, np.uint8).reshape(count, *self.shape[1:])

    def close(self) -> None:
        if self._member is not None:
            self._member.close()
            self._zip.close()
        self._zip = self._member = None

    def read(self, first, count, mode, size):
        x = self.rows(first, count)
        out = []
        for j in range(count):
            i = first + j
            label = int(self.labels[i]) if self.labels is not None else None
            out.append(Record(i, f"arr_0[{i}]", f"{self.shown} arr_0[{i}]", x[j], label=label))
        return out


class ParquetSource(Source):
    """Parquet file(s), Hugging Face style: an image column (a struct with ``bytes``, or binary)
    and a caption column; read one row group at a time, never whole."""

    def __init__(self, path: Path, shown: str, image_column: str, caption_column: str | None):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        self.groups: list[tuple[Path, int, int]] = []  # (file, row group, first record)
        total = 0
        stamp = []
        caption = caption_column
        for f in files:
            rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
            try:
                pf = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"{shown}: {rel} is not a readable Parquet file ({e})") from None
            schema = pf.schema_arrow
            if image_column not in schema.names:
                raise UserError(
                    f"{shown}: {rel} has no column '{image_column}' (columns: "
                    f"{', '.join(schema.names)}); pass --image-column"
                )
            t = schema.field(image_column).type
            ok = pa.types.is_binary(t) or pa.types.is_large_binary(t)
            if pa.types.is_struct(t):
                ok = t.get_field_index("bytes") >= 0
            if not ok:
                raise UserError(
                    f"{shown}: {rel} column '{image_column}' is {t}, not encoded image bytes "
                    "(binary, or a struct with 'bytes')"
                )
            if caption is None:
                caption = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
            if caption is not None:
                if caption not in schema.names:
                    raise UserError(
                        f"{shown}: {rel} has no column '{caption}' (columns: "
                        f"{', '.join(schema.names)}); pass --caption-column"
                    )
                ct = schema.field(caption).type
                if not (pa.types.is_string(ct) or pa.types.is_large_string(ct)):
                    raise UserError(f"{shown}: {rel} column '{caption}' is {ct}, not text")
                for rg in range(pf.num_row_groups):  # one small column, a row group at a time
                    col = pf.read_row_group(rg, columns=[caption]).column(0)
                    nulls = pc.sum(pc.is_null(col)).as_py() or 0
                    if nulls:
                        first_null = total + sum(
                            pf.metadata.row_group(g).num_rows for g in range(rg)
                        )
                        first_null += int(np.flatnonzero(col.is_null().to_numpy())[0])
                        raise UserError(
                            f"{shown}: {rel} row {first_null - total}: the caption is missing"
                        )
            for rg in range(pf.num_row_groups):
                self.groups.append((f, rg, total))
                total += pf.metadata.row_group(rg).num_rows
            stamp.append([rel, f.stat().st_size, pf.metadata.num_rows])
        if not files or total == 0:
            raise UserError(f"{shown}: no Parquet rows found")
        self.image_column, self.caption_column = image_column, caption
        self.starts = np.array([g[2] for g in self.groups], dtype=np.int64)
        self._cached: tuple[int, object] | None = None
        key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
        super().__init__(
            "parquet",
            path,
            shown,
            total,
            "captions" if caption is not None else "none",
            key,
            {"image_column": image_column, "caption_column": caption},
        )

    def _group(self, g: int):
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != g:
            f, rg, _ = self.groups[g]
            cols = [self.image_column] + ([self.caption_column] if self.caption_column else [])
            self._cached = (g, pq.ParquetFile(f).read_row_group(rg, columns=cols))
        return self._cached[1]

    def read(self, first, count, mode, size):
        import pyarrow as pa

        images, captions = [], []
        i = first
        while i < first + count:
            g = int(np.searchsorted(self.starts, i, side="right")) - 1
            table = self._group(g)
            lo = i - int(self.starts[g])
            n = min(first + count - i, table.num_rows - lo)
            part = table.slice(lo, n)
            col = part.column(self.image_column).combine_chunks()
            if pa.types.is_struct(col.type):
                col = col.field("bytes")
            images += col.to_pylist()
            if self.caption_column:
                captions += part.column(self.caption_column).to_pylist()
            i += n
        decoded = _decode_all([b if b is not None else b"" for b in images], mode, size)
        out = []
        for j, (img, why) in enumerate(decoded):
            r = first + j
            cap = captions[j] if self.caption_column else None
            out.append(Record(r, f"row {r}", f"{self.shown} row {r}", img, why, cap))
        return out


def open_source(path_arg: str, teacher, image_column: str, caption_column: str | None) -> Source:
    """The source named by SOURCE, checked whole against the teacher (UserError, one line)."""
    p = Path(path_arg)
    shown = path_arg
    if not p.exists():
        raise UserError(f"SOURCE {shown}: no such file or folder")
    resolved = p.resolve()
    parquet = p.is_file() and p.suffix.lower() == ".parquet"
    if p.is_dir() and not (p / CAPTIONS_FILE).is_file() and any(p.rglob("*.parquet")):
        parquet = True
    if parquet:
        src: Source = ParquetSource(resolved, shown, image_column, caption_column)
    elif p.is_dir() and (p / CAPTIONS_FILE).is_file():
        src = CaptionedFolder(resolved, shown)
    elif p.is_dir():
        if teacher.text_conditioned:
            raise UserError(
                f"SOURCE {shown}: a text-to-image teacher needs {CAPTIONS_FILE} next to the "
                'images, one {"file": ..., "caption": ...} per line'
            )
        if teacher.num_classes:
            raise UserError(
                f"SOURCE {shown} is an image folder without labels, but the teacher is "
                "class-conditional: pass an npz with labels (arr_1)"
            )
        src = ImageFolder(resolved, shown)
    elif p.suffix.lower() == ".npz":
        src = NpzSource(resolved, shown, teacher.num_classes)
    else:
        raise UserError(
            f"SOURCE {shown}: expected an image folder (with {CAPTIONS_FILE} for text-to-image), "
            "an .npz or Parquet file(s)"
        )
    need = teacher_conditioning(teacher)
    if need == "captions" and src.conditioning != "captions":
        raise UserError(
            f"SOURCE {shown} has no captions, but the '{teacher.name}' teacher is text-to-image"
            + (
                ": pass --caption-column"
                if src.kind == "parquet"
                else f": use a folder of images with {CAPTIONS_FILE}"
            )
        )
    if need == "labels" and src.conditioning != "labels":
        raise UserError(
            f"SOURCE {shown} has no labels (arr_1), but the '{teacher.name}' teacher is "
            f"class-conditional ({teacher.num_classes} classes)"
        )
    shape = tuple(int(s) for s in teacher.sample_shape)
    video = len(shape) == 4 and teacher.codec.latent  # latents [C, F, H, W] of a video teacher
    if video and not isinstance(src, CaptionedFolder):
        raise UserError(
            f"SOURCE {shown}: a video teacher's real data is a folder of videos with "
            f'{CAPTIONS_FILE}, one {{"file": ..., "caption": ...}} per line'
        )
    if len(shape) != 3 and not video:
        raise UserError(
            f"prepare-real makes images; the '{teacher.name}' teacher is not an image model"
        )
    if isinstance(src, NpzSource):
        want = (shape[1], shape[2], shape[0])
        if teacher.codec.latent:  # RGB images the VAE encodes to the teacher's latents
            side = image_resolution(teacher)
            want = (side, side, 3)
        if src.shape[1:] != want:
            raise UserError(
                f"{shown}: arr_0 holds images of {list(src.shape[1:])} [H, W, C], but this "
                f"teacher makes {list(want)}"
            )
    return src


# --- writing ------------------------------------------------------------------------------------
def _shown(value) -> str:
    """A value for a message; a resolved path under the working folder is shown relative."""
    if isinstance(value, str) and Path(value).is_absolute():
        try:
            return repr(Path(value).relative_to(Path.cwd().resolve()).as_posix())
        except ValueError:
            pass
    return repr(value)


class RealWriter(ShardWriter):
    """Writes the store's Arrow shards (any order, any process) and keeps manifest.json."""

    prefix = SHARD_PREFIX
    suffix = SHARD_SUFFIX
    format = STORE_FORMAT
    what = "real data"

    def check_same_settings(self, existing: dict) -> None:
        for key, value in self.settings.items():
            there = existing.get(key)
            if there == value:
                continue
            name = key
            if isinstance(value, dict) and isinstance(there, dict):  # name the inner key
                sub = next(k for k in {**there, **value} if there.get(k) != value.get(k))
                name, there, value = f"{key}.{sub}", there.get(sub), value.get(sub)
            raise UserError(
                f"{self.folder} already holds a real-data store made with a different "
                f"'{name}' ({_shown(there)} there, {_shown(value)} now); use another --out or "
                "the same source, teacher and settings"
            )

    def verify_shard(self, entry: dict) -> Path:
        from dmdctl.data.shards import verify_shard

        return verify_shard(self.folder, entry, self.what, "`dmdctl prepare-real` command")

    @property
    def num_shards(self) -> int:
        s = self.settings
        return -(-s["records"] // s["shard_size"])

    def shard_records(self, index: int) -> range:
        s = self.settings
        first = index * s["shard_size"]
        return range(first, min(first + s["shard_size"], s["records"]))

    def entry_fits(self, index: int, entry: dict) -> bool:
        return entry.get("first_record") == self.shard_records(index).start

    @property
    def rows(self) -> int:
        return sum(e["count"] for e in self.shards.values())

    @property
    def skipped(self) -> int:
        return sum(len(e.get("skipped", [])) for e in self.shards.values())

    def manifest_extra(self) -> dict:
        return {"rows": self.rows}

    def write_file(self, index: int, tmp: Path, data: dict) -> dict:
        import pyarrow as pa

        x: np.ndarray = data["x"]
        rows = x.shape[0]
        per_row = math.prod(self.settings["sample_shape"])
        flat = pa.array(np.ascontiguousarray(x).reshape(-1))
        columns = {"x": pa.FixedSizeListArray.from_arrays(flat, per_row)}
        if self.settings["conditioning"] == "captions":
            columns["caption"] = pa.array(data["caption"], pa.string())
        elif self.settings["conditioning"] == "labels":
            columns["label"] = pa.array(np.asarray(data["label"], dtype=np.int64))
        columns["record"] = pa.array(np.asarray(data["record"], dtype=np.int64))
        columns["name"] = pa.array(data["name"], pa.string())
        batch = pa.record_batch(list(columns.values()), names=list(columns))
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as w:
            w.write_batch(batch)
        return {
            "first_record": self.shard_records(index).start,
            "count": rows,
            "skipped": data["skipped"],
            "bytes": tmp.stat().st_size,
        }
