#!/bin/bash
# Benchmark phi2 on one model file: prompt and generation speed, and how close generation
# comes to the machine's own memory read bandwidth.
#
#   scripts/bench.sh MODEL.bin [THREADS]        (default THREADS: all cores)
#   REPS=5 PROMPT=128 GEN=64 FLAGS=--mmap scripts/bench.sh MODEL.bin 2
#   DEPTH=1900 GEN=32 FLAGS='--kv-type f16' scripts/bench.sh MODEL.bin 2
#   MARCH=haswell LONG=1900 scripts/bench.sh MODEL.bin 2
#
# Builds ./phi2 (make phi2) and build/membw (scripts/membw.c), measures read bandwidth
# over a 300 MB buffer, then runs phi2 REPS times (default 3) with a PROMPT-token prompt
# (default 128, fixed ids) and GEN generated tokens (default 64, greedy, --ignore-eos so
# every run generates all of them) and prints the medians: prompt tok/s, generation tok/s,
# bytes of weights streamed per generated token, the effective bandwidth that gives, its
# share of the probe's, and the peak resident memory (the model's mapped pages count). The
# probe runs again after the generation runs, and shares are of the mean of the two: on a
# machine whose bandwidth drifts (a busy server, a laptop changing clocks) the two differ,
# and both are printed.
# DEPTH=N: generation deep into the context, after an N-token prompt (PROMPT=N); decode then
# also reads the KV cache, 2 x n_layers x hidden x depth numbers per token (4 bytes each with
# --kv-type f32, 2 with f16, as the timings line says), so bytes per token = weights + that
# KV cache at the mean depth of the generated tokens (N + GEN/2), and the bandwidth share
# counts both.
# Prompt speed is also shown as a share of the machine's arithmetic: build/peak
# (scripts/peak.c) measures multiply-adds per second for float32 FMA and int8 dot products
# with the instruction sets of this build, and a prompt token needs the layers' matrices'
# multiply-adds (layers x (4 hidden^2 + 2 hidden ffn): 2.52 G for Phi-2; attention and the
# lm_head, which a prompt skips but for its last token, are left out): f32 files against
# the best f32 FMA figure, q8 and q4 files against the best int8 one (AMX, which the probe
# does not measure, can exceed it).
# LONG=N (default 1024; 0: skip): also a long prompt of N tokens (REPS runs, one generated
# token each), its tok/s, share of the peak, and ratio to the PROMPT-token prompt's.
# ONESHOT=1 (the default; 0: skip): what a person waits for, exec to exit, with phi2's own
# defaults (no --no-mmap: a short run maps the weights) for a 12-token prompt and 32
# generated tokens, REPS runs: the wall time, the time to first token, and the ratio of the
# wall time to the engine's own prompt + generation time.
# MARCH=TARGET: benchmark a build for another x86 target instead of this CPU's own, e.g.
# MARCH=haswell (AVX2 + FMA: a laptop without AVX-512) or MARCH=alderlake (AVX2 + AVX-VNNI);
# phi2 and the peak probe are both built with -march=TARGET (build/phi2-TARGET,
# build/peak-TARGET), so the peak is that of the instructions the build can use.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/bench.sh MODEL.bin [THREADS]" >&2
    exit 2
fi
MODEL=$1
THREADS=${2:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)}
REPS=${REPS:-3}
DEPTH=${DEPTH:-}
PROMPT=${DEPTH:-${PROMPT:-128}}
GEN=${GEN:-64}
# Extra phi2 flags, e.g. --mmap. They come after --no-mmap: the runs measure the steady
# state of a long run, weights in huge pages, which phi2 chooses itself only from -n 512 on.
USER_FLAGS=${FLAGS:-}
FLAGS="--no-mmap $USER_FLAGS"
LONG=${LONG:-1024}
MARCH=${MARCH:-}
[ -f "$MODEL" ] || { echo "bench: no such model file: $MODEL" >&2; exit 1; }
case "$MARCH" in *[!a-z0-9_-]*) echo "bench: MARCH must be a -march name such as haswell" >&2; exit 1 ;; esac
case "$LONG" in '' | *[!0-9]*) echo "bench: LONG must be a number of tokens (0: no long prompt)" >&2; exit 1 ;; esac

