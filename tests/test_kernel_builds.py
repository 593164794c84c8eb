"""Build keying of the fused CPU kernels (sparse_msda.functional.cpu_kernels): the build
directory changes with everything the binary depends on (torch version, target ISA, compiler
flags, source) and only with that; a build prints one line when it starts; ``-march`` values
whose ISA the CPU lacks are refused; ``python -m sparse_msda.build_kernels`` prebuilds."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_msda.functional import cpu_kernels

NAME = "sparse_msda_neighborhood_cpu"
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler: the build key asks it for its -march macros"
)


@pytest.fixture
def fake_macros(monkeypatch):
    """Stand-in predefined macros per -march (no compiler needed): native = an AVX2 host."""
    avx2 = ("#define __SSE2__ 1", "#define __AVX__ 1", "#define __AVX2__ 1", "#define __FMA__ 1")
    table = {
        "native": (*avx2, "#define __tune_haswell__ 1"),
        "x86-64-v3": (*avx2, "#define __k8__ 1"),
        "skylake-avx512": (*avx2, "#define __AVX512F__ 1", "#define __AVX512BW__ 1"),
    }
    monkeypatch.setattr(cpu_kernels, "_predefined_macros", lambda compiler, march: table[march])
    monkeypatch.delenv("SPARSE_MSDA_CPU_MARCH", raising=False)
    return table


def test_build_directory_same_inputs_same_directory(fake_macros, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = cpu_kernels.build_directory(NAME)
    assert d == cpu_kernels.build_directory(NAME)
    assert d.parent == tmp_path / "sparse_msda" and d.name.startswith(f"{NAME}-avx2-")
    assert cpu_kernels.build_directory("sparse_msda_sample_cpu") != d


def test_build_directory_changes_with_torch_version(fake_macros, monkeypatch):
    d = cpu_kernels.build_directory(NAME)
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    assert cpu_kernels.build_directory(NAME) != d


def test_build_directory_changes_with_march_and_flags(fake_macros, monkeypatch):
    native = cpu_kernels.build_directory(NAME)
    monkeypatch.setenv("SPARSE_MSDA_CPU_MARCH", "x86-64-v3")
    v3 = cpu_kernels.build_directory(NAME)
    assert v3 != native
    monkeypatch.setattr(cpu_kernels, "_BASE_CFLAGS", ["-O2"])
    assert cpu_kernels.build_directory(NAME) not in (native, v3)


def test_build_directory_changes_with_host_isa(fake_macros, monkeypatch):
    """-march=native on another CPU (another macro set) must not share the binary."""
    avx2_host = cpu_kernels.build_directory(NAME)
    fake_macros["native"] = fake_macros["skylake-avx512"]
    avx512_host = cpu_kernels.build_directory(NAME)
    assert avx512_host != avx2_host and avx512_host.name.startswith(f"{NAME}-avx512-")


def test_build_directory_changes_with_source(fake_macros, monkeypatch, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(cpu_kernels._CSRC, csrc)
    monkeypatch.setattr(cpu_kernels, "_CSRC", csrc)
    before = cpu_kernels.build_directory(NAME)
    other = cpu_kernels.build_directory("sparse_msda_sample_cpu")
    source = csrc / "neighborhood_attention_cpu.cpp"
    source.write_text(source.read_text() + "\n// edited\n")
    assert cpu_kernels.build_directory(NAME) != before
    assert cpu_kernels.build_directory("sparse_msda_sample_cpu") == other  # the other kernel is untouched
    (csrc / "common.h").write_text("#pragma once\n")  # a header either may include
    assert cpu_kernels.build_directory("sparse_msda_sample_cpu") != other


def test_build_directory_changes_with_source_path(fake_macros, monkeypatch, tmp_path):
    """The same source in another checkout gets its own directory: torch's ninja build records the
    absolute source path and would otherwise recompile the shared binary, silently, on each switch."""
    here = cpu_kernels.build_directory(NAME)
    csrc = tmp_path / "csrc"
    shutil.copytree(cpu_kernels._CSRC, csrc)
    monkeypatch.setattr(cpu_kernels, "_CSRC", csrc)
    assert cpu_kernels.build_directory(NAME) != here


def test_bad_march_and_name_raise(fake_macros, monkeypatch):
    monkeypatch.setenv("SPARSE_MSDA_CPU_MARCH", "native -O0")
    with pytest.raises(ValueError, match="SPARSE_MSDA_CPU_MARCH"):
        cpu_kernels.target_march()
    with pytest.raises(ValueError, match="name must be one of"):
        cpu_kernels.build_directory("other")


def _fake_load(calls):
    def load(name, sources, extra_cflags, build_directory, verbose):
        calls.append((name, extra_cflags, build_directory))
        Path(build_directory, f"{name}.so").write_bytes(b"")
        return object()

    return load


def test_build_prints_one_line_once(fake_macros, monkeypatch, tmp_path, capfd):
    """A build prints the one line when it starts; a later process finding the binary does not."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    assert cpu_kernels.neighborhood_kernels() is not None
    err = capfd.readouterr().err
    assert err.count("building sparse_msda CPU") == 1 and "once, ~30 s" in err and "-march=native" in err
    assert calls == [(NAME, ["-O3", "-fno-trapping-math", "-march=native"], str(cpu_kernels.build_directory(NAME)))]
    monkeypatch.setattr(cpu_kernels, "_STATE", {})  # a new process: the binary is there
    assert cpu_kernels.neighborhood_kernels() is not None
    assert "building" not in capfd.readouterr().err
    monkeypatch.setenv("SPARSE_MSDA_CPU_MARCH", "x86-64-v3")  # another target: its own build, own message
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    assert cpu_kernels.neighborhood_kernels() is not None
    assert "-march=x86-64-v3" in capfd.readouterr().err
    assert len({c[2] for c in calls}) == 2


