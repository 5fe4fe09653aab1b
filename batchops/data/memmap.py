"""Memory-mapped datasets of ``.npy`` files: batched reads, no pickled objects, atomic writes.

A dataset is a directory with one ``.npy`` file per array -- ``features.npy`` and
``labels.npy`` by default, any other named arrays besides -- all of the same length (first
dimension), plus a ``meta.json`` when :class:`MemmapWriter` wrote it::

    write_memmap_dataset("data/train", features, labels)        # arrays in memory
    write_memmap_batches("data/train", batches)                 # a stream larger than memory
    ds = MemmapDataset("data/train")
    loader = DataLoader(ds, batch_size=256, shuffle=True)       # default collate: fast path

:class:`MemmapDataset` maps the files with ``np.load(mmap_mode="r", allow_pickle=False)``: the
shape and dtype come from the ``.npy`` header, and nothing is unpickled. ``ds[i]`` returns a
tuple of tensors (one per array); ``ds.__getitems__(indices)``, which the DataLoader calls for
each batch, reads the whole batch with one indexed read per array and returns a
:class:`MemmapBatch`, which ``default_collate`` turns into the batch without stacking samples
one by one (see :func:`memmap_collate`).
"""

from __future__ import annotations

import json
import math
import operator
import os
import secrets
import struct
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate, default_collate_fn_map

__all__ = [
    "MemmapBatch",
    "MemmapDataset",
    "MemmapWriter",
    "memmap_collate",
    "write_memmap_batches",
    "write_memmap_dataset",
]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_NAMES = ("features", "labels")
META_FILE = "meta.json"
META_FORMAT = "batchops.memmap"
META_VERSION = 1
# Each batch is converted (dtype cast, device-to-host copy, made contiguous) and written this
# many bytes at a time, so the writer's own memory stays bounded whatever the batch size.
DEFAULT_CHUNK_BYTES = 16 * 2**20
_ARRAY_ALIGN = 64  # numpy pads .npy headers to a multiple of 64 bytes; so do we


# ---------------------------------------------------------------------------------------------
# .npy headers and dtypes


def _torch_dtype(dtype: np.dtype, where: str) -> torch.dtype:
    """The torch dtype that arrays of `dtype` (any byte order) become; TypeError if none."""
    if dtype.hasobject:
        raise ValueError(f"{where}: object arrays (pickled Python objects) are not supported; store numeric arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(
            f"{where}: structured or sub-array dtype {dtype} is not supported; store each field as its own array"
        )
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        raise TypeError(
            f"{where}: dtype {dtype} has no torch equivalent (torch supports bool, "
            "(u)int8-64, float16/32/64, complex64/128)"
        ) from None