cd "$(dirname "$0")/.."
mkdir -p build
if [ -z "$MARCH" ]; then
    make -s phi2 >&2
    PHI2=./phi2
    PEAK_BIN=build/peak
    PEAK_MARCH=native
else
    PHI2=build/phi2-$MARCH
    PEAK_BIN=build/peak-$MARCH
    PEAK_MARCH=$MARCH
    ${CC:-cc} -std=c11 -O3 -march="$MARCH" -fopenmp -o "$PHI2" phi2.c tokenizer.c -lm ||
        { echo "bench: cannot build phi2 with -march=$MARCH" >&2; exit 1; }
fi
if [ ! -x build/membw ] || [ scripts/membw.c -nt build/membw ]; then
    ${CC:-cc} -std=c11 -O3 -march=native -fopenmp -o build/membw scripts/membw.c 2>/dev/null ||
        ${CC:-cc} -std=c11 -O3 -o build/membw scripts/membw.c  # no OpenMP (Apple clang): one thread
fi

# Peak memory comes from /usr/bin/time: GNU's -f (Linux) or BSD's -l (macOS, in bytes).
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "bench: /usr/bin/time is needed for the peak memory" >&2; exit 1; }
if "$TIME" -f "%M" true >/dev/null 2>&1; then
    peak_rss_kb() { "$TIME" -f "bench-rss-kb %M" "$@"; }
else
    peak_rss_kb() { "$TIME" -l "$@" 2> >(awk '/maximum resident set size/ { print "bench-rss-kb", int($1 / 1024); next } { print }' >&2); }