def test_march_the_cpu_lacks_is_refused(fake_macros, monkeypatch, tmp_path):
    """-march=skylake-avx512 on an AVX2 host would SIGILL: warned, PyTorch path, nothing built."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSE_MSDA_CPU_KERNELS", "1")
    monkeypatch.setenv("SPARSE_MSDA_CPU_MARCH", "skylake-avx512")
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    with pytest.warns(RuntimeWarning, match="lacks: AVX512BW, AVX512F"):
        assert cpu_kernels.sampling_kernels() is None
    assert calls == []


@needs_compiler
def test_real_compiler_keys_march():
    """With the real compiler: x86-64-v3 targets AVX2 without AVX-512, and its key differs
    from x86-64's (the baseline)."""
    macros = cpu_kernels._isa_features(cpu_kernels._predefined_macros(cpu_kernels._compiler(), "x86-64-v3"))
    if "__SSE2__" not in macros:
        pytest.skip("not an x86-64 compiler")
    assert {"__AVX2__", "__FMA__"} <= macros and "__AVX512F__" not in macros


@needs_compiler
def test_prebuild_command_builds_what_the_library_loads():
    """``python -m sparse_msda.build_kernels`` (another process) builds into the same keyed
    directories the library then loads from; a second run finds them and builds nothing."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "SPARSE_MSDA_CPU_KERNELS": "1"}
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sparse_msda.build_kernels"], cwd=root, env=env, capture_output=True, text=True, timeout=1800
    )
    first = run()
    assert first.returncode == 0, first.stderr
    printed = dict(line.split(": ", 1) for line in first.stdout.splitlines())
    assert set(printed) == set(cpu_kernels._KERNELS) == {"sparse_msda_sample_cpu", "sparse_msda_neighborhood_cpu", "sparse_msda_rope_cpu"}
    for name, directory in printed.items():
        assert Path(directory) == cpu_kernels.build_directory(name)
        assert (Path(directory) / f"{name}.so").exists()
    second = run()
    assert second.returncode == 0 and "building" not in second.stderr, second.stderr
