"""Threads: the default count (one per performance core, one per physical core, within the
affinity mask), what overrides it, and the OpenMP wait policy.

The detection reads Linux's /sys; PHI2_SYSFS_ROOT points it at a fake tree instead, so each
test lays out the /sys of another machine (hybrid Intel, SMT, Arm big.LITTLE, no
information) and reads the thread count and its reason from the timings line,
"| 4 threads (performance cores) |".
"""
import os
import re
import shutil
import subprocess
import sys

from common import PHI2, WORK, Skip, checkpoint, converted


LINUX = sys.platform.startswith("linux")


def require_linux():
    if not LINUX:
        raise Skip("not Linux: the /sys layouts do not apply")


NO_OPENMP = "prompts on 1: built without OpenMP"

_test_build = []


def require_test_build():
    """The fake /sys needs the test-only hooks (-DPHI2_TEST_HOOKS), which -v names."""
    if not _test_build:
        p = subprocess.run([PHI2, "-v"], capture_output=True, timeout=60)
        _test_build.append(b", test build)" in p.stdout)
    if not _test_build[0]:
        raise Skip("not a test build (no PHI2_SYSFS_ROOT): make test runs build/phi2-test")


def run_threads(*flags, sysfs=None, env=None, cpus=None, note=None):
    """Generate one token with the tiny model; return (threads, reason) from the timings line.
    cpus: the affinity mask to start it with (Linux); note: a list to append the line's note
    to (a build without OpenMP says NO_OPENMP after the reason, when it has threads)."""
    e = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "PHI2_SYSFS_ROOT"):
        e.pop(name, None)
    if sysfs is not None:
        e["PHI2_SYSFS_ROOT"] = sysfs
    e.update(env or {})
    cmd = [PHI2, converted(checkpoint()), "--ids", "1,2", "-n", "1", *map(str, flags)]
    p = subprocess.run(cmd, capture_output=True, env=e, timeout=120,
                       preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err[-1000:]
    m = re.search(r"\| (\d+) (threads?) \(([^)]*)\) \|", err)
    assert m, err[-500:]
    assert (m.group(2) == "thread") == (m.group(1) == "1"), m.group(0)  # "1 thread", "2 threads"
    reason, _, said = m.group(3).partition("; ")
    assert said in ("", NO_OPENMP) and (said == "" or m.group(1) != "1"), m.group(0)
    if note is not None:
        note.append(said)
    return int(m.group(1)), reason


def built_with_openmp():
    note = []
    run_threads("-t", 2, note=note)
    return note != [NO_OPENMP]


def fake_sysfs(name, cpus, siblings=None, max_freq=None, files=None):
    """A /sys tree under WORK: cpus online, siblings[cpu] its thread_siblings_list, max_freq[cpu]
    in kHz, files: other paths (relative to the root) and their contents."""
    require_test_build()
    root = os.path.join(WORK, "sysfs-" + name)
    shutil.rmtree(root, ignore_errors=True)

    def write(path, text):
        full = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text + "\n")

    cpu_dir = "sys/devices/system/cpu"
    write(f"{cpu_dir}/online", f"0-{cpus - 1}")
    for c, s in (siblings or {}).items():
        write(f"{cpu_dir}/cpu{c}/topology/thread_siblings_list", s)
    for c, f in (max_freq or {}).items():
        write(f"{cpu_dir}/cpu{c}/cpufreq/cpuinfo_max_freq", str(f))
    for path, text in (files or {}).items():
        write(path, text)
    return root


def test_hybrid_intel_counts_physical_performance_cores():
    """A 16-thread hybrid part: 4 performance cores with SMT (CPUs 0-7, siblings 0-1, 2-3, ...)
    listed in /sys/devices/cpu_core/cpus, 8 efficiency cores (8-15): 4 threads."""
    require_linux()
    siblings = {c: f"{c & ~1}-{c | 1}" for c in range(8)}
    siblings.update({c: str(c) for c in range(8, 16)})
    root = fake_sysfs("hybrid", 16, siblings, files={"sys/devices/cpu_core/cpus": "0-7",
                                                      "sys/devices/cpu_atom/cpus": "8-15"})
    assert run_threads(sysfs=root) == (4, "performance cores")


def test_smt_machine_counts_physical_cores():
    """8 logical CPUs on 4 cores (siblings 0,4  1,5  2,6  3,7, as Linux numbers them): 4."""
    require_linux()
    root = fake_sysfs("smt", 8, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert run_threads(sysfs=root) == (4, "physical cores")


def test_big_little_counts_the_fast_cores():
    """Arm big.LITTLE: 4 cores at 2.0 GHz and 4 at 3.0 GHz (by cpuinfo_max_freq), no SMT: 4.
    Cores whose top clocks differ by a few percent (boost bins) are all fast ones."""
    require_linux()
    freq = {c: 2000000 if c < 4 else 3000000 for c in range(8)}
    root = fake_sysfs("biglittle", 8, {c: str(c) for c in range(8)}, freq)
    assert run_threads(sysfs=root) == (4, "performance cores")
    freq = {c: 5700000 if c < 3 else 5450000 for c in range(6)}
    root = fake_sysfs("boost", 6, {c: str(c) for c in range(6)}, freq)
    assert run_threads(sysfs=root) == (6, "all cores")


def test_machine_without_topology_uses_every_cpu():
    """No topology or clock information: every online CPU (here 6). On this machine, with
    the real /sys, the affinity mask limits the count (one CPU: 1 thread)."""
    require_linux()
    assert run_threads(sysfs=fake_sysfs("plain", 6)) == (6, "all cores")
    n, why = run_threads(cpus={min(os.sched_getaffinity(0))})
    assert n == 1, (n, why)
    n, _ = run_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0)), n