fi
file_size() { wc -c <"$1" | tr -d ' '; }
# What ran: the CPU's name and the kernels compiled into ./phi2.
CPU=$( (grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //') || true)
[ -n "$CPU" ] || CPU=$(sysctl -n machdep.cpu.brand_string 2>/dev/null || uname -m)

# Model shape from the header (docs/FORMAT.md): hidden at 20, layers at 28 (u32 LE).
read -r HIDDEN < <(od -An -tu4 -j20 -N4 "$MODEL")
read -r LAYERS < <(od -An -tu4 -j28 -N4 "$MODEL")
read -r MAX_SEQ < <(od -An -tu4 -j44 -N4 "$MODEL")
read -r WTYPE < <(od -An -tu4 -j12 -N4 "$MODEL")
read -r FFN < <(od -An -tu4 -j24 -N4 "$MODEL")
MODEL_BYTES=$(file_size "$MODEL")
if [ $((PROMPT + GEN)) -gt "$MAX_SEQ" ]; then
    echo "bench: prompt $PROMPT + $GEN generated tokens exceed the context of $MAX_SEQ" >&2
    exit 1
fi

echo "bench: $MODEL ($((MODEL_BYTES / 1000000)) MB), $THREADS threads, prompt $PROMPT tokens${DEPTH:+ (DEPTH)}, $GEN generated, $REPS runs${FLAGS:+, flags $FLAGS}"
echo "cpu: $CPU ($(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc) logical cores); $("$PHI2" -v)${MARCH:+ (built with -march=$MARCH)}"
PROBE=$(OMP_NUM_THREADS=$THREADS build/membw 300 9)
echo "$PROBE"
PROBE_BEFORE=$(echo "$PROBE" | awk '{print $2}')
if [ ! -x "$PEAK_BIN" ] || [ scripts/peak.c -nt "$PEAK_BIN" ]; then
    ${CC:-cc} -std=c11 -O3 -march="$PEAK_MARCH" -fopenmp -o "$PEAK_BIN" scripts/peak.c 2>/dev/null ||
        ${CC:-cc} -std=c11 -O3 -o "$PEAK_BIN" scripts/peak.c
fi
PEAKS=$(OMP_NUM_THREADS=$THREADS "$PEAK_BIN" 5)
echo "$PEAKS" | grep -v checksum
# The figure prompt speed is compared with: f32 FMA for f32 files, int8 for q8 and q4.
PEAK_KIND=$([ "$WTYPE" = 0 ] && echo f32 || echo int8)
PEAK_GMAC=$(echo "$PEAKS" | awk -v k="$PEAK_KIND" '$2 == k { for (i = 3; i <= NF; i++) if ($i == "G") v = $(i - 1);
    if (v + 0 > best) best = v + 0 } END { print best + 0 }')

# Tokenizer: 100 KB of this repository's own text and code through --tokenize.
TOKTXT=$(mktemp)
while [ "$(file_size "$TOKTXT")" -lt 100000 ]; do cat README.md phi2.c >>"$TOKTXT"; done
head -c 100000 "$TOKTXT" >"$TOKTXT.cut" && mv "$TOKTXT.cut" "$TOKTXT"
make -s build/tokenizer_tool >&2
echo "tokenizer: 100 KB of README.md + phi2.c: $(build/tokenizer_tool "$MODEL" bench "$TOKTXT" 5) (best of 5)"
rm -f "$TOKTXT"

# A fixed prompt of ordinary token ids (no <|endoftext|>).
IDS=$(awk -v n="$PROMPT" 'BEGIN { for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), 1000 + (i * 7919) % 40000 }')

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for r in $(seq 1 "$REPS"); do
    peak_rss_kb "$PHI2" "$MODEL" --ids "$IDS" -n "$GEN" --temp 0 --ignore-eos -t "$THREADS" \
        --print-ids $FLAGS >/dev/null 2>"$TMP/err"
    line=$(grep '^phi2: load' "$TMP/err") || { cat "$TMP/err" >&2; exit 1; }
    rss=$(awk '/^bench-rss-kb/ {print $2}' "$TMP/err")
    # phi2: load X s | prompt N tokens, X tok/s | generated N tokens, X tok/s (X GB/s of weights) | N threads
    #       | KV cache f16, X MB | KERNELS
    echo "$line" | awk -v rss="$rss" '{
        for (i = 1; i <= NF; i++) {
            if ($i == "prompt") pp = $(i + 3);
            if ($i == "generated") { ng = $(i + 1); tg = $(i + 3); gbs = substr($(i + 5), 2) }
            if ($i == "KV" && $(i + 1) == "cache") { kvt = substr($(i + 2), 1, 3); kvmb = $(i + 3) }
        }
        printf "%s %s %s %s %s %s %s\n", pp, tg, gbs, rss, ng, kvt, kvmb
    }' >>"$TMP/runs"
    echo "  run $r: $line | peak RSS $((rss / 1024)) MB"
done

PROBE=$(OMP_NUM_THREADS=$THREADS build/membw 300 9)
echo "after the runs: $PROBE"
PROBE_AFTER=$(echo "$PROBE" | awk '{print $2}')
PROBE_GBS=$(awk -v a="$PROBE_BEFORE" -v b="$PROBE_AFTER" 'BEGIN { printf "%.1f", (a + b) / 2 }')

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
PP=$(awk '{print $1}' "$TMP/runs" | median)
TG=$(awk '{print $2}' "$TMP/runs" | median)
GBS=$(awk '{print $3}' "$TMP/runs" | median)
RSS=$(awk '{print $4}' "$TMP/runs" | median)
KV_TYPE=$(awk 'NR == 1 {print $6}' "$TMP/runs")
KV_BYTES=$(awk 'NR == 1 {printf "%.0f", $7 * 1e6}' "$TMP/runs")
awk -v pp="$PP" -v tg="$TG" -v gbs="$GBS" -v probe="$PROBE_GBS" -v rss="$RSS" -v model="$MODEL_BYTES" \
    -v kv="$KV_BYTES" -v kvt="$KV_TYPE" -v reps="$REPS" -v depth="$DEPTH" -v gen="$GEN" -v layers="$LAYERS" \
    -v hidden="$HIDDEN" -v ffn="$FFN" -v peak="$PEAK_GMAC" -v peakkind="$PEAK_KIND" \
    -v before="$PROBE_BEFORE" -v after="$PROBE_AFTER" 'BEGIN {
    printf "median of %d runs:\n", reps
    gmac = layers * (4 * hidden * hidden + 2 * hidden * ffn) / 1e9
    printf "  prompt      %8.2f tok/s = %.1f G MAC/s = %.0f%% of the %.1f G MAC/s %s peak\n", pp, pp * gmac,
        (peak > 0 ? 100 * pp * gmac / peak : 0), peak, peakkind
    printf "  generation  %8.2f tok/s%s\n", tg, (depth != "" ? " after a " depth "-token prompt" : "")
    wmb = tg > 0 ? gbs * 1000 / tg : 0
    printf "  weights     %8.1f MB per generated token\n", wmb
    if (depth == "") {
        printf "  bandwidth   %8.1f GB/s effective = %.0f%% of the %.1f GB/s read probe (before %.1f, after %.1f)\n", gbs,
            100 * gbs / probe, probe, before, after
    } else {
        d = depth + gen / 2; elem = (kvt == "f16" ? 2 : 4)
        kvmb = 2 * layers * hidden * d * elem / 1e6
        printf "  KV cache    %8.1f MB per generated token (%s, 2 x %d layers x %d x mean depth %d x %d bytes)\n",
            kvmb, kvt, layers, hidden, d, elem
        printf "  read        %8.1f MB per generated token = weights + KV cache\n", wmb + kvmb
        bw = (wmb + kvmb) * tg / 1000
        printf "  bandwidth   %8.1f GB/s effective = %.0f%% of the %.1f GB/s read probe (before %.1f, after %.1f)\n", bw,
            100 * bw / probe, probe, before, after
    }
    printf "  peak RSS    %8.0f MB = model %.0f MB + KV cache %.0f MB (%s) + %.0f MB\n", rss / 1024, model / 1048576,
        kv / 1048576, kvt, (rss * 1024 - model - kv) / 1048576
}'

