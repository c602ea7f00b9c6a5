"""docs/WALKTHROUGH.md cannot drift from the code it quotes.

Every code quote in the walkthrough is a fenced block preceded by a marker line

    <!-- quote: FILE FUNCTION -->

FILE is a path from the repository root (phi2.c, tokenizer.c, scripts/reference.py, ...) and
FUNCTION a function defined in it. The block's language must match the file (```c for .c,
```python for .py). A line that is only `...` (any indentation) elides source lines; every
other line of the quote must be a line of the function's source, verbatim (trailing spaces
aside), in order, and the lines between two elisions must be contiguous in the source. The
function's extent is its definition through the matching closing brace (C: the first line
that starts with the return type and the name, and whose first `{` or `;` at parenthesis
depth 0 is a `{`) or through the end of its indented body (Python: `def NAME(`).

Also: every function named in backticks with parentheses (`forward()`) exists in phi2.c or
tokenizer.c; the walkthrough quotes the functions its steps are about; and the checker
itself notices planted mistakes (one changed character, swapped chunks, a missing elision,
lines from another function).
"""
import os
import re

from common import REPO

SAME_FOR_EVERY_BUILD = True  # the text of docs and source: no engine (run.py --engine-only)

DOC = os.path.join(REPO, "docs", "WALKTHROUGH.md")
C_FILES = ("phi2.c", "tokenizer.c")

MARKER = re.compile(r"^<!-- quote: (\S+) (\w+) -->\s*$")
FENCE_LANG = {".c": "c", ".h": "c", ".py": "python"}

# The functions the walkthrough's steps are about: each must be quoted at least once.
REQUIRED = {
    "tokenizer.c": {"tokenizer_encode", "pretoken_end", "bpe"},
    "phi2.c": {"forward", "matrix_row", "layernorm", "matmul", "product", "matmul_f32_scalar", "rotary",
               "init_state", "kv_offset", "attention_scalar", "attend", "attention", "gelu_new_scalar", "sample",
               "prefill", "generate", "generate_tokens", "quantize_rows_q8_scalar", "matmul_q8_scalar",
               "matmul_q4_scalar"},
    "scripts/reference.py": {"layer_norm", "rotate_half", "apply_rotary", "gelu_new", "forward"},
}


# ------------------------------------------------------------------ finding the quotes

class Quote:
    def __init__(self, path, func, lang, lines, doc_line):
        self.path, self.func, self.lang, self.lines, self.doc_line = path, func, lang, lines, doc_line

    def where(self):
        return f"WALKTHROUGH.md:{self.doc_line} ({self.path} {self.func})"


def parse_quotes(text):
    """(quotes, problems): every marked quote of the document, and malformed markers."""
    lines = text.split("\n")
    quotes, problems = [], []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if not m:
            if lines[i].lstrip().startswith("<!-- quote"):
                problems.append(f"WALKTHROUGH.md:{i + 1}: malformed quote marker: {lines[i]!r}")
            i += 1
            continue
        path, func = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and lines[j].strip() == "":
            j += 1
        if j >= len(lines) or not lines[j].startswith("```"):
            problems.append(f"WALKTHROUGH.md:{i + 1}: marker for {path} {func} is not followed by a fenced block")
            i += 1
            continue
        lang = lines[j][3:].strip()
        k = j + 1
        while k < len(lines) and lines[k].rstrip() != "```":
            k += 1
        if k >= len(lines):
            problems.append(f"WALKTHROUGH.md:{j + 1}: unterminated code block")
            break
        quotes.append(Quote(path, func, lang, lines[j + 1:k], j + 2))
        i = k + 1
    return quotes, problems


# ------------------------------------------------------------------ function extents

def _c_body_end(text, start):
    """Index of the '}' closing the first '{' at or after start, skipping comments and
    string/char literals; or -1 if a ';' at parenthesis depth 0 comes first (a prototype)."""
    i, n, paren, depth = start, len(text), 0, 0
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                return -1
            continue
        if text.startswith("/*", i):
            i = text.find("*/", i + 2)
            if i < 0:
                return -1
            i += 2
            continue
        if c in "\"'":
            i += 1
            while i < n and text[i] != c:
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if depth == 0:
            if c == "(":
                paren += 1
            elif c == ")":
                paren -= 1
            elif c == ";" and paren == 0:
                return -1
            elif c == "{" and paren == 0:
                depth = 1
        else:
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return i
        i += 1
    return -1


