"""Multi-level sparse neighborhood attention against an independent naive reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adapters import SparseCoordinateIndex, coo_stack_to_spconv
from sparse_msda import SparseNeighborhoodAttentionBlock, get_multilevel_neighborhoods
from sparse_msda.functional import neighborhood
from sparse_msda import tuning
from sparse_msda.backends.reference import NeighborhoodAttentionFunction
from sparse_msda.functional.neighborhood import (
    build_neighborhood_plan,
    window_offsets,
)
from tests.window_maps import make_map, random_queries

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------
# naive reference: python loop over queries, voxel-list scan, dense softmax, complex-number RoPE
# ------------------------------------------------------------------------------------------
def naive_block(block, query, positions, offsets, voxels, feats, shapes, background=None, query_levels=None, query_mask=None):
    E, H = block.embed_dim, block.n_heads
    d = E // H
    dim = len(shapes[0])
    L = len(shapes)
    shapes_t = torch.tensor(shapes, dtype=torch.float64)
    full = shapes_t[int(torch.argmax(shapes_t.prod(-1)))]
    freqs = block.rope.frequencies().detach().to(torch.float64)  # [H', d/2, D+1]
    Wq, Wkv, Wo = block.q_proj.weight, block.kv_proj.weight, block.out_proj.weight
    bq = block.q_proj.bias
    bkv = block.kv_proj.bias
    bo = block.out_proj.bias

    def lin(x, W, b):
        return x @ W.T + (b if b is not None else 0)

    def rot(x, u):  # x [H, d], u [D+1] -> rotated via complex multiplication
        theta = (freqs * u[None, None, :]).sum(-1).expand(H, d // 2)
        z = torch.complex(x[:, : d // 2].to(torch.float64), x[:, d // 2 :].to(torch.float64)) * torch.exp(1j * theta)
        return torch.cat([z.real, z.imag], -1).to(x.dtype)

    def norm(x):
        return torch.nn.functional.layer_norm(x, (E,), block.norm.weight, block.norm.bias, block.norm.eps)

    out = []
    for i in range(query.shape[0]):
        x = query[i]
        if query_mask is not None and bool(query_mask[i]):
            out.append(x)
            continue
        b = int(torch.searchsorted(offsets, torch.tensor(i), right=True)) - 1
        ql = int(query_levels[i]) if query_levels is not None else int(torch.argmax(shapes_t.prod(-1)))
        p = positions[i].to(torch.float64)
        h = norm(x) if block.norm_first else x
        # positions are full-scale (as sparse-transformer-layers); the query level enters RoPE only
        q = rot(lin(h, Wq, bq).view(H, d), torch.cat([p, torch.tensor([float(ql)])]))
        ks, vs = [], []
        for level in range(L):
            centre = torch.floor(p / full * shapes_t[level]).long()
            r = (block.neighborhood_sizes[level] - 1) // 2
            for off in itertools.product(range(-r, r + 1), repeat=dim):
                cell = tuple((centre + torch.tensor(off)).tolist())
                if any(c < 0 or c >= s for c, s in zip(cell, shapes[level])):
                    continue
                rows = [j for j, vox in enumerate(voxels) if vox == (b, level, cell)]  # linear scan
                if rows:
                    f = feats[rows[0]]
                elif background is not None:
                    f = background[b, level]
                else:
                    continue
                kv = lin(f, Wkv, bkv).view(2, H, d)
                u = torch.cat([(torch.tensor(cell, dtype=torch.float64) + 0.5) / shapes_t[level] * full, torch.tensor([float(level)])])
                ks.append(rot(kv[0], u))
                vs.append(kv[1])
        if ks:
            K, V = torch.stack(ks, 1), torch.stack(vs, 1)  # [H, n, d]
            a = torch.softmax((q[:, None, :] * K).sum(-1) / math.sqrt(d), dim=-1)  # [H, n]
            branch = lin((a[..., None] * V).sum(1).reshape(E), Wo, bo)
        else:
            branch = torch.zeros(E, dtype=x.dtype)
        y = x + branch
        out.append(y if block.norm_first else norm(y))
    return torch.stack(out)


def make_block(E, H, L, sizes, dim, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    block = SparseNeighborhoodAttentionBlock(E, H, n_levels=L, neighborhood_sizes=sizes, position_dim=dim, **kw).to(dtype)
    with torch.no_grad():  # non-trivial norm / bias so the reference checks them
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.2, 0.2)
        for lin in (block.q_proj, block.kv_proj, block.out_proj):
            if lin.bias is not None:
                lin.bias.uniform_(-0.2, 0.2)
    return block


# ------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------
CASES_2D = dict(shapes=[[12, 10], [6, 5], [3, 3]], sizes=[3, 5, 3])
CASES_3D = dict(shapes=[[6, 8, 8], [3, 4, 4]], sizes=[3, 3])


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("variant", ["prenorm", "postnorm_bias_levels"])
def test_parity_with_naive_reference(dim, background, variant, backend):
    case = CASES_2D if dim == 2 else CASES_3D
    shapes, sizes = case["shapes"], case["sizes"]
    L, E, H = len(shapes), 16, 2
    kw = dict(norm_first=variant == "prenorm", bias=variant != "prenorm")
    if variant != "prenorm":
        kw.update(rope_freq_group_pattern="axial" if dim == 3 else "spatial_level", rope_share_heads=True)
    block = make_block(E, H, L, sizes, dim, **kw)
    stacked, voxels, feats = make_map(shapes, 2, 0.3, E, seed=dim)
    pos, offsets = random_queries([7, 5], shapes[0], seed=3)
    query = torch.randn(pos.shape[0], E, dtype=torch.float64)
    bg = torch.randn(2, L, E, dtype=torch.float64) if background else None
    qlev = None
    if variant != "prenorm":  # queries of other levels (positions stay full-scale)
        qlev = torch.randint(0, L, (pos.shape[0],))
    out = block(query, pos, offsets, stacked, shapes, background_embedding=bg, query_level_indices=qlev)
    ref = naive_block(block, query, pos, offsets, voxels, feats, shapes, bg, qlev)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
def test_cuda_matches_naive_reference_and_cpu(dim, background):
    """The block on CUDA (plan built on the device) equals the naive reference, and its
    gradients (query, features, background, parameters) equal the CPU run's."""
    case = CASES_2D if dim == 2 else CASES_3D
    shapes, sizes = case["shapes"], case["sizes"]
    L, E, H = len(shapes), 16, 2
    block = make_block(E, H, L, sizes, dim)
    stacked, voxels, feats = make_map(shapes, 2, 0.3, E, seed=dim)
    pos, offsets = random_queries([7, 5], shapes[0], seed=3)
    query = torch.randn(pos.shape[0], E, dtype=torch.float64)
    bg = torch.randn(2, L, E, dtype=torch.float64) if background else None
    ref = naive_block(block, query, pos, offsets, voxels, feats, shapes, bg)
    runs = {}
    for dev in ("cpu", "cuda"):
        b = make_block(E, H, L, sizes, dim).to(dev)
        inputs = [query.to(dev).requires_grad_(True), stacked.to(dev).coalesce().requires_grad_(True)]
        if background:
            inputs.append(bg.to(dev).requires_grad_(True))
        out = b(inputs[0], pos.to(dev), offsets.to(dev), inputs[1], shapes, background_embedding=inputs[2] if background else None)
        out.square().sum().backward()
        grads = [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in inputs] + [p.grad for p in b.parameters()]
        runs[dev] = (out, grads)
    torch.testing.assert_close(runs["cuda"][0].cpu(), ref, rtol=1e-10, atol=1e-10)
    for g_cuda, g_cpu in zip(runs["cuda"][1], runs["cpu"][1]):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-9, atol=1e-10)


