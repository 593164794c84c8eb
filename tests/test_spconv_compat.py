"""Tests of the narrow workarounds for spconv's CPU-wheel defects (adapters/spconv_compat.py)."""

from __future__ import annotations

import pytest
import torch
from spconv.pytorch.hash import HashTable

import adapters  # noqa: F401  (applies patch_spconv_cpu_stream)
import spconv.pytorch as spconv
from adapters import hash_insert, hash_query, patch_spconv_cpu_scatter_add, patch_spconv_cpu_stream
from adapters.spconv_compat import new_hash_table, query_cpu, query_cpu_async
from spconv.pytorch.cppcore import torch_tensor_to_tv

CPU_ONLY = not torch.cuda.is_available()


@pytest.fixture
def two_threads():
    """Run with 2 intra-op (OpenMP) threads, as CI does, so that thread races can show."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _random_keys(n, high, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(high, generator=gen)[:n].to(torch.int64)
    values = torch.randint(-(2**40), 2**40, (n,), generator=gen)
    return keys, values, gen


# --- defect 1: HashTable.insert/query raise after doing their work on CPU tables ---------------
def test_raw_cpu_hashtable_still_raises_no_cuda():
    """The workaround is needed while spconv's raw CPU calls raise; if this fails, revisit it."""
    table = HashTable(torch.device("cpu"), torch.int64, torch.int64)
    keys = torch.tensor([3, 5, 7])
    try:
        table.insert(keys, torch.tensor([30, 50, 70]))
    except RuntimeError as err:
        assert "spconv not compiled with cuda" in str(err)
    else:
        pytest.fail("spconv's CPU HashTable.insert no longer raises: the hash_insert workaround may be unnecessary")
    assert table._table.size_cpu() == 3  # ... but it did insert
    try:
        table.query(keys)
    except RuntimeError as err:
        assert "spconv not compiled with cuda" in str(err)
    else:
        pytest.fail("spconv's CPU HashTable.query no longer raises: the hash_query workaround may be unnecessary")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wrapped_insert_and_query_match_dict(seed):
    keys, values, gen = _random_keys(5000, 10**6, seed)
    table = new_hash_table("cpu", keys.numel())
    hash_insert(table, keys[:3000], values[:3000])
    hash_insert(table, keys[3000:], values[3000:])  # a second insert into the same table
    reference = dict(zip(keys.tolist(), values.tolist()))
    queries = torch.cat([keys, torch.randint(0, 2 * 10**6, (5000,), generator=gen), torch.tensor([-1, 2**62])])
    got, found = hash_query(table, queries)
    assert got.dtype == torch.int64 and found.dtype == torch.bool
    expected_found = [q in reference for q in queries.tolist()]
    assert found.tolist() == expected_found
    assert got[found].tolist() == [reference[q] for q, f in zip(queries.tolist(), expected_found) if f]
    assert sum(expected_found) >= 5000  # the misses are real misses, the hits all found


def test_wrapped_calls_on_empty_inputs():
    table = new_hash_table("cpu", 0)
    hash_insert(table, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    values, found = hash_query(table, torch.empty(0, dtype=torch.int64))
    assert values.shape == (0,) and found.shape == (0,)
    values, found = hash_query(table, torch.tensor([1, 2]))
    assert found.tolist() == [False, False]


class _FakeCppTable:
    """Stands in for the C++ table: delegates, except for the behaviour under test."""

    def __init__(self, real, insert_error=None, query_error=None, insert_does_work=True, query_does_work=True):
        self.real = real
        self.insert_error, self.query_error = insert_error, query_error
        self.insert_does_work, self.query_does_work = insert_does_work, query_does_work

    def size_cpu(self):
        return self.real.size_cpu()

    def insert(self, *args, **kwargs):
        if self.insert_does_work:
            try:
                self.real.insert(*args, **kwargs)
            except RuntimeError:
                pass
        if self.insert_error:
            raise RuntimeError(self.insert_error)

    def query(self, *args, **kwargs):
        if self.query_does_work:
            try:
                self.real.query(*args, **kwargs)
            except RuntimeError:
                pass
        if self.query_error:
            raise RuntimeError(self.query_error)


def test_other_runtime_errors_are_not_swallowed():
    table = new_hash_table("cpu", 4)
    table._table = _FakeCppTable(table._table, insert_error="device-side assert triggered")
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20]))
    table = new_hash_table("cpu", 4)
    hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20]))
    table._table = _FakeCppTable(table._table, query_error="out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        hash_query(table, torch.tensor([1, 3]))


def test_swallowed_error_without_the_work_is_detected():
    """The no-cuda message alone is not trusted: the work must be verifiably done."""
    msg = "HashTable_insert.cc(91)\nspconv not compiled with cuda, don't support cuda"
    table = new_hash_table("cpu", 4)
    table._table = _FakeCppTable(table._table, insert_error=msg, insert_does_work=False)
    with pytest.raises(RuntimeError, match=r"HashTable.insert did not insert: size 0 -> 0 after inserting 2 keys"):
        hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20]))
    table = new_hash_table("cpu", 4)
    hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20]))
    table._table = _FakeCppTable(table._table, query_error=msg, query_does_work=False)
    with pytest.raises(RuntimeError, match="HashTable.query did not write every result"):
        hash_query(table, torch.tensor([1, 3]))
    # with the work done, the same message is swallowed
    table = new_hash_table("cpu", 4)
    table._table = _FakeCppTable(table._table, insert_error=msg, query_error=msg)
    hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20]))
    values, found = hash_query(table, torch.tensor([1, 3, 2]))
    assert found.tolist() == [True, False, True] and values[found].tolist() == [10, 20]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (spconv CUDA HashTable)")
