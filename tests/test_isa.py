"""Choosing the CPU backend's micro-kernel family from the target's features and SPARKLE_CPU_ISA."""

import subprocess
import sys
import textwrap

import pytest

import sparkle
from sparkle.cpu.isa import ISA_ENV, ISAS, active_isa, isa_by_name, select_isa, supported_isas

# Synthetic LLVM feature sets (what Numba compiles for), from an SSE-only x86 to AVX-512.
SSE_ONLY = frozenset({"sse2", "sse4.2", "popcnt"})
AVX_NO_FMA = frozenset({"sse2", "avx", "avx2"})  # AVX2 without FMA is not enough for the avx2 family
AVX2_FMA = frozenset({"sse2", "avx", "avx2", "fma"})
AVX512 = frozenset({"sse2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw"})
AARCH64 = frozenset({"neon", "fp-armv8"})


@pytest.mark.parametrize("features, expected", [
    (SSE_ONLY, "portable"), (AVX_NO_FMA, "portable"), (AARCH64, "portable"), (frozenset(), "portable"),
    (AVX2_FMA, "avx2"), (AVX512, "avx512"),
], ids=["sse-only", "avx2-without-fma", "aarch64", "no-features", "avx2+fma", "avx512f+fma"])
def test_widest_supported_family_is_selected(features, expected):
    assert select_isa(None, features).name == expected
    assert select_isa("", features).name == expected
    # Widest first, portable always last.
    names = [isa.name for isa in supported_isas(features)]
    assert names[0] == expected and names[-1] == "portable"
    assert names == [name for name in ("avx512", "avx2", "portable") if name in names]


def test_avx512_without_fma_is_not_avx512():
    assert select_isa(None, frozenset({"avx2", "avx512f"})).name == "portable"


@pytest.mark.parametrize("requested, features, expected", [
    ("avx2", AVX512, "avx2"), ("portable", AVX512, "portable"), ("portable", AVX2_FMA, "portable"),
    ("avx512", AVX512, "avx512"), (" AVX2 ", AVX512, "avx2"), ("portable", SSE_ONLY, "portable"),
])
def test_requesting_a_supported_narrower_family(requested, features, expected):
    assert select_isa(requested, features).name == expected


@pytest.mark.parametrize("requested, features, supported", [
    ("avx512", AVX2_FMA, ["avx2", "portable"]),
    ("avx512", SSE_ONLY, ["portable"]),
    ("avx2", AVX_NO_FMA, ["portable"]),
])
def test_requesting_a_family_the_cpu_lacks_names_the_variable_and_what_runs(requested, features, supported):
    with pytest.raises(ValueError) as error:
        select_isa(requested, features)
    message = str(error.value)
    assert ISA_ENV in message and "SPARKLE_CPU_ISA" in message
    assert repr(requested) in message
    assert str(supported) in message


@pytest.mark.parametrize("requested", ["sse9", "avx-512", "neon", "512"])
def test_unknown_family_name_raises(requested):
    with pytest.raises(ValueError, match="SPARKLE_CPU_ISA must be one of") as error:
        select_isa(requested, AVX512)
    assert repr(requested) in str(error.value)
    with pytest.raises(ValueError, match="SPARKLE_CPU_ISA"):
        isa_by_name(requested)


@pytest.mark.parametrize("name, vector_bytes", [("avx512", 64), ("avx2", 32), ("portable", 16)])
def test_lanes_follow_the_vector_width(name, vector_bytes):
    isa = isa_by_name(name)
    assert isa.name == name and isa.vector_bytes == vector_bytes
    assert isa.lanes(4) == vector_bytes // 4 and isa.lanes(8) == vector_bytes // 8
    assert {"avx512": (16, 8), "avx2": (8, 4), "portable": (4, 2)}[name] == (isa.lanes(4), isa.lanes(8))


def test_family_shapes_fit_their_register_file():
    expected = {"avx512": {(14, 2), (6, 4), (8, 3)}, "avx2": {(6, 2), (4, 3)}, "portable": {(6, 2), (4, 3)}}
    assert {isa.name: set(isa.microkernels) for isa in ISAS} == expected
    assert all(len(set(isa.microkernels)) == len(isa.microkernels) for isa in ISAS)
    for isa in ISAS:
        assert isa.default_microkernel == isa.microkernels[0]
        for mr, nv in isa.microkernels:
            # accumulators + nv B vectors + one broadcast must fit in the registers.
            assert mr * nv + nv + 1 <= isa.registers, (isa.name, mr, nv)


def test_active_family_is_one_this_host_supports():
    isa = active_isa()
    assert isa in supported_isas()
    assert supported_isas()[-1].name == "portable"


def test_cpu_device_entry_names_the_active_family():
    cpu = sparkle.devices()[0]
    assert cpu.id == "cpu"
    assert cpu.isa == active_isa().name


def run_python(script, env_value, **extra_env):
    import os

    env = dict(os.environ)
    env.pop(ISA_ENV, None)
    if env_value is not None:
        env[ISA_ENV] = env_value
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env)


def test_environment_variable_forces_a_narrower_family_in_a_new_process():
    script = """
        from sparkle.cpu.isa import active_isa, supported_isas
        print(active_isa().name, " ".join(isa.name for isa in supported_isas()))
    """
    for name in [isa.name for isa in supported_isas()]:
        result = run_python(script, name)
        assert result.returncode == 0, result.stderr
        active, supported = result.stdout.split(maxsplit=1)
        assert active == name
        assert supported.split() == [isa.name for isa in supported_isas()]
    unset = run_python(script, None)
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout.split()[0] == supported_isas()[0].name


def test_environment_variable_avx2_in_a_new_process():
    if "avx2" not in [isa.name for isa in supported_isas()]:
        pytest.skip("this CPU cannot run the avx2 family")
    result = run_python("from sparkle.cpu.isa import active_isa; print(active_isa().name)", "avx2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "avx2"


@pytest.mark.parametrize("value", ["bogus", "avx1024"])
def test_environment_variable_with_an_unknown_family_raises(value):
    result = run_python("from sparkle.cpu.isa import active_isa; active_isa()", value)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "SPARKLE_CPU_ISA" in result.stderr and value in result.stderr


def test_environment_variable_with_an_unsupported_family_raises():
    # Numba compiling for an AVX2-only target (NUMBA_CPU_FEATURES) cannot run the avx512 family.
    script = "from sparkle.cpu.isa import active_isa; active_isa()"
    result = run_python(script, "avx512", NUMBA_CPU_FEATURES="+sse2,+avx,+avx2,+fma")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "SPARKLE_CPU_ISA='avx512'" in result.stderr
    assert "['avx2', 'portable']" in result.stderr


def test_generic_target_runs_the_portable_family():
    script = "from sparkle.cpu.isa import active_isa; print(active_isa().name)"
    result = run_python(script, None, NUMBA_CPU_NAME="generic")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "portable"
    features = run_python(script, None, NUMBA_CPU_FEATURES="+sse2,+avx,+avx2,+fma")
    assert features.returncode == 0, features.stderr
    assert features.stdout.strip() == "avx2"
