"""Does the installed spconv need :func:`adapters.patch_spconv`?  ``python -m adapters.check_spconv``

Runs a small CPU sparse convolution (a ``SubMConv3d`` and a stride-2 ``SparseConv3d``, float64,
forward and backward) at 1 and 2 threads, with spconv's own code (:func:`adapters.spconv_unpatched`)
and with the fixes (:func:`adapters.patch_spconv`), compares every output and gradient with
torch's dense ``conv3d`` on the zero-filled grid, and prints one line per run and a verdict.

The scatter-add race is intermittent: ``--repeats`` forward passes are run per setting, and "not
reproduced" is evidence, not proof. Exit status: 0 when the patched convolutions match the dense
reference (whatever the verdict on the unpatched ones), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from .spconv_compat import patch_spconv, spconv_unpatched

__all__ = ["CheckResult", "check_spconv", "main"]

_TOLERANCE = 1e-9  # float64; exact sums differ from the dense conv by rounding only (~1e-14)


@dataclass
class CheckResult:
    """Outcome of one setting (patched or not, thread count).

    Attributes:
        patched: whether :func:`adapters.patch_spconv`'s fixes were in place.
        threads: ``torch.set_num_threads`` value during the run.
        forward_errors: max abs difference to the dense reference, one per forward pass.
        backward_error: max abs difference of the input and weight gradients, or ``None`` when
            the backward raised (``backward_exception`` then holds the message).
    """

    patched: bool
    threads: int
    forward_errors: list = field(default_factory=list)
    backward_error: Optional[float] = None
    backward_exception: Optional[str] = None

    @property
    def forward_wrong(self) -> int:
        return sum(e > _TOLERANCE for e in self.forward_errors)

    @property
    def ok(self) -> bool:
        return self.forward_wrong == 0 and self.backward_error is not None and self.backward_error <= _TOLERANCE

    def describe(self) -> str:
        mode = "patched  " if self.patched else "unpatched"
        fwd = (
            f"forward ok in {len(self.forward_errors)}/{len(self.forward_errors)} runs"
            if self.forward_wrong == 0
            else f"forward WRONG in {self.forward_wrong}/{len(self.forward_errors)} runs "
            f"(max |error| {max(self.forward_errors):.3g})"
        )
        if self.backward_exception is not None:
            bwd = f"backward FAILS ({self.backward_exception})"
        elif self.backward_error > _TOLERANCE:
            bwd = f"backward WRONG (max |error| {self.backward_error:.3g})"
        else:
            bwd = "backward ok"
        return f"{mode} spconv, {self.threads} thread{'s' if self.threads > 1 else ''}: {fwd}; {bwd}"


class _Problem:
    """The test input, the two convolutions and their dense references (computed once)."""

    def __init__(self, n_voxels: int, seed: int, shape=(16, 40, 40), batch_size: int = 2, channels: int = 16) -> None:
        import spconv.pytorch as spconv

        gen = torch.Generator().manual_seed(seed)
        volume = batch_size * shape[0] * shape[1] * shape[2]
        flat = torch.randperm(volume, generator=gen)[: min(n_voxels, volume)]
        coords = []
        for size in reversed((batch_size, *shape)):
            coords.append(flat % size)
            flat = flat // size
        self.indices = torch.stack(coords[::-1], 1).to(torch.int32)
        self.features = torch.randn(self.indices.shape[0], channels, dtype=torch.float64, generator=gen)
        self.shape, self.batch_size = list(shape), batch_size
        torch.manual_seed(seed)
        self.convs = [
            spconv.SubMConv3d(channels, 32, 3, padding=1, bias=False).double(),
            spconv.SparseConv3d(channels, 32, 3, stride=2, padding=1, bias=False).double(),
        ]
        self.references: dict = {}  # conv number -> (output indices, output, upstream grad, input grad, weight grad)

    def sparse_input(self, features: torch.Tensor):
        import spconv.pytorch as spconv

        return spconv.SparseConvTensor(features, self.indices, self.shape, self.batch_size)

    def reference(self, i: int, out_indices: torch.Tensor):
        """Dense ``conv3d`` on the zero-filled grid, read at ``out_indices`` (spconv's output sites), with
        the input and weight gradients of ``<out, upstream>`` for a fixed random ``upstream``."""
        if i not in self.references:
            conv = self.convs[i]
            feats = self.features.clone().requires_grad_(True)
            weight = conv.weight.detach().clone().requires_grad_(True)  # [out, kz, ky, kx, in]
            b, z, y, x = self.indices.long().T
            dense = feats.new_zeros(self.batch_size, *self.shape, feats.shape[1]).index_put((b, z, y, x), feats)
            out = torch.nn.functional.conv3d(
                dense.permute(0, 4, 1, 2, 3), weight.permute(0, 4, 1, 2, 3), None, conv.stride, conv.padding
            )
            o = out_indices.long()
            out = out.permute(0, 2, 3, 4, 1)[o[:, 0], o[:, 1], o[:, 2], o[:, 3]]
            upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            (out * upstream).sum().backward()
            self.references[i] = (out_indices, out.detach(), upstream, feats.grad, weight.grad)
        return self.references[i]


def _run_setting(problem: _Problem, patched: bool, threads: int, repeats: int) -> CheckResult:
    result = CheckResult(patched, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(repeats):
            err = 0.0
            for i, conv in enumerate(problem.convs):
                with torch.no_grad():
                    out = conv(problem.sparse_input(problem.features))
                ref_indices, ref, _, _, _ = problem.reference(i, out.indices)
                # output sites come from the indice pairs, which the race does not touch
                err = max(err, float((out.features - ref).abs().max()) if torch.equal(out.indices, ref_indices) else float("inf"))
            result.forward_errors.append(err)
        try:
            err = 0.0
            for i, conv in enumerate(problem.convs):
                feats = problem.features.clone().requires_grad_(True)
                out = conv(problem.sparse_input(feats))
                _, _, upstream, ref_input, ref_weight = problem.reference(i, out.indices)
                conv.zero_grad()
                with _quiet():  # spconv prints its debug data when its backward fails
                    (out.features * upstream).sum().backward()
                err = max(err, float((feats.grad - ref_input).abs().max()), float((conv.weight.grad - ref_weight).abs().max()))
            result.backward_error = err
        except (RuntimeError, AssertionError) as exc:
            result.backward_exception = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120]}"
    finally:
        torch.set_num_threads(before)
    return result


@contextlib.contextmanager
def _quiet():
    """Silence stdout/stderr at the file-descriptor level (spconv's C++ prints as well)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def check_spconv(repeats: int = 5, n_voxels: int = 8_000, seed: int = 0) -> tuple[list[CheckResult], list[CheckResult]]:
    """Run the check; returns ``(unpatched results, patched results)``, one per thread count (1, 2)."""
    patch_spconv()
    problem = _Problem(n_voxels, seed)
    with spconv_unpatched():
        raw = [_run_setting(problem, False, t, repeats) for t in (1, 2)]
    fixed = [_run_setting(problem, True, t, repeats) for t in (1, 2)]
    return raw, fixed


def verdict(raw: list[CheckResult], fixed: list[CheckResult]) -> str:
    """One paragraph: which defects showed, and whether the patch is needed and works."""
    defects = []
    if any(r.backward_exception for r in raw):
        defects.append("sparse-conv backward fails (CPU-only torch asked for a CUDA stream)")
    if any(r.forward_wrong or (r.backward_error or 0.0) > _TOLERANCE for r in raw if r.threads > 1):
        defects.append("results are wrong with 2 threads (scatter-add race)")
    if any(r.forward_wrong or (r.backward_error or 0.0) > _TOLERANCE for r in raw if r.threads == 1):
        defects.append("results are wrong even with 1 thread")
    fixed_ok = all(r.ok for r in fixed)
    if defects:
        text = "verdict: the installed spconv NEEDS adapters.patch_spconv(): " + "; ".join(defects) + "."
    else:
        text = (
            "verdict: no defect reproduced in these runs (the race is intermittent: evidence, not proof); "
            "adapters.patch_spconv() is harmless either way."
        )
    if fixed_ok:
        text += " With the patch every result matches the dense reference."
    else:
        text += " WITH THE PATCH RESULTS STILL DIFFER from the dense reference: please report this."
    return text


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.check_spconv", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="forward passes per setting (the race is intermittent)")
    parser.add_argument("--voxels", type=int, default=8_000, help="active voxels of the test input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import spconv

    print(
        f"spconv {getattr(spconv, '__version__', '?')}, torch {torch.__version__} "
        f"(CUDA {'available' if torch.cuda.is_available() else 'not available'}), "
        f"SubMConv3d + SparseConv3d(stride 2) on {args.voxels} voxels, float64, vs dense conv3d"
    )
    raw, fixed = check_spconv(args.repeats, args.voxels, args.seed)
    for r in raw + fixed:
        print(r.describe())
    print(verdict(raw, fixed))
    return 0 if all(r.ok for r in fixed) else 1


if __name__ == "__main__":
    sys.exit(main())