def test_cuda_table_matches_dict():
    keys, values, gen = _random_keys(5000, 10**6, 5)
    table = new_hash_table("cuda", keys.numel())
    hash_insert(table, keys.cuda(), values.cuda())
    queries = torch.cat([keys, torch.randint(0, 2 * 10**6, (5000,), generator=gen)])
    got, found = hash_query(table, queries.cuda())
    reference = dict(zip(keys.tolist(), values.tolist()))
    expected_found = [q in reference for q in queries.tolist()]
    assert found.cpu().tolist() == expected_found
    assert got[found].cpu().tolist() == [reference[q] for q, f in zip(queries.tolist(), expected_found) if f]


# --- defect 2: sparse-conv backward asks for a CUDA stream on a CPU-only torch ----------------
@pytest.mark.skipif(not CPU_ONLY, reason="the defect only exists with a CPU-only torch")
def test_stream_patch_installed_and_still_needed():
    with pytest.raises((RuntimeError, AssertionError), match="not compiled with CUDA"):
        torch.cuda.current_stream()  # what spconv's get_current_stream calls
    assert patch_spconv_cpu_stream() is True
    import spconv.pytorch.ops as ops

    assert getattr(ops.get_current_stream, "_sparse_msda_patch", False)
    assert ops.get_current_stream() == 0


# --- defect 3: data race in spconv's CPU scatter-add ---------------------------------------------
def _scatter_case(seed, n_rows=20_000, channels=32, dtype=torch.float32, n=None):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, n_rows, (1,), generator=gen)) if n is None else n
    inds = torch.randperm(n_rows, generator=gen)[:n].to(torch.int32)
    out = torch.randn(n_rows, channels, generator=gen).to(dtype)
    buffer = torch.randn(n_rows, channels, generator=gen).to(dtype)  # only the first n rows are used
    expected = out.index_add(0, inds.long(), buffer[:n])
    return out, buffer, inds, expected