# Long prompt: LONG tokens through prefill (attention over the whole prompt adds to the
# matrices' arithmetic), compared with the PROMPT-token prompt above.
if [ "$LONG" -gt 0 ] && [ "$LONG" -ne "$PROMPT" ]; then
    if [ "$LONG" -ge "$MAX_SEQ" ]; then
        echo "bench: LONG=$LONG does not fit the context of $MAX_SEQ (LONG=0 skips it)" >&2
        exit 1
    fi
    LONG_IDS=$(awk -v n="$LONG" 'BEGIN { for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), 1000 + (i * 7919) % 40000 }')
    for r in $(seq 1 "$REPS"); do
        "$PHI2" "$MODEL" --ids "$LONG_IDS" -n 1 --temp 0 --ignore-eos -t "$THREADS" --print-ids $FLAGS \
            >/dev/null 2>"$TMP/err"
        line=$(grep '^phi2: load' "$TMP/err") || { cat "$TMP/err" >&2; exit 1; }
        echo "$line" | awk '{ for (i = 1; i <= NF; i++) if ($i == "prompt") print $(i + 3) }' >>"$TMP/long"
        echo "  long prompt run $r: $line"
    done
    awk -v lp="$(median <"$TMP/long")" -v pp="$PP" -v n="$LONG" -v short="$PROMPT" -v reps="$REPS" -v layers="$LAYERS" \
        -v hidden="$HIDDEN" -v ffn="$FFN" -v peak="$PEAK_GMAC" -v peakkind="$PEAK_KIND" 'BEGIN {
        gmac = layers * (4 * hidden * hidden + 2 * hidden * ffn) / 1e9
        printf "long prompt, median of %d runs:\n", reps
        printf "  prompt      %8.2f tok/s for %d tokens = %.0f%% of the %.1f G MAC/s %s peak, %.0f%% of the %d-token rate\n",
            lp, n, (peak > 0 ? 100 * lp * gmac / peak : 0), peak, peakkind, (pp > 0 ? 100 * lp / pp : 0), short
    }'
fi