def test_threads_flag_wins():
    """-t decides over the detection."""
    root = fake_sysfs("smt-override", 8, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}) if LINUX else None
    assert run_threads("-t", 3, sysfs=root) == (3, "-t")


def test_omp_num_threads_wins_over_detection_not_over_the_flag():
    """OMP_NUM_THREADS decides over the detection, -t over OMP_NUM_THREADS."""
    if not built_with_openmp():
        raise Skip("built without OpenMP: OMP_NUM_THREADS is not read")
    root = fake_sysfs("smt-override", 8, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}) if LINUX else None
    assert run_threads(sysfs=root, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert run_threads("-t", 2, sysfs=root, env={"OMP_NUM_THREADS": "3"}) == (2, "-t")


def test_one_thread_is_singular():
    assert run_threads("-t", 1) == (1, "-t")


def spin_settings(env):
    """The OpenMP runtime's spin settings, as it prints them at start (OMP_DISPLAY_ENV)."""
    e = dict(os.environ, OMP_DISPLAY_ENV="verbose", **env)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        if name not in env:
            e.pop(name, None)
    p = subprocess.run([PHI2, converted(checkpoint()), "--ids", "1,2", "-n", "1"], capture_output=True, env=e,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-1000:]
    text = p.stderr.decode("utf-8", "replace")
    # libgomp (GCC) prints GOMP_SPINCOUNT, libomp (LLVM) KMP_BLOCKTIME; the last one printed
    # is the one that ran (a libgomp build prints once before it restarts itself).
    found = re.findall(r"(GOMP_SPINCOUNT|KMP_BLOCKTIME)\s*=\s*'(\d+)", text)
    return found[-1] if found else None


def test_idle_threads_sleep_unless_the_user_says_otherwise():
    """Without OMP_WAIT_POLICY, idle threads spin only briefly (libgomp: GOMP_SPINCOUNT 1000;
    libomp: block time 0): a long-spinning thread on a core another program uses holds up
    every parallel loop. A policy the user sets is kept."""
    got = spin_settings({})
    if got is None:
        raise Skip("this OpenMP runtime does not print its settings" if built_with_openmp() else
                   "built without OpenMP")
    assert got == ("GOMP_SPINCOUNT", "1000") or got == ("KMP_BLOCKTIME", "0"), got
    active = spin_settings({"OMP_WAIT_POLICY": "active"})
    assert int(active[1]) > 1000, active


def load_mode(*flags, available_kb=None):
    """'in memory, WHY' or 'mapped, WHY', from the timings line ("phi2: load 0.01 s (mapped,
    a short run) | ..."); available_kb: MemAvailable of a fake /proc/meminfo."""
    env = {}
    if available_kb is not None:
        root = fake_sysfs(f"meminfo-{available_kb}", 2, files={"proc/meminfo": f"MemTotal: 99999999 kB\nMemFree: 1 kB\n"
                                                                                f"MemAvailable: {available_kb} kB"})
        env["PHI2_SYSFS_ROOT"] = root
    e = dict(os.environ, **env)
    if available_kb is None:
        e.pop("PHI2_SYSFS_ROOT", None)
    # -c 8: a long run (-n 512, -n -1) ends when these few positions are full
    p = subprocess.run([PHI2, converted(checkpoint()), "--ids", "1,2", "-c", "8", "-n", "1", *flags], capture_output=True,
                       env=e, timeout=120)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err[-1000:]
    m = re.search(r"^phi2: load [0-9.]+ s \(([a-z ]+, [^)]+)\)", err, re.M)
    assert m, err[-500:]
    return m.group(1)


def test_load_path_follows_the_run_length():
    """By default a short run maps the weights (instant start) and a long one (-n 512 or
    more, -n -1) reads them into memory (huge pages: faster decode) when they fit with room
    to spare, else maps them; --mmap and --no-mmap decide regardless."""
    require_linux()
    size_kb = os.path.getsize(converted(checkpoint())) // 1024
    roomy = size_kb + (4 << 20)  # 4 GB to spare
    assert load_mode() == "mapped, a short run"
    assert load_mode("-n", "511", available_kb=roomy) == "mapped, a short run"
    assert load_mode("-n", "512", available_kb=roomy) == "in memory, a long run"
    assert load_mode("-n", "-1", available_kb=roomy) == "in memory, a long run"
    assert load_mode("-n", "-1", available_kb=size_kb + 1024) == "mapped, too little free memory to copy"
    assert load_mode("-n", "-1", available_kb=0) == "mapped, too little free memory to copy"
    assert load_mode("-n", "-1", "--mmap", available_kb=roomy) == "mapped, --mmap"
    assert load_mode("--no-mmap", available_kb=1024) == "in memory, --no-mmap"
    assert load_mode("--no-mmap", "--mmap", available_kb=roomy) == "mapped, --mmap"  # the last one wins