def test_raw_scatter_add_cpu_race_still_present(two_threads):
    """Documents why the patch exists; skipped (not failed) where the race does not show."""
    raw = ops_module().SpconvOps._base
    base, buffer, inds, expected = _scatter_case(0, dtype=torch.float64, n=15_000)
    wrong = 0
    for _ in range(150):  # the race is intermittent: same inputs, repeated until it shows
        out = base.clone()
        raw.scatter_add_cpu(torch_tensor_to_tv(out), torch_tensor_to_tv(buffer), torch_tensor_to_tv(inds))
        wrong += not torch.equal(out, expected)
        if wrong:
            break
    if wrong == 0:
        pytest.skip("spconv's raw scatter_add_cpu gave 150 correct results with 2 threads: race not reproduced here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_patched_scatter_add_cpu_is_exact(two_threads, dtype):
    assert patch_spconv_cpu_scatter_add() is True
    ops = ops_module()
    assert getattr(ops.SpconvOps, "_sparse_msda_patch", False)
    for seed in range(20):
        out, buffer, inds, expected = _scatter_case(seed, n_rows=5000, channels=16, dtype=dtype)
        ops.SpconvOps.scatter_add_cpu(torch_tensor_to_tv(out), torch_tensor_to_tv(buffer), torch_tensor_to_tv(inds))
        assert torch.equal(out, expected)
    # everything else is still spconv's
    assert ops.SpconvOps.gather_cpu is ops.SpconvOps._base.gather_cpu


def ops_module():
    import spconv.pytorch.ops as ops

    return ops


def _random_sparse_input(shape, batch_size, n, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    volume = batch_size * shape[0] * shape[1] * shape[2]
    flat = torch.randperm(volume, generator=gen)[:n]
    coords = []
    for size in reversed([batch_size, *shape]):
        coords.append(flat % size)
        flat = flat // size
    idx = torch.stack(coords[::-1], 1)
    feats = torch.randn(n, channels, dtype=torch.float64, generator=gen)
    return idx, feats


@pytest.mark.parametrize(
    "make_conv",
    [
        pytest.param(lambda: spconv.SubMConv3d(8, 32, 3, padding=1, bias=True), id="SubMConv3d"),
        pytest.param(lambda: spconv.SparseConv3d(8, 32, 3, stride=2, padding=1, bias=True), id="SparseConv3d-s2"),
        pytest.param(lambda: spconv.SparseConv3d(8, 32, (3, 3, 3), stride=2, padding=(0, 1, 1), bias=False), id="SparseConv3d-s2-p011"),
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_sparse_conv_backward_on_cpu_matches_dense_conv3d(make_conv, seed, two_threads):
    """Forward and backward of spconv's CPU convs (fixes 2 and 3) against torch's dense conv3d."""
    torch.manual_seed(seed)
    shape, batch_size = [15, 16, 17], 2
    idx, feats = _random_sparse_input(shape, batch_size, 4000, 8, seed=seed)
    conv = make_conv().double()
    feats = feats.requires_grad_(True)
    out = conv(spconv.SparseConvTensor(feats, idx.to(torch.int32), shape, batch_size))
    weight_out = torch.randn(out.features.shape, dtype=torch.float64)
    (out.features * weight_out).sum().backward()  # dies without the stream patch on CPU-only torch

    # dense reference: zero-filled input, torch conv3d, read at spconv's output sites
    dense_feats = feats.detach().clone().requires_grad_(True)
    weight = conv.weight.detach().clone().requires_grad_(True)  # [out, kz, ky, kx, in]
    bias = conv.bias.detach().clone().requires_grad_(True) if conv.bias is not None else None
    b, z, y, x = idx.T
    dense = torch.zeros(batch_size, *shape, feats.shape[1], dtype=torch.float64).index_put((b, z, y, x), dense_feats)
    dense_out = torch.nn.functional.conv3d(
        dense.permute(0, 4, 1, 2, 3), weight.permute(0, 4, 1, 2, 3), bias, stride=conv.stride, padding=conv.padding
    ).permute(0, 2, 3, 4, 1)
    o = out.indices.long()
    ref = dense_out[o[:, 0], o[:, 1], o[:, 2], o[:, 3]]
    torch.testing.assert_close(out.features.detach(), ref.detach(), rtol=0, atol=1e-12)
    (ref * weight_out).sum().backward()
    assert feats.grad is not None and conv.weight.grad is not None
    torch.testing.assert_close(feats.grad, dense_feats.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=0, atol=1e-12)
    if bias is not None:
        torch.testing.assert_close(conv.bias.grad, bias.grad, rtol=0, atol=1e-12)
    # every output site of spconv is a site the dense conv can reach (non-trivial comparison)
    assert out.features.shape[0] > 0 and float(feats.grad.abs().sum()) > 0


# --- adapters.patch_spconv() and python -m adapters.check_spconv (issue 15) ---------------------
def test_patch_spconv_is_idempotent_and_reversible_for_the_check():
    import spconv.pytorch.ops as ops

    from adapters import patch_spconv, spconv_unpatched

    first = patch_spconv()
    proxy, stream = ops.SpconvOps, ops.get_current_stream
    assert patch_spconv() == first == {"cpu_stream": CPU_ONLY, "cpu_scatter_add": True}
    assert ops.SpconvOps is proxy and ops.get_current_stream is stream  # a second call wraps nothing twice
    assert not isinstance(proxy._base, type(proxy))
    with spconv_unpatched():
        assert ops.SpconvOps is proxy._base
        assert not getattr(ops.get_current_stream, "_sparse_msda_patch", False)
    assert ops.SpconvOps is proxy and ops.get_current_stream is stream


def test_check_spconv_verdicts():
    from adapters.check_spconv import CheckResult, verdict

    def result(patched, threads, errors, backward=0.0, exc=None):
        return CheckResult(patched, threads, list(errors), None if exc else backward, exc)

    fine = [result(True, 1, [0.0]), result(True, 2, [0.0, 1e-15])]
    racy = [result(False, 1, [0.0]), result(False, 2, [0.0, 0.3])]
    text = verdict(racy, fine)
    assert "NEEDS adapters.patch_spconv(): results are wrong with 2 threads" in text and "backward fails" not in text
    assert text.endswith("With the patch every result matches the dense reference.")
    no_stream = [result(False, 1, [0.0], exc="AssertionError: Torch not compiled with CUDA enabled"), result(False, 2, [0.0])]
    assert "backward fails" in verdict(no_stream, fine)
    healthy = [result(False, 1, [0.0]), result(False, 2, [0.0])]
    assert verdict(healthy, fine).startswith("verdict: no defect reproduced")
    assert "STILL DIFFER" in verdict(healthy, [result(True, 1, [0.0]), result(True, 2, [0.1])])
    assert racy[1].describe() == "unpatched spconv, 2 threads: forward WRONG in 1/2 runs (max |error| 0.3); backward ok"


def test_check_spconv_command():
    """The command runs spconv's own and the patched CPU convolutions against dense conv3d."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "adapters.check_spconv", "--repeats", "2", "--voxels", "4000"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "patched   spconv, 1 thread: forward ok in 2/2 runs; backward ok" in lines
    assert "patched   spconv, 2 threads: forward ok in 2/2 runs; backward ok" in lines
    assert any(l.startswith("unpatched spconv, 2 threads: forward ") for l in lines)
    assert lines[-1].startswith("verdict: ") and lines[-1].endswith("With the patch every result matches the dense reference.")
    if CPU_ONLY:  # spconv 2.3's backward asks for a CUDA stream on a CPU-only torch: deterministic
        assert "unpatched spconv, 1 thread: forward ok in 2/2 runs; backward FAILS" in proc.stdout
        assert "NEEDS adapters.patch_spconv()" in lines[-1]
    assert "[Exception|" not in proc.stdout  # spconv's debug dump is silenced


def test_cpu_query_runs_off_the_calling_thread():
    """spconv's CPU query (an OpenMP loop in spconv's own libgomp) runs on the adapters' worker
    thread, never on the caller's (there it slowed torch's later parallel ops several times), and
    its answer and errors come back to the caller."""
    import threading

    table = new_hash_table("cpu", 4, value_dtype=torch.int32)
    hash_insert(table, torch.tensor([1, 2]), torch.tensor([10, 20], dtype=torch.int32))
    seen = []

    class _Recording(_FakeCppTable):
        def query(self, *args, **kwargs):
            seen.append(threading.get_ident())
            return super().query(*args, **kwargs)

    table._table = _Recording(table._table)
    values, found = hash_query(table, torch.tensor([1, 3, 2]))
    assert found.tolist() == [True, False, True] and values[found].tolist() == [10, 20]
    assert seen and threading.get_ident() not in seen
    table._table = _Recording(table._table.real, query_error="out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        hash_query(table, torch.tensor([1, 3]))


def test_bad_value_dtype_and_values_buffer_are_named_errors():
    """``new_hash_table(value_dtype=)`` takes int64 or int32 only, and ``query_cpu`` a contiguous
    ``[n]`` values buffer of the table's value dtype: anything else is a ValueError naming it."""
    with pytest.raises(ValueError, match="value_dtype must be torch.int64 or torch.int32"):
        new_hash_table("cpu", 4, value_dtype=torch.float32)
    table = new_hash_table("cpu", 4, value_dtype=torch.int32)
    keys = torch.arange(4, dtype=torch.int64)
    hash_insert(table, keys, torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be a contiguous \[4\] torch.int32 tensor.*values.dtype=torch.int64"):
        query_cpu(table, keys, torch.empty(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"values must be a contiguous \[4\] torch.int32 tensor.*values.shape=\(3,\)"):
        query_cpu(table, keys, torch.empty(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be a contiguous \[4\]"):
        query_cpu(table, keys, torch.empty(8, dtype=torch.int32)[::2])
    values = torch.full((4,), -7, dtype=torch.int32)
    empty = query_cpu(table, keys, values)
    assert values.tolist() == [0, 1, 2, 3] and empty.tolist() == [0, 0, 0, 0]
    # the asynchronous form: the buffer is checked before the query starts, wait() gives the flags
    with pytest.raises(ValueError, match=r"values must be a contiguous \[4\] torch.int32 tensor.*values.dtype=torch.int64"):
        query_cpu_async(table, keys, torch.empty(4, dtype=torch.int64))
    values = torch.full((6,), -7, dtype=torch.int32)
    wait = query_cpu_async(table, torch.tensor([3, 9, 0, 2, -1, 1]), values)
    assert wait().tolist() == [0, 1, 0, 0, 1, 0] and values.tolist() == [3, -7, 0, 2, -7, 1]
    assert query_cpu_async(table, keys[:0], values[:0])().numel() == 0