def _chunk_pairs(chunks, n_queries):
    """{(query, key)} voxel pairs, {(query, slot)} background slots and the queries of each chunk."""
    pairs, slots, queries = set(), set(), []
    for c in chunks:
        t, g, u = (~c.masked).nonzero().T.tolist()
        pairs |= set(zip(c.query[t, g].tolist(), c.key[t, u].tolist()))
        queries.append(c.query_rows.tolist())
        assert c.query_pos.tolist() == (c.query.view(-1) < n_queries).nonzero().squeeze(1).tolist()  # padding = n_queries
        assert c.query.view(-1)[c.query_pos].tolist() == c.query_rows.tolist()
        if c.bg_masked is not None:
            i, k = (~c.bg_masked[0]).nonzero().T.tolist()
            slots |= set(zip(c.query_rows[i].tolist(), k))
    return pairs, slots, queries


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [False, True])
def test_device_chunk_grouping_equals_greedy(dim, background, monkeypatch):
    """The CUDA packing (no Python loop over pieces) holds the same pairs and background slots as
    the CPU greedy packing, every query with keys in exactly one chunk, chunks within the size
    bound, and the PyTorch path gives the same output and gradients with either."""
    import dataclasses

    case = CASES_2D if dim == 2 else CASES_3D
    shapes, sizes = case["shapes"], case["sizes"]
    L, E, H = len(shapes), 16, 2
    block = make_block(E, H, L, sizes, dim)
    stacked, _, _ = make_map(shapes, 2, 0.3, E, seed=dim)
    pos, offsets = random_queries([40, 30], shapes[0], seed=4)
    plan = block.build_plan(pos, offsets, stacked, shapes, background=background)
    plan = dataclasses.replace(plan, chunk_size=300, _chunks=None, _counts=None)
    from sparse_msda.functional.neighborhood_plan import _pack_chunks

    greedy, counts_g = _pack_chunks(plan, "greedy")
    device, counts_d = _pack_chunks(plan, "device")
    assert len(device) > 3 and len(greedy) > 3  # the small chunk size forces several chunks
    assert torch.equal(counts_g[0], counts_d[0])
    assert (counts_g[1] is None) == (not background) and (not background or torch.equal(counts_g[1], counts_d[1]))
    pairs_g, slots_g, _ = _chunk_pairs(greedy, plan.n_queries)
    pairs_d, slots_d, queries_d = _chunk_pairs(device, plan.n_queries)
    assert pairs_g == pairs_d and slots_g == slots_d and len(pairs_d) == int(counts_d[0].sum())
    flat = [q for qs in queries_d for q in qs]
    has_keys = plan.has_keys()
    assert sorted(flat) == has_keys.nonzero().squeeze(1).tolist()  # each query with keys once
    for c in device:
        assert c.masked.numel() <= plan.chunk_size or c.masked.shape[0] == 1
        if background:
            assert len(set(plan.query_batch[c.query_rows].tolist())) == 1 and c.batch == int(plan.query_batch[c.query_rows[0]])
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "0")
    query = torch.randn(pos.shape[0], E, dtype=torch.float64)
    bg = torch.randn(2, L, E, dtype=torch.float64) if background else None
    results = []
    for chunks, counts in ((greedy, counts_g), (device, counts_d)):
        p = dataclasses.replace(plan, _chunks=chunks, _counts=counts)
        q = query.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        out = block(q, pos, offsets, stacked, shapes, background_embedding=bg, plan=p)
        out.square().sum().backward()
        results.append([out, q.grad, *(w.grad for w in block.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_spconv_levels_input_and_prebuilt_index_match_coo_stack(backend):
    shapes, sizes = CASES_2D["shapes"], CASES_2D["sizes"]
    block = make_block(16, 2, 3, sizes, 2)
    stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=5)
    pos, offsets = random_queries([6, 6], shapes[0], seed=6)
    query = torch.randn(12, 16, dtype=torch.float64)
    out_coo = block(query, pos, offsets, stacked, shapes)
    levels = coo_stack_to_spconv(stacked, shapes)
    out_sp = block(query, pos, offsets, levels, None)
    out_idx = block(query, pos, offsets, levels, None, coordinate_index=SparseCoordinateIndex.from_spconv(levels))
    torch.testing.assert_close(out_sp, out_coo)  # row order differs, result must not
    torch.testing.assert_close(out_idx, out_coo)


# ------------------------------------------------------------------------------------------
# custom backward
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("share_heads", [False, True])
@pytest.mark.parametrize("keep_weights", [False, True])
def test_gradcheck_function(background, share_heads, keep_weights, one_thread, monkeypatch):
    # the forward keeps the attention weights under a byte budget, else the backward recomputes them
    monkeypatch.setattr(tuning, "SAVED_PROBABILITIES_BYTES", 1 << 30 if keep_weights else 0)
    shapes, sizes = [[8, 8], [4, 4]], [3, 3]
    _, voxels, _ = make_map(shapes, 2, 0.3, 1, seed=11)
    idx = SparseCoordinateIndex(
        torch.tensor([v[0] for v in voxels]), torch.tensor([v[1] for v in voxels]),
        torch.tensor([v[2] for v in voxels]), shapes, 2,
    )
    pos, offsets = random_queries([4, 3], [8, 8], seed=12)
    batch = torch.repeat_interleave(torch.arange(2), offsets.diff())
    # small chunks and tiles (several of each per call), so the chunked recomputation and the
    # padding of tiles are exercised
    plan = build_neighborhood_plan(
        idx, batch, pos, torch.tensor([8.0, 8.0], dtype=torch.float64), sizes, background, chunk_size=12, tile_queries=2
    )
    assert plan.n_pairs > 0 and plan.pair_counts.max() > 2
    assert len(plan.chunks) >= 3 and plan.n_padded_pairs > plan.n_pairs
    H, d = 2, 4
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = rnd(7, H, d), rnd(plan.n_keys, H, d), rnd(plan.n_keys, H, d)
    bk = rnd(2, 2, H, d) if background else None
    bv = rnd(2, 2, H, d) if background else None
    fr = rnd(1 if share_heads else H, d // 2, 3) if background else None
    inputs = [t for t in (q, k, v, bk, bv, fr)]

    def fn(q, k, v, bk, bv, fr):
        return NeighborhoodAttentionFunction.apply(q, k, v, bk, bv, fr, plan, 0.7)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
def test_plan_tiles_hold_exactly_each_querys_window_voxels(dim):
    """The tiles' masks select, for every query, exactly the present voxels of its windows
    (brute force over get_multilevel_neighborhoods + lookup), and the background slots are
    exactly its absent in-bounds window cells; every query with a key sits in one tile."""
    shapes = [[24, 20], [12, 10], [6, 5]] if dim == 2 else [[8, 12, 10], [4, 6, 5]]
    sizes = [3, 5, 3] if dim == 2 else [3, 3]
    _, voxels, _ = make_map(shapes, 2, 0.25, 1, seed=91 + dim)
    idx = SparseCoordinateIndex(
        torch.tensor([v[0] for v in voxels]), torch.tensor([v[1] for v in voxels]),
        torch.tensor([v[2] for v in voxels]), shapes, dim,
    )
    pos, offsets = random_queries([40, 25], shapes[0], seed=92, lo=[-2] * dim, hi=[s + 2 for s in shapes[0]])
    batch = torch.repeat_interleave(torch.arange(2), offsets.diff())
    full = torch.tensor(shapes[0], dtype=torch.float64)
    plan = build_neighborhood_plan(idx, batch, pos, full, sizes, True, chunk_size=64, tile_queries=3)
    cells, oob, lev = get_multilevel_neighborhoods(pos, shapes, sizes)
    rows, found = idx.lookup(batch[:, None], lev[None], cells)
    voxel_rows = plan.voxel_rows if plan.voxel_rows is not None else torch.arange(idx.n_voxels)
    seen = torch.zeros(pos.shape[0], dtype=torch.int64)
    for c in plan.chunks:
        T, G, U = c.shape
        for t in range(T):
            for g in range(G):
                i = int(c.query[t, g])
                if i == pos.shape[0]:
                    assert c.masked[t, g].all()  # padding row
                    continue
                seen[i] += 1
                got = sorted(int(voxel_rows[c.key[t, u]]) for u in range(U) if not c.masked[t, g, u])
                assert got == sorted(rows[i][found[i]].tolist())
        bg = ~c.bg_masked[0]  # [n, K] for the real queries, in query_pos order
        for j, i in enumerate(c.query_rows.tolist()):
            assert torch.equal(bg[j], ~oob[i] & ~found[i])
    assert torch.equal(plan.pair_counts, found.sum(1))
    assert torch.equal(plan.background_counts, (~oob & ~found).sum(1))
    assert (seen <= 1).all() and (seen[plan.has_keys()] == 1).all()
    assert len(plan.chunks) > 2 and any(c.shape[1] > 1 for c in plan.chunks)


def test_gradcheck_block_through_positions_background_and_features(one_thread, backend):
    shapes, sizes = [[8, 6], [4, 3]], [3, 3]
    block = make_block(8, 2, 2, sizes, 2, rope_share_heads=False)
    stacked, _, _ = make_map(shapes, 1, 0.35, 8, seed=21)
    idx = stacked.coalesce().indices()
    voxels = [(int(c[0]), int(c[-1]), tuple(c[1:-1].tolist())) for c in idx.T]  # coalesced row order
    pos, offsets = random_queries([5], shapes[0], seed=22)
    query = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    pos.requires_grad_(True)
    vals = stacked.coalesce().values().clone().requires_grad_(True)
    bg = torch.randn(1, 2, 8, dtype=torch.float64, requires_grad=True)

    def fn(query, pos, vals, bg):
        st = torch.sparse_coo_tensor(idx, vals, stacked.shape)
        return block(query, pos, offsets, st, shapes, background_embedding=bg)

    assert torch.autograd.gradcheck(fn, (query, pos, vals, bg), eps=1e-6, atol=1e-6)
    # and the module's parameters (RoPE frequencies, projections) get the reference's gradients
    out = fn(query, pos, vals, bg)
    ref = naive_block(block, query, pos, offsets, voxels, vals, shapes, bg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    params = [block.rope.freqs, block.kv_proj.weight, block.q_proj.weight]
    g1 = torch.autograd.grad((out * w).sum(), params)
    # naive reference rotation uses detached frequencies; compare the projections only there,
    # and the frequencies against a finite difference of the block
    g2 = torch.autograd.grad((ref * w).sum(), params[1:])
    for a, b in zip(g1[1:], g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        e = 1e-6
        direction = torch.randn_like(block.rope.freqs)
        block.rope.freqs += e * direction
        plus = (fn(query, pos, vals, bg) * w).sum()
        block.rope.freqs -= 2 * e * direction
        minus = (fn(query, pos, vals, bg) * w).sum()
        block.rope.freqs += e * direction
    fd = (plus - minus) / (2 * e)
    torch.testing.assert_close((g1[0] * direction).sum(), fd, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# invariances
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
def test_translation_invariance(background, backend):
    shapes = [[96, 96], [48, 48], [24, 24], [12, 12]]  # coarsest stride 8 full-scale cells
    sizes = [3, 5, 3, 3] if background else [3, 5, 7, 9]
    E = 32
    block = make_block(E, 4, 4, sizes, 2, dtype=torch.float32, bias=True)
    stacked, voxels, feats = make_map(shapes, 1, 0.2, E, dtype=torch.float32, seed=31, region=(0, 56))
    pos, offsets = random_queries([40], [96, 96], dtype=torch.float32, seed=32, lo=16, hi=40)
    query = torch.randn(40, E)
    bg = torch.randn(1, 4, E) if background else None
    out = block(query, pos, offsets, stacked, shapes, background_embedding=bg)
    shift_full = torch.tensor([24, 16])  # multiples of 8
    st = stacked.coalesce()
    idx = st.indices().clone()
    stride = torch.tensor([1, 2, 4, 8])[idx[-1]]
    idx[1:3] += (shift_full[:, None] // stride[None])
    shifted = torch.sparse_coo_tensor(idx, st.values(), st.shape)
    out_s = block(query, pos + shift_full.float(), offsets, shifted, shapes, background_embedding=bg)
    torch.testing.assert_close(out_s, out, rtol=1e-5, atol=1e-5)
    # control: a shift that is not a multiple of the coarse stride changes the windows
    pos_bad = pos + 3.0
    assert not torch.allclose(block(query, pos_bad, offsets, stacked, shapes, background_embedding=bg), out, atol=1e-3)


def test_permutation_equivariance_over_queries(backend):
    shapes, sizes = CASES_2D["shapes"], CASES_2D["sizes"]
    block = make_block(16, 2, 3, sizes, 2)
    stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=41)
    pos, offsets = random_queries([9, 6], shapes[0], seed=42)
    query = torch.randn(15, 16, dtype=torch.float64)
    bg = torch.randn(2, 3, 16, dtype=torch.float64)
    perm = torch.cat([torch.randperm(9), 9 + torch.randperm(6)])
    out = block(query, pos, offsets, stacked, shapes, background_embedding=bg)
    out_p = block(query[perm], pos[perm], offsets, stacked, shapes, background_embedding=bg)
    torch.testing.assert_close(out_p, out[perm], rtol=1e-12, atol=1e-12)


def test_locality_voxel_outside_every_window_changes_nothing(backend):
    shapes, sizes = [[16, 16], [8, 8]], [3, 3]
    block = make_block(16, 2, 2, sizes, 2)
    stacked, voxels, feats = make_map(shapes, 1, 0.4, 16, seed=51)
    pos, offsets = random_queries([6], [16, 16], seed=52, lo=0, hi=6)
    query = torch.randn(6, 16, dtype=torch.float64)
    bg = torch.randn(1, 2, 16, dtype=torch.float64)
    cells, oob, lev = get_multilevel_neighborhoods(pos, shapes, sizes)
    in_window = {(int(lev[k]), tuple(cells[i, k].tolist())) for i in range(6) for k in range(cells.shape[1])}
    st = stacked.coalesce()
    idx = st.indices()
    keys = [(int(idx[-1, j]), tuple(idx[1:3, j].tolist())) for j in range(idx.shape[1])]
    outside = [j for j, key in enumerate(keys) if key not in in_window]
    inside = [j for j, key in enumerate(keys) if key in in_window]
    assert outside and inside
    for background in (None, bg):
        out = block(query, pos, offsets, st, shapes, background_embedding=background)
        vals = st.values().clone()
        vals[outside] += 10.0
        out2 = block(query, pos, offsets, torch.sparse_coo_tensor(idx, vals, st.shape), shapes, background_embedding=background)
        assert torch.equal(out, out2)
        vals[inside[0]] += 10.0  # control: a voxel in a window does change something
        out3 = block(query, pos, offsets, torch.sparse_coo_tensor(idx, vals, st.shape), shapes, background_embedding=background)
        assert not torch.allclose(out, out3)


# ------------------------------------------------------------------------------------------
# query_mask / empty windows
# ------------------------------------------------------------------------------------------
def test_query_mask_rows_returned_exactly_and_others_unchanged(backend):
    shapes, sizes = CASES_2D["shapes"], CASES_2D["sizes"]
    for norm_first in (True, False):
        block = make_block(16, 2, 3, sizes, 2, norm_first=norm_first)
        stacked, _, _ = make_map(shapes, 2, 0.3, 16, seed=61)
        pos, offsets = random_queries([6, 6], shapes[0], seed=62)
        query = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([True, False] * 6)
        out = block(query, pos, offsets, stacked, shapes, query_mask=mask)
        full = block(query, pos, offsets, stacked, shapes)
        assert torch.equal(out[mask], query[mask])
        torch.testing.assert_close(out[~mask], full[~mask])
        (grad,) = torch.autograd.grad(out[mask].sum(), query)
        assert torch.equal(grad[mask], torch.ones(6, 16, dtype=torch.float64)) and not grad[~mask].any()
    all_masked = block(query, pos, offsets, stacked, shapes, query_mask=torch.ones(12, dtype=torch.bool))
    assert torch.equal(all_masked, query)


def test_empty_windows_return_residual_finite_with_finite_grads(backend):
    shapes, sizes = [[16, 16], [8, 8]], [3, 3]
    block = make_block(16, 2, 2, sizes, 2, bias=True)  # out_proj bias must not leak in
    stacked, _, _ = make_map(shapes, 1, 0.5, 16, seed=71, region=(0, 4))
    pos = torch.tensor([[14.5, 14.5], [13.2, 15.9], [1.0, 1.0]], dtype=torch.float64)
    query = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3])
    out = block(query, pos, offsets, stacked, shapes)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], query[:2])
    assert not torch.allclose(out[2], query[2])
    out.sum().backward()
    assert torch.isfinite(query.grad).all()
    for p in block.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    # a map with no voxel at all
    empty = torch.sparse_coo_tensor(torch.zeros(4, 0, dtype=torch.int64), torch.zeros(0, 16, dtype=torch.float64), (1, 16, 16, 2, 16))
    out_e = block(query, pos, offsets, empty, shapes)
    assert torch.equal(out_e, query)


# ------------------------------------------------------------------------------------------
# get_multilevel_neighborhoods
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_get_multilevel_neighborhoods_against_loop(dim):
    shapes = [[20, 14], [10, 7], [5, 4]] if dim == 2 else [[8, 10, 6], [4, 5, 3]]
    sizes = [3, 5, 1] if dim == 2 else [3, 5]
    full = torch.tensor(shapes[0], dtype=torch.float32)
    pos = torch.rand(9, dim) * (full + 4) - 2  # some queries outside the map
    cells, oob, lev = get_multilevel_neighborhoods(pos, shapes, sizes)
    K = sum(s**dim for s in sizes)
    assert cells.shape == (9, K, dim) and oob.shape == (9, K) and lev.shape == (K,)
    for i in range(9):
        k = 0
        for level, s in enumerate(sizes):
            centre = [math.floor(float(pos[i, a]) / shapes[0][a] * shapes[level][a]) for a in range(dim)]
            r = (s - 1) // 2
            for off in itertools.product(range(-r, r + 1), repeat=dim):
                cell = [c + o for c, o in zip(centre, off)]
                assert cells[i, k].tolist() == cell
                assert bool(oob[i, k]) == any(c < 0 or c >= n for c, n in zip(cell, shapes[level]))
                assert int(lev[k]) == level
                k += 1


def test_window_offsets_order():
    off, lev = window_offsets([1, 3], 2)
    assert off.tolist() == [[0, 0], [-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 0], [0, 1], [1, -1], [1, 0], [1, 1]]
    assert lev.tolist() == [0] + [1] * 9


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_constructor_errors():
    with pytest.raises(ValueError, match="odd"):
        SparseNeighborhoodAttentionBlock(16, 2, n_levels=2, neighborhood_sizes=[3, 4])
    with pytest.raises(ValueError, match="len\\(neighborhood_sizes\\)"):
        SparseNeighborhoodAttentionBlock(16, 2, n_levels=3, neighborhood_sizes=[3, 5])
    with pytest.raises(ValueError, match="position_dim"):
        SparseNeighborhoodAttentionBlock(16, 2, position_dim=4)
    with pytest.raises(ValueError, match="rope_freq_group_pattern"):
        SparseNeighborhoodAttentionBlock(16, 2, rope_freq_group_pattern="diagonal")
    with pytest.raises(ValueError, match="split equally"):  # 4 pairs into 3 groups
        SparseNeighborhoodAttentionBlock(16, 2, rope_freq_group_pattern="axial")
    SparseNeighborhoodAttentionBlock(16, 2, rope_freq_group_pattern="axial", rope_enforce_freq_groups_equal=False)
    with pytest.raises(ValueError, match="even head_dim"):
        SparseNeighborhoodAttentionBlock(18, 6)
    with pytest.raises(ValueError, match="rope_spatial_base_theta"):
        SparseNeighborhoodAttentionBlock(16, 2, rope_spatial_base_theta=-1.0)
    with pytest.raises(TypeError, match="rope_share_heads"):
        SparseNeighborhoodAttentionBlock(16, 2, rope_share_heads="yes")
    with pytest.raises(ValueError, match="divisible"):
        SparseNeighborhoodAttentionBlock(16, 3)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            SparseNeighborhoodAttentionBlock(16, 2, dropout=bad)
    with pytest.raises(ValueError, match="n_levels must be a positive int"):
        SparseNeighborhoodAttentionBlock(16, 2, n_levels=0)


def test_forward_and_function_errors():
    shapes, sizes = CASES_2D["shapes"], CASES_2D["sizes"]
    block = make_block(16, 2, 3, sizes, 2)
    stacked, _, _ = make_map(shapes, 1, 0.3, 16, seed=81)
    pos, offsets = random_queries([4], shapes[0], seed=82)
    query = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="floating-point"):
        block(query, pos.long(), offsets, stacked, shapes)
    with pytest.raises(ValueError, match="query_spatial_positions"):
        block(query, torch.rand(4, 3, dtype=torch.float64), offsets, stacked, shapes)
    with pytest.raises(ValueError, match="n_levels"):
        make_block(16, 2, 2, [3, 3], 2)(query, pos, offsets, stacked, shapes)
    with pytest.raises(ValueError, match="query_mask"):
        block(query, pos, offsets, stacked, shapes, query_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask"):
        block(query, pos, offsets, stacked, shapes, query_mask=torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        get_multilevel_neighborhoods(torch.zeros(3, 2, dtype=torch.int64), shapes, sizes)
    with pytest.raises(ValueError, match="odd"):
        get_multilevel_neighborhoods(torch.zeros(3, 2), shapes, [3, 5, 2])
    with pytest.raises(ValueError, match="len\\(neighborhood_sizes\\)"):
        get_multilevel_neighborhoods(torch.zeros(3, 2), shapes, [3, 5])
    with pytest.raises(ValueError, match="position_dim"):
        get_multilevel_neighborhoods(torch.zeros(3, 3), shapes, sizes)


def test_extra_repr():
    r = repr(SparseNeighborhoodAttentionBlock(32, 4, n_levels=2, neighborhood_sizes=[3, 7], position_dim=3))
    assert "neighborhood_sizes=[3, 7]" in r and "position_dim=3" in r and "freq_group_pattern='single'" in r
