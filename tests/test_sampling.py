"""Sampling: temperature, top-k and top-p checked against a Python re-implementation.

The engine's sampler (phi2.c, section 5, sample()) works on the logits of the real tokens
(ids past the tokenizer's 50,295 are padding and never sampled), in float32:

    prob[i] = expf((logit[i] - max) / T)
    keep the top_k best (0: all), ordered by prob descending, ties by id ascending
    total = sum of the kept probs, in that order
    keep the shortest prefix whose running sum reaches top_p * total
    r = random_f32() * (that prefix's sum): the first id whose running sum exceeds r

The Python version below does the same arithmetic on the logits --dump-logits writes (the
last row is what the first generated token is drawn from) and gives the set of ids that can
ever come out first. The engine, run with -n 1 over 200 seeds and several settings, must
only ever produce ids of that set and, where an allowed id is likely enough that missing it
in all the draws would be a one-in-100,000 event, must produce it. The same check must fail
on sets computed with top_p before top_k, or without the temperature: it is tight enough to
notice those mistakes. Finally, with the engine's RNG (xorshift64*, seeded as generate()
does) the Python sampler predicts the engine's draw for every seed; it uses the C library's
expf, as the engine does, so the float32 sums agree bit for bit.
"""
import ctypes
import ctypes.util
import os

import numpy as np

from common import WORK, checkpoint, converted, persist, phi2, read_logits

VOCAB = 51200
N_REAL = 50295  # tokens in the tokenizer; ids from here on are padding rows of lm_head
EOS = 50256
# A prompt after which the best few logits are within 0.35 of each other (found by scanning
# the positions of test_model's LONG prompt), so small allowed sets have several likely ids.
PROMPT = [int(i) for i in np.random.default_rng(7).integers(0, 50295, size=130)][:38]

# (temperature, top_k, top_p, number of seeds): 200 engine runs in all.
SETTINGS = [
    (1.0, 3, 1.0, 40),     # top-k alone: 3 ids, each about 1/3
    (1.0, 4, 0.5, 50),     # top-p inside top-k: 2 of the 4 (top-p first would keep all 4)
    (0.8, 40, 0.95, 30),   # the defaults
    (3.0, 0, 0.3, 30),     # hot, whole vocabulary: thousands of ids (at T = 1: a handful)
    (0.3, 0, 0.9, 30),     # cold: very few ids
    (100.0, 0, 1.0, 20),   # nearly uniform: had padding ids been candidates, draws would move
]
MISS_CHANCE = 1e-5  # an allowed id this unlikely to be missed in every draw must be drawn


def last_alone(prompt):
    """-b flags that put the prompt's last position in a batch of its own. Every run here, the
    dumps of logits too, uses them: then a dumped last row and the row a sampling run draws
    from come from the same kernels, bit for bit (a batch's lm_head runs through the prompt
    kernels, a sampling run's one row through the single-token kernel, and the two round
    differently: enough to move a draw that lies near an edge between two ids)."""
    return ("-b", len(prompt) - 1)


def last_logits():
    """The last prompt row of --dump-logits, real tokens only, <|endoftext|> at -inf as
    --ignore-eos makes it."""
    path = persist(os.path.join(WORK, "sampling-logits-last-alone.f32"))
    if not os.path.isfile(path):
        phi2(converted(checkpoint()), "--ids", ",".join(map(str, PROMPT)), "--dump-logits", path, *last_alone(PROMPT))
    row = read_logits(path, VOCAB)[-1, :N_REAL].copy()
    row[EOS] = -np.inf
    return row


_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_libm.expf.restype = ctypes.c_float
_libm.expf.argtypes = [ctypes.c_float]


def expf(a):
    """The C library's expf, element by element: the engine calls it, and numpy's float32
    exp differs from it in the last bit for about 40% of inputs."""
    return np.array([_libm.expf(float(v)) for v in a], dtype=np.float32)


def candidates(logits, temp, top_k, top_p, top_p_first=False, strict=True):
    """The sampler's kept candidates: (ids, float32 probs, running float32 sums), in the
    engine's order. top_p_first: a planted mistake, the nucleus taken over the whole
    vocabulary before top-k."""
    x = logits.astype(np.float32)
    prob = expf((x - x.max()) / np.float32(temp))
    order = np.lexsort((np.arange(len(prob)), -prob))  # prob descending, then id ascending
    n = top_k if 0 < top_k < len(prob) else len(prob)
    if top_p_first:
        n_kept = nucleus_size(np.cumsum(prob[order], dtype=np.float32), top_p, strict=False)
        order = order[:min(n, n_kept)]
    else:
        order = order[:n]
        running = np.cumsum(prob[order], dtype=np.float32)  # sequential float32 sums, like C
        order = order[:nucleus_size(running, top_p, strict)]
    p = prob[order]
    return order, p, np.cumsum(p, dtype=np.float32)


