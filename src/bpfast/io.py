"""Saving and loading networks: one ``.npz`` file of arrays plus a JSON header.

The file is a NumPy ``.npz`` archive (uncompressed) with these members:

``header``
    A 1-D uint8 array: the UTF-8 bytes of a JSON object (fields below).
``parameters``
    The network's flat parameter array, 1-D, of the header's dtype.
``buffers``
    Only for a network with running statistics (BatchNorm1d): its flat buffer
    array, 1-D, of the header's dtype.
``optimizer_state``
    Only when an optimizer that has stepped the network was saved with it: its
    state, one row per name in ``header["optimizer"]["state_names"]``, shape
    (n_states, n_parameters).

The header's fields: ``format`` ("bpfast-model"), ``format_version`` (an int: 1
for networks of Dense layers only, 2 when other layer kinds are present),
``bpfast_version``, ``dtype`` ("float32" or "float64"),
``n_parameters``, ``layers`` (a list of objects: a Dense is ``in_features``,
``out_features``, ``activation``, ``bias`` and ``activation_param``, the
leaky_relu slope or elu alpha; any other layer is its ``describe()``, with its
``kind``), ``stream`` (version 2: ``[key, counter]`` of Dropout's random stream,
so a loaded network draws the masks the saved one would have), ``seed``,
``rng_state`` (the state of the
network's random generator, so shuffling continues as it would have),
``epochs_trained`` (when the network counts them), ``optimizer`` (null, or an
object with ``name``, ``hyperparameters`` in the constructor's names,
``step_count``, ``state_names`` and ``has_state``, whether ``optimizer_state``
is present) and ``metadata`` (any JSON object the caller
attached; the command line keeps its class labels and scaling there).

Loading never runs code from the file: arrays are read with
``allow_pickle=False``, and a member holding Python objects is refused before
anything is read. Only a regular file is read (a FIFO, a device such as
``/dev/zero`` or a directory is a ValueError). Every size the file declares (the
zip records' sizes and offsets, each ``.npy`` header's shape and dtype) is checked
against the bytes really present before memory is allocated, so what ``load``
allocates stays within the file's size plus a small constant, and every integer
and number in the header is checked against the range it is used in.

Saving replaces only regular files; a symbolic link is written through (its
target gets the model, the link stays), and a replaced file keeps its
permission bits.
"""
import json
import math
import os
import secrets
import stat
import struct
import zipfile
import zlib
from typing import Any, Literal, NamedTuple, overload

import numpy as np

from . import __version__
from .layers import ACTIVATIONS, Dense, from_description
from .network import Network
from .optimizers import _BY_CLASS_NAME as _OPTIMIZER_CLASSES
from .optimizers import Optimizer

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save", "load", "read_header"]

#: The ``format`` field of every bpfast model file.
FORMAT_NAME = "bpfast-model"
#: The newest format version this bpfast writes and reads (1 is still written for
#: networks of Dense layers only, so that older bpfast versions read them).
FORMAT_VERSION = 2

# A header past this size is not one bpfast wrote (metadata of a very wide
# dataset stays far below it); refused before it is read.
_MAX_HEADER_BYTES = 64 << 20
# The fixed part of a zip entry's local header (APPNOTE 4.3.7), before its name and extra field.
_LOCAL_HEADER_SIZE = 30

_LAYER_FIELDS = Dense.FILE_FIELDS


# --------------------------------------------------------------------------- save
#: What a path argument may be.
PathType = str | os.PathLike[str]


