"""Read NVlabs EDM and EDM2 network pickles as data, without running any code they contain.

An EDM ``.pkl`` stores each network object as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the Python
source of the defining module (``module_src``), the class name and the object's ``__dict__``
(``state``: init kwargs, parameters, buffers, submodules). Loading it with ``pickle.load``
executes ``module_src`` and any other callable the file names. Here a restricted
:class:`pickle.Unpickler` resolves only an allow-list of globals, each to a function of ours
that builds plain data:

* a persistence record becomes a :class:`PersistentRecord` (class name, version, state; the
  source is hashed, never executed);
* ``torch.nn`` containers (``ModuleDict`` …) become :class:`ContainerRecord`;
* tensors are rebuilt from storages, and each storage (pickled as
  ``torch.storage._load_from_bytes(blob)``, a ``torch.save`` blob) is read with
  ``torch.load(weights_only=True)``;
* numpy scalars (EDM stores e.g. ``skip_scale = np.sqrt(0.5)``) become Python numbers, and
  numeric numpy arrays (EDM2's VAE ``scale`` / ``bias``; its reference statistics) become
  :class:`NDArrayRecord` s, their bytes checked against shape and dtype and size-capped.

Each file must hold the classes of one format (EDM's, EDM2's: :data:`FAMILIES`); a file mixing
them, or a statistics file holding any object, is refused.

Any other global (``os.system``, ``builtins.eval``, an unknown class …) stops the load with a
:class:`~dmdctl.errors.UserError` before anything is called. Our own network is then built
from the top-level ``init_kwargs`` and the tensors are loaded into it with ``strict=True``.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import UserError
from dmdctl.teachers.edm.networks import MODEL_KWARGS, EDMBackbone

PERSISTENCE_GLOBAL = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# preconditioners of NVIDIA's training/networks.py; only EDMPrecond is supported
PRECONDITIONERS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
# every class a published EDM network pickle holds (NVlabs/edm: training/networks.py, loss.py,
# augment.py)
EDM_CLASSES = frozenset(
    {
        *PRECONDITIONERS,
        "SongUNet",
        "DhariwalUNet",
        "UNetBlock",
        "Linear",
        "Conv2d",
        "GroupNorm",
        "PositionalEmbedding",
        "FourierEmbedding",
        "EDMLoss",
        "VPLoss",
        "VELoss",
        "AugmentPipe",
    }
)
# every class a published EDM2 pickle holds (NVlabs/edm2: training/networks_edm2.py, the loss of
# training/training_loop.py, the encoders of training/encoders.py)
EDM2_CLASSES = frozenset(
    {
        "Precond",
        "UNet",
        "Block",
        "MPConv",
        "MPFourier",
        "EDM2Loss",
        "StandardRGBEncoder",
        "StabilityVAEEncoder",
    }
)
# a statistics file (EDM2's dataset-refs/*.pkl) holds dicts and arrays, no objects at all
FAMILIES = {"EDM": EDM_CLASSES, "EDM2": EDM2_CLASSES, "statistics": frozenset()}
KNOWN_CLASSES = EDM_CLASSES | EDM2_CLASSES
TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")
NUMPY_KINDS = "biuf"  # bool, int, unsigned, float: the only numpy values accepted
MAX_ARRAY_BYTES = 1 << 20  # numpy arrays in these pickles are a few numbers (EDM2's VAE scaling)
# EDM2's reference statistics (dataset-refs/img512.pkl): a 2048x2048 float64 covariance
MAX_REFERENCE_ARRAY_BYTES = 64 << 20


class UnsafePickleError(UserError):
    """The file is not an EDM pickle dmdctl can read as data (refused before anything ran)."""


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, kept as data."""

    class_name: str
    version: object
    module_src_sha256: str
    state: dict

    @property
    def init_kwargs(self) -> dict:
        kw = self.state.get("_init_kwargs")
        return dict(kw) if isinstance(kw, dict) else {}


class ContainerRecord:
    """A plain ``torch.nn`` container (``ModuleDict`` …) of a pickle, kept as data.

    Pickle creates it with ``cls.__new__`` (NEWOBJ) and fills it through ``__setstate__`` (BUILD).
    """

    class_name = "container"
    state: dict = {}  # replaced, never mutated

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state of a torch.nn.{self.class_name}")
        self.state = state


class PlainDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

    def __setstate__(self, state) -> None:
        if state:
            raise UnsafePickleError("unexpected attributes on a dnnlib.EasyDict")