def nucleus_size(running, top_p, strict=True):
    """How many candidates the engine keeps: up to the first running sum >= top_p * total."""
    threshold = np.float32(top_p) * running[-1]
    reached = np.nonzero(running >= threshold)[0]
    n_kept = int(reached[0]) + 1 if len(reached) else len(running)
    # The setting must not sit on a rounding edge, where 1-ulp differences between the
    # engine's and numpy's float32 arithmetic could move the cut by one candidate. (With
    # top_p 1 the cut is where the sum stops growing: what follows is never drawn anyway.)
    if not strict or top_p >= 1.0:
        return n_kept
    if n_kept < len(running):
        assert running[n_kept - 1] >= threshold * np.float32(1 + 1e-4), "top-p cut too close to call"
    if n_kept >= 2:
        assert running[n_kept - 2] <= threshold * np.float32(1 - 1e-4), "top-p cut too close to call"
    return n_kept


def allowed(logits, temp, top_k, top_p, **mistake):
    """{id: probability of being drawn} over the ids the sampler can ever return."""
    if mistake.get("no_temperature"):
        temp = 1.0
    ids, p, running = candidates(logits, temp, top_k, top_p, top_p_first=mistake.get("top_p_first", False),
                                 strict=not mistake)
    widths = np.diff(np.concatenate([[np.float32(0)], running]))  # an id with no width is never drawn
    return {int(i): float(w) / float(running[-1]) for i, w in zip(ids, widths) if w > 0}


def check_draws(allowed_probs, draws):
    """The drawn ids lie in the allowed set, and every allowed id that is likely enough
    (missed by all draws with probability < MISS_CHANCE) was drawn. Returns the problems."""
    problems = []
    outside = sorted(set(draws) - set(allowed_probs))
    if outside:
        problems.append(f"drew ids outside the allowed set: {outside[:10]}")
    n = len(draws)
    missed = sorted(i for i, p in allowed_probs.items() if (1 - p) ** n < MISS_CHANCE and i not in draws)
    if missed:
        problems.append(f"never drew likely ids {missed[:10]} in {n} draws")
    return problems


_draws = {}


def engine_draws():
    """{setting: [first generated id for each seed]}: 200 runs of the engine with -n 1."""
    if not _draws:
        model = converted(checkpoint())
        ids = ",".join(map(str, PROMPT))
        seed = 0
        for temp, top_k, top_p, n_seeds in SETTINGS:
            got = []
            for _ in range(n_seeds):
                seed += 1
                p = phi2(model, "--ids", ids, "-n", 1, "--ignore-eos", "--print-ids", "-t", 1, "-s", seed,
                         *last_alone(PROMPT), "--temp", temp, "--top-k", top_k, "--top-p", top_p)
                got.append((seed, int(p.out.strip())))
            _draws[(temp, top_k, top_p)] = got
    return _draws


def test_engine_draws_only_allowed_ids_and_all_likely_ones():
    """Over 200 seeds and six (temperature, top-k, top-p) settings, every first token the
    engine samples can be sampled by the Python sampler, and every likely one was sampled
    (e.g. all three of top-k 3)."""
    logits = last_logits()
    for (temp, top_k, top_p), got in engine_draws().items():
        probs = allowed(logits, temp, top_k, top_p)
        draws = [i for _, i in got]
        print(f"     T={temp} top-k={top_k} top-p={top_p}: {len(probs)} allowed ids, "
              f"{len(set(draws))} distinct drawn in {len(draws)}")
        problems = check_draws(probs, draws)
        assert not problems, f"T={temp} top-k={top_k} top-p={top_p}: " + "; ".join(problems)
    # the settings do what their comments say
    assert len(allowed(logits, 1.0, 3, 1.0)) == 3
    assert len(allowed(logits, 1.0, 4, 0.5)) == 2 and len(allowed(logits, 1.0, 4, 0.5, top_p_first=True)) == 4
    assert len(allowed(logits, 3.0, 0, 0.3)) > 1000 > 10 > len(allowed(logits, 3.0, 0, 0.3, no_temperature=True))


