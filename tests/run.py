#!/usr/bin/env python3
"""Minimal test runner: runs every `test_*` function of every `tests/test_*.py` module.

Usage: tests/run.py [-k SUBSTRING] [--skip MODULE.TEST ...] [--engine-only] [MODULE ...]
Each test is a plain function that raises (usually AssertionError) on failure, or
common.Skip when it cannot run on this host. The last line printed is "N passed, N failed,
N skipped", followed by the skipped tests' names, if any. Exit status is non-zero if any
test failed or if none passed. --skip (repeatable) leaves out one test by its full name,
e.g. for a platform it cannot apply to; it counts as skipped. --engine-only leaves out the tests
whose outcome cannot depend on the build under test (common.same_for_every_build): for the
runs of further builds after `make test`; their count is printed. Environment: PHI2_BIN selects the engine
binary (default ./phi2); PHI2_TEST_WORK the test-data folder; PHI2_TEST_KEEP=1 keeps that folder
after a run that passed (a failed run always keeps it).
"""
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402 -- after the path is set


def main():
    args = sys.argv[1:]
    pattern = None
    skip = set()
    engine_only = False
    while args and args[0] == "--engine-only" or len(args) >= 2 and args[0] in ("-k", "--skip"):
        if args[0] == "--engine-only":
            engine_only = True
            args = args[1:]
            continue
        if args[0] == "-k":
            pattern = args[1]
        else:
            skip.add(args[1])
        args = args[2:]
    modules = args or sorted(f[:-3] for f in os.listdir(HERE) if f.startswith("test_") and f.endswith(".py"))
    passed = failed = same_for_every_build = 0
    skipped = []  # full names, in order
    t_start = time.time()
    for mod_name in modules:
        mod_name = os.path.basename(mod_name)
        mod_name = mod_name[:-3] if mod_name.endswith(".py") else mod_name
        spec = importlib.util.spec_from_file_location(mod_name, os.path.join(HERE, mod_name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        tests = [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and callable(f)]
        tests.sort(key=lambda nf: nf[1].__code__.co_firstlineno)
        for name, fn in tests:
            full = f"{mod_name}.{name}"
            if pattern and pattern not in full:
                continue
            if engine_only and (getattr(mod, "SAME_FOR_EVERY_BUILD", False)
                                or getattr(fn, "same_for_every_build", False)):
                same_for_every_build += 1
                continue
            if full in skip:
                skip.discard(full)
                skipped.append(full)
                print(f"skip {full} (--skip)", flush=True)
                continue
            t0 = time.time()
            try:
                fn()
            except common.Skip as e:
                skipped.append(full)
                print(f"skip {full} ({time.time() - t0:.1f}s): {e}", flush=True)
            except Exception as e:  # noqa: BLE001 -- report every failure and go on
                failed += 1
                print(f"FAIL {full} ({time.time() - t0:.1f}s): {type(e).__name__}: {e}", flush=True)
                if os.environ.get("VERBOSE"):
                    traceback.print_exc()
            else:
                passed += 1
                print(f"ok   {full} ({time.time() - t0:.1f}s)", flush=True)
            common.prune_work()
    for name in sorted(skip):  # a --skip that matched nothing: a renamed test, say so
        failed += 1
        print(f"FAIL --skip {name}: no such test", flush=True)
    if same_for_every_build:
        print(f"# --engine-only: left out {same_for_every_build} tests that do not depend on the build "
              "(make test runs them)")
    print(f"# {time.time() - t_start:.0f}s in all")
    print(f"{passed} passed, {failed} failed, {len(skipped)} skipped" + (f": {' '.join(skipped)}" if skipped else ""))
    if not failed and not os.environ.get("PHI2_TEST_KEEP"):
        common.remove_work()   # a run that passed leaves no test data behind (see common.py)
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