_CONTAINERS = {
    name: type(name, (ContainerRecord,), {"class_name": name}) for name in TORCH_CONTAINERS
}


def _persistent_record(meta) -> PersistentRecord:
    if not isinstance(meta, dict):
        raise UnsafePickleError("a persistence record whose metadata is not a dict")
    src = meta.get("module_src", "")
    name = meta.get("class_name")
    if not isinstance(name, str) or not isinstance(src, str):
        raise UnsafePickleError("a persistence record without a class name or module source")
    short = name.rsplit(".", 1)[-1]
    if short not in KNOWN_CLASSES:
        raise UnsafePickleError(
            f"the pickle holds an object of class {name!r}, which is not part of an EDM or EDM2 "
            "network (its embedded source was not run)"
        )
    state = meta.get("state")
    if not isinstance(state, dict):
        raise UnsafePickleError(f"the {short} record has no state dict")
    if meta.get("type", "class") != "class":
        raise UnsafePickleError(f"the {short} record has type {meta.get('type')!r}, not 'class'")
    digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
    return PersistentRecord(short, meta.get("version"), digest, dict(state))


def _load_storage(blob) -> torch.storage.TypedStorage:
    """A storage pickled by torch: a ``torch.save`` blob, read with ``weights_only=True``."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError("a tensor storage that is not a byte blob")
    try:
        with warnings.catch_warnings():  # torch's note on unusual pickle protocols
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged or hostile blob
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsafePickleError(f"a tensor storage could not be read safely ({msg})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"a tensor blob holds a {type(storage).__name__}, not a storage")
    return storage


def _int_tuple(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) for i in v):
        raise UnsafePickleError(f"a tensor with a malformed {what}")
    return tuple(v)


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> torch.Tensor:
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError("a tensor built from something other than a storage")
    if not isinstance(offset, int):
        raise UnsafePickleError("a tensor with a malformed storage offset")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    try:
        return torch._utils._rebuild_tensor_v2(
            storage, offset, size, stride, False, collections.OrderedDict()
        )
    except RuntimeError as e:
        raise UnsafePickleError(f"a tensor does not fit its storage ({e})") from None


def _rebuild_parameter(data, *_ignored) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("a parameter without tensor data")
    return data


class _DType:
    """A numpy dtype of a pickled numpy scalar, checked to be numeric."""

    def __init__(self, name, align=False, copy=True):
        try:
            self.dtype = np.dtype(str(name))
        except TypeError:
            raise UnsafePickleError(f"an unknown numpy dtype {name!r}") from None
        if self.dtype.kind not in NUMPY_KINDS:
            raise UnsafePickleError(f"a numpy value of non-numeric dtype {self.dtype}")

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes):
        raise UnsafePickleError("a malformed numpy scalar")
    if len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError("a numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` as the class argument of ``_reconstruct``."""


class NDArrayRecord:
    """A numeric numpy array of a pickle (EDM2 stores its VAE scaling as float32 arrays).

    Pickle protocols 2-4 build it as ``_reconstruct(ndarray, (0,), b'b')`` and fill it through
    ``__setstate__((version, shape, dtype, fortran_order, raw bytes))``; only numeric dtypes and
    small arrays are accepted, and the bytes are copied into a fresh array.
    """

    array: np.ndarray | None = None

    def __init__(self, cap: int = MAX_ARRAY_BYTES):
        self.cap = cap

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("a malformed numpy array")
        _, shape, dtype, fortran, data = state
        self.array = _array_from(data, dtype, shape, "F" if fortran else "C", self.cap)


def _array_from(data, dtype, shape, order, cap: int = MAX_ARRAY_BYTES) -> np.ndarray:
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("a malformed numpy array")
    shape = _int_tuple(shape, "numpy array shape")
    if any(d < 0 for d in shape) or order not in ("C", "F"):
        raise UnsafePickleError("a malformed numpy array")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) > cap or len(data) != n * dtype.dtype.itemsize:
        raise UnsafePickleError("a numpy array whose data does not fit its shape")
    return np.frombuffer(bytes(data), dtype=dtype.dtype).reshape(shape, order=order).copy()


def _ndarray_reconstruct(cls, shape=None, typecode=None, cap: int = MAX_ARRAY_BYTES):
    """``numpy.core.multiarray._reconstruct``: an empty array record, filled by BUILD."""
    if cls is not _NDArrayType:
        raise UnsafePickleError("the pickle reconstructs a numpy object that is not an array")
    return NDArrayRecord(cap)