def test_check_notices_planted_sampler_mistakes():
    """The same draws checked against sets computed wrongly (top-p before top-k; the
    temperature left out) fail: the check is tight enough to see either mistake."""
    logits = last_logits()
    for mistake in ("top_p_first", "no_temperature"):
        failed = [s for s, got in engine_draws().items()
                  if check_draws(allowed(logits, *s, **{mistake: True}), [i for _, i in got])]
        print(f"     {mistake}: caught by {len(failed)} of {len(SETTINGS)} settings")
        assert failed, f"a sampler with the mistake '{mistake}' would pass the check"


def random_u32(state):
    """xorshift64* as in phi2.c: (new state, 32-bit output)."""
    mask = (1 << 64) - 1
    state ^= state >> 12
    state = (state ^ (state << 25)) & mask
    state ^= state >> 27
    return state, ((state * 0x2545F4914F6CDD1D) & mask) >> 32


def predicted_draw(ids, running, seed):
    """The first id the engine draws with -s seed from the kept candidates (ids, running
    sums), and whether the draw lies so close to an edge between two ids (1e-6 of the kept
    mass) that a last-bit difference in the logits could decide it."""
    state = (seed * 0x9E3779B97F4A7C15 + 1) & ((1 << 64) - 1)  # as generate() seeds it
    _, u = random_u32(state)
    r = np.float32(u >> 8) / np.float32(16777216.0) * running[-1]
    i = int(np.searchsorted(running, r, side="right"))  # the first running sum > r
    i = min(i, len(ids) - 1)
    near_edge = bool(np.min(np.abs(running - r)) < 1e-6 * running[-1])
    return int(ids[i]), near_edge


def test_python_sampler_predicts_every_draw():
    """With the engine's RNG and seeding, the Python sampler predicts the engine's first
    token for every one of the 200 seeds (a draw within 1e-6 of an edge may go either way).
    At temperature 100 nearly every id is a candidate, so this also notices padding ids
    (past the tokenizer's tokens) among the candidates: every later running sum would move."""
    logits = last_logits()
    n_checked = 0
    for (temp, top_k, top_p), got in engine_draws().items():
        ids, _, running = candidates(logits, temp, top_k, top_p)
        for seed, drawn in got:
            want, near_edge = predicted_draw(ids, running, seed)
            if near_edge:
                continue
            assert drawn == want, f"T={temp} top-k={top_k} top-p={top_p} seed {seed}: engine {drawn}, Python {want}"
            n_checked += 1
    print(f"     {n_checked} of 200 draws predicted exactly ({200 - n_checked} too close to an edge to call)")
    assert n_checked >= 190, f"only {n_checked} draws away from an edge"


# --- min-p and the repetition penalties ----------------------------------------------------
# The engine's order: penalties on the logits (repeat: CTRL / llama.cpp, a logit > 0 divided
# by the penalty, else multiplied; then presence + count * frequency subtracted, OpenAI-style;
# each over the distinct ids of the last N tokens of prompt + generated text), then the
# temperature, top-k, top-p, then min-p: the candidates left whose tempered probability is
# at least min_p times the best one's.

def penalty_prompt():
    """A prompt whose last logits have ids of the prompt itself among the likely ones: the 10
    best ids after PROMPT, the first 4 of them again, then PROMPT (the tiny model's last logits
    depend mostly on the last tokens, so those ids stay near the top)."""
    best = [int(i) for i in np.argsort(-last_logits(), kind="stable")[:10]]
    return best + best[:4] + PROMPT


def penalty_logits():
    """The last row of --dump-logits after penalty_prompt(), real ids only, <|endoftext|> at -inf."""
    path = persist(os.path.join(WORK, "sampling-penalty-logits-last-alone.f32"))
    if not os.path.isfile(path):
        phi2(converted(checkpoint()), "--ids", ",".join(map(str, penalty_prompt())), "--dump-logits", path,
             *last_alone(penalty_prompt()))
    row = read_logits(path, VOCAB)[-1, :N_REAL].copy()
    row[EOS] = -np.inf
    return row


