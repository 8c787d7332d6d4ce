"""``MemoryBank``: keys, values, float32 bank norms and stable ids, saved and loaded safely.

A bank file is a safetensors file (readable by the ``safetensors`` package too) whose header
metadata holds, under ``"hen_fast"``, a JSON document: the format name and version, whether values
are the keys (auto-association), the next free id, and every tensor's dtype, shape and the sha256
of its bytes. ``save`` writes a temporary file beside the target, flushes and fsyncs it, renames it
over the target and fsyncs the directory, so a crash at any moment leaves either the old bank or
the new one, never a mixture. ``load`` checks the header, the sizes and every checksum, recomputes
what the file stores but could be derived (the squared norms, from the keys) and checks the ids,
and refuses anything else with :class:`BankIntegrityError`. No pickle is involved anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backends.norms import remember_sq_norms, sq_norms
from .index import (
    INDEX_FIELDS,
    KMEANS_ITERS,
    SKETCH_FIELDS,
    BankIndex,
    cluster_order,
    cluster_statistics,
    default_num_clusters,
    kmeans_labels,
    row_sketch,
    sketch_basis,
    verified_index,
)
from .options import FLOAT_DTYPES, all_finite, check_tensor

FORMAT_NAME = "hen_fast.MemoryBank"
FORMAT_VERSION = 1
# safetensors dtype names; 16-bit floats travel as int16 through numpy (it has no bfloat16).
_DTYPES = {
    torch.float64: ("F64", np.float64),
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.int16),
    torch.bfloat16: ("BF16", np.int16),
    torch.int64: ("I64", np.int64),
}
_DTYPE_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}
# Bytes written per write() call, so a large bank never needs a second copy in memory.
_WRITE_BLOCK = 1 << 24


class BankIntegrityError(ValueError):
    """A bank file that is corrupted, truncated, incomplete or of another format version."""


@dataclass(frozen=True)
class BankState:
    """One consistent snapshot of a bank: what ``retrieve`` reads, replaced as a whole on every
    change so that a concurrent reader never sees keys of one version and norms of another."""

    keys: Tensor
    values: Tensor | None  # None: the values are the keys (auto-association)
    norms: Tensor
    ids: Tensor
    mapped: bool  # memory-mapped from a file: retrieve streams it in chunks
    index: BankIndex | None = None  # clusters with score bounds (build_index); rows sorted by it


class MemoryBank:
    """Stored patterns for :func:`hen_fast.retrieve`: keys ``(M, d)``, values ``(M, dv)`` (or the
    keys themselves), their float32 squared norms (for ``similarity="l2"``) and one stable int64 id
    per memory.

    Pass a bank wherever ``retrieve`` takes ``memories`` (with ``values=None``); it reuses the
    bank's norms and its cached finiteness check. ``append`` and ``remove`` replace the bank's
    tensors as a whole (under a lock), so retrieval from other threads sees the bank before or
    after a change, never halfway. :meth:`build_index` partitions the bank into clusters with
    certified score bounds, so that ``retrieve`` reads only the clusters a query needs.

    Args:
        keys: ``(M, d)`` floating-point tensor.
        values: ``(M, dv)`` on the keys' device, or None for auto-association.
        ids: ``(M,)`` distinct integers; default ``0 .. M-1``.
    """

    def __init__(self, keys: Tensor, values: Tensor | None = None, ids=None):
        keys = _check_rows("keys", keys)
        if keys.shape[1] == 0:
            raise ValueError(f"keys must have at least one column, got {tuple(keys.shape)}")
        if values is not None:
            values = _check_rows("values", values, rows=keys.shape[0])
            if values.device != keys.device:
                raise ValueError(f"values must be on the keys' device {keys.device}")
        ids = _check_ids(ids, keys.shape[0], keys.device)
        self._lock = threading.Lock()
        self._next_id = int(ids.max()) + 1 if ids.numel() else 0
        self._finite_cache: tuple | None = None
        self._set_state(keys, values, sq_norms(keys), ids, mapped=False)

    # ---------------------------------------------------------------------------------- reading
    @property
    def state(self) -> BankState:
        return self._state

    @property
    def keys(self) -> Tensor:
        return self._state.keys

    @property
    def values(self) -> Tensor:
        """The values, which are the keys for an auto-associative bank."""
        state = self._state
        return state.keys if state.values is None else state.values

    @property
    def norms(self) -> Tensor:
        """float32 ``||k||^2`` per memory."""
        return self._state.norms

    @property
    def ids(self) -> Tensor:
        return self._state.ids

    @property
    def auto_associative(self) -> bool:
        return self._state.values is None

    @property
    def mapped(self) -> bool:
        """Loaded with ``mmap=True``: its tensors are backed by the file."""
        return self._state.mapped

    @property
    def index(self) -> BankIndex | None:
        """The bank's cluster index (:meth:`build_index`), or None."""
        return self._state.index

    def __len__(self) -> int:
        return self._state.keys.shape[0]

    def __repr__(self) -> str:
        state = self._state
        values = "keys" if state.values is None else tuple(state.values.shape)
        index = "None" if state.index is None else f"{state.index.num_clusters} clusters"
        return (
            f"MemoryBank(keys={tuple(state.keys.shape)}, values={values}, "
            f"dtype={state.keys.dtype}, device={state.keys.device}, mapped={state.mapped}, "
            f"index={index})"
        )

    def all_finite(self) -> bool:
        """No NaN or Inf in keys or values; computed once per version of the bank's tensors."""
        state = self._state
        tensors = [t for t in (state.keys, state.values) if t is not None]
        stamp = (state, tuple(t._version for t in tensors))
        cached = self._finite_cache
        if cached is not None and cached[0][0] is stamp[0] and cached[0][1] == stamp[1]:
            return cached[1]
        finite = all(all_finite(t) for t in tensors)
        self._finite_cache = (stamp, finite)
        return finite

    # ---------------------------------------------------------------------------------- changes
    def append(self, keys: Tensor, values: Tensor | None = None, ids=None) -> Tensor:
        """Adds memories and returns their ids (by default the next free ones). ``values`` must be
        given exactly when the bank has its own values. Drops the bank's index (build it again
        once the changes are done)."""
        with self._lock:
            state = self._state
            keys = _check_rows("keys", keys, like=state.keys)
            if (values is None) != (state.values is None):
                need = "without values (auto-associative)" if state.values is None else "values"
                raise ValueError(f"values: this bank stores {need}; append accordingly")
            if values is not None:
                values = _check_rows("values", values, rows=keys.shape[0], like=state.values)
            if ids is None:
                ids = torch.arange(self._next_id, self._next_id + keys.shape[0])
            ids = _check_ids(ids, keys.shape[0], state.keys.device)
            clash = ids[torch.isin(ids, state.ids)]
            if clash.numel():
                raise ValueError(f"ids already in the bank: {clash.tolist()[:10]}")
            self._set_state(
                torch.cat([state.keys, keys]),
                None if values is None else torch.cat([state.values, values]),
                torch.cat([state.norms, sq_norms(keys)]),
                torch.cat([state.ids, ids]),
                mapped=False,
            )
            if ids.numel():
                self._next_id = max(self._next_id, int(ids.max()) + 1)
            return ids

    def remove(self, ids) -> int:
        """Removes the memories with these ids; every id must be in the bank (nothing is removed
        otherwise). Returns how many were removed. Drops the bank's index."""
        with self._lock:
            state = self._state
            ids = _check_ids(ids, None, state.ids.device)
            missing = ids[~torch.isin(ids, state.ids)]
            if missing.numel():
                raise ValueError(f"ids not in the bank: {missing.tolist()[:10]}")
            keep = ~torch.isin(state.ids, ids)
            self._set_state(
                state.keys[keep],
                None if state.values is None else state.values[keep],
                state.norms[keep],
                state.ids[keep],
                mapped=False,
            )
            return int((~keep).sum())

    # ------------------------------------------------------------------------------------ index
    def build_index(self, num_clusters: int | None = None, *, labels=None,
                    iters: int = KMEANS_ITERS, seed: int = 0, sketch_dim: int | str = "auto",
                    progress: bool | None = None) -> BankIndex:  # fmt: skip
        """Partitions the bank into clusters and keeps a certified bound on each cluster's best
        score, so that :func:`hen_fast.retrieve` reads, per query, only the clusters that can
        matter (:mod:`hen_fast.indexed`). Returns the index (also :attr:`index`).

        The memories are reordered so that each cluster is a contiguous range of rows (ids move
        with their memories: use :attr:`ids` to name them; a memory-mapped bank is read into
        memory). ``append`` and ``remove`` drop the index; ``save`` stores it and ``load``
        verifies it against the keys.

        Args:
            num_clusters: default ``round(4 sqrt(M))``
                (:func:`hen_fast.index.default_num_clusters`).
            labels: ``(M,)`` integer cluster per memory, in ``[0, num_clusters)``, instead of
                k-means (any partition gives exact results; a poor one reads more).
            iters: Lloyd iterations of k-means (on a seeded sample of the bank).
            seed: seeds the k-means sample and its initial centres.
            sketch_dim: the row sketch's size ``p`` (a bound on every row's dot / l2 score from
                ``p`` float16 numbers and one float32 per row, for queries whose cluster bounds
                do not prune: :mod:`hen_fast.sketch_filter`); 0: none; ``"auto"``: the largest of
                8, 16, 32, 64 whose 2p + 4 bytes a row are at most 8% of a key's, else none
                (:func:`hen_fast.index.auto_sketch_dim`).
            progress: progress bars for k-means, the assignment and the sketch (default: for
                banks of >= 2^20 rows, on a terminal).
        """
        with self._lock:
            state = self._state
            rows = state.keys.shape[0]
            if rows == 0:
                raise ValueError("build_index needs a bank with at least one memory")
            for name, value in (("iters", iters), ("seed", seed)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be an int >= 0, got {value!r}")
            dim = state.keys.shape[1]
            if sketch_dim != "auto" and (isinstance(sketch_dim, bool)
                                          or not isinstance(sketch_dim, int)
                                          or not 0 <= sketch_dim <= dim):  # fmt: skip
                raise ValueError(f"sketch_dim must be 'auto' or an int in [0, "
                                 f"{dim}] (the key size), got {sketch_dim!r}")
            if labels is not None:
                labels = _check_labels(labels, rows, num_clusters, state.keys.device)
                num_clusters = num_clusters or int(labels.max()) + 1
            elif num_clusters is None:
                num_clusters = default_num_clusters(rows)
            elif (isinstance(num_clusters, bool) or not isinstance(num_clusters, int)
                  or not 1 <= num_clusters <= rows):  # fmt: skip
                raise ValueError(
                    f"num_clusters must be an int in [1, {rows}] (the bank's memories), "
                    f"got {num_clusters!r}"
                )
            if labels is None:
                labels = kmeans_labels(state.keys, num_clusters, iters=iters, seed=seed,
                                       progress=progress)  # fmt: skip
            perm, offsets = cluster_order(labels, num_clusters)
            keys = state.keys[perm]
            index = cluster_statistics(keys, offsets)
            basis = sketch_basis(keys, sketch_dim, seed)
            if basis is not None:
                sketch, residual = row_sketch(keys, basis, progress)
                index = dataclasses.replace(index, basis=basis, sketch=sketch, residual=residual)
            values = None if state.values is None else state.values[perm]
            self._set_state(keys, values, state.norms[perm], state.ids[perm], mapped=False,
                            index=index)  # fmt: skip
            return index

    def drop_index(self) -> None:
        """Forgets the index (the memories keep their cluster order); ``retrieve`` scans."""
        with self._lock:
            state = self._state
            self._set_state(state.keys, state.values, state.norms, state.ids, mapped=state.mapped)

    def _set_state(self, keys, values, norms, ids, *, mapped, index=None):
        remember_sq_norms(keys, norms)
        self._state = BankState(keys, values, norms, ids, mapped, index)

    # ------------------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Writes the bank to ``path`` atomically (see the module docstring) and returns it."""
        path = Path(path)
        state = self._state
        tensors = {"keys": state.keys, "norms": state.norms, "ids": state.ids}
        if state.values is not None:
            tensors["values"] = state.values
        if state.index is not None:
            tensors.update(state.index.tensors())
        arrays = {name: _as_numpy(t) for name, t in tensors.items()}
        # Widest dtypes first keeps every tensor aligned to its element size in the file.
        order = sorted(arrays, key=lambda name: (-arrays[name].itemsize, name))
        described, offset = {}, 0
        for name in order:
            array = arrays[name]
            described[name] = {
                "dtype": _DTYPES[tensors[name].dtype][0],
                "shape": list(tensors[name].shape),
                "sha256": hashlib.sha256(memoryview(array).cast("B")).hexdigest(),
            }
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "auto_associative": state.values is None,
            "next_id": self._next_id,
            "index": state.index is not None,
            "index_sketch": state.index is not None and state.index.basis is not None,
            "tensors": described,
        }
        header = {"__metadata__": {"hen_fast": json.dumps(meta, sort_keys=True)}}
        for name in order:
            size = arrays[name].nbytes
            header[name] = {
                "dtype": described[name]["dtype"],
                "shape": described[name]["shape"],
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        blobs = [struct.pack("<Q", len(header_bytes)), header_bytes]
        blobs += [memoryview(arrays[name]).cast("B") for name in order]
        _atomic_write(path, blobs)
        return path

    @classmethod
    def load(cls, path, mmap: bool = False) -> MemoryBank:
        """Reads a bank saved by :meth:`save`, verifying its format version, sizes and the sha256
        of every tensor. ``mmap=True`` maps the tensors from the file instead of reading them
        (copy-on-write: changing them never changes the file); ``retrieve`` then streams the bank
        in chunks. Raises FileNotFoundError for a missing file and :class:`BankIntegrityError`,
        naming the file, for anything wrong inside it."""
        path = Path(path)
        with open(path, "rb"):  # FileNotFoundError / PermissionError as usual
            pass
        if path.stat().st_size < 8:
            raise BankIntegrityError(f"{path}: truncated ({path.stat().st_size} bytes)")
        if mmap:
            buffer = np.memmap(path, mode="c", dtype=np.uint8)
        else:
            buffer = np.fromfile(path, dtype=np.uint8)
        meta, tensors, index = _parse(path, buffer)
        bank = cls.__new__(cls)
        bank._lock = threading.Lock()
        bank._next_id = meta["next_id"]
        bank._finite_cache = None
        values = None if meta["auto_associative"] else tensors["values"]
        bank._set_state(tensors["keys"], values, tensors["norms"], tensors["ids"], mapped=mmap,
                        index=index)  # fmt: skip
        return bank


# ---------------------------------------------------------------------------------- file format
def _atomic_write(path: Path, blobs) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"path: directory {directory} does not exist")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            for blob in blobs:
                _write_blob(file, blob)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _write_blob(file, blob) -> None:
    for start in range(0, len(blob), _WRITE_BLOCK):
        file.write(blob[start : start + _WRITE_BLOCK])


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable. Some platforms cannot open a directory; the rename is still
    atomic there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse(path: Path, buffer: np.ndarray) -> tuple[dict, dict[str, Tensor]]:
    def refuse(why: str):
        raise BankIntegrityError(f"{path}: {why}; the file is not an intact hen_fast bank")

    (header_size,) = struct.unpack("<Q", buffer[:8].tobytes())
    if header_size > buffer.size - 8:
        refuse(f"truncated header (needs {header_size} bytes, has {buffer.size - 8})")
    try:
        header = json.loads(buffer[8 : 8 + header_size].tobytes().decode("utf-8"))
        meta = json.loads(header.pop("__metadata__")["hen_fast"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        refuse(f"unreadable header ({type(error).__name__}: {error})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        refuse("not a MemoryBank file")
    if meta.get("version") != FORMAT_VERSION:
        refuse(f"format version {meta.get('version')!r}, this hen_fast reads {FORMAT_VERSION}")
    described = meta.get("tensors")
    auto = meta.get("auto_associative")
    indexed = meta.get("index", False)  # files from before indexes have no entry
    expected = {"keys", "norms", "ids"} | (set() if auto else {"values"})
    sketched = meta.get("index_sketch", False)  # nor from before sketches
    if indexed is True:
        expected |= {f"index_{name}" for name in INDEX_FIELDS}
        if sketched is True:
            expected |= {f"index_{name}" for name in SKETCH_FIELDS}
    if (not isinstance(auto, bool) or not isinstance(meta.get("next_id"), int)
            or not isinstance(indexed, bool) or not isinstance(sketched, bool)
            or (sketched and not indexed)):  # fmt: skip
        refuse("bad metadata")
    if not isinstance(described, dict) or set(described) != expected or set(header) != expected:
        refuse(f"tensors {sorted(header)} where {sorted(expected)} belong")
    data_start = 8 + header_size
    data_size = buffer.size - data_start
    tensors, spans = {}, []
    for name in expected:
        entry, record = header[name], described[name]
        try:
            dtype = _DTYPE_BY_NAME[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            refuse(f"bad header entry for {name!r}")
        if entry["dtype"] != record.get("dtype") or shape != record.get("shape"):
            refuse(f"header and metadata disagree on {name!r}")
        itemsize = np.dtype(_DTYPES[dtype][1]).itemsize
        if min(shape, default=0) < 0 or end - begin != itemsize * int(np.prod(shape)):
            refuse(f"size of {name!r} does not match its shape")
        if begin < 0 or end > data_size:
            refuse(f"{name!r} lies past the end of the file (truncated?)")
        raw = buffer[data_start + begin : data_start + end]
        if hashlib.sha256(memoryview(raw)).hexdigest() != record.get("sha256"):
            refuse(f"checksum of {name!r} does not match (corrupted)")
        array = raw.view(_DTYPES[dtype][1]).reshape(shape)
        tensors[name] = torch.from_numpy(array).view(dtype)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            refuse("tensor data overlaps or leaves gaps")
        covered = end
    if covered != data_size:
        refuse(f"{data_size - covered} unexpected trailing bytes")
    _check_loaded(refuse, tensors, auto)
    _check_derived(refuse, meta, tensors)
    index = None
    if indexed:
        # Its statistics are recomputed from the keys and the recomputed ones kept: a radius
        # too small would skip memories that matter.
        index, why = verified_index(BankIndex.from_tensors(tensors), tensors["keys"])
        if index is None:
            refuse(why)
    return meta, tensors, index


def _check_loaded(refuse, tensors: dict[str, Tensor], auto: bool) -> None:
    keys, norms, ids = tensors["keys"], tensors["norms"], tensors["ids"]
    rows = keys.shape[0] if keys.dim() == 2 else -1
    if keys.dtype not in FLOAT_DTYPES or keys.dim() != 2:
        refuse("keys must be a 2-D floating-point tensor")
    if norms.dtype != torch.float32 or tuple(norms.shape) != (rows,):
        refuse("norms must be float32, one per key")
    if ids.dtype != torch.int64 or tuple(ids.shape) != (rows,):
        refuse("ids must be int64, one per key")
    if not auto:
        values = tensors["values"]
        if values.dtype not in FLOAT_DTYPES or values.dim() != 2 or values.shape[0] != rows:
            refuse("values must be 2-D floating point, one row per key")


# Rows of keys whose norms are recomputed at a time on load (bounds the float32 copy of a
# memory-mapped bank to 64 MiB whatever its dtype and size).
_NORM_CHUNK_BYTES = 64 << 20
# Stored and recomputed float32 squared norms may differ by the summation order of another
# machine or torch build: a few float32 roundings of the sum, far below any change that matters.
_NORM_RTOL = 1e-5


def _check_derived(refuse, meta: dict, tensors: dict[str, Tensor]) -> None:
    """What the file stores but could be computed is checked against what it is computed from,
    never trusted: a checksum only proves that the bytes are the ones written, not that the
    writer was right (or honest). The squared norms are recomputed from the keys (chunk by
    chunk, one read of the keys); the ids must be distinct and below the next free id."""
    keys, norms, ids = tensors["keys"], tensors["norms"], tensors["ids"]
    rows, dim = keys.shape
    step = max(1, _NORM_CHUNK_BYTES // max(1, 4 * dim))
    for begin in range(0, rows, step):
        end = min(rows, begin + step)
        fresh = sq_norms(keys[begin:end])
        stored = norms[begin:end]
        # equal_nan: a bank may hold non-finite keys (retrieve refuses them, saving does not)
        bad = ~torch.isclose(stored, fresh, rtol=_NORM_RTOL, atol=0.0, equal_nan=True)
        if bool(bad.any()):
            row = begin + int(bad.nonzero()[0])
            refuse(
                f"stored norms do not match the keys (row {row}: stored {float(norms[row])!r}, "
                f"the keys give {float(sq_norms(keys[row : row + 1])[0])!r})"
            )
    if rows:
        if ids.unique().numel() != rows:
            refuse("ids are not distinct")
        if int(ids.max()) >= meta["next_id"]:
            refuse(f"id {int(ids.max())} is not below the next free id {meta['next_id']}")


# ---------------------------------------------------------------------------------- validation
def _check_rows(name: str, tensor, *, rows: int | None = None, like: Tensor | None = None):
    """A 2-D floating-point tensor; with ``rows``, that many rows; with ``like``, the same
    device, dtype and number of columns (what ``append`` concatenates onto)."""
    check_tensor(name, tensor, (2,), shape="(M, d)")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have one row per key ({rows}), got {tuple(tensor.shape)}")
    if like is not None:
        if tensor.device != like.device or tensor.dtype != like.dtype:
            raise ValueError(
                f"{name} must match the bank's {like.dtype} on {like.device}, "
                f"got {tensor.dtype} on {tensor.device}"
            )
        if tensor.shape[1] != like.shape[1]:
            raise ValueError(
                f"{name} must have the bank's {like.shape[1]} columns, got {tuple(tensor.shape)}"
            )
    return tensor


def _check_labels(labels, rows: int, num_clusters, device) -> Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if tuple(labels.shape) != (rows,):
        raise ValueError(f"labels must hold one cluster per memory ({rows},), "
                         f"got {tuple(labels.shape)}")  # fmt: skip
    labels = labels.to(torch.int64)
    limit = num_clusters if num_clusters is not None else rows
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= rows:
        raise ValueError(f"num_clusters must be an int in [1, {rows}], got {num_clusters!r}")
    if bool((labels < 0).any()) or bool((labels >= limit).any()):
        raise ValueError(f"labels must lie in [0, {limit}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")  # fmt: skip
    return labels


def _check_ids(ids, rows: int | None, device) -> Tensor:
    if ids is None:
        return torch.arange(rows, device=device)
    ids = torch.as_tensor(ids, device=device)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    ids = ids.reshape(-1).to(torch.int64)
    if rows is not None and ids.numel() != rows:
        raise ValueError(f"ids must hold one id per memory ({rows}), got {ids.numel()}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("ids must be distinct")
    return ids


def _as_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy()