def _ndarray_frombuffer(buf, dtype, shape, order="C", cap: int = MAX_ARRAY_BYTES):
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5, data in band)."""
    rec = NDArrayRecord(cap)
    rec.array = _array_from(buf, dtype, shape, order, cap)
    return rec


def _reconstructor(cls, base, state=None):
    """``copyreg._reconstructor`` (protocol 0/1 objects): only for our record classes."""
    if isinstance(cls, type) and issubclass(cls, (ContainerRecord, PlainDict)):
        obj = cls()
        if state:
            obj.__setstate__(state)
        return obj
    raise UnsafePickleError("the pickle reconstructs an object dmdctl does not accept")


ALLOWED = {
    PERSISTENCE_GLOBAL: _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): _NDArrayType,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _ndarray_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _ndarray_frombuffer,
    **{("torch.nn.modules.container", n): cls for n, cls in _CONTAINERS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in :data:`ALLOWED`, each to a data-building function of ours.

    ``classes``: the class names of the persistence records read (which family the file is).
    """

    def __init__(self, f, max_array_bytes: int = MAX_ARRAY_BYTES):
        super().__init__(f)
        self.classes: set[str] = set()
        self.cap = int(max_array_bytes)

    def _record(self, meta) -> PersistentRecord:
        rec = _persistent_record(meta)
        self.classes.add(rec.class_name)
        return rec

    def find_class(self, module: str, name: str):
        if (module, name) == PERSISTENCE_GLOBAL:
            return self._record
        fn = ALLOWED.get((module, name))
        if fn in (_ndarray_reconstruct, _ndarray_frombuffer):  # with this file's size cap
            return functools.partial(fn, cap=self.cap)
        if fn is None:
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which is not on dmdctl's allow-list "
                "for EDM checkpoints; nothing in it was run"
            )
        return fn

    def persistent_load(self, pid):
        raise UnsafePickleError("the pickle uses persistent ids (is it a torch.save file?)")