def c_functions(src, name):
    """The source lines of every definition of C function `name` in src (a list of lists)."""
    head = re.compile(r"^(?:[A-Za-z_]\w*[\s*]+)+" + re.escape(name) + r"\s*\(")
    lines = src.split("\n")
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    found = []
    for i, line in enumerate(lines):
        if not head.match(line):
            continue
        end = _c_body_end(src, offsets[i])
        if end < 0:
            continue  # a prototype
        last = src.count("\n", 0, end)
        found.append(lines[i:last + 1])
    return found


def py_functions(src, name):
    """The source lines of every `def name(` in src, through the end of its indented body."""
    head = re.compile(r"^(\s*)def " + re.escape(name) + r"\s*\(")
    lines = src.split("\n")
    found = []
    for i, line in enumerate(lines):
        m = head.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        j = i + 1
        while j < len(lines) and (lines[j].strip() == "" or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        while j > i + 1 and lines[j - 1].strip() == "":
            j -= 1
        found.append(lines[i:j])
    return found


def function_sources(path, name):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        src = f.read()
    return py_functions(src, name) if path.endswith(".py") else c_functions(src, name)


# ------------------------------------------------------------------ the check

def is_elision(line):
    return line.strip() == "..."


def chunks_of(quote_lines):
    """The quote split at elision lines into runs of lines that must be contiguous."""
    chunks, cur = [], []
    for line in quote_lines:
        if is_elision(line):
            if cur:
                chunks.append(cur)
            cur = []
        else:
            cur.append(line.rstrip())
    if cur:
        chunks.append(cur)
    return chunks


def fits(quote_lines, body):
    """None if the quote fits the function body, else a description of the first misfit."""
    body = [b.rstrip() for b in body]
    chunks = chunks_of(quote_lines)
    if not chunks:
        return "the quote is empty"
    at = 0
    for chunk in chunks:
        hit = next((s for s in range(at, len(body) - len(chunk) + 1) if body[s:s + len(chunk)] == chunk), None)
        if hit is None:
            # Say which line fails: the longest prefix of the chunk that does fit.
            for n in range(len(chunk), 0, -1):
                if any(body[s:s + n] == chunk[:n] for s in range(at, len(body) - n + 1)):
                    break
            else:
                n = 0
            bad = chunk[n] if n < len(chunk) else chunk[-1]
            why = "does not follow the line before it" if n else "is not in the function (after the previous chunk)"
            return f"line {bad.strip()!r} {why}"
        at = hit + len(chunk)
    return None


def check_quote(q):
    """None if the quote matches its source, else what is wrong."""
    ext = os.path.splitext(q.path)[1]
    if not os.path.isfile(os.path.join(REPO, q.path)):
        return f"{q.where()}: no such file {q.path}"
    if FENCE_LANG.get(ext) != q.lang:
        return f"{q.where()}: code block is ```{q.lang}, expected ```{FENCE_LANG.get(ext)}"
    bodies = function_sources(q.path, q.func)
    if not bodies:
        return f"{q.where()}: no function {q.func} in {q.path}"
    misfits = [fits(q.lines, body) for body in bodies]
    if all(misfits):
        return f"{q.where()}: drifted from the source: {misfits[0]}"
    return None


def doc_quotes():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    return text, *parse_quotes(text)


# ------------------------------------------------------------------ tests

def test_every_quote_matches_its_source():
    _, quotes, problems = doc_quotes()
    assert len(quotes) >= 20, f"only {len(quotes)} marked quotes found in WALKTHROUGH.md"
    problems += [p for p in (check_quote(q) for q in quotes) if p]
    assert not problems, f"{len(problems)} quote(s) drifted:\n  " + "\n  ".join(problems)


def test_the_steps_quote_their_functions():
    _, quotes, _ = doc_quotes()
    quoted = {(q.path, q.func) for q in quotes}
    missing = sorted(f"{p} {f}" for p, names in REQUIRED.items() for f in names if (p, f) not in quoted)
    assert not missing, "WALKTHROUGH.md quotes none of: " + ", ".join(missing)


def test_named_functions_exist():
    text, _, _ = doc_quotes()
    srcs = {}
    for path in C_FILES:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            srcs[path] = f.read()
    names = sorted(set(re.findall(r"`(\w+)\(\)`", text)))
    assert len(names) >= 15, f"only {len(names)} functions named as `name()`"
    missing = [n for n in names if not any(c_functions(s, n) for s in srcs.values())]
    assert not missing, "WALKTHROUGH.md names functions that phi2.c and tokenizer.c do not define: " + \
        ", ".join(f"{n}()" for n in missing)


def test_checker_notices_planted_mistakes():
    _, quotes, _ = doc_quotes()
    c_quote = next(q for q in quotes if q.lang == "c" and len(chunks_of(q.lines)) >= 2)
    py_quote = next(q for q in quotes if q.lang == "python")
    for q in (c_quote, py_quote):
        assert check_quote(q) is None, f"the real quote should pass: {check_quote(q)}"

    def planted(q, lines, func=None):
        return Quote(q.path, func or q.func, q.lang, lines, q.doc_line)

    def one_char_changed(lines):
        lines = list(lines)
        i = next(i for i, s in enumerate(lines) if not is_elision(s) and len(s.strip()) > 8)
        s = lines[i]
        j = len(s) - len(s.lstrip()) + len(s.strip()) // 2
        lines[i] = s[:j] + ("+" if s[j] != "+" else "-") + s[j + 1:]
        return lines

    # One changed character, in C and in Python.
    for q in (c_quote, py_quote):
        assert check_quote(planted(q, one_char_changed(q.lines))), f"a changed character in {q.where()} went unnoticed"
    # Two chunks in the wrong order.
    ch = chunks_of(c_quote.lines)
    swapped = ch[1] + ["    ..."] + ch[0]
    assert check_quote(planted(c_quote, swapped)), "swapped chunks went unnoticed"
    # Two chunks joined without the elision between them (lines are skipped silently).
    joined = [line for line in c_quote.lines if not is_elision(line)]
    assert check_quote(planted(c_quote, joined)), "a missing elision went unnoticed"
    # The right lines credited to another function of the same file.
    other = next(q.func for q in quotes if q.path == c_quote.path and q.func != c_quote.func)
    assert function_sources(c_quote.path, other), other
    assert check_quote(planted(c_quote, c_quote.lines, func=other)), "a quote from another function went unnoticed"
    # A function that does not exist, a file that does not exist, the wrong language.
    assert check_quote(planted(c_quote, c_quote.lines, func="no_such_function"))
    assert check_quote(Quote("nosuch.c", "forward", "c", c_quote.lines, 0))
    assert check_quote(Quote(c_quote.path, c_quote.func, "python", c_quote.lines, 0))
    # A marker without its code block is reported by the parser.
    _, problems = parse_quotes("<!-- quote: phi2.c forward -->\ntext\n")
    assert problems, "a marker without a code block went unnoticed"


def test_extents_are_exact():
    """The extent finder: definitions only (not prototypes or calls), through the closing brace."""
    src = ("static int f(int a);\n"
           "/* f(x) { */\n"
           "static int f(int a,\n"
           "             int b) {\n"
           "    const char *s = \"}\";  // }\n"
           "    if (a) { return '}'; }\n"
           "    return g(a);\n"
           "}\n"
           "static int g(int a) { return f(a, 1); }\n")
    (body,) = c_functions(src, "f")
    assert body[0].startswith("static int f(int a,") and body[-1] == "}" and len(body) == 6, body
    assert c_functions(src, "g") == [["static int g(int a) { return f(a, 1); }"]]
    assert c_functions(src, "h") == []
    py = "def a(x):\n    y = 1\n\n    return y\n\n\ndef b():\n    pass\n"
    assert py_functions(py, "a") == [["def a(x):", "    y = 1", "", "    return y"]]
    assert fits(["    y = 1", "...", "    return y"], py_functions(py, "a")[0]) is None
    assert fits(["    y = 1", "    return y"], py_functions(py, "a")[0]) is not None
