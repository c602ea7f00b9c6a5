#!/usr/bin/env bash
# Runs the libFuzzer harnesses built by the Makefile (build/fuzz/fuzz_<harness>).
#
#   tests/fuzz/run.sh fuzz HARNESS...     fuzz each for $FUZZ_SECONDS (default 60) seconds,
#                                         $FUZZ_JOBS (default 2) at a time
#   tests/fuzz/run.sh regress HARNESS...  run each once over its committed corpus and its
#                                         regression inputs, no fuzzing
#
# Fuzzing starts from tests/fuzz/corpus/<harness>/ and tests/fuzz/regressions/<harness>/
# (so every regression input is run first) but writes the new inputs it finds to the
# scratch folder build/fuzz/work/<harness>/, never to the committed corpus; the next run
# starts from those too (rm -rf build/fuzz/work to start afresh). A crash, leak,
# sanitizer report, timeout (-timeout, seconds per input) or out-of-memory is saved under
# build/fuzz/artifacts/<harness>/ and makes the run fail. Each harness's log is
# build/fuzz/<harness>.log; the executions per harness (libFuzzer's -print_final_stats) are
# printed at the end. -close_fd_mask=2 hides the engine's one-line errors (one per rejected
# input); libFuzzer's and the sanitizers' reports still reach the log.
#
# To fuzz longer: make fuzz FUZZ_SECONDS=3600. To keep what a long run found as seeds,
# minimize it first: build/fuzz/fuzz_<h> -merge=1 tests/fuzz/corpus/<h> build/fuzz/work/<h>
set -uo pipefail
cd "$(dirname "$0")/../.."

mode=${1:-}
shift || true
if [ "$mode" != fuzz ] && [ "$mode" != regress ] || [ $# -eq 0 ]; then
    echo "usage: tests/fuzz/run.sh fuzz|regress HARNESS..." >&2
    exit 2
fi
seconds=${FUZZ_SECONDS:-60}
jobs=${FUZZ_JOBS:-2}
timeout_s=${FUZZ_TIMEOUT:-10}
export PHI2_FUZZ_TOKENIZER=${PHI2_FUZZ_TOKENIZER:-build/fuzz/phi2.tokenizer}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

run_one() {
    local h=$1 bin=build/fuzz/fuzz_$1 log=build/fuzz/$1.log
    local opts=(-close_fd_mask=2 -timeout="$timeout_s" -rss_limit_mb=2048 -print_final_stats=1
                -artifact_prefix=build/fuzz/artifacts/$h/)
    [ -f "tests/fuzz/$h.dict" ] && opts+=(-dict="tests/fuzz/$h.dict")
    rm -rf "build/fuzz/artifacts/$h"  # only this run's findings
    mkdir -p "build/fuzz/artifacts/$h"
    if [ ! -x "$bin" ]; then
        echo "$bin is missing: build it with make (needs clang)" >"$log"
        return 1
    fi
    if [ "$mode" = fuzz ]; then
        mkdir -p "build/fuzz/work/$h"  # kept between runs: each run goes on from the last
        local dirs=("build/fuzz/work/$h" "tests/fuzz/corpus/$h")
        [ -d "tests/fuzz/regressions/$h" ] && dirs+=("tests/fuzz/regressions/$h")
        "$bin" "${opts[@]}" -max_total_time="$seconds" "${dirs[@]}" >"$log" 2>&1
    else
        # Files, not folders: libFuzzer runs each once and writes nothing.
        local files=()
        while IFS= read -r -d '' f; do files+=("$f"); done < <(
            find "tests/fuzz/corpus/$h" "tests/fuzz/regressions/$h" -type f ! -name '*.md' -print0 2>/dev/null | sort -z)
        if [ ${#files[@]} -eq 0 ]; then
            echo "no inputs for $h under tests/fuzz/corpus/$h" >"$log"
            return 1
        fi
        "$bin" "${opts[@]}" "${files[@]}" >"$log" 2>&1
    fi
}

# Up to $jobs harnesses at a time; each one's status is kept in build/fuzz/<h>.rc.
mkdir -p build/fuzz
running=0
for h in "$@"; do
    rm -f "build/fuzz/$h.rc"
    (run_one "$h"; echo $? >"build/fuzz/$h.rc") &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

failed=0
for h in "$@"; do
    rc=$(cat "build/fuzz/$h.rc" 2>/dev/null || echo 1)
    log=build/fuzz/$h.log
    if [ "$mode" = fuzz ]; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        added=$(sed -n 's/^stat::new_units_added: *//p' "$log")
        printf 'fuzz_%-12s %s executions in %ss (%s/s), %s new inputs' "$h" "${execs:-?}" "$seconds" "${rate:-?}" "${added:-?}"
    else
        ran=$(grep -c '^Executed ' "$log")
        printf 'fuzz_%-12s %s inputs replayed' "$h" "$ran"
    fi
    if [ "$rc" = 0 ]; then
        echo ": ok"
    else
        failed=1
        echo ": FAILED (exit status $rc), log $log:"
        grep -v '^"' "$log" | tail -n 40 | sed 's/^/    /'
        ls build/fuzz/artifacts/"$h"/* 2>/dev/null | sed 's/^/    saved input: /'
    fi
done
exit $failed
