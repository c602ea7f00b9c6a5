"""--trace: the engine's named intermediates against reference.py --trace, step by step,
with scripts/compare_trace.py; and planted bugs, which it must pinpoint at the right step.

Measured on the tiny synthetic model (6 positions): the float32 engine agrees with the
float64 reference to 1e-7..1e-6 at every step (compare_trace.py's default tolerance is 1e-4);
the q8 engine differs by ~4e-3 from the embedding on and up to ~0.07 (0.15 with 200
positions) at the attention outputs, hence its suggested --tol of 0.3.
"""
import importlib.util
import json
import os
import shlex
import struct
import subprocess

from common import REPO, SCRIPTS, WORK, checkpoint, converted, persist, phi2, reference_logits, same_for_every_build, script

IDS = [1212, 318, 281, 1672, 2643, 290]  # "This is an example sentence and"

_spec = importlib.util.spec_from_file_location("compare_trace", os.path.join(SCRIPTS, "compare_trace.py"))
compare_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_trace)


def reference_trace(ckpt):
    out = persist(os.path.join(WORK, f"trace-ref-{os.path.basename(ckpt)}.bin"))
    if not os.path.isfile(out):
        script("reference.py", ckpt, "--ids", ",".join(map(str, IDS)), "--trace", out)
    return out


def engine_trace(model, name, *flags, binary=None):
    out = os.path.join(WORK, f"trace-{name}.bin")
    cmd = [binary] if binary else []
    args = [model, "--ids", ",".join(map(str, IDS)), "--trace", out, *flags]
    if binary:
        p = subprocess.run(cmd + args, capture_output=True, timeout=120)
        assert p.returncode == 0, f"{binary} -> exit {p.returncode}: {p.stderr.decode()[-500:]}"
    else:
        phi2(*args)
    return out


def compare(eng, ref, *flags):
    """compare_trace.py's CompletedProcess (not checked: the exit status is the result)."""
    return script("compare_trace.py", eng, ref, *flags, check=False)


def test_f32_trace_matches_reference_at_every_step():
    ckpt = checkpoint()
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    H, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    ref = reference_trace(ckpt)
    model = converted(ckpt)

    # Every step at every position, with its size, in both traces.
    sizes = {"embed": H, "final_ln": H, "logits": V}
    for l in range(L):
        for step in compare_trace.LAYER_STEPS:
            sizes[f"L{l}.{step}"] = F if step == "mlp_act" else H
    assert len(sizes) == L * 9 + 3
    expected = {(name, pos): n for name, n in sizes.items() for pos in range(len(IDS))}
    for flags in ((), ("--batch", "4")):  # --batch 4: records of two batches interleave
        eng = engine_trace(model, "f32" + "".join(flags), *flags)
        for path in (eng, ref):
            got = {key: a.size for key, a in compare_trace.read_trace(path).items()}
            assert got == expected, f"{path}: records differ: missing {sorted(expected.keys() - got.keys())[:5]}, " \
                                    f"extra {sorted(got.keys() - expected.keys())[:5]}"
        p = compare(eng, ref)
        print("     " + "\n     ".join(p.out.splitlines()[-3:]))
        assert p.returncode == 0, f"compare_trace.py {' '.join(flags)} -> exit {p.returncode}\n{p.out}{p.err}"
        assert "all steps agree" in p.out, p.out

    # --trace captures without changing the computation: its logits are --dump-logits' exactly.
    traced = compare_trace.read_trace(ref)
    with open(reference_logits(ckpt, IDS), "rb") as f:
        dumped = f.read()
    assert dumped == b"".join(traced[("logits", pos)].tobytes() for pos in range(len(IDS)))


@same_for_every_build
def test_bad_traces_are_errors():
    """A missing record, a truncated file or a size mismatch: exit 2, with the record named."""
    ckpt = checkpoint()
    ref = reference_trace(ckpt)
    data = open(ref, "rb").read()
    records, off = [], 0
    while off < len(data):  # split into records: u32 name_len, name, u32 pos, u32 n, n f32
        (name_len,) = struct.unpack_from("<I", data, off)
        pos, n = struct.unpack_from("<II", data, off + 4 + name_len)
        end = off + 12 + name_len + 4 * n
        records.append((data[off + 4:off + 4 + name_len].decode(), pos, data[off:end]))
        off = end
    bad = os.path.join(WORK, "trace-bad.bin")

    missing = [r for r in records if (r[0], r[1]) != ("L2.mlp_act", 3)]
    assert len(missing) == len(records) - 1
    open(bad, "wb").write(b"".join(r[2] for r in missing))
    for a, b in ((bad, ref), (ref, bad)):
        p = compare(a, b)
        assert p.returncode == 2 and "L2.mlp_act at position 3" in p.err, (p.returncode, p.err)

    open(bad, "wb").write(data[:-10])
    p = compare(bad, ref)
    assert p.returncode == 2 and "truncated" in p.err, (p.returncode, p.err)

    # the same records, but one of them with one value less (its n patched, its data shortened)
    name, pos, raw = records[0]
    n = (len(raw) - 12 - len(name)) // 4
    short = raw[:8 + len(name)] + struct.pack("<I", n - 1) + raw[12 + len(name):-4]
    open(bad, "wb").write(short + b"".join(r[2] for r in records[1:]))
    p = compare(bad, ref)
    assert p.returncode == 2 and f"{name} at position {pos}: {n - 1} values" in p.err, (p.returncode, p.err)

    p = compare(os.path.join(WORK, "no-such-trace.bin"), ref)
    assert p.returncode == 2 and "cannot read" in p.err, (p.returncode, p.err)