def penalize(logits, history, repeat=1.0, last_n=64, presence=0.0, frequency=0.0, mistake=None):
    """The engine's penalties in float32. mistake: 'repeat_sign' (every logit divided by the
    penalty, also negative ones), 'no_last_n' (the whole history), 'frequency_once' (the
    frequency penalty without the count)."""
    x = logits.astype(np.float32).copy()
    if mistake == "no_last_n" or last_n < 0 or last_n > len(history):
        last_n = len(history)
    window = history[len(history) - last_n:] if last_n > 0 else []
    counts = {}
    for i in window:
        if i < len(x):
            counts[i] = counts.get(i, 0) + 1
    for i, count in counts.items():
        v = x[i]
        v = v / np.float32(repeat) if (v > 0 or mistake == "repeat_sign") else v * np.float32(repeat)
        if mistake == "frequency_once":
            count = 1
        x[i] = v - (np.float32(presence) + np.float32(count) * np.float32(frequency))
    return x


def min_p_cut(x, temp, order, prob, min_p, untempered=False, strict=True):
    """How many of the candidates `order` (best first) min-p keeps. untempered: a planted
    mistake, min-p on the probabilities at temperature 1."""
    p = expf(x - x.max())[order] if untempered else prob[order]
    threshold = np.float32(min_p) * p[0]
    n = 1
    while n < len(p) and p[n] >= threshold:
        n += 1
    if strict:  # not on a rounding edge (probabilities within 1e-5 of the threshold)
        assert not np.any(np.abs(p[1:] - threshold) < np.float32(1e-5) * threshold), "min-p cut too close to call"
    return n


def candidates_min_p(logits, temp, top_k, top_p, min_p, mistake=None, strict=True):
    """candidates() followed by min-p: (ids, probs, running sums) the engine draws from."""
    x = logits.astype(np.float32)
    ids, p, running = candidates(x, temp, top_k, top_p, strict=strict)
    if min_p > 0:
        prob = expf((x - x.max()) / np.float32(temp))
        n = min_p_cut(x, temp, ids, prob, min_p, untempered=mistake == "min_p_untempered", strict=strict)
        ids, p = ids[:n], p[:n]
        running = np.cumsum(p, dtype=np.float32)
    return ids, p, running


# (temperature, top-k, top-p, min-p, repeat, last-n, presence, frequency, seeds): 150 runs
PENALTY_SETTINGS = [
    (1.0, 5, 1.0, 0.0, 1.3, 64, 0.0, 0.0, 25),     # the repeated best ids pushed out of the top 5
    (1.0, 5, 1.0, 0.0, 1.3, 40, 0.0, 0.0, 25),     # only the last 40 tokens: 2 of those ids penalized
    (1.0, 6, 1.0, 0.0, 1.0, 64, 0.3, 0.4, 25),     # presence and frequency (4 ids seen twice)
    (100.0, 0, 1.0, 0.0, 1.5, -1, 0.0, 0.0, 20),   # nearly uniform: negative logits multiplied too
    (1.0, 0, 1.0, 0.6, 1.0, 64, 0.0, 0.0, 25),     # min-p alone
    (3.0, 40, 0.8, 0.5, 1.1, 64, 0.1, 0.0, 30),    # min-p of tempered probabilities: 17 of top-p's 30
]
PENALTY_MISTAKES = ("repeat_sign", "no_last_n", "frequency_once", "min_p_untempered")

_penalty_draws = {}


def penalty_engine_draws():
    """{setting: [(seed, first generated id)]} for PENALTY_SETTINGS."""
    if not _penalty_draws:
        model = converted(checkpoint())
        ids = ",".join(map(str, penalty_prompt()))
        seed = 1000
        for setting in PENALTY_SETTINGS:
            temp, top_k, top_p, min_p, repeat, last_n, presence, frequency, n_seeds = setting
            got = []
            for _ in range(n_seeds):
                seed += 1
                p = phi2(model, "--ids", ids, "-n", 1, "--ignore-eos", "--print-ids", "-t", 1, "-s", seed,
                         *last_alone(penalty_prompt()), "--temp", temp, "--top-k", top_k, "--top-p", top_p,
                         "--min-p", min_p,
                         "--repeat-penalty", repeat, "--repeat-last-n", last_n,
                         "--presence-penalty", presence, "--frequency-penalty", frequency)
                got.append((seed, int(p.out.strip())))
            _penalty_draws[setting] = got
    return _penalty_draws