def _read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the .npy file at `path`, checked against the file size.

    Raises FileNotFoundError, ValueError (not a .npy file, corrupt header, truncated data,
    object dtype, no first dimension) or TypeError (a dtype torch cannot hold), naming `path`.
    """
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not a .npy file ({exc})") from None
        try:
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                # 3.0 differs from 2.0 only by a UTF-8 header, needed for non-Latin-1 field names
                # of structured dtypes, which _torch_dtype refuses anyway.
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt .npy header ({exc})") from None
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    _torch_dtype(dtype, str(path))
    if len(shape) == 0:
        raise ValueError(f"{path}: holds a 0-d array; a dataset array needs a first (sample) dimension")
    expected = offset + math.prod(shape) * dtype.itemsize
    if size < expected:
        raise ValueError(
            f"{path} is truncated: its header says shape {tuple(shape)} of {dtype} "
            f"({expected} bytes with the {offset}-byte header), but the file has {size} bytes"
        )
    return tuple(int(s) for s in shape), dtype, offset


def _open_memmap(path: str) -> np.ndarray:
    """A read-only memory map of the .npy file at `path`, validated first (see _read_npy_header)."""
    shape, dtype, _ = _read_npy_header(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: cannot memory-map it ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
        raise ValueError(f"{path} changed while it was being opened")
    return arr


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], total_len: int) -> bytes:
    """A version 1.0 .npy header of exactly `total_len` bytes (magic to newline), padded with
    spaces, so that a header reserved for a guessed length can be rewritten in place."""
    body = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}".encode(
        "latin1"
    )
    header_len = total_len - 10  # magic string (6) + version (2) + little-endian uint16 length (2)
    if len(body) + 1 > header_len or header_len > 0xFFFF:
        raise RuntimeError(f"internal error: .npy header of {len(body) + 1} bytes does not fit {header_len}")
    padding = b" " * (header_len - len(body) - 1)
    return np.lib.format.magic(1, 0) + struct.pack("<H", header_len) + body + padding + b"\n"


def _reserved_header_len(dtype: np.dtype, row_shape: tuple[int, ...]) -> int:
    """Header bytes that fit any final length: sized for a 20-digit first dimension."""
    longest = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {(10**20 - 1, *row_shape)!r}, }}"
    need = 10 + len(longest.encode("latin1")) + 1
    return -(-need // _ARRAY_ALIGN) * _ARRAY_ALIGN


# ---------------------------------------------------------------------------------------------
# Batches and collation


class _MemmapSample(tuple):
    """One sample of a :class:`MemmapBatch` (a tuple of tensors, views of the batch). Its type
    is registered in ``default_collate_fn_map``: that is how ``default_collate`` recognises a
    MemmapBatch, since it dispatches on the type of ``batch[0]``."""

    __slots__ = ()


class MemmapBatch(Sequence):
    """A batch read by :meth:`MemmapDataset.__getitems__`: already collated, one tensor per array
    (``tensors``), each of shape ``(batch, *row_shape)``.

    It is also a sequence of samples, as torch's ``__getitems__`` contract asks: ``batch[i]`` is
    the tuple of the i-th rows (views of ``tensors``, made on demand). ``default_collate`` (and
    :func:`memmap_collate`) return ``list(batch.tensors)`` without copying -- what the default
    collate of the per-sample tuples would give, a list of stacked tensors. A custom
    ``collate_fn`` receives the MemmapBatch itself: use ``batch.tensors`` or iterate samples.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"MemmapBatch index {index} out of range for a batch of {n}")
        return _MemmapSample(t[i] for t in self.tensors)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # unbind makes all the row views in one call instead of one indexing call per row.
        for rows in zip(*(t.unbind(0) for t in self.tensors)):
            yield _MemmapSample(rows)

    def collate(self) -> list[torch.Tensor]:
        """The collated batch: a new list of the batch tensors (not copied)."""
        return list(self.tensors)

    def __repr__(self) -> str:
        parts = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in self.tensors)
        return f"MemmapBatch({parts})"


def _collate_memmap_samples(batch, *, collate_fn_map=None):
    if isinstance(batch, MemmapBatch):
        return batch.collate()
    # Samples regrouped by someone else (e.g. a list of samples of several batches): collate
    # them as the plain tuples they are.
    return collate([tuple(s) for s in batch], collate_fn_map=collate_fn_map or default_collate_fn_map)


# default_collate dispatches on type(batch[0]); torch documents in-place extension of this map.
# The key is a private type, so nothing else's collation changes. Importing this module (as
# unpickling a MemmapDataset in a spawned DataLoader worker does) registers it.
default_collate_fn_map[_MemmapSample] = _collate_memmap_samples


def memmap_collate(batch):
    """Collate function for loaders over a :class:`MemmapDataset`: a :class:`MemmapBatch` gives
    ``list(batch.tensors)`` (no copy), anything else goes to ``default_collate``.

    ``default_collate`` already does this, so ``DataLoader(ds, batch_size=...)`` needs no
    ``collate_fn``; call this from a custom collate function that post-processes the batch.
    """
    if isinstance(batch, MemmapBatch):
        return batch.collate()
    return default_collate(batch)


