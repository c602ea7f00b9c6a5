"""Kernel unit tests: runs the compiled test program (tests/test_kernels.c).

KERNEL_TEST_BIN names the binary (default build/test_kernels; make test-sanitize and
make test-portable pass their own builds). It checks every fast kernel of its build against
the scalar twin and ends with "test_kernels: N checks, N failed".
"""
import os
import re

from common import REPO, run

BIN = os.environ.get("KERNEL_TEST_BIN", os.path.join(REPO, "build", "test_kernels"))


def test_kernels_match_scalar_twins():
    """Every fast kernel of the build equals its scalar twin, the heap top-k equals a full
    sort, and the AMX kernel is checked wherever the CPU has AMX (or reported as not covered)."""
    assert os.path.isfile(BIN), f"{BIN} is missing: build it with make {os.path.relpath(BIN, REPO)}"
    p = run([BIN], check=False, timeout=900)
    lines = p.out.strip().splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert p.returncode == 0 and not failures, \
        f"{BIN} -> exit {p.returncode}\n" + "\n".join(failures[:20]) + "\n" + p.err[-2000:]
    m = re.fullmatch(r"test_kernels: (\d+) checks, (\d+) failed", lines[-1] if lines else "")
    assert m, f"unexpected last line from {BIN}: {lines[-1:]!r}\n{p.err[-2000:]}"
    assert int(m.group(1)) > 100 and int(m.group(2)) == 0, lines[-1]
    # every kernel family of the build reported ok
    for family in ("quantization", "matmul_f32_scalar", "matmul_q8_scalar", "matmul_q4_scalar",
                   "matmul dispatch", "f16 conversion", "f32_to_f16_row", "f16_to_f32_row", "dot_f32_f16",
                   "attention_blocked (kv f32)", "attention_blocked (kv f16)", "select_top_k",
                   "thread pool"):
        assert any(line.startswith("ok") and family in line for line in lines), f"no ok line for {family}:\n{p.out}"
    # AMX: checked, or said plainly why not; on a CPU with AMX a native build must check it
    amx_ok = any(line.startswith("ok") and "matmul_q8_amx" in line for line in lines)
    not_covered = [line for line in lines if line.startswith("not covered: matmul_q8_amx")]
    assert amx_ok != bool(not_covered), f"AMX neither checked nor reported as not covered:\n{p.out}"
    for line in not_covered:
        print(f"     {line}")
    # (an aarch64 build run under qemu on an x86 host with AMX has no AMX kernel to check)
    if (cpu_flags() & {"amx_int8", "amx_tile"} == {"amx_int8", "amx_tile"} and "scalar kernels only" not in lines[0]
            and "aarch64" not in lines[0]):
        assert amx_ok, f"this CPU has AMX-INT8 (/proc/cpuinfo) but {BIN} did not check matmul_q8_amx:\n{p.out}"


def cpu_flags():
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