def penalty_problems(setting, got, mistake=None):
    """What is wrong with the draws `got` under the Python model of `setting` (with a planted
    mistake or not): ids outside the allowed set, likely ids never drawn, and draws that the
    seeded RNG puts on another id."""
    temp, top_k, top_p, min_p, repeat, last_n, presence, frequency, _ = setting
    x = penalize(penalty_logits(), penalty_prompt(), repeat, last_n, presence, frequency, mistake=mistake)
    ids, _, running = candidates_min_p(x, temp, top_k, top_p, min_p, mistake=mistake, strict=mistake is None)
    widths = np.diff(np.concatenate([[np.float32(0)], running]))
    probs = {int(i): float(w) / float(running[-1]) for i, w in zip(ids, widths) if w > 0}
    problems = check_draws(probs, [i for _, i in got])
    wrong = [(seed, drawn, want) for seed, drawn in got
             for want, near_edge in [predicted_draw(ids, running, seed)] if not near_edge and drawn != want]
    if wrong:
        problems.append(f"{len(wrong)} draws not as predicted, e.g. seed {wrong[0][0]}: engine {wrong[0][1]}, "
                        f"Python {wrong[0][2]}")
    return problems, len(probs)


def test_min_p_and_penalties_match_python_sampler():
    """Over 150 seeds and six settings of min-p and the penalties, the engine draws only ids
    the Python sampler allows, every likely one, and exactly the id the Python sampler draws
    with the same seed. The settings do what their comments say."""
    for setting, got in penalty_engine_draws().items():
        problems, n_allowed = penalty_problems(setting, got)
        print(f"     {setting[:8]}: {n_allowed} allowed ids, {len(set(i for _, i in got))} distinct drawn")
        assert not problems, f"{setting}: " + "; ".join(problems)
    x, history = penalty_logits(), penalty_prompt()
    top5 = set(np.argsort(-x)[:5].tolist())
    assert top5 & set(history), "no prompt id among the best 5: the penalties would change nothing"
    assert not top5 & set(np.argsort(-penalize(x, history, 1.3, 64))[:5].tolist()) & set(history[:14]), \
        "the repeat penalty should push the repeated ids out of the top 5"
    # at temperature 3 min-p's tempered cut keeps 17 of top-p's 30, an untempered one just 1
    hot = penalize(x, history, 1.1, 64, 0.1)
    after_top_p = candidates(hot, 3.0, 40, 0.8)[0]
    tempered = candidates_min_p(hot, 3.0, 40, 0.8, 0.5)[0]
    untempered = candidates_min_p(hot, 3.0, 40, 0.8, 0.5, mistake="min_p_untempered", strict=False)[0]
    assert len(untempered) < len(tempered) < len(after_top_p), (len(untempered), len(tempered), len(after_top_p))


def test_check_notices_planted_penalty_and_min_p_mistakes():
    """The same draws checked against a Python sampler with one planted mistake (negative
    logits divided by the repeat penalty; the whole history instead of the last N; the
    frequency penalty without the count; min-p at temperature 1) fail."""
    for mistake in PENALTY_MISTAKES:
        caught = [s for s, got in penalty_engine_draws().items() if penalty_problems(s, got, mistake)[0]]
        print(f"     {mistake}: caught by {len(caught)} of {len(PENALTY_SETTINGS)} settings")
        assert caught, f"a sampler with the mistake '{mistake}' would pass the check"


def test_greedy_takes_the_penalized_argmax():
    """--temp 0 takes the best id after the penalties (here: not the best id without them)."""
    model = converted(checkpoint())
    x, history = penalty_logits(), penalty_prompt()
    ids = ",".join(map(str, history))
    for flags in ((1.5, 64, 0.0, 0.0), (1.0, 64, 2.0, 0.0), (1.0, 64, 0.0, 1.5)):
        repeat, last_n, presence, frequency = flags
        want = int(np.argmax(penalize(x, history, *flags)))
        assert want != int(np.argmax(x)), flags
        got = phi2(model, "--ids", ids, "-n", 1, "--ignore-eos", "--print-ids", *last_alone(history), "--temp", 0,
                   "--repeat-penalty", repeat,
                   "--repeat-last-n", last_n, "--presence-penalty", presence, "--frequency-penalty", frequency).out
        assert int(got.strip()) == want, (flags, got, want)
    # off: --repeat-last-n 0 (the penalties see nothing), the default repeat penalty of 1
    plain = int(np.argmax(x))
    for flags in (("--repeat-penalty", 1.5, "--repeat-last-n", 0), ()):
        got = phi2(model, "--ids", ids, "-n", 1, "--ignore-eos", "--print-ids", *last_alone(history), "--temp", 0,
                   *flags).out
        assert int(got.strip()) == plain, (flags, got)
