"""The engine against the float64 reference (scripts/reference.py) on synthetic checkpoints.

Tolerance: max |engine - reference| <= 1e-4 * max |reference logit| for every prompt
position. The engine computes in float32, the reference in float64.
"""
import numpy as np

from common import (checkpoint, converted, engine_logits, phi2, read_logits, reference_logits,
                    rel_max_diff, script)

VOCAB = 51200
TOL = 1e-4
# The first ids of "This is an example sentence and this is a test" (transformers' Phi test).
SHORT = [1212, 318, 281, 1672, 2643, 290, 428, 318, 257, 1332]
LONG = [int(i) for i in np.random.default_rng(7).integers(0, 50295, size=130)]  # crosses batch edges


def check_matches_reference(ckpt, model, ids, *flags):
    ref = read_logits(reference_logits(ckpt, ids), VOCAB)
    eng = read_logits(engine_logits(model, ids, *flags), VOCAB)
    assert eng.shape == ref.shape == (len(ids), VOCAB), (eng.shape, ref.shape)
    d = rel_max_diff(eng, ref)
    print(f"     {len(ids)} tokens {' '.join(flags)}: max|diff|/max|ref| = {d:.2e}")
    assert d <= TOL, f"logits differ: {d:.3e} > {TOL}"
    return d


def test_logits_match_reference_short_long_single():
    ckpt = checkpoint()
    model = converted(ckpt)
    for ids in ([50256], SHORT, LONG):
        check_matches_reference(ckpt, model, ids)


def test_kv_cache_one_at_a_time_equals_batched():
    """Feeding positions one by one through the KV cache gives the full-prompt logits."""
    ckpt = checkpoint()
    model = converted(ckpt)
    batched = read_logits(engine_logits(model, LONG), VOCAB)
    for batch in ("1", "7"):
        stepped = read_logits(engine_logits(model, LONG, "--batch", batch), VOCAB)
        d = rel_max_diff(stepped, batched)
        assert d <= 1e-5, f"--batch {batch}: {d:.3e}"
    check_matches_reference(ckpt, model, LONG, "--batch", "1")


def test_variants_convert_and_match():
    """msft names, BF16, F32 and 3 shards all convert and match the reference."""
    for kw in (dict(naming="msft"), dict(dtype="BF16"), dict(dtype="F32"), dict(shards=3),
               dict(naming="msft", dtype="BF16", shards=2)):
        ckpt = checkpoint(seed=2, **kw)
        check_matches_reference(ckpt, converted(ckpt), SHORT)


def test_phi15_shape_ratios():
    """phi-1.5's geometry ratios (rotary factor 0.5, more and smaller heads) work too."""
    ckpt = checkpoint(seed=3, extra=("--set", "partial_rotary_factor=0.5", "--set", "num_attention_heads=8", "--set", "num_key_value_heads=8",
                                     "--set", "num_hidden_layers=3"))
    model = converted(ckpt)
    check_matches_reference(ckpt, model, SHORT)
    check_matches_reference(ckpt, model, LONG)


def test_greedy_matches_reference():
    """32 greedy tokens from the engine are exactly the reference's greedy continuation."""
    ckpt = checkpoint()
    model = converted(ckpt)
    for prompt in (SHORT, LONG[:40]):
        ids = ",".join(map(str, prompt))
        ref = script("reference.py", ckpt, "--ids", ids, "--greedy", 32).out.strip()
        eng = phi2(model, "--ids", ids, "-n", 32, "--temp", 0, "--print-ids").out.strip()
        assert eng == ref, f"engine {eng}\n reference {ref}"
        assert len(set(eng.split(","))) > 4, f"degenerate continuation: {eng}"


def test_threads_do_not_change_results():
    ckpt = checkpoint()
    model = converted(ckpt)
    one = read_logits(engine_logits(model, SHORT, "-t", "1"), VOCAB)
    two = read_logits(engine_logits(model, SHORT, "-t", "2"), VOCAB)
    assert rel_max_diff(one, two) <= 1e-6


def test_no_mmap_gives_identical_logits():
    """--no-mmap (weights read into memory) computes exactly what the mapped file (--mmap)
    does."""
    model = converted(checkpoint())
    mapped = read_logits(engine_logits(model, SHORT, "--mmap"), VOCAB)
    copied = read_logits(engine_logits(model, SHORT, "--no-mmap"), VOCAB)
    assert np.array_equal(mapped, copied)