def read_pickle(path: Path, family: str | None = None):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (plain data and tensors only).

    ``family`` ("EDM" or "EDM2"): every persistence record must be a class of that family's
    checkpoints, so a file mixing the two formats is refused too.
    """
    return read_checkpoint_pickle(path, family)[0]


def read_checkpoint_pickle(
    path: Path, family: str | None = "any", max_array_bytes: int = MAX_ARRAY_BYTES
):
    """(data, family) of a checkpoint pickle read once: ``family`` "EDM" / "EDM2" checks every
    record against that format's classes, "any" takes the format the records belong to
    (refusing a file that mixes them), None checks only the allow-list; "statistics" allows no
    record at all (EDM2's reference statistics)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the EDM .pkl file")
    try:
        with open(path, "rb") as f:
            unpickler = RestrictedUnpickler(f, max_array_bytes)
            data = unpickler.load()
        if family == "any":  # the format of its ema network, else the one its records fit
            fits = [n for n, known in FAMILIES.items() if unpickler.classes <= known]
            family = family_of(data) or (fits or ["EDM"])[0]
        if family is not None:
            _check_family(unpickler.classes, family)
        return data, family
    except UserError as e:
        raise UnsafePickleError(f"refusing to load {path}: {e}") from None
    except OSError as e:
        raise UserError(f"could not read {path}: {e.strerror or e}") from None
    except RecursionError:
        raise UnsafePickleError(f"refusing to load {path}: it is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - pickle raises many types on malformed input
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable EDM pickle ({msg})") from None


def _check_family(classes: set[str], family: str) -> None:
    other = sorted(classes - FAMILIES[family])
    if other:
        what = "a statistics file" if family == "statistics" else f"an {family} checkpoint"
        raise UnsafePickleError(f"{what} holds no {other[0]} object (a class of another format)")


def read_statistics_pickle(path: Path):
    """EDM2's reference statistics (``dataset-refs/img512.pkl``): dicts of numeric arrays,
    read with the same restricted unpickler (no object of any class; arrays up to 64 MiB)."""
    return read_checkpoint_pickle(path, "statistics", MAX_REFERENCE_ARRAY_BYTES)[0]


def family_of(data) -> str | None:
    """ "EDM2" for a pickle whose ``ema`` network is EDM2's ``Precond``, "EDM" for EDM's
    preconditioners, None otherwise."""
    net = data.get("ema") if isinstance(data, dict) else None
    if isinstance(net, PersistentRecord):
        if net.class_name == "Precond":
            return "EDM2"
        if net.class_name in PRECONDITIONERS:
            return "EDM"
    return None


def state_dict_of(record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` the object of ``record`` would have: parameters and kept buffers."""
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise UnsafePickleError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ContainerRecord)):
            raise UnsafePickleError(f"submodule {prefix}{name} is not a network record")
        out.update(state_dict_of(child, f"{prefix}{name}."))
    return out


def _plain(v):
    """JSON-safe copy of an init argument (lists, numbers, strings)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, NDArrayRecord) and v.array is not None:
        return _plain(v.array.tolist())
    raise UnsafePickleError(f"an init argument of type {type(v).__name__}")


@dataclass
class EDMCheckpoint:
    """A checkpoint's network as dmdctl needs it: config, NVIDIA-named state, provenance."""

    config: dict
    state: dict[str, torch.Tensor]
    info: dict


def read_edm_checkpoint(path: Path, entry: str = "ema") -> EDMCheckpoint:
    """The network under ``entry`` of an EDM pickle, as a dmdctl ``edm`` teacher config + state."""
    return edm_checkpoint_of(read_pickle(path, "EDM"), path, entry)


def edm_checkpoint_of(data, path: Path, entry: str = "ema") -> EDMCheckpoint:
    """:func:`read_edm_checkpoint` of an already unpickled file."""
    if not isinstance(data, dict) or entry not in data:
        keys = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} has no '{entry}' network (it holds: {keys}); is it an EDM pickle?")
    net = data[entry]
    if not isinstance(net, PersistentRecord):
        raise UserError(f"{path}: '{entry}' is not an EDM network record")
    if net.class_name != "EDMPrecond":
        raise UserError(
            f"{path}: '{entry}' is a {net.class_name}; dmdctl converts EDM-preconditioned "
            "networks (EDMPrecond) only"
        )
    kwargs = net.init_kwargs
    if net.state.get("_init_args"):
        raise UserError(f"{path}: '{entry}' was built with positional arguments dmdctl cannot read")
    arch = kwargs.pop("model_type", "DhariwalUNet")
    model = (net.state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord) or model.class_name != arch:
        found = model.class_name if isinstance(model, PersistentRecord) else type(model).__name__
        raise UserError(f"{path}: its model_type is {arch!r} but its network is a {found}")
    try:
        img_resolution = int(kwargs.pop("img_resolution"))
        img_channels = int(kwargs.pop("img_channels"))
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{path}: the network's init_kwargs lack img_resolution/img_channels"
        ) from None
    label_dim = int(kwargs.pop("label_dim", 0))
    use_fp16 = bool(kwargs.pop("use_fp16", False))
    sd = float(kwargs.pop("sigma_data", net.state.get("sigma_data", 0.5)))
    net_min = float(kwargs.pop("sigma_min", net.state.get("sigma_min", 0)))
    net_max = float(kwargs.pop("sigma_max", net.state.get("sigma_max", math.inf)))
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS[arch]))
    if unknown:
        raise UserError(f"{path}: unknown {arch} argument(s) {', '.join(unknown)}")
    model_kwargs = {k: _plain(v) for k, v in kwargs.items()}
    trained_dropout = model_kwargs.get("dropout")
    config = {
        "architecture": arch,
        "img_resolution": img_resolution,
        "img_channels": img_channels,
        "label_dim": label_dim,
        "model_kwargs": model_kwargs,
        "sigma_data": sd,
        # EDM's sampler range, clipped to what the network supports (EDM generate.py's rule)
        "sigma_min": max(0.002, net_min),
        "sigma_max": min(80.0, net_max),
    }
    # the nets train with dropout 0 when distilled (DMD2's ImageNet setting); the teacher is
    # evaluated in eval mode, where dropout does nothing
    model_kwargs["dropout"] = 0.0
    state = state_dict_of(net)
    info = {
        "source": Path(path).name,
        "source_class": f"{net.class_name}/{model.class_name}",
        "source_persistence_version": str(net.version),
        "source_module_src_sha256": net.module_src_sha256,
        "trained_dropout": trained_dropout,
        "trained_use_fp16": use_fp16,
    }
    return EDMCheckpoint(config, state, info)


def backbone_from_checkpoint(ckpt: EDMCheckpoint) -> EDMBackbone:
    """Our network with the checkpoint's weights, loaded with ``strict=True``."""
    try:
        net = EDMBackbone(ckpt.config)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"cannot build the network from the checkpoint's init_kwargs ({e})"
        ) from None
    try:
        net.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserError(
            f"the checkpoint's weights do not match its architecture ({' '.join(lines[:2])[:400]})"
        ) from None
    return net