def save(network: Network, path: PathType, *, optimizer: Optimizer | None = None,
         metadata: dict[str, Any] | None = None) -> None:
    """Write ``network`` (and optionally its optimizer) to ``path`` atomically.

    Parameters
    ----------
    network : Network
        The network to save: its layers, dtype, seed and parameters.
    path : str or os.PathLike
        The file to write, used exactly as given (no ``.npz`` is appended).
        An existing file is replaced only once the new one is complete, and keeps
        its permission bits (and, where allowed, its owner); a new file gets the
        mode the umask leaves of 0o666. A symbolic link is written through: its
        target is replaced and the link stays. Anything that is not a regular
        file (a directory, a FIFO, a device such as ``/dev/null``) is refused
        with a ValueError before anything is written.
    optimizer : Optimizer, optional
        Also save this optimizer's hyperparameters, step count and state, so that
        training resumes exactly where it stopped. It must be the network's own
        (or one that has not stepped yet).
    metadata : dict, optional
        Anything JSON can hold (str keys), kept in the header and returned by
        :func:`read_header`.

    Notes
    -----
    The file is written to a temporary file in the same directory (the link
    target's, for a symbolic link), flushed to disk, then renamed over the file:
    a crash leaves either the old file or the new one, never a half-written one.
    What is written is one snapshot taken under the network's lock: a step
    running in another thread is waited for, never half-saved; while another
    thread's ``fit`` owns the network, ``RuntimeError``.
    """
    if not isinstance(network, Network):
        raise TypeError(f"network must be a bpfast.Network, got {type(network).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a bpfast Optimizer, got {type(optimizer).__name__}")
    for index, layer in enumerate(network.layers):
        if not isinstance(layer.activation, str):
            raise ValueError(f"layer {index} has a custom Python activation "
                             f"{layer.activation!r}: a model file holds no Python code, so "
                             "it cannot be saved; pickle the network instead (its functions "
                             "are pickled by reference), or use a named activation")
    state = network._get_state(optimizer)  # one consistent snapshot, see Network._get_state
    dense_only = all(spec["kind"] == "dense" for spec in state["layers"])
    header = {
        "format": FORMAT_NAME,
        "format_version": 1 if dense_only else FORMAT_VERSION,
        "bpfast_version": __version__,
        "dtype": state["dtype"],
        "n_parameters": int(network.n_parameters),
        "layers": [{field: spec[field] for field in _LAYER_FIELDS}
                   if spec["kind"] == "dense" else spec for spec in state["layers"]],
        "seed": state["seed"],
        "rng_state": state["rng_state"],
        "optimizer": None,
        "metadata": metadata if metadata is not None else {},
    }
    if state["epochs_trained"] is not None:
        header["epochs_trained"] = int(state["epochs_trained"])
    if not dense_only:
        header["stream"] = [int(value) for value in state["stream"]]
    arrays = {"parameters": state["parameters"]}
    if state["buffers"].shape[0]:
        arrays["buffers"] = state["buffers"]
    if state["optimizer"] is not None:
        header["optimizer"] = state["optimizer"]
        if state["optimizer_state"] is not None:
            arrays["optimizer_state"] = state["optimizer_state"]
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata cannot be stored as JSON: {error}") from None
    except RecursionError:
        raise ValueError("metadata nests lists or dicts too deeply to store as JSON") from None
    arrays["header"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_atomically(os.fspath(path), arrays)


def _write_atomically(path, arrays):
    target, existing = _save_target(path)
    directory, name = os.path.split(target)
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide
            descriptor = os.open(temporary,
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                                 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            if existing is not None:
                _keep_owner_and_mode(file.fileno(), existing)
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    _sync_directory(directory)


def _save_target(path):
    """(the file to replace, its os.stat_result or None when it does not exist yet).

    A symbolic link (also one whose target does not exist yet) is followed, so the
    link survives and its target gets the model, as ``open(path, "w")`` would do.
    Only a regular file may be replaced: renaming over a FIFO or a device (as root,
    ``/dev/null``) would destroy it, and a directory cannot be.
    """
    target = os.path.realpath(path)
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return target, None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{path}: not a regular file; bpfast.save replaces only regular "
                         "files (or writes through a symbolic link to one)")
    return target, status


def _keep_owner_and_mode(descriptor, existing):
    """Give the new file the replaced file's owner (where allowed) and permission bits."""
    mode = stat.S_IMODE(existing.st_mode)
    try:
        os.fchown(descriptor, existing.st_uid, existing.st_gid)
    except (AttributeError, OSError):  # not permitted (or Windows): we own the new file
        mode &= ~(stat.S_ISUID | stat.S_ISGID)  # so never make a set-id file of ours
    if hasattr(os, "fchmod"):
        os.fchmod(descriptor, mode)


def _sync_directory(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- load
class _FileError(ValueError):
    """A ValueError whose message starts with the file's name."""

    def __init__(self, path, message):
        super().__init__(f"{path}: {message}")


def read_header(path: PathType) -> dict[str, Any]:
    """The JSON header of a bpfast model file, as a dict, after checking the file.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        The header fields (see the module documentation); ``header["metadata"]``
        is what was passed to :func:`save`.
    """
    header, _ = _read(os.fspath(path), arrays_wanted=False)
    return header


@overload
def load(path: PathType, *, with_optimizer: Literal[False] = ...) -> Network: ...


@overload
def load(path: PathType, *,
         with_optimizer: Literal[True]) -> tuple[Network, Optimizer | None]: ...


@overload
def load(path: PathType, *,
         with_optimizer: bool) -> Network | tuple[Network, Optimizer | None]: ...


def load(path: PathType, *,
         with_optimizer: bool = False) -> Network | tuple[Network, Optimizer | None]:
    """Read a network (and optionally its optimizer) saved by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
    with_optimizer : bool
        False (default): return the Network. True: return ``(network, optimizer)``,
        where optimizer is the saved optimizer, bound to the network with its state
        and step count, or None when none was saved.

    Returns
    -------
    Network or (Network, Optimizer or None)

    Raises
    ------
    ValueError
        The file is not a bpfast model, is truncated or corrupted, was written by a
        newer bpfast (a newer format version), or is inconsistent; the message
        names the file. Loading never unpickles anything.
    OSError
        The file cannot be opened.
    """
    path = os.fspath(path)
    header, arrays = _read(path, arrays_wanted=True)
    try:
        network = Network._from_state({
            "layers": header["layers"], "dtype": header["dtype"], "seed": header["seed"],
            "parameters": arrays["parameters"], "buffers": arrays.get("buffers"),
            "stream": header.get("stream"), "rng_state": header.get("rng_state"),
            "epochs_trained": header.get("epochs_trained")})
    except (TypeError, ValueError, OverflowError) as error:
        raise _FileError(path, f"invalid network description: {error}") from None
    if not with_optimizer:
        return network
    return network, _build_optimizer(path, network, header["optimizer"],
                                     arrays.get("optimizer_state"))


def _build_optimizer(path, network, record, state):
    if record is None:
        return None
    try:
        optimizer = Optimizer._from_state(record)
    except ValueError as error:
        raise _FileError(path, str(error)) from None
    if state is not None:
        optimizer._restore(network, state, record["step_count"])
    return optimizer


def _read(path, arrays_wanted):
    """(header, arrays) from path, every check done; arrays is None unless wanted."""
    # Opening is outside the try: a missing or unreadable file stays an OSError, while
    # every error past this point comes from the file's content.
    file, file_size = _open_regular_file(path)
    with file:
        return _read_open_file(path, file, file_size, arrays_wanted)


def _open_regular_file(path):
    """(binary file object, size in bytes) of path, refused unless it is a regular file.

    A FIFO would block the open until a writer comes, ``/dev/zero`` reads forever and
    a directory cannot be read: none is a model file. The path is checked before it
    is opened (opening some devices has effects) and the opened file again, in case
    the path changed in between; the size taken here bounds every later read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise _FileError(path, "not a regular file, so not a bpfast model file")
    # O_NONBLOCK: should the path have become a FIFO since, the open still returns
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)
                         | getattr(os, "O_NONBLOCK", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise _FileError(path, "not a regular file, so not a bpfast model file")
        return os.fdopen(descriptor, "rb"), status.st_size
    except BaseException:
        os.close(descriptor)
        raise


def _read_open_file(path, file, file_size, arrays_wanted):
    try:
        if not zipfile.is_zipfile(file):
            raise _FileError(path, "not a bpfast model file (not an .npz archive)")
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            members = _inspect_members(path, archive, file, file_size)
            _check_header_member(path, members["header"])  # before reading a byte of it
            header = _parse_header(path, _read_array(archive, members["header"]))
            expected = _expected_shapes(path, header)
            for key in members:
                if key != "header" and key not in expected:
                    raise _FileError(path, f"unexpected array {key!r}")
            for key, shape in expected.items():
                if key not in members:
                    raise _FileError(path, f"missing array {key!r}")
                if members[key].shape != shape:
                    raise _FileError(path, f"array {key!r} has shape {members[key].shape}, "
                                     f"but the header's layers need {shape}")
                if not _is_float_of(members[key].dtype, header["dtype"]):
                    raise _FileError(path, f"array {key!r} has dtype {members[key].dtype}, "
                                     f"expected {header['dtype']}")
            if not arrays_wanted:
                return header, None
            arrays = {}
            for key in expected:
                arrays[key] = _read_array(archive, members[key]).astype(header["dtype"],
                                                                       copy=False)
                if not np.isfinite(arrays[key]).all():
                    raise _FileError(path, f"array {key!r} contains NaN or infinity")
            return header, arrays
    except _FileError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError, struct.error,
            zlib.error, NotImplementedError, RuntimeError) as error:
        # zipfile and numpy report damage in many ways (a bad offset is an OSError, a
        # garbled version field NotImplementedError, a flipped flag bit "encrypted", a
        # RuntimeError); the user needs to know which file and that it is damaged
        raise _FileError(path, f"not a readable bpfast model file (truncated or corrupted?): "
                         f"{type(error).__name__}: {error}") from None


class _Member(NamedTuple):
    """An archive member's array as its .npy header declares it, and its zip entry."""

    shape: tuple[int, ...]
    dtype: np.dtype
    info: zipfile.ZipInfo


def _read_array(archive, member):
    # the sizes were checked by _inspect_members, so this reads what the file holds
    with archive.open(member.info) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _inspect_members(path, archive, file, file_size):
    """{name: _Member} of every array in the archive, read from the .npy headers only.

    Every declared size is checked against the bytes really in the file before
    anything is read: the zip entry's data must lie inside the file, apart from
    the other entries', and hold exactly the bytes its .npy header's shape and
    dtype need. So the arrays read later cannot together exceed the file's size,
    whatever the central directory claims. Object arrays (pickles) are refused.
    """
    members = {}
    extents = []
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise _FileError(path, f"unexpected member {info.filename!r}")
        key = info.filename[:-len(".npy")]
        if key in members:
            raise _FileError(path, f"array {key!r} appears twice")
        # bpfast writes stored members only; refusing compression keeps every size
        # check against bytes really in the file (a small deflated file could
        # otherwise declare, and make us allocate, gigabytes)
        if info.compress_type != zipfile.ZIP_STORED:
            raise _FileError(path, f"array {key!r} is compressed; bpfast model files "
                             "are not")
        start = _member_data_offset(path, file, info)
        if info.compress_size != info.file_size or start + info.file_size > file_size:
            raise _FileError(path, f"array {key!r} declares {info.file_size} bytes "
                             f"({info.compress_size} stored) from offset {start}, but the "
                             f"file has {file_size} bytes")
        extents.append((start, start + info.file_size, key))
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise _FileError(path, f"array {key!r} has .npy version {version}")
            header_bytes = stream.tell()
        if dtype.hasobject:
            raise _FileError(path, f"array {key!r} holds Python objects; bpfast files "
                             "never do, and loading them could run code, so it is refused")
        if any(length < 0 for length in shape):
            raise _FileError(path, f"array {key!r} declares the shape {shape}")
        data_bytes = math.prod(shape) * dtype.itemsize
        if header_bytes + data_bytes != info.file_size:
            raise _FileError(path, f"array {key!r} declares shape {shape} "
                             f"({data_bytes} bytes) but holds "
                             f"{info.file_size - header_bytes} bytes")
        members[key] = _Member(tuple(shape), dtype, info)
    extents.sort()
    for (_, end, first), (start, _, second) in zip(extents, extents[1:]):
        if start < end:
            raise _FileError(path, f"arrays {first!r} and {second!r} overlap in the file")
    if "header" not in members:
        raise _FileError(path, "not a bpfast model file (no header)")
    return members


def _member_data_offset(path, file, info):
    """Where the entry's data start: after its local header, whose lengths are read here."""
    file.seek(info.header_offset)
    local_header = file.read(_LOCAL_HEADER_SIZE)
    if len(local_header) != _LOCAL_HEADER_SIZE or local_header[:4] != b"PK\x03\x04":
        raise _FileError(path, f"member {info.filename!r} has no local header at offset "
                         f"{info.header_offset}")
    name_length, extra_length = struct.unpack("<HH", local_header[26:30])
    return info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length


def _is_float_of(dtype, name):
    # either byte order: a file written on a big-endian machine reads anywhere
    return dtype.kind == "f" and dtype.itemsize == np.dtype(name).itemsize


def _check_header_member(path, member):
    shape, dtype = member.shape, member.dtype
    if dtype != np.uint8 or len(shape) != 1:
        raise _FileError(path, "header must be a 1-D uint8 array")
    if shape[0] > _MAX_HEADER_BYTES:
        raise _FileError(path, f"header of {shape[0]} bytes is too large")


def _parse_header(path, array):
    try:
        header = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _FileError(path, f"header is not valid JSON: {error}") from None
    except RecursionError:
        raise _FileError(path, "header nests lists or objects too deeply to read") from None
    except ValueError as error:  # an integer of more digits than int() takes
        raise _FileError(path, f"header holds a value out of range: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise _FileError(path, "not a bpfast model file (wrong format name)")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _FileError(path, f"invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise _FileError(path, f"written by a newer bpfast "
                         f"({header.get('bpfast_version', 'unknown')}), format version "
                         f"{version}; this bpfast {__version__} reads up to version "
                         f"{FORMAT_VERSION}: upgrade bpfast")
    _check_fields(path, header)
    return header


def _check_fields(path, header):
    """Types of every field load uses; values are checked by the constructors."""
    def fail(message):
        raise _FileError(path, f"invalid header: {message}")

    if header.get("dtype") not in ("float32", "float64"):
        fail(f"dtype must be 'float32' or 'float64', got {header.get('dtype')!r}")
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers:
        fail("layers must be a non-empty list")
    for index, spec in enumerate(layers):
        if isinstance(spec, dict) and spec.get("kind", "dense") != "dense":
            try:  # an unattached layer: its constructor checks every value
                from_description(spec)
            except (TypeError, ValueError, OverflowError) as error:
                fail(f"layer {index}: {error}")
            continue
        if not isinstance(spec, dict) or any(field not in spec for field in _LAYER_FIELDS):
            fail(f"layer {index} must have the fields {', '.join(_LAYER_FIELDS)}")
        for field in ("in_features", "out_features"):
            if not _is_int(spec[field]) or spec[field] < 1:
                fail(f"layer {index} {field} must be a positive integer, got {spec[field]!r}")
        if not isinstance(spec["bias"], bool):
            fail(f"layer {index} bias must be true or false")
        if spec["activation"] not in ACTIVATIONS:
            fail(f"layer {index} has unknown activation {spec['activation']!r}")
        if not _is_finite_number(spec["activation_param"]):
            fail(f"layer {index} activation_param must be a finite number, got "
                 f"{_short(spec['activation_param'])}")
    for field in ("seed", "optimizer"):
        if field not in header:
            fail(f"missing field {field!r}")
    seed = header["seed"]
    if seed is not None and not (_is_int(seed) and seed >= 0):
        fail(f"seed must be a non-negative integer or null, got {_short(seed)}")
    if "epochs_trained" in header and not _is_count(header["epochs_trained"]):
        fail(f"epochs_trained must be an integer in [0, 2**63), got "
             f"{_short(header['epochs_trained'])}")
    _check_rng_state(fail, header.get("rng_state"))
    stream = header.get("stream")
    if stream is not None and not (isinstance(stream, list) and len(stream) == 2 and all(
            _is_int(value) and 0 <= value < 2**64 for value in stream)):
        fail(f"stream must be [key, counter], integers in [0, 2**64), got {_short(stream)}")
    if not isinstance(header.get("metadata", {}), dict):
        fail("metadata must be an object")
    header.setdefault("metadata", {})
    record = header.get("optimizer")
    if record is not None:
        if not isinstance(record, dict) or record.get("name") not in _OPTIMIZER_CLASSES:
            fail(f"optimizer must be null or name one of {', '.join(_OPTIMIZER_CLASSES)}")
        if not isinstance(record.get("hyperparameters"), dict):
            fail("optimizer hyperparameters must be an object")
        if "betas" in record["hyperparameters"]:
            betas = record["hyperparameters"]["betas"]
            if not isinstance(betas, list):
                fail("optimizer betas must be a list")
            record["hyperparameters"]["betas"] = tuple(betas)
        _check_hyperparameters(fail, record["name"], record["hyperparameters"])
        if not _is_count(record.get("step_count")):
            fail(f"optimizer step_count must be an integer in [0, 2**63), got "
                 f"{_short(record.get('step_count'))}")
        initial_lr = record.get("initial_lr")
        if initial_lr is not None and (not _is_finite_number(initial_lr) or initial_lr < 0):
            fail(f"optimizer initial_lr must be null or a finite number >= 0, got "
                 f"{_short(initial_lr)}")
        if not isinstance(record.get("has_state"), bool):
            fail("optimizer has_state must be true or false")
        names = record.get("state_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail("optimizer state_names must be a list of strings")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value):
    """An int the engine can count in (an int64), and not negative."""
    return _is_int(value) and 0 <= value < 2**63


def _is_finite_number(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)  # float(value) inside: OverflowError past 1.8e308
    except OverflowError:
        return False


def _short(value, limit=60):
    """repr(value), cut to a readable length (a header may hold 400-digit numbers)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_hyperparameters(fail, name, hyperparameters):
    """The optimizer's constructor must accept them: read_header checks what load uses."""
    for key, value in hyperparameters.items():
        for number in (value if isinstance(value, tuple) else (value,)):
            if (isinstance(number, (int, float)) and not isinstance(number, bool)
                    and not _is_finite_number(number)):
                fail(f"optimizer hyperparameter {key!r} must be finite, got {_short(number)}")
    try:
        _OPTIMIZER_CLASSES[name](**hyperparameters)
    except (TypeError, ValueError, OverflowError) as error:
        fail(f"optimizer hyperparameters: {error}")


# The bit generators a header may name; numpy's own, so setting a state runs no code
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "SFC64", "Philox", "MT19937")


def _check_rng_state(fail, state):
    """rng_state must be null or a state its bit generator accepts (tried on a fresh one)."""
    if state is None:
        return
    if not isinstance(state, dict) or state.get("bit_generator") not in _BIT_GENERATORS:
        fail(f"rng_state must be null or the state of one of {', '.join(_BIT_GENERATORS)}")
    try:
        getattr(np.random, state["bit_generator"])(0).state = state
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        fail(f"rng_state is not a valid {state['bit_generator']} state: "
             f"{type(error).__name__}: {error}")


def _expected_shapes(path, header):
    """The shape each array must have for the header's layers."""
    n_parameters = n_buffers = 0
    for spec in header["layers"]:
        if spec.get("kind", "dense") == "dense":
            n_parameters += spec["out_features"] * (spec["in_features"] + spec["bias"])
        else:  # checked by _check_fields: the constructor accepts it
            layer = from_description(spec)
            n_parameters += layer.n_parameters
            n_buffers += layer.n_buffers
    if header.get("n_parameters", n_parameters) != n_parameters:
        raise _FileError(path, f"header says {_short(header['n_parameters'])} parameters, but its "
                         f"layers have {n_parameters}")
    shapes = {"parameters": (n_parameters,)}
    if n_buffers:
        shapes["buffers"] = (n_buffers,)
    record = header["optimizer"]
    if record is not None and record["has_state"]:
        shapes["optimizer_state"] = (len(record["state_names"]), n_parameters)
    return shapes
