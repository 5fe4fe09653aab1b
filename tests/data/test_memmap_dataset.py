"""MemmapDataset, MemmapBatch / memmap_collate, MemmapWriter and the write_* helpers
(batchops.data.memmap): round trips, batched reads, streams, validation, pickling, DataLoader
workers. No compiled kernels are needed."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from batchops.data.memmap import (
    MemmapBatch,
    MemmapDataset,
    MemmapWriter,
    memmap_collate,
    write_memmap_batches,
    write_memmap_dataset,
)

from tests.helpers import ROOT


def _features(n, row_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random((n, *row_shape)) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), (n, *row_shape), endpoint=True).astype(dtype)
    return rng.standard_normal((n, *row_shape)).astype(dtype)


def _assert_item(item, arrays, i):
    assert isinstance(item, tuple) and len(item) == len(arrays)
    for t, a in zip(item, arrays):
        assert isinstance(t, torch.Tensor)
        np.testing.assert_array_equal(t.numpy(), a[i])
        assert t.shape == a[i].shape


def _no_temp_files(root):
    return [f for f in os.listdir(root) if f.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint8", "int32", "bool"])
@pytest.mark.parametrize("row_shape", [(5,), (3, 4), ()])
def test_round_trip(tmp_path, dtype, row_shape):
    x = _features(37, row_shape, dtype)
    y = np.arange(37, dtype=np.int64) * 3 - 50
    ds = write_memmap_dataset(tmp_path, x, y)
    assert len(ds) == 37 and ds.names == ("features", "labels")
    assert ds.shapes == {"features": (37, *row_shape), "labels": (37,)}
    assert ds.dtypes == {"features": torch.from_numpy(x).dtype, "labels": torch.int64}
    for i in (0, 1, 17, 36, -1, -37):
        _assert_item(ds[i], (x, y), i)
    # The files are plain .npy files, readable without batchops, with aligned headers.
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), y)
    with open(tmp_path / "features.npy", "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)
        assert f.tell() % 64 == 0  # the data offset, aligned as numpy aligns it
    assert not ds.array("features").flags.writeable
    np.testing.assert_array_equal(ds.array("labels"), y)
    # A fresh dataset over the directory finds the arrays through meta.json.
    np.testing.assert_array_equal(MemmapDataset(tmp_path)[5][0].numpy(), x[5])


def test_items_are_writable_copies(tmp_path):
    x = _features(10, (4,), "float32")
    ds = write_memmap_dataset(tmp_path, x, np.arange(10))
    f, label = ds[2]
    f += 1  # a view of the read-only map would raise (or warn at from_numpy)
    np.testing.assert_array_equal(ds[2][0].numpy(), x[2])
    assert label.dim() == 0 and label.item() == 2


@pytest.mark.parametrize("sort_reads", [True, False])
def test_getitems_equals_per_item(tmp_path, sort_reads):
    x = _features(200, (3, 2), "float16")
    y = np.arange(200, dtype=np.int64)
    w = _features(200, (), "float64", seed=1)
    write_memmap_dataset(tmp_path, x, y, extra={"weights": w})
    ds = MemmapDataset(tmp_path, sort_reads=sort_reads)
    assert ds.names == ("features", "labels", "weights")
    rng = np.random.default_rng(0)
    index_lists = [
        [7],
        list(range(10, 74)),  # a contiguous run: one slice read
        sorted(rng.choice(200, 50, replace=False).tolist()),  # sorted with gaps
        rng.permutation(200)[:64].tolist(),  # random order
        [5, 5, 3, 5, 199, 0],  # duplicates
        [-1, -200, 3],  # negative indices
        np.array([9, 1, 4]),
        torch.tensor([9, 1, 4]),
    ]
    for indices in index_lists:
        batch = ds.__getitems__(indices)
        assert isinstance(batch, MemmapBatch) and len(batch) == len(indices)
        for pos, i in enumerate(list(indices)):
            expected = ds[int(i)]
            for got, exp in zip(batch[pos], expected):
                torch.testing.assert_close(got, exp, rtol=0, atol=0)
        collated = default_collate(batch)
        assert isinstance(collated, list) and len(collated) == 3
        stacked = default_collate([ds[int(i)] for i in indices])  # the per-item path
        for a, b in zip(collated, stacked):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_getitems_bad_indices(tmp_path):
    ds = write_memmap_dataset(tmp_path, _features(10, (2,), "float32"), np.arange(10))
    with pytest.raises(IndexError, match="10"):
        ds.__getitems__([1, 10])
    with pytest.raises(IndexError):
        ds.__getitems__([-11])
    with pytest.raises(TypeError, match="integers"):
        ds.__getitems__([0.5, 1.0])
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(TypeError):
        ds[1.5]
    assert len(ds.__getitems__([])) == 0


def test_memmap_batch_sequence_protocol(tmp_path):
    x = _features(20, (3,), "float32")
    ds = write_memmap_dataset(tmp_path, x, np.arange(20))
    batch = ds.__getitems__([4, 2, 9])
    samples = list(batch)
    assert len(samples) == 3 and all(isinstance(s, tuple) and len(s) == 2 for s in samples)
    np.testing.assert_array_equal(samples[1][0].numpy(), x[2])
    assert [int(s[1]) for s in batch[1:]] == [2, 9]
    assert int(batch[-1][1]) == 9
    with pytest.raises(IndexError):
        batch[3]
    # memmap_collate: no copy for a MemmapBatch, default_collate for anything else.
    f, y = memmap_collate(batch)
    assert f.data_ptr() == batch.tensors[0].data_ptr()
    # default_collate takes the same no-copy path (the sample type is registered with it).
    assert default_collate(batch)[0].data_ptr() == batch.tensors[0].data_ptr()
    f2, y2 = memmap_collate([ds[4], ds[2], ds[9]])
    torch.testing.assert_close(f, f2)
    # Samples of several batches regrouped into a plain list still collate (the slow way).
    other = ds.__getitems__([0, 1])
    f3, y3 = default_collate(list(batch) + list(other))
    assert y3.tolist() == [4, 2, 9, 0, 1]
    np.testing.assert_array_equal(f3.numpy(), x[[4, 2, 9, 0, 1]])
    # A MemmapBatch pickles (a DataLoader with an identity collate_fn sends it from workers).
    again = pickle.loads(pickle.dumps(batch))
    torch.testing.assert_close(again.tensors[0], batch.tensors[0])


def test_source_forms_and_names(tmp_path):
    x, y = _features(12, (2,), "float32"), np.arange(12)
    np.save(tmp_path / "features.npy", x)
    np.save(tmp_path / "labels.npy", y)
    np.save(tmp_path / "other.npy", y * 2)
    ds = MemmapDataset(tmp_path)  # no meta.json: features + labels
    assert ds.names == ("features", "labels")
    _assert_item(ds[3], (x, y), 3)
    ds = MemmapDataset(tmp_path, names=("other", "features"))
    _assert_item(ds[3], (y * 2, x), 3)
    ds = MemmapDataset({"a": tmp_path / "other.npy", "b": str(tmp_path / "labels.npy")})
    assert ds.names == ("a", "b")
    ds = MemmapDataset([tmp_path / "labels.npy"])
    assert ds.names == ("labels",) and int(ds[4][0]) == 4
    assert ds.paths == {"labels": str(tmp_path / "labels.npy")}
    with pytest.raises(ValueError, match="no array named"):
        MemmapDataset({"a": tmp_path / "other.npy"}, names=("b",))
    with pytest.raises(NotADirectoryError):
        MemmapDataset(tmp_path / "labels.npy")
    with pytest.raises(TypeError):
        MemmapDataset(tmp_path, names="features")


def test_big_endian_file(tmp_path):
    x = _features(8, (3,), ">f4")
    np.save(tmp_path / "features.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(8, dtype=">i8"))
    ds = MemmapDataset(tmp_path)
    assert ds.dtypes == {"features": torch.float32, "labels": torch.int64}
    np.testing.assert_array_equal(ds[2][0].numpy(), x[2])
    f, y = default_collate(ds.__getitems__([5, 1, 2]))
    np.testing.assert_array_equal(f.numpy(), x[[5, 1, 2]])
    f, y = default_collate(ds.__getitems__([1, 2, 3]))
    np.testing.assert_array_equal(f.numpy(), x[1:4])
    assert y.tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Writing streams


def test_stream_of_batches_larger_than_chunk(tmp_path):
    rng = np.random.default_rng(3)
    sizes = [7, 50, 0, 33, 1, 64]
    xs = [_features(n, (4, 3), "float32", seed=k) for k, n in enumerate(sizes)]
    ys = [rng.integers(0, 10, n) for n in sizes]

    def stream():  # a generator: the writer never knows the total length
        for x, y in zip(xs, ys):
            yield (x, torch.from_numpy(y))  # arrays and tensors mixed

    # chunk_bytes=100 < one batch (and < one row of 48 bytes x 3): many chunks per batch.
    ds = write_memmap_batches(tmp_path, stream(), chunk_bytes=100)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(ds) == sum(sizes) == 155
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), y)
    f, lab = default_collate(ds.__getitems__(list(range(len(ds)))))
    np.testing.assert_array_equal(f.numpy(), x)
    assert _no_temp_files(tmp_path)


def test_writer_from_dataloader_batches_and_casts(tmp_path):
    src = torch.arange(300, dtype=torch.float64).reshape(100, 3)
    labels = torch.arange(100)
    loader = DataLoader(torch.utils.data.TensorDataset(src, labels), batch_size=32)
    ds = write_memmap_batches(tmp_path, loader, dtypes={"features": np.float16}, chunk_bytes=64)
    assert ds.dtypes == {"features": torch.float16, "labels": torch.int64}
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), src.numpy().astype(np.float16))


def test_writer_mapping_batches_and_empty(tmp_path):
    with MemmapWriter(tmp_path / "a", ("x", "y")) as w:
        w.append({"x": np.ones((3, 2), np.float32), "y": np.zeros(3, np.int32)})
        w.append({"y": np.zeros(2, np.int32), "x": np.ones((2, 2), np.float32)})
        assert w.rows == 5
    ds = MemmapDataset(tmp_path / "a")
    assert ds.names == ("x", "y") and len(ds) == 5
    # Zero samples: needs the row shapes (and dtypes) up front.
    write_memmap_batches(
        tmp_path / "b", [], names=("x", "y"), row_shapes={"x": (2,), "y": ()}, dtypes={"x": np.float32, "y": np.int64}
    )
    ds = MemmapDataset(tmp_path / "b")
    assert len(ds) == 0 and ds.shapes == {"x": (0, 2), "y": (0,)}
    with pytest.raises(ValueError, match="row_shapes"):
        write_memmap_batches(tmp_path / "c", [], names=("x",))
    assert _no_temp_files(tmp_path / "c")


def test_writer_rejects_bad_batches(tmp_path):
    w = MemmapWriter(tmp_path, ("features", "labels"))
    w.append((np.zeros((4, 3), np.float32), np.arange(4)))
    with pytest.raises(ValueError, match="different lengths"):
        w.append((np.zeros((4, 3), np.float32), np.arange(5)))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        w.append((np.zeros((4, 2), np.float32), np.arange(4)))
    with pytest.raises(TypeError, match="same_kind"):
        w.append((np.zeros((4, 3), np.float32), np.zeros(4, np.float64)))  # float labels into int64
    with pytest.raises(ValueError, match="expected 2"):
        w.append((np.zeros((4, 3), np.float32),))
    with pytest.raises(ValueError, match="object"):
        w.append((np.zeros((4, 3), np.float32), np.array([1, "a", None, 2], dtype=object)))
    with pytest.raises(TypeError, match="bfloat16"):
        w.append((torch.zeros(4, 3, dtype=torch.bfloat16), np.arange(4)))
    # Rejected batches wrote nothing: the dataset holds the first batch only.
    w.close()
    assert len(MemmapDataset(tmp_path)) == 4
    with pytest.raises(RuntimeError):
        w.append((np.zeros((4, 3), np.float32), np.arange(4)))
    with pytest.raises(TypeError):
        MemmapWriter(tmp_path / "o", ("features",)).append(np.zeros(3, dtype="datetime64[s]"))


def test_writer_is_atomic(tmp_path):
    x = _features(20, (3,), "float32")
    write_memmap_dataset(tmp_path, x, np.arange(20))
    before = {f: (tmp_path / f).read_bytes() for f in ("features.npy", "labels.npy", "meta.json")}
    with pytest.raises(FileExistsError):
        MemmapWriter(tmp_path)
    # A failure in the middle of an overwrite leaves the old dataset and no temporary files.
    with pytest.raises(RuntimeError, match="boom"):
        with MemmapWriter(tmp_path, overwrite=True) as w:
            w.append((x * 2, np.arange(20)))
            raise RuntimeError("boom")
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert _no_temp_files(tmp_path)
    # While being written, the temporary file is a valid .npy that claims 0 rows.
    w = MemmapWriter(tmp_path / "new")
    w.append((x, np.arange(20)))
    (tmp,) = [f for f in os.listdir(tmp_path / "new") if f.startswith(".features")]
    w._files["features"].file.flush()
    assert np.load(tmp_path / "new" / tmp).shape == (0, 3)
    assert not (tmp_path / "new" / "features.npy").exists()
    w.abort()
    assert os.listdir(tmp_path / "new") == []
    # A writer dropped without close() removes its temporary files.
    w = MemmapWriter(tmp_path / "dropped")
    w.append((x, np.arange(20)))
    w._files["features"].file.close()
    w._files["labels"].file.close()
    del w
    gc.collect()
    assert os.listdir(tmp_path / "dropped") == []
    # overwrite=True replaces the dataset.
    ds = write_memmap_dataset(tmp_path, x[:5] * 2, np.arange(5), overwrite=True)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds[1][0].numpy(), x[1] * 2)


# ---------------------------------------------------------------------------------------------
# Bad files


def test_truncated_file(tmp_path):
    write_memmap_dataset(tmp_path, _features(100, (8,), "float32"), np.arange(100))
    path = tmp_path / "features.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match=r"features\.npy is truncated"):
        MemmapDataset(tmp_path)
    path.write_bytes(data[:5])  # not even a magic string
    with pytest.raises(ValueError, match=r"features\.npy is not a \.npy file"):
        MemmapDataset(tmp_path)


def test_not_npy_and_corrupt_header(tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(4))
    (tmp_path / "features.npy").write_bytes(b"just some text, no numpy here\n" * 4)
    with pytest.raises(ValueError, match=r"features\.npy is not a \.npy file"):
        MemmapDataset(tmp_path)
    (tmp_path / "features.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 3}    \n")
    with pytest.raises(ValueError, match=r"features\.npy: corrupt \.npy header"):
        MemmapDataset(tmp_path)
    np.savez(tmp_path / "z.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not a .npy file"):
        MemmapDataset([tmp_path / "z.npz"])


def test_object_and_unsupported_dtypes_refused(tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(3))
    np.save(tmp_path / "features.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"features\.npy: object arrays"):
        MemmapDataset(tmp_path)
    np.save(tmp_path / "features.npy", np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match=r"features\.npy: dtype <U1"):
        MemmapDataset(tmp_path)
    np.save(tmp_path / "features.npy", np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    with pytest.raises(TypeError, match="structured"):
        MemmapDataset(tmp_path)
    np.save(tmp_path / "features.npy", np.float32(1.0))
    with pytest.raises(ValueError, match="0-d"):
        MemmapDataset(tmp_path)


def test_mismatched_lengths_and_missing_files(tmp_path):
    np.save(tmp_path / "features.npy", np.zeros((10, 2), np.float32))
    np.save(tmp_path / "labels.npy", np.arange(9))
    with pytest.raises(ValueError, match=r"different lengths.*features.*10.*labels.*9"):
        MemmapDataset(tmp_path)
    os.remove(tmp_path / "labels.npy")
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        MemmapDataset(tmp_path)
    assert len(MemmapDataset(tmp_path, names=("features",))) == 10


def test_meta_mismatch(tmp_path):
    write_memmap_dataset(tmp_path, _features(10, (4,), "float32"), np.arange(10))
    np.save(tmp_path / "features.npy", np.zeros((10, 5), np.float32))  # replaced behind our back
    with pytest.raises(ValueError, match=r"meta\.json says \(10, 4\)"):
        MemmapDataset(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json: not a valid"):
        MemmapDataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Pickling and DataLoader


def test_pickle_reopens_by_path(tmp_path):
    x = _features(500, (64,), "float32")
    ds = write_memmap_dataset(tmp_path, x, np.arange(500))
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 < x.nbytes  # the paths, not the data
    again = pickle.loads(blob)
    assert again._maps is None  # opened on first use
    _assert_item(again[123], (x, np.arange(500)), 123)
    assert again._maps is not None
    # The files changed shape between pickling and reopening: refused on first use.
    blob = pickle.dumps(again)
    np.save(tmp_path / "labels.npy", np.arange(7))
    stale = pickle.loads(blob)
    with pytest.raises(ValueError, match=r"labels\.npy now holds \(7,\)"):
        stale[0]


class _PerItem(Dataset):
    """The usual per-item dataset over the same files (no __getitems__)."""

    def __init__(self, root):
        self.x = np.load(os.path.join(root, "features.npy"), mmap_mode="r")
        self.y = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.x[i])), torch.from_numpy(np.array(self.y[i]))


def _collect(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert len(ba) == len(bb)
        for ta, tb in zip(ba, bb):
            assert ta.dtype == tb.dtype
            torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_dataloader_default_collate_matches_per_item(tmp_path):
    x = _features(300, (6,), "float16")
    ds = write_memmap_dataset(tmp_path, x, np.arange(300) % 7)
    for shuffle in (False, True):
        kw = dict(batch_size=64, shuffle=shuffle)
        ours = _collect(DataLoader(ds, generator=torch.Generator().manual_seed(1), **kw))
        ref = _collect(DataLoader(_PerItem(tmp_path), generator=torch.Generator().manual_seed(1), **kw))
        _assert_same_batches(ours, ref)
        assert [len(b[0]) for b in ours] == [64, 64, 64, 64, 44]
    # Subset delegates to __getitems__; a custom collate_fn receives the MemmapBatch.
    sub = Subset(ds, [5, 9, 11])
    seen = []
    out = next(iter(DataLoader(sub, batch_size=3, collate_fn=lambda b: seen.append(type(b)) or memmap_collate(b))))
    assert seen == [MemmapBatch]
    np.testing.assert_array_equal(out[0].numpy(), x[[5, 9, 11]])
    # batch_size=None: per-item reads (default_convert turns the tuple into a list).
    item = next(iter(DataLoader(ds, batch_size=None)))
    _assert_item(tuple(item), (x, np.arange(300) % 7), 0)


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_dataloader_workers(tmp_path, context):
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"{context} is not available here")
    x = _features(200, (5,), "float32")
    ds = write_memmap_dataset(tmp_path, x, np.arange(200))
    kw = dict(batch_size=32, shuffle=True)
    ref = _collect(DataLoader(ds, generator=torch.Generator().manual_seed(2), **kw))
    got = _collect(
        DataLoader(ds, num_workers=2, multiprocessing_context=context, generator=torch.Generator().manual_seed(2), **kw)
    )
    _assert_same_batches(got, ref)
    assert torch.cat([b[1] for b in got]).sort().values.tolist() == list(range(200))


def test_imports_without_extension(tmp_path):
    code = (
        "import sys; sys.modules['batchops._C'] = None\n"
        "import numpy as np\n"
        "from batchops.data.memmap import write_memmap_dataset\n"
        f"ds = write_memmap_dataset({str(tmp_path)!r}, np.ones((4, 2), np.float32), np.arange(4))\n"
        "assert ds.__getitems__([3, 1]).tensors[1].tolist() == [3, 1]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
