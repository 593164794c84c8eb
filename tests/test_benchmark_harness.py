"""The benchmark harness's interleaved rounds (``benchmarks/common.py``): call order and counts,
one result per implementation, failures, the paired ratios and the kernel-vs-PyTorch table.

No timing is asserted: the clock is a fake one that the fake implementations advance.
"""

import os

import pytest

from benchmarks.common import (
    Case,
    Result,
    _selected,
    cpu_kernels_off,
    interleave,
    kernel_vs_pytorch_table,
    paired_ratios,
    round_orders,
    run_interleaved,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_impls(clock: FakeClock, durations: dict, log: list, fail: dict | None = None):
    """name -> callable that logs its name, advances the clock by ``durations[name][call]`` (or
    the one number) and raises on its ``fail[name]``-th call (0-based, warm-up included)."""
    fail = fail or {}
    calls = {name: 0 for name in durations}

    def make(name):
        def fn():
            n = calls[name]
            calls[name] += 1
            log.append(name)
            if fail.get(name) == n:
                raise RuntimeError(f"{name} broke on call {n}")
            d = durations[name]
            clock.now += d[n] if isinstance(d, list) else d
            return object()
        return fn

    return {name: make(name) for name in durations}


def test_round_orders_rotate_so_each_implementation_takes_each_position():
    orders = round_orders(["k", "p", "f"], 5)
    assert orders == [["k", "p", "f"], ["p", "f", "k"], ["f", "k", "p"], ["k", "p", "f"], ["p", "f", "k"]]
    assert round_orders(["k", "p", "f"], 2, rotate=False) == [["k", "p", "f"], ["k", "p", "f"]]
    assert round_orders([], 3) == [[], [], []]


def test_interleave_calls_each_implementation_warmup_plus_repeats_times_in_rotated_rounds():
    clock, log = FakeClock(), []
    fns = fake_impls(clock, {"kernel": 2.0, "pytorch": 5.0, "floor": 1.0}, log)
    syncs = []
    timings = interleave(fns, warmup=2, repeats=4, clock=clock, sync=lambda: syncs.append(1))
    # warm-up: each implementation twice, one after the other; then 4 rounds, order rotated
    warm = ["kernel"] * 2 + ["pytorch"] * 2 + ["floor"] * 2
    rounds = [name for order in round_orders(["kernel", "pytorch", "floor"], 4) for name in order]
    assert log == warm + rounds
    assert list(timings) == ["kernel", "pytorch", "floor"]  # one result per implementation, in order
    assert timings["kernel"].times_s == [2.0] * 4
    assert timings["pytorch"].times_s == [5.0] * 4
    assert timings["floor"].times_s == [1.0] * 4
    assert all(t.error is None for t in timings.values())
    assert len(syncs) == 3 + 2 * 12  # after each warm-up, before and after each timed call


def test_interleave_records_per_round_times_in_round_order():
    clock, log = FakeClock(), []
    # warm-up call first (index 0), then the rounds' calls
    fns = fake_impls(clock, {"a": [9.0, 1.0, 2.0, 3.0], "b": [9.0, 4.0, 5.0, 6.0]}, log)
    timings = interleave(fns, warmup=1, repeats=3, clock=clock)
    assert timings["a"].times_s == [1.0, 2.0, 3.0]
    assert timings["b"].times_s == [4.0, 5.0, 6.0]
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_interleave_failing_implementation_is_reported_and_the_others_keep_their_rounds():
    clock, log = FakeClock(), []
    # pytorch fails on its 3rd call overall: warm-up (0), round 0 (1), round 1 (2)
    fns = fake_impls(clock, {"kernel": 2.0, "pytorch": 5.0, "floor": 1.0}, log, fail={"pytorch": 2})
    timings = interleave(fns, warmup=1, repeats=4, clock=clock)
    assert timings["pytorch"].times_s == [5.0]
    assert "RuntimeError: pytorch broke on call 2" == timings["pytorch"].error
    assert timings["kernel"].times_s == [2.0] * 4 and timings["kernel"].error is None
    assert timings["floor"].times_s == [1.0] * 4 and timings["floor"].error is None
    assert log.count("pytorch") == 3  # not called again after it failed


def test_interleave_failure_in_warmup_leaves_no_times():
    clock, log = FakeClock(), []
    fns = fake_impls(clock, {"kernel": 2.0, "floor": 1.0}, log, fail={"kernel": 0})
    timings = interleave(fns, warmup=1, repeats=3, clock=clock)
    assert timings["kernel"].times_s == [] and timings["kernel"].error.startswith("RuntimeError")
    assert timings["floor"].times_s == [1.0] * 3
    assert log == ["kernel", "floor", "floor", "floor", "floor"]


def test_paired_ratios_median_of_round_ratios_and_ratio_of_medians():
    # rounds: 2/1, 3/3, 9/3 -> per-round 2, 1, 3 (median 2); medians 3 / 3 -> 1
    assert paired_ratios([2.0, 3.0, 9.0], [1.0, 3.0, 3.0]) == (2.0, 1.0)
    # a drifting machine: both slow down together; the per-round ratio stays 0.5
    num, den = [1.0, 2.0, 4.0, 8.0], [2.0, 4.0, 8.0, 16.0]
    assert paired_ratios(num, den) == (0.5, 0.5)
    # only the rounds both have are paired
    assert paired_ratios([1.0, 1.0, 1.0], [2.0]) == (0.5, 0.5)
    assert paired_ratios([], [1.0]) == (None, None)


def _result(name: str, times, mode: str) -> Result:
    return Result(Case(name, "setup", {}), times_s=list(times), mode=mode)


def _key(case: Case) -> tuple:
    group, _, impl = case.name.rpartition("/")
    return group, impl


def test_kernel_vs_pytorch_table_uses_per_round_ratios_when_interleaved():
    # per round the kernel is 0.8x its PyTorch path; the medians alone would say 1.5 / 1.0 (a loss)
    k = [0.8, 1.6, 3.2, 1.5, 1.5]
    p = [1.0, 2.0, 4.0, 1.0, 1.0]
    f = [0.5, 0.5, 0.5, 0.5, 0.5]
    results = [_result("a/kernel", k, "interleaved"), _result("a/pytorch", p, "interleaved"), _result("a/floor", f, "interleaved")]
    text = kernel_vs_pytorch_table(results, _key, kernel="kernel", pytorch="pytorch", floor="floor")
    assert "interleaved rounds" in text
    assert paired_ratios(k, p) == (0.8, 1.5)
    row = next(line for line in text.splitlines() if line.startswith("| a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["a", "1500", "1000", "500", "0.80x", "3.00x", "2.00x", "5", "1.50x / 3.00x"]
    assert text.rstrip().endswith("kernel <= PyTorch path in every case measured")

    slow = [_result("b/kernel", [2.0, 2.0, 2.0], "interleaved"), _result("b/pytorch", [1.0, 1.0, 3.0], "interleaved")]
    text = kernel_vs_pytorch_table(slow, _key, kernel="kernel", pytorch="pytorch", floor="floor")
    assert "KERNEL SLOWER THAN ITS PYTORCH PATH: b (2.00x)" in text


def test_kernel_vs_pytorch_table_separate_mode_keeps_its_format():
    results = [_result("a/kernel", [0.2], "separate"), _result("a/pytorch", [0.4], "separate"), _result("a/floor", [0.1], "separate")]
    text = kernel_vs_pytorch_table(results, _key, kernel="kernel", pytorch="pytorch", floor="floor")
    lines = text.splitlines()
    assert lines[0] == "Kernel vs its PyTorch path (same inputs, same run):"
    assert lines[2] == "| case | kernel ms | PyTorch path ms | floor ms | kernel / PyTorch | kernel / floor | PyTorch / floor |"
    assert lines[4] == "| a | 200 | 400 | 100 | 0.50x | 2.00x | 4.00x |"


def test_selected_cases_for_peak_runs():
    assert _selected("scan-3d-enc block fwd+bwd", "all")
    assert not _selected("scan-3d-enc block fwd+bwd", "none")
    assert _selected("scan-3d-enc block fwd+bwd", "scan-3d-enc block,scan-3d-enc floor")
    assert not _selected("scan-bev-enc block fwd+bwd", "scan-3d-enc block,scan-3d-enc floor")


@pytest.mark.parametrize("before", [None, "1"])
def test_cpu_kernels_off_selects_the_pytorch_path_during_the_call_only(monkeypatch, before):
    import torch

    from sparse_msda.backends import choose_backend, reference

    if before is None:
        monkeypatch.delenv("SPARSE_MSDA_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", before)
    monkeypatch.delenv("SPARSE_MSDA_BACKEND", raising=False)
    seen = []

    def fn():
        seen.append(os.environ.get("SPARSE_MSDA_CPU_KERNELS"))
        return choose_backend("neighborhood_attention", torch.zeros(2, 2))

    assert cpu_kernels_off(fn)() is reference
    assert seen == ["0"]
    assert os.environ.get("SPARSE_MSDA_CPU_KERNELS") == before


# module-level setups: the interleaved subprocess imports them by name
def setup_counter(label: str, fail_setup: bool = False):
    if fail_setup:
        raise ValueError(f"setup of {label} failed on purpose")
    return lambda: sum(range(1000))


def test_run_interleaved_one_subprocess_one_result_per_case_and_setup_failure():
    cases = [
        Case("s/kernel", setup_counter, {"label": "kernel"}),
        Case("s/pytorch", setup_counter, {"label": "pytorch", "fail_setup": True}),
        Case("s/floor", setup_counter, {"label": "floor"}),
    ]
    results = run_interleaved(cases, warmup=1, repeats=3, timeout=120)
    assert [r.case.name for r in results] == ["s/kernel", "s/pytorch", "s/floor"]
    assert all(r.mode == "interleaved" and r.peak_rss_bytes is None for r in results)
    assert results[1].error == "ValueError: setup of pytorch failed on purpose" and results[1].times_s == []
    for r in (results[0], results[2]):
        assert r.error is None and len(r.times_s) == 3 and all(t > 0 for t in r.times_s)
    assert results[0].case is cases[0]  # the caller's case back (its setup function, not a name)
