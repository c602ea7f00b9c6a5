#!/bin/sh
# Checks an aarch64 build's disassembly for the int8 instructions of its level (make check-arm-asm):
#   tests/arm_asm.sh OBJDUMP BINARY LEVEL      LEVEL: v8 | dotprod | i8mm
# v8: NEON widening multiply-accumulate (smull + sadalp on vector registers), no sdot/smmla;
# dotprod: sdot, no smmla; i8mm: sdot and smmla. Prints which functions hold them.
set -eu
objdump=$1 bin=$2 level=$3
dis=$($objdump -d "$bin") || { echo "FAIL $bin: $objdump -d failed"; exit 1; }
counts=$(printf '%s\n' "$dis" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $2 }
    { split($0, f, "\t") }
    f[3] ~ /^(sdot|smmla|sadalp)$/ && f[4] ~ /^v/ { n[f[3]]++; where[f[3]] = where[f[3]] " " fn }
    END { for (op in n) { print op, n[op], where[op] } }' | awk '{ printf "%s %s", $1, $2; delete seen;
        for (i = 3; i <= NF; i++) if (!($i in seen)) { seen[$i] = 1; printf " %s", $i } print "" }')
count() { printf '%s\n' "$counts" | awk -v op="$1" '$1 == op { print $2; found = 1 } END { if (!found) print 0 }'; }
sdot=$(count sdot) smmla=$(count smmla) sadalp=$(count sadalp)
echo "$bin ($level): $sdot sdot, $smmla smmla, $sadalp sadalp"
printf '%s\n' "$counts" | sed '/^$/d; s/^/    /'
case $level in
v8) [ "$sdot" = 0 ] && [ "$smmla" = 0 ] && [ "$sadalp" -gt 0 ] ;;
dotprod) [ "$sdot" -gt 0 ] && [ "$smmla" = 0 ] ;;
i8mm) [ "$sdot" -gt 0 ] && [ "$smmla" -gt 0 ] ;;
*) echo "FAIL unknown level $level"; exit 1 ;;
esac || { echo "FAIL $bin: not the int8 instructions of level $level"; exit 1; }