# ---------------------------------------------------------------------------------------------
# Dataset


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where}: array names must be str, got {type(name).__name__}")
    if not name or name.startswith(".") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"{where}: array name {name!r} must be a plain file name stem")
    return name


def _load_meta(root: str) -> dict | None:
    path = os.path.join(root, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"'format' is {meta.get('format')!r}, expected {META_FORMAT!r}")
        arrays = meta["arrays"]
        for a in arrays:
            a["shape"] = tuple(int(s) for s in a["shape"])
            a["dtype"] = np.dtype(a["dtype"])
            _check_name(a["name"], path)
            if "file" in a and os.path.basename(a["file"]) != a["file"]:
                raise ValueError(f"array file {a['file']!r} is not a plain file name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid {META_FORMAT} metadata file ({exc})") from None
    return meta


class MemmapDataset(Dataset):
    """A map-style dataset over memory-mapped ``.npy`` files of equal length.

    Args:
        source: a directory -- its arrays are those listed in ``<source>/meta.json`` (written
            by :class:`MemmapWriter`), else ``<source>/features.npy`` and ``<source>/labels.npy``;
            or a mapping ``{name: path}``; or a sequence of ``.npy`` paths (named by their stems).
        names: which arrays, in which order, items hold (default: all the arrays of ``source``;
            ``("features", "labels")`` for a directory without ``meta.json``).
        sort_reads: read each batch in increasing file order and put the rows back in the
            requested order afterwards (helps the page cache and readahead on large files read
            in random order; costs one small in-memory copy per batch).

    ``ds[i]`` is a tuple of tensors, one per array (``(features, label)`` by default; a label
    is a 0-d tensor); ``ds.__getitems__(indices)`` returns a :class:`MemmapBatch` read with one
    indexed read per array. Tensors are copies, never views of the read-only maps.

    The maps are not pickled: a pickled dataset (e.g. sent to DataLoader workers started by
    spawn or forkserver) holds the paths and reopens the files on first use, checking that their
    shapes and dtypes have not changed.

    Raises FileNotFoundError for a missing file and ValueError for a bad one (not ``.npy``,
    truncated, object dtype, 0-d, arrays of different lengths, a header that disagrees with
    ``meta.json``); TypeError for dtypes torch cannot hold.
    """

    def __init__(
        self,
        source: PathLike | Mapping[str, PathLike] | Sequence[PathLike],
        names: Sequence[str] | None = None,
        *,
        sort_reads: bool = True,
    ):
        meta = None
        if isinstance(source, (str, os.PathLike)):
            root = os.path.abspath(os.fspath(source))
            if not os.path.isdir(root):
                raise NotADirectoryError(
                    f"MemmapDataset: source {root} is not a directory (pass a "
                    "directory, a {name: path} mapping or a list of .npy paths)"
                )
            meta = _load_meta(root)
            if meta is not None:
                available = {a["name"]: os.path.join(root, a.get("file", a["name"] + ".npy")) for a in meta["arrays"]}
            else:
                wanted = DEFAULT_NAMES if names is None else names
                available = {_check_name(n, "MemmapDataset"): os.path.join(root, n + ".npy") for n in wanted}
        elif isinstance(source, Mapping):
            available = {_check_name(n, "MemmapDataset"): os.path.abspath(os.fspath(p)) for n, p in source.items()}
        elif isinstance(source, Sequence):
            paths = [os.path.abspath(os.fspath(p)) for p in source]
            stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
            if len(set(stems)) != len(stems):
                raise ValueError(
                    f"MemmapDataset: source has several files with the same name stem: {stems}; "
                    "pass a {name: path} mapping"
                )
            available = dict(zip(stems, paths))
        else:
            raise TypeError(
                f"MemmapDataset: source must be a directory, a mapping or a sequence of paths, "
                f"got {type(source).__name__}"
            )

        if names is None:
            names = list(available)
        elif isinstance(names, str):
            raise TypeError("MemmapDataset: names must be a sequence of str, got a str (write names=(name,))")
        names = [_check_name(n, "MemmapDataset") for n in names]
        if not names:
            raise ValueError("MemmapDataset: names is empty; a dataset needs at least one array")
        if len(set(names)) != len(names):
            raise ValueError(f"MemmapDataset: names has duplicates: {names}")
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"MemmapDataset: no array named {missing} in source (available: {list(available)})")

        self._names = tuple(names)
        self._paths = {n: available[n] for n in names}
        for n, p in self._paths.items():
            if not os.path.isfile(p):
                hint = (
                    " (a directory without meta.json holds features.npy and labels.npy; pass names=... for others)"
                    if meta is None and isinstance(source, (str, os.PathLike))
                    else ""
                )
                raise FileNotFoundError(f"MemmapDataset: array {n!r}: no file {p}{hint}")
        self.sort_reads = bool(sort_reads)

        maps = {n: _open_memmap(p) for n, p in self._paths.items()}
        self._specs = {n: (m.shape, m.dtype) for n, m in maps.items()}
        if meta is not None:
            by_name = {a["name"]: a for a in meta["arrays"]}
            for n in names:
                a = by_name[n]
                if (a["shape"], a["dtype"]) != self._specs[n]:
                    raise ValueError(
                        f"MemmapDataset: {self._paths[n]} holds {self._specs[n][0]} {self._specs[n][1]}, but "
                        f"{os.path.join(root, META_FILE)} says {a['shape']} {a['dtype']}: the dataset was "
                        "modified after it was written"
                    )
        lengths = {n: s[0][0] for n, s in self._specs.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{n} ({self._paths[n]}): {k}" for n, k in lengths.items())
            raise ValueError(f"MemmapDataset: the arrays have different lengths (first dimensions): {detail}")
        self._len = next(iter(lengths.values()))
        # Native-order dtypes of the tensors; torch cannot take other byte orders.
        self._out_dtypes = {n: s[1].newbyteorder("=") for n, s in self._specs.items()}
        self._torch_dtypes = {n: _torch_dtype(s[1], self._paths[n]) for n, s in self._specs.items()}
        # Plain ndarray views of the np.memmap objects (they keep the maps alive): np.memmap's
        # __getitem__ and __array_finalize__ are Python code, a cost on every read.
        self._maps: tuple[np.ndarray, ...] | None = tuple(maps[n].view(np.ndarray) for n in self._names)

    # -- pickling: by path, the maps reopened lazily in the receiving process

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        maps = self._maps
        if maps is None:
            opened = []
            for n in self._names:
                m = _open_memmap(self._paths[n])
                if (m.shape, m.dtype) != self._specs[n]:
                    raise ValueError(
                        f"MemmapDataset: {self._paths[n]} now holds {m.shape} {m.dtype}, but held "
                        f"{self._specs[n][0]} {self._specs[n][1]} when the dataset was created"
                    )
                opened.append(m.view(np.ndarray))
            maps = self._maps = tuple(opened)
        return maps

    # -- introspection

    @property
    def names(self) -> tuple[str, ...]:
        """The arrays' names, in the order of each item's tensors."""
        return self._names

    @property
    def paths(self) -> dict[str, str]:
        """{name: absolute path of its .npy file}."""
        return dict(self._paths)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: full shape of the array}, first dimension = len(self)."""
        return {n: s[0] for n, s in self._specs.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """{name: torch dtype of its tensors}."""
        return dict(self._torch_dtypes)

    def array(self, name: str) -> np.ndarray:
        """The read-only numpy array of `name`, a view of its memory map (no data is read)."""
        if name not in self._paths:
            raise KeyError(f"MemmapDataset has no array {name!r} (names: {list(self._names)})")
        return self._arrays()[self._names.index(name)]

    def __repr__(self) -> str:
        arrays = ", ".join(f"{n}: {s[0]} {s[1]}" for n, s in self._specs.items())
        return f"MemmapDataset({self._len} samples; {arrays})"

    # -- reads

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> tuple[torch.Tensor, ...]:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"MemmapDataset indices must be integers, got {type(index).__name__} (use __getitems__ for a batch)"
            ) from None
        n = self._len
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"MemmapDataset index {index} out of range for {n} samples")
        out = []
        for name, m in zip(self._names, self._arrays()):
            # np.array copies the row out of the read-only map (a writable array, so
            # torch.from_numpy does not warn), in native byte order.
            out.append(torch.from_numpy(np.array(m[i], dtype=self._out_dtypes[name])))
        return tuple(out)

    def __getitems__(self, indices) -> MemmapBatch:
        """The samples at `indices` (a sequence of ints, as a DataLoader's batch sampler gives),
        read with one indexed read per array, as an already-collated :class:`MemmapBatch`."""
        idx = self._check_indices(indices)
        n = idx.size
        in_worker = get_worker_info() is not None
        # Plan the read once for all arrays: a contiguous run is a slice; otherwise read in
        # increasing file order, then put rows back in the requested order.
        run = order = sorted_idx = None
        if n and int(idx[-1]) - int(idx[0]) == n - 1 and (n == 1 or (idx[1:] - idx[:-1] == 1).all()):
            run = slice(int(idx[0]), int(idx[-1]) + 1)
        elif self.sort_reads and n > 1 and not (idx[1:] >= idx[:-1]).all():
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
        tensors = []
        for name, m in zip(self._names, self._arrays()):
            out = torch.empty((n, *m.shape[1:]), dtype=self._torch_dtypes[name])
            if in_worker:
                # As default_collate does in workers: the batch then reaches the main process
                # through shared memory without another copy.
                out.share_memory_()
            dst = out.numpy()
            if n == 0:
                pass
            elif run is not None:
                dst[...] = m[run]
            elif order is not None:
                dst[order] = m[sorted_idx]
            elif m.dtype == dst.dtype:
                # mode="clip" because the indices are checked: mode="raise" would buffer `out`.
                np.take(m, idx, axis=0, out=dst, mode="clip")
            else:
                dst[...] = m[idx]  # non-native byte order: the assignment swaps the bytes
            tensors.append(out)
        return MemmapBatch(tensors)

    def _check_indices(self, indices) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"MemmapDataset.__getitems__: indices must be 1-D, got shape {idx.shape}")
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"MemmapDataset.__getitems__: indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=True)
        n = self._len
        idx[idx < 0] += n
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"MemmapDataset.__getitems__: index {np.asarray(indices)[first]} (position {first}) "
                f"out of range for {n} samples"
            )
        return idx


# ---------------------------------------------------------------------------------------------
# Writing


def _numpy_dtype_of(x: Any) -> np.dtype:
    if isinstance(x, torch.Tensor):
        try:
            return torch.empty(0, dtype=x.dtype).numpy().dtype
        except TypeError:
            raise TypeError(
                f"tensors of dtype {x.dtype} cannot be stored in .npy files; convert them (e.g. bfloat16 to float32)"
            ) from None
    return x.dtype


def _remove_quietly(paths: Iterable[str]) -> None:
    for p in list(paths):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on this platform (e.g. Windows); the files themselves are synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ArrayFile:
    """One array being written: a temporary file with a header reserved for any length."""

    def __init__(self, root: str, name: str, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.name, self.dtype, self.row_shape = name, dtype, row_shape
        self.final = os.path.join(root, name + ".npy")
        self.rows = 0
        self.header_len = _reserved_header_len(dtype, row_shape)
        # Temporary name in the same directory (os.replace is atomic only within a filesystem);
        # "xb" (O_EXCL) so two writers never share it, with the usual umask permissions.
        self.tmp = os.path.join(root, f".{name}.npy.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.file = open(self.tmp, "xb")
        # Until close, the header says 0 rows: even the temporary file never claims data it
        # may not hold.
        self.file.write(_npy_header(dtype, (0, *row_shape), self.header_len))

    def finish(self) -> None:
        f = self.file
        f.flush()
        f.seek(0)
        f.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self.header_len))
        f.flush()
        os.fsync(f.fileno())
        f.close()


class MemmapWriter:
    """Writes a :class:`MemmapDataset` directory from batches, without knowing the length in
    advance and without holding more than one chunk of a batch in extra memory.

    Each array is written to a temporary file in `root` after a header reserved for any length;
    :meth:`close` rewrites the header with the final length, fsyncs, renames every file into
    place (``<name>.npy``, ``os.replace``: atomic) and writes ``meta.json`` last (also by
    temporary file and rename). A crash or an exception inside a ``with`` block leaves no
    ``.npy`` that looks complete, and ``meta.json`` exists only for a fully written dataset.

    Args:
        root: the dataset directory (created if needed).
        names: the arrays' names, in the order :meth:`append` takes them.
        dtypes: optional {name: dtype}; batches are cast to it (``same_kind`` casting, e.g.
            float64 -> float16, never float -> int). Default: the first batch's dtype.
        row_shapes: optional {name: shape of one sample}; needed only to write zero samples
            (then an array without a `dtypes` entry is float32). Default: the first batch's.
        overwrite: replace an existing dataset in `root` (FileExistsError otherwise).
        chunk_bytes: a batch is converted and written at most this many bytes at a time.

    Use as a context manager, or call :meth:`close` (or :meth:`abort`)::

        with MemmapWriter("data/train") as w:
            for features, labels in stream:
                w.append((features, labels))
    """

    def __init__(
        self,
        root: PathLike,
        names: Sequence[str] = DEFAULT_NAMES,
        *,
        dtypes: Mapping[str, Any] | None = None,
        row_shapes: Mapping[str, Sequence[int]] | None = None,
        overwrite: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        if isinstance(names, str):
            raise TypeError("MemmapWriter: names must be a sequence of str, got a str (write names=(name,))")
        self.names = tuple(_check_name(n, "MemmapWriter") for n in names)
        if not self.names:
            raise ValueError("MemmapWriter: names is empty")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"MemmapWriter: names has duplicates: {list(self.names)}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"MemmapWriter: chunk_bytes must be a positive int, got {chunk_bytes!r}")
        for arg, mapping in (("dtypes", dtypes), ("row_shapes", row_shapes)):
            unknown = set(mapping or ()) - set(self.names)
            if unknown:
                raise ValueError(
                    f"MemmapWriter: {arg} names unknown arrays {sorted(unknown)} (names: {list(self.names)})"
                )
        self.root = os.path.abspath(os.fspath(root))
        self._dtypes = {n: np.dtype(d) for n, d in (dtypes or {}).items()}
        for n, d in self._dtypes.items():
            _torch_dtype(d, f"MemmapWriter: dtypes[{n!r}]")
        self._row_shapes = {n: tuple(int(s) for s in shp) for n, shp in (row_shapes or {}).items()}
        self.chunk_bytes = chunk_bytes
        self.overwrite = overwrite
        os.makedirs(self.root, exist_ok=True)
        if not overwrite:
            existing = [
                p
                for p in [os.path.join(self.root, n + ".npy") for n in self.names]
                + [os.path.join(self.root, META_FILE)]
                if os.path.exists(p)
            ]
            if existing:
                raise FileExistsError(f"MemmapWriter: {existing[0]} exists; pass overwrite=True to replace the dataset")
        self._files: dict[str, _ArrayFile] = {}
        self._tmp_paths: list[str] = []  # what the finalizer removes if the writer is dropped unclosed
        self._finalizer = weakref.finalize(self, _remove_quietly, self._tmp_paths)
        self._batches = 0
        self._closed = False

    @property
    def rows(self) -> int:
        """Samples appended so far."""
        return next(iter(self._files.values())).rows if self._files else 0

    def _file(self, name: str, x: Any) -> _ArrayFile:
        f = self._files.get(name)
        if f is None:
            row_shape = tuple(int(s) for s in x.shape[1:])
            expected = self._row_shapes.get(name)
            if expected is not None and expected != row_shape:
                raise ValueError(
                    f"MemmapWriter: array {name!r}: samples of shape {row_shape}, but row_shapes[{name!r}] = {expected}"
                )
            dtype = self._dtypes.get(name, _numpy_dtype_of(x))
            _torch_dtype(dtype, f"MemmapWriter: array {name!r}")
            f = self._files[name] = _ArrayFile(self.root, name, dtype, row_shape)
            self._tmp_paths.append(f.tmp)
        return f

    def append(self, batch: Mapping[str, Any] | Sequence[Any] | np.ndarray | torch.Tensor) -> None:
        """Append one batch: a mapping {name: array}, a tuple/list of arrays in `names` order, or
        (for a single-array writer) an array. Arrays may be numpy arrays, tensors (any device;
        bfloat16 is refused, as .npy has no such type) or anything np.asarray accepts; all must
        have the same length, which may be 0."""
        if self._closed:
            raise RuntimeError("MemmapWriter: append() after close() or abort()")
        where = f"MemmapWriter.append (batch {self._batches})"
        if isinstance(batch, Mapping):
            if set(batch) != set(self.names):
                raise ValueError(f"{where}: batch has arrays {sorted(batch)}, expected {list(self.names)}")
            arrays = [batch[n] for n in self.names]
        elif isinstance(batch, (np.ndarray, torch.Tensor)):
            if len(self.names) != 1:
                raise TypeError(
                    f"{where}: got one array, expected a tuple or mapping of {len(self.names)} "
                    f"arrays {list(self.names)}"
                )
            arrays = [batch]
        elif isinstance(batch, (tuple, list)):
            arrays = list(batch)
            if len(arrays) != len(self.names):
                raise ValueError(f"{where}: got {len(arrays)} arrays, expected {len(self.names)} {list(self.names)}")
        else:
            raise TypeError(f"{where}: batch must be a mapping, tuple or list of arrays, got {type(batch).__name__}")
        arrays = [a if isinstance(a, (np.ndarray, torch.Tensor)) else np.asarray(a) for a in arrays]
        for n, a in zip(self.names, arrays):
            if a.ndim == 0:
                raise ValueError(f"{where}: array {n!r} is 0-d; a batch needs a first (sample) dimension")
            if a.dtype == object:
                raise ValueError(f"{where}: array {n!r} is an object array; store numeric arrays")
        lengths = {n: int(a.shape[0]) for n, a in zip(self.names, arrays)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{where}: arrays of different lengths {lengths}")
        # Check every array before writing any, so a rejected batch leaves the files consistent.
        files = []
        for n, a in zip(self.names, arrays):
            f = self._file(n, a)
            if tuple(a.shape[1:]) != f.row_shape:
                raise ValueError(
                    f"{where}: array {n!r} has samples of shape {tuple(a.shape[1:])}, expected {f.row_shape}"
                )
            src = _numpy_dtype_of(a)
            if not np.can_cast(src, f.dtype, casting="same_kind"):
                raise TypeError(
                    f"{where}: array {n!r} of dtype {src} cannot be stored as {f.dtype} (same_kind casting)"
                )
            files.append(f)
        try:
            for f, a in zip(files, arrays):
                self._write(f, a)
        except BaseException:
            # Some arrays may hold this batch and others not: the files can't be finished.
            self.abort()
            raise
        self._batches += 1

    def _write(self, f: _ArrayFile, a: np.ndarray | torch.Tensor) -> None:
        n = int(a.shape[0])
        row_bytes = max(1, math.prod(f.row_shape) * f.dtype.itemsize)
        step = max(1, self.chunk_bytes // row_bytes)
        for start in range(0, n, step):
            chunk = a[start : start + step]
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.detach().cpu().numpy()
            chunk = np.ascontiguousarray(chunk, dtype=f.dtype)
            f.file.write(memoryview(chunk).cast("B"))
        f.rows += n

    def close(self) -> str:
        """Finish the dataset: final headers, fsync, atomic renames, then ``meta.json``.
        Returns the dataset directory."""
        if self._closed:
            raise RuntimeError("MemmapWriter: close() after close() or abort()")
        for n in self.names:
            if n not in self._files:
                if n not in self._row_shapes:
                    self.abort()
                    raise ValueError(
                        f"MemmapWriter: no batch was appended, so the shape of array {n!r} is "
                        "unknown; pass row_shapes= (and dtypes=) to write an empty dataset"
                    )
                self._file(n, np.empty((0, *self._row_shapes[n]), dtype=self._dtypes.get(n, np.float32)))
        try:
            for f in self._files.values():
                f.finish()
            meta_path = os.path.join(self.root, META_FILE)
            # Remove an old meta.json first: while the arrays are being replaced one by one, the
            # directory must not claim to be a complete dataset.
            _remove_quietly([meta_path])
            for n in self.names:
                f = self._files[n]
                os.replace(f.tmp, f.final)
            meta = {
                "format": META_FORMAT,
                "version": META_VERSION,
                "length": self.rows,
                "arrays": [
                    {
                        "name": f.name,
                        "file": f.name + ".npy",
                        "dtype": np.lib.format.dtype_to_descr(f.dtype),
                        "shape": [f.rows, *f.row_shape],
                    }
                    for f in (self._files[n] for n in self.names)
                ],
            }
            tmp = os.path.join(self.root, f".{META_FILE}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            self._tmp_paths.append(tmp)
            with open(tmp, "x", encoding="utf-8") as mf:
                json.dump(meta, mf, indent=1)
                mf.write("\n")
                mf.flush()
                os.fsync(mf.fileno())
            os.replace(tmp, meta_path)
            _fsync_dir(self.root)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._finalizer.detach()
        return self.root

    def abort(self) -> None:
        """Stop writing and delete the temporary files; files already in place stay."""
        for f in self._files.values():
            if not f.file.closed:
                f.file.close()
        _remove_quietly(self._tmp_paths)
        self._closed = True
        self._finalizer.detach()

    def __enter__(self) -> MemmapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self._closed:
                self.abort()
        elif not self._closed:
            self.close()


def write_memmap_dataset(
    root: PathLike,
    features: Any,
    labels: Any = None,
    *,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MemmapDataset:
    """Write arrays (numpy arrays, tensors, or read-only memmaps of another dataset) as a
    :class:`MemmapDataset` directory: ``features.npy``, ``labels.npy`` (when given), one
    ``<name>.npy`` per `extra` entry, and ``meta.json``. Returns the opened dataset.
    """
    names = ["features"] + (["labels"] if labels is not None else []) + list(extra or {})
    arrays = [features] + ([labels] if labels is not None else []) + list((extra or {}).values())
    with MemmapWriter(root, names, overwrite=overwrite, chunk_bytes=chunk_bytes) as w:
        w.append(arrays)
    return MemmapDataset(root)


def write_memmap_batches(
    root: PathLike,
    batches: Iterable[Any],
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    dtypes: Mapping[str, Any] | None = None,
    row_shapes: Mapping[str, Sequence[int]] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MemmapDataset:
    """Write a stream of batches (each as :meth:`MemmapWriter.append` takes: a tuple/list of
    arrays in `names` order -- e.g. the ``[features, labels]`` a DataLoader yields -- or a
    mapping) as a :class:`MemmapDataset` directory; the total length need not be known and may
    exceed memory. Returns the opened dataset."""
    with MemmapWriter(
        root, names, dtypes=dtypes, row_shapes=row_shapes, overwrite=overwrite, chunk_bytes=chunk_bytes
    ) as w:
        for batch in batches:
            w.append(batch)
    return MemmapDataset(root)
