"""What a grammar costs per token, on the real 262,144-entry logits row of the default model.

Per call, in grammar states reached by teacher forcing a real answer (so each row is the one
the model gives there): the argmax of the row (what greedy costs without a grammar), the
fast path `Grammar.allows` on that argmax, `Grammar.allowed` on the 64 best tokens
(argpartition included), `Grammar.mask` on the whole row, `Grammar.mask_top` for k = 1
(greedy) and k = 50 (a top-k sampler), and `Grammar.accept`.
Then constrained greedy decodes of JSON answers (the scheduler's loop: argmax; if the grammar
refuses it, mask and argmax again; accept) count how often the fast path says no, i.e. how
often the full mask is paid, and how the time splits between llama_decode and the grammar.
On each refusal `mask_top(row, 1)` runs too, on a copy: it must pick the same token.

    python benchmarks/bench_grammar.py [--model PATH] [--rounds 5] [--calls 500] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' prompt helper
from table import Table, write_json

from chatkit import gemma_chat
from lollms_fast.engine.backend import Backend, BackendParams, Grammar, json_grammar
from lollms_fast.engine.batch import Batch

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]}},
    "required": ["name", "age", "city"],
}
BOOK = {
    "type": "object",
    "properties": {"title": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                   "author": {"type": "object", "required": ["first", "last"],
                              "properties": {"first": {"type": "string"},
                                             "last": {"type": "string"}}}},
    "required": ["title", "tags", "author"],
}


FEW_SHOT = gemma_chat("Reply in JSON. What is the capital of Italy?", '{"capital": "Rome"}',
                "Reply in JSON. What is the capital of France?")
# (name, schema, prompt): with an example answer the model follows the grammar's layout;
# asked plainly it writes its own (line breaks, indentation) and the grammar says no more
DECODES = [
    ("json_object, example given", None, FEW_SHOT),
    ("json_object, asked plainly", None, gemma_chat("Describe a cat as a JSON object.")),
    ("person schema, example given", PERSON, gemma_chat(
        "Reply in JSON. A person who lives in Rome.",
        '{"name": "Marco", "age": 41, "city": "Rome"}',
        "Reply in JSON. A person who lives in Tokyo.")),
    ("person schema, asked plainly", PERSON, gemma_chat(
        "Give a person (name, age, city) as JSON.")),
    ("book schema, asked plainly", BOOK, gemma_chat(
        "Give a book as JSON: title, tags and author (first, last).")),
]
# grammar states for the per-call costs: the answer's text accepted so far
STATES = [("start of the object", ""), ("inside a string", '{"capital": "Par'),
          ("after a value", '{"capital": "Paris"')]


def default_model() -> Path:
    from lollms_fast.modelfiles import ensure_default_model
    return ensure_default_model(Path(__file__).resolve().parent.parent / ".cache" / "models")


def prefill(backend: Backend, tokens: list[int]) -> int:
    """Decode `tokens` as sequence 0 (from scratch); the batch index of the last row."""
    backend.seq_rm(0, 0, -1)
    batch = Batch(len(tokens))
    index = batch.add(0, tokens, 0, True)
    if backend.decode(batch) != 0:
        raise RuntimeError("llama_decode failed")
    return index


@dataclass
class DecodeRun:
    tokens: int = 0
    masked: int = 0
    ended: bool = False
    decode_s: float = 0.0
    grammar_s: float = 0.0  # allows + accept (the fast path)
    mask_s: float = 0.0
    mask_top_s: float = 0.0  # mask_top(row, 1) on the same rows, for comparison
    text: str = ""


def constrained_decode(backend: Backend, grammar: Grammar, prompt: str,
                       n_max: int) -> DecodeRun:
    run = DecodeRun()
    tokens = backend.tokenize(prompt, add_special=True, parse_special=True)
    index = prefill(backend, tokens)
    batch = Batch(1)
    pos = len(tokens)
    pieces: list[bytes] = []
    for _ in range(n_max):
        row = backend.logits(index)
        token = int(np.argmax(row))
        t = time.perf_counter()
        ok = grammar.allows(token)
        run.grammar_s += time.perf_counter() - t
        if not ok:
            copy = row.copy()
            t = time.perf_counter()
            grammar.mask_top(copy, 1)
            run.mask_top_s += time.perf_counter() - t
            t = time.perf_counter()
            grammar.mask(row)
            token = int(np.argmax(row))
            run.mask_s += time.perf_counter() - t
            run.masked += 1
            if int(np.argmax(copy)) != token:
                sys.exit(f"mask_top(row, 1) chose {int(np.argmax(copy))}, mask {token}")
        t = time.perf_counter()
        grammar.accept(token)
        run.grammar_s += time.perf_counter() - t
        run.tokens += 1
        if backend.is_eog(token):
            run.ended = True
            break
        pieces.append(backend.piece(token))
        batch.clear()
        index = batch.add(0, [token], pos, True)
        pos += 1
        t4 = time.perf_counter()
        if backend.decode(batch) != 0:
            raise RuntimeError("llama_decode failed")
        run.decode_s += time.perf_counter() - t4
    run.text = b"".join(pieces).decode("utf-8", "replace")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=500, help="calls per round (fast paths)")
    ap.add_argument("--mask-calls", type=int, default=3, help="mask calls per round")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()

    backend = Backend(BackendParams(args.model or default_model(), n_ctx=1024, n_batch=512,
                                    n_threads=2, n_seq_max=1))
    t0 = time.perf_counter()
    backend.grammar(json_grammar(None)).close()  # the first one also scans the vocabulary
    first_grammar_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    backend.grammar(json_grammar(BOOK)).close()
    schema_grammar_ms = (time.perf_counter() - t0) * 1e3
    prompt = backend.tokenize(FEW_SHOT, add_special=True, parse_special=True)

    tables = []
    scratch = np.empty(backend.n_vocab, dtype=np.float32)
    for state, prefix in STATES:
        answer = backend.tokenize(prefix, add_special=False) if prefix else []
        row = backend.logits(prefill(backend, prompt + answer)).copy()
        grammar = backend.grammar(json_grammar(None))
        for t in answer:
            grammar.accept(t)
        best = int(np.argmax(row))
        table = Table(f"grammar cost per call, {state} (json_object grammar; row argmax "
                      f"{backend.piece(best)!r}, allowed: {grammar.allows(best)})")
        base = table.row("argmax of the row (no grammar)", "us/call", higher_is_better=False)
        fast = table.row("allows(argmax) (fast path)", "us/call", higher_is_better=False)
        top = table.row("allowed(top 64) incl. argpartition", "us/call",
                        higher_is_better=False)
        full = table.row("mask(whole row)", "us/call", higher_is_better=False)
        top1 = table.row("mask_top(row, 1)", "us/call", higher_is_better=False)
        top50 = table.row("mask_top(row, 50)", "us/call", higher_is_better=False)
        n_allowed = 0
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.calls):
                int(np.argmax(row))
            base.samples.append((time.perf_counter() - t) / args.calls * 1e6)
            t = time.perf_counter()
            for _ in range(args.calls):
                grammar.allows(best)
            fast.samples.append((time.perf_counter() - t) / args.calls * 1e6)
            n_top = max(1, args.calls // 10)
            t = time.perf_counter()
            for _ in range(n_top):
                ok = grammar.allowed(np.argpartition(row, -64)[-64:])
            top.samples.append((time.perf_counter() - t) / n_top * 1e6)
            spent = 0.0
            for _ in range(args.mask_calls):
                np.copyto(scratch, row)
                t = time.perf_counter()
                grammar.mask(scratch)
                spent += time.perf_counter() - t
            full.samples.append(spent / args.mask_calls * 1e6)
            for r, k in ((top1, 1), (top50, 50)):
                spent = 0.0
                n_top = max(1, args.calls // 20)
                for _ in range(n_top):
                    np.copyto(scratch, row)
                    t = time.perf_counter()
                    grammar.mask_top(scratch, k)
                    spent += time.perf_counter() - t
                r.samples.append(spent / n_top * 1e6)
            np.copyto(scratch, row)
            grammar.mask(scratch)
        n_allowed = int(np.isfinite(scratch).sum())
        table.checks["tokens the mask leaves"] = n_allowed
        table.checks["of the 64 best, allowed"] = int(ok.sum())
        grammar.close()
        table.print()
        tables.append(table)

    # accept: on a fresh grammar each time (accepting changes the state)
    brace = backend.tokenize("{", add_special=False)[0]
    grammars = [backend.grammar(json_grammar(None)) for _ in range(args.calls)]
    t = time.perf_counter()
    for g in grammars:
        g.accept(brace)
    accept_us = (time.perf_counter() - t) / len(grammars) * 1e6
    for g in grammars:
        g.close()

    print(f"\ngrammar creation: first {first_grammar_ms:.0f} ms (includes the one scan of the "
          f"vocabulary for control tokens), a schema grammar afterwards "
          f"{schema_grammar_ms:.1f} ms; accept: {accept_us:.1f} us/call "
          f"(re-checks the token unless allows just said yes to it)")

    print(f"\nconstrained greedy decodes (at most {args.n_predict} tokens)")
    print(f"{'answer':<30} {'tokens':>6} {'masked':>6} {'reject%':>7} {'ended':>5} "
          f"{'decode ms/tok':>13} {'fast path us/tok':>16} {'mask ms/tok':>11} "
          f"{'mask_top ms/tok':>15}")
    decodes = []
    for name, schema, text in DECODES:
        grammar = backend.grammar(json_grammar(schema))
        run = constrained_decode(backend, grammar, text, args.n_predict)
        grammar.close()
        decodes.append({"name": name, **run.__dict__})
        n = max(1, run.tokens)
        print(f"{name:<30} {run.tokens:>6} {run.masked:>6} {100 * run.masked / n:>6.1f}% "
              f"{'yes' if run.ended else 'no':>5} {run.decode_s / n * 1e3:>13.1f} "
              f"{run.grammar_s / n * 1e6:>16.1f} {run.mask_s / n * 1e3:>11.1f} "
              f"{run.mask_top_s / n * 1e3:>15.2f}")
    for d in decodes:
        print(f"  {d['name']}: {d['text']!r}")
    backend.close()
    write_json(args.json, tables, {"rounds": args.rounds, "calls": args.calls,
                                   "mask_calls": args.mask_calls, "decodes": decodes,
                                   "accept_us": accept_us,
                                   "first_grammar_ms": first_grammar_ms})


if __name__ == "__main__":
    main()
