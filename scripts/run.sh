#!/usr/bin/env bash
# From a fresh clone to a model answering a prompt, in one command:
#
#   scripts/run.sh [--dtype q8|q4|f32] [--model FILE] [--repo ORG/NAME] [--revision REV]
#                  [--dir DIR] [--from HF_DIR] [phi2 options, e.g. -p PROMPT -n 64]
#
# 1. builds ./phi2 (make -s phi2; nothing to do when it is up to date; PHI2_BIN: use that
#    binary instead, no build);
# 2. if the model file (--model, else $PHI2_MODEL, else phi2.q8.bin / .q4.bin / .f32.bin in the
#    repository root) is missing: downloads the checkpoint (scripts/download.py: --repo,
#    default microsoft/phi-2, 5.6 GB, into --dir, default phi-2/ in the repository root;
#    an existing Hugging Face cache is used instead when it holds the files) or takes the
#    folder of --from, converts it (scripts/convert.py --dtype), and for microsoft/phi-2
#    checks the result against Hugging Face's published logits (scripts/selfcheck.py; a
#    failure is reported, the model file is kept);
# 3. runs ./phi2 MODEL with the remaining options; without -p/-f/--ids, an Instruct: example
#    with --stop Instruct:.
#
# HF_ENDPOINT (a mirror) and HF_TOKEN (private or gated repositories) are read by
# scripts/download.py. PYTHON: the Python 3 with numpy to use (default: python3 if it has
# numpy, else /usr/bin/python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ID=microsoft/phi-2
REVISION=main
DTYPE=q8
DIR=
FROM=
MODEL=${PHI2_MODEL:-}
PASS=()
HAVE_PROMPT=0

die() { echo "run.sh: error: $*" >&2; exit 1; }
need_value() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dtype)    need_value "$1" $#; DTYPE=$2; shift 2 ;;
        --model)    need_value "$1" $#; MODEL=$2; shift 2 ;;
        --repo)     need_value "$1" $#; REPO_ID=$2; shift 2 ;;
        --revision) need_value "$1" $#; REVISION=$2; shift 2 ;;
        --dir)      need_value "$1" $#; DIR=$2; shift 2 ;;
        --from)     need_value "$1" $#; FROM=$2; shift 2 ;;
        -h|--help)  sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -p|--prompt|-f|--file|--ids)
                    HAVE_PROMPT=1; PASS+=("$1"); shift
                    if [ $# -gt 0 ]; then PASS+=("$1"); shift; fi ;;
        *)          PASS+=("$1"); shift ;;
    esac
done
case "$DTYPE" in q8|q4|f32) ;; *) die "--dtype must be q8, q4 or f32, not '$DTYPE'" ;; esac
MODEL=${MODEL:-$ROOT/phi2.$DTYPE.bin}
DIR=${DIR:-$ROOT/${REPO_ID##*/}}

# The engine.
if [ -n "${PHI2_BIN:-}" ]; then
    BIN=$PHI2_BIN
else
    command -v make >/dev/null || die "make not found (install make and a C compiler)"
    make -s -C "$ROOT" phi2 >&2 || die "building ./phi2 failed (a C compiler is needed: cc, gcc or clang)"
    BIN=$ROOT/phi2
fi

# The model file.
if [ ! -f "$MODEL" ]; then
    if [ -z "${PYTHON:-}" ]; then
        for p in python3 /usr/bin/python3; do
            if command -v "$p" >/dev/null && "$p" -c 'import numpy' 2>/dev/null; then PYTHON=$p; break; fi
        done
        [ -n "${PYTHON:-}" ] || die "converting needs Python 3 with numpy (pip install numpy, or apt install python3-numpy)"
    fi
    case "$DTYPE" in q8) OUT_SIZE="3.0 GB" ;; q4) OUT_SIZE="1.7 GB" ;; *) OUT_SIZE="11.1 GB" ;; esac
    if [ -n "$FROM" ]; then
        HF_DIR=$FROM
        echo "run.sh: $MODEL is missing: converting $HF_DIR to it" >&2
    else
        if [ "$REPO_ID" = microsoft/phi-2 ]; then
            echo "run.sh: $MODEL is missing: downloading $REPO_ID (5.6 GB) into $DIR," \
                 "then converting to $MODEL ($OUT_SIZE)" >&2
        else
            echo "run.sh: $MODEL is missing: downloading $REPO_ID into $DIR, then converting to $MODEL" >&2
        fi
        HF_DIR=$("$PYTHON" "$ROOT/scripts/download.py" "$REPO_ID" --revision "$REVISION" --dir "$DIR") \
            || exit $?
    fi
    "$PYTHON" "$ROOT/scripts/convert.py" "$HF_DIR" "$MODEL" --dtype "$DTYPE" || exit $?
    if [ "$REPO_ID" = microsoft/phi-2 ] && [ -z "$FROM" ]; then
        echo "run.sh: checking $MODEL against Hugging Face's published Phi-2 logits (scripts/selfcheck.py)" >&2
        if "$PYTHON" "$ROOT/scripts/selfcheck.py" "$MODEL" --phi2 "$BIN" >&2; then
            echo "run.sh: selfcheck passed" >&2
        else
            echo "run.sh: warning: selfcheck FAILED: the engine's logits differ from the published ones" \
                 "(the model file is kept; please report it)" >&2
        fi
    fi
    echo "run.sh: model ready: $MODEL (converted from $HF_DIR)" >&2
fi

if [ "$HAVE_PROMPT" = 0 ]; then
    PASS=(-p $'Instruct: Write a haiku about caches.\nOutput:' -n 64 --stop Instruct: "${PASS[@]}")
fi
exec "$BIN" "$MODEL" "${PASS[@]}"