# One-shot: exec to exit with the defaults.
if [ "${ONESHOT:-1}" = 1 ]; then
    SHORT_IDS=$(echo "$IDS" | cut -d, -f1-12)
    for r in $(seq 1 "$REPS"); do
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        "$PHI2" "$MODEL" --ids "$SHORT_IDS" -n 32 --temp 0 --ignore-eos -t "$THREADS" --print-ids $USER_FLAGS \
            >/dev/null 2>"$TMP/err"
        t1=$(date +%s.%N)
        line=$(grep '^phi2: load' "$TMP/err") || { cat "$TMP/err" >&2; exit 1; }
        # compute = prompt tokens / prompt tok/s + the tokens fed back / generation tok/s
        echo "$line" | awk -v wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" '{
            for (i = 1; i <= NF; i++) {
                if ($i == "prompt") { np = $(i + 1); pp = $(i + 3) }
                if ($i == "generated") { ng = $(i + 1); tg = $(i + 3) }
                if ($i == "first" && $(i + 1) == "token") ft = $(i + 3)
            }
            compute = (pp > 0 ? np / pp : 0) + (tg > 0 ? (ng - 1) / tg : 0)
            printf "%.3f %.3f %.3f\n", wall, compute, ft
        }' >>"$TMP/oneshot"
        echo "  one-shot run $r: $line"
    done
    awk -v reps="$REPS" '{ w[NR] = $1; c[NR] = $2; f[NR] = $3; r[NR] = ($2 > 0 ? $1 / $2 : 0) }
        function med(a,   n, i, j, t) { n = NR; for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
            if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t } return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
        END { printf "one-shot (12-token prompt, 32 generated, default load path), median of %d runs:\n", reps
              printf "  wall        %8.2f s exec to exit = %.2fx the engine'"'"'s prompt + generation time (%.2f s); first token at %.2f s\n",
                     med(w), med(r), med(c), med(f) }' "$TMP/oneshot"
fi

# Busy-core mode, BUSY=1 scripts/bench.sh MODEL.bin 2: how generation holds up when another program keeps one core
# busy (a laptop compiling or playing a video). A shell loop pinned to core BUSY_CPU
# (default: the last one) spins while phi2 generates REPS times with THREADS threads and
# REPS times with -t 1, interleaved, under that same load; then both medians and their
# ratio. (Threads that claim rows in chunks and sleep while idle keep THREADS ahead of 1.)
if [ "${BUSY:-0}" = 1 ]; then
    command -v taskset >/dev/null || { echo "bench: BUSY=1 needs taskset (Linux, util-linux)" >&2; exit 1; }
    BUSY_CPU=${BUSY_CPU:-$(( $(getconf _NPROCESSORS_ONLN) - 1 ))}
    taskset -c "$BUSY_CPU" sh -c 'while :; do :; done' &
    SPINNER=$!
    trap 'kill "$SPINNER" 2>/dev/null; rm -rf "$TMP"' EXIT
    echo "busy: core $BUSY_CPU kept busy by a spinning process (pid $SPINNER)"
    for r in $(seq 1 "$REPS"); do
        for t in "$THREADS" 1; do
            "$PHI2" "$MODEL" --ids "$IDS" -n "$GEN" --temp 0 --ignore-eos -t "$t" --print-ids $FLAGS \
                >/dev/null 2>"$TMP/err"
            line=$(grep '^phi2: load' "$TMP/err") || { cat "$TMP/err" >&2; exit 1; }
            echo "$line" | awk '{ for (i = 1; i <= NF; i++) if ($i == "generated") print $(i + 3) }' >>"$TMP/busy-t$t"
            echo "  busy run $r, -t $t: $line"
        done
    done
    kill "$SPINNER"
    wait "$SPINNER" 2>/dev/null || true
    TG_N=$(median <"$TMP/busy-t$THREADS")
    TG_1=$(median <"$TMP/busy-t1")
    awk -v n="$THREADS" -v tn="$TG_N" -v t1="$TG_1" -v reps="$REPS" 'BEGIN {
        printf "busy core, median of %d runs:\n", reps
        printf "  generation  %8.2f tok/s with %s threads, %.2f tok/s with 1: %.2fx\n", tn, n, t1, (t1 > 0 ? tn / t1 : 0)
    }'
fi
