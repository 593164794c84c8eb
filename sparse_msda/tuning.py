"""Tuning constants: buffer sizes, chunking and memory budgets, in one place.

None of these changes a result beyond floating-point summation order (the tests hold each
path's chunking to the unchunked result); they trade memory for speed. The code reads them as
``tuning.NAME`` at call time, so a test or an experiment can change one with
``monkeypatch.setattr(sparse_msda.tuning, "NAME", value)``. Defaults that appear in a function
signature (``TILE_QUERIES``, ``LOOKUP_CELLS_PER_CHUNK``) are bound when the module is imported.

Where each is used:

* sampling (:mod:`sparse_msda.backends.reference`, :mod:`sparse_msda.backends.cpu`):
  :data:`CHUNK_CORNERS`, :data:`TABLE_COPY_BYTES`; the deformable attention on the C++ kernels
  (:mod:`sparse_msda.backends.cpu_deformable`): :data:`CHUNK_CORNERS` (samples per chunk),
  :data:`DEFORMABLE_KEEP_BYTES`;
* neighborhood attention plans (:mod:`sparse_msda.functional.neighborhood_plan`):
  :data:`TILE_QUERIES`, :data:`LOOKUP_CELLS_PER_CHUNK`, :data:`CHUNK_SCORE_ENTRIES`,
  :data:`PAD_SLACK`;
* the neighborhood attention's PyTorch path (:mod:`sparse_msda.backends.reference`):
  :data:`SAVED_PROBABILITIES_BYTES`, :data:`SOFTMAX_NO_SHIFT_BOUND`;
* the rotary encoding (:mod:`sparse_msda.functional.rope`): :data:`ROPE_CHUNK_ROWS`,
  :data:`ROPE_GRAD_IN_PLACE`; LayerNorm + linear (:mod:`sparse_msda.functional.norm_linear`):
  :data:`NORM_LINEAR_CHUNK_ROWS`.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_CORNERS",
    "CHUNK_SCORE_ENTRIES",
    "DEFORMABLE_KEEP_BYTES",
    "LOOKUP_CELLS_PER_CHUNK",
    "NORM_LINEAR_CHUNK_ROWS",
    "PAD_SLACK",
    "ROPE_CHUNK_ROWS",
    "ROPE_GRAD_IN_PLACE",
    "SAVED_PROBABILITIES_BYTES",
    "SOFTMAX_NO_SHIFT_BOUND",
    "TABLE_COPY_BYTES",
    "TILE_QUERIES",
]

CHUNK_CORNERS = 1 << 19
"""Sampling: corners processed per chunk by the PyTorch path (and hash keys per chunk of the
base-cell lookups). Bounds the ``[corners, head_dim]`` scratch buffer of the backward and the
``[samples, J, 2**D]`` corner rows/weights of one chunk; ``sparse_weighted_gather(chunk_corners=)``
overrides it per call."""

DEFORMABLE_KEEP_BYTES = 64 << 20
"""Deformable attention on the C++ kernels (:mod:`sparse_msda.backends.cpu_deformable`): what one
layer keeps from its forward to its backward. Always: the int32 base-cell ids, ``Q * H * L * P * 4``
bytes (3D scan encoder, Q = 118.5k, H = 8, L * P = 16: 58 MiB), whose recomputation would cost
the hash lookups again. Each of the projected value table (``N * C`` floats: 116 MiB there) and
the offsets with the attention logits (``Q * H * L * P * (D + 1)`` floats: 232 MiB there) is
kept only while it is at most this size, else recomputed in the backward (one ``[N, C_in] x
[C_in, C]`` product; two small products per chunk). Every kept byte adds to every layer's
memory between its forward and its backward (an encoder of k layers keeps k of them): in the
single-layer 3D benchmark the peak falls while the loss's backward runs, after the forward, so
keeping the table raised it 1:1 (637 -> 765 MiB against the floor's 347, measured 2026-11-30);
the recomputation costs ~0.12 s (table) + ~0.2 s (offsets, logits) of its ~3.5 s fwd+bwd."""

TABLE_COPY_BYTES = 512 << 20
"""Sampling, C++ kernel backward: memory it may spend on per-thread copies of the table gradient
(one copy per extra thread, no atomics); a larger table runs the backward on fewer threads."""

TILE_QUERIES = 32
"""Neighborhood plan: most queries per tile (queries sharing a batch item and a coarsest-level
window centre). Larger tiles share more key lookups but widen the union of their windows."""

LOOKUP_CELLS_PER_CHUNK = 1 << 19
"""Neighborhood plan: window cells looked up through the coordinate index at once (bounds the
memory of the plan's lookups)."""

CHUNK_SCORE_ENTRIES = 1 << 19
"""Neighborhood attention, PyTorch path: padded (query, key) score entries per chunk summed over
heads, i.e. ``default_chunk_size(n_heads) = max(4096, CHUNK_SCORE_ENTRIES // n_heads)``: the
``[H, T, G, U]`` score buffers stay near 2 MiB in float32, reused by the allocator instead of
fresh, page-faulting mappings."""

PAD_SLACK = 1.15
"""Neighborhood attention, PyTorch path: a chunk of padded tiles closes early once its padded
(query, key) entries exceed this times its real ones (bounds the work wasted on padding)."""

SAVED_PROBABILITIES_BYTES = 256 * 2**20
"""Neighborhood attention, PyTorch path: budget for keeping the attention weights (voxel pairs
``[H, padded pairs]``, background slots ``[H, queries, slots]``: ``embed_dim / H`` times smaller
than per-pair features) and the background path's window-centre ``cos``/``sin`` from the forward
for the backward; above it the backward recomputes them from ``q``, ``k`` and the frequencies."""

SOFTMAX_NO_SHIFT_BOUND = 60.0
"""Neighborhood attention, PyTorch path: a chunk whose score bound ``max |q_h| |k_h| * scale``
is at most this skips the softmax's max shift (``exp(+-60)`` is far from float32
overflow/underflow), saving two passes over the scores. float16 / bfloat16 scores always shift
(``exp`` overflows float16 above ~11)."""

NORM_LINEAR_CHUNK_ROWS = 4096
"""LayerNorm + linear (:mod:`sparse_msda.functional.norm_linear`): rows per chunk of its forward
and backward above this many rows; the normalised chunk and its gradient stay small reused buffers
instead of fresh ``[N, C]`` tensors."""

ROPE_GRAD_IN_PLACE = True
"""Rotary encoding of the blocks' own ``q`` / ``k`` projections on the C++ kernel
(:func:`~sparse_msda.functional.rope.apply_rope_to_projection`): the backward writes the input's
gradient over the incoming one instead of a new tensor."""

ROPE_CHUNK_ROWS = 8192
"""Rotary encoding: rows rotated at a time by ``_RopeFunction``: the float64 angles and the
cos/sin of a chunk stay small (a few MiB, cache-resident and reused) instead of
``[N, H', d/2]`` float64 temporaries that are page-faulted in on every call."""