def build_broken_engine(name, old, new, count=1, more=()):
    """./phi2 built from a copy of phi2.c with `old` replaced by `new` (it must occur `count`
    times), and each further (old, new, count) of `more` likewise, with the Makefile's own
    command for ./phi2."""
    src = open(os.path.join(REPO, "phi2.c")).read()
    for o, n, k in ((old, new, count), *more):
        assert src.count(o) == k, f"planting '{name}': expected {k} of {o!r} in phi2.c, found {src.count(o)}"
        src = src.replace(o, n)
    os.makedirs(WORK, exist_ok=True)
    c_file, binary = os.path.join(WORK, f"phi2_{name}.c"), os.path.join(WORK, f"phi2_{name}")
    open(c_file, "w").write(src)

    p = subprocess.run(["make", "-s", "-n", "-B", "--no-print-directory", "-C", REPO, "phi2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"make -n phi2 failed: {p.stderr}"
    cmd = shlex.split(p.stdout.strip())
    assert "-o" in cmd and cmd[cmd.index("-o") + 1] == "phi2" and "phi2.c" in cmd, \
        f"the Makefile's command for ./phi2 is not what this test understands: {p.stdout}"
    cmd[cmd.index("-o") + 1] = binary
    cmd[cmd.index("phi2.c")] = c_file
    cmd.insert(1, "-I" + REPO)  # the copy includes "tokenizer.h" from the repository
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"compiling the planted bug '{name}' failed:\n{p.stderr[-2000:]}"
    return binary


# Each planted bug, and where compare_trace.py must say the traces first part.
PLANTED = [
    # rotary pairs dim i with i + half + 1 instead of i + half. Position 0 rotates by angle 0
    # (cos 1, sin 0), which leaves any pairing unchanged: the bug shows from position 1 on.
    ("rotary_pairs", "head[i + half]", "head[i + half + 1]", 2, "L0.q at position 1"),
    # the layers' LayerNorm with epsilon 1e-2 instead of the model's 1e-5
    ("layernorm_eps", "L->ln_bias, n_tokens, H, c->norm_eps)", "L->ln_bias, n_tokens, H, 1e-2f)", 1,
     "L0.ln at position 0"),
    # the MLP's output never reaches the residual stream
    ("no_mlp_residual", "s->x[i] += s->att_proj[i] + s->mlp_out[i];", "s->x[i] += s->att_proj[i];", 1,
     "L0.residual at position 0"),
]


@same_for_every_build
def test_planted_bugs_are_pinpointed():
    ckpt = checkpoint()
    ref = reference_trace(ckpt)
    model = converted(ckpt)
    for name, old, new, count, where in PLANTED:
        binary = build_broken_engine(name, old, new, count)
        p = compare(engine_trace(model, name, binary=binary), ref)
        first = [line for line in p.out.splitlines() if line.startswith("first divergence:")]
        print(f"     {name}: {first}")
        assert p.returncode == 1, f"{name}: compare_trace.py -> exit {p.returncode}, expected 1\n{p.out}{p.err}"
        assert first == [f"first divergence: {where}"], f"{name}: expected {where}\n{p.out}"


def test_q8_trace_tolerance():
    """q8 differs from the float64 reference already in the (int8) embedding: it fails the f32
    default tolerance there, and passes with the q8 tolerance compare_trace.py suggests."""
    ckpt = checkpoint()
    ref = reference_trace(ckpt)
    eng = engine_trace(converted(ckpt, "q8"), "q8")
    p = compare(eng, ref)
    assert p.returncode == 1 and "first divergence: embed at position 0" in p.out, (p.returncode, p.out)
    p = compare(eng, ref, "--tol", compare_trace.Q8_TOL)
    assert p.returncode == 0, f"q8 with --tol {compare_trace.Q8_TOL}: exit {p.returncode}\n{p.out}{p.err}"
    assert f"--tol {compare_trace.Q8_TOL:g}" in script("compare_trace.py", "--help").out
