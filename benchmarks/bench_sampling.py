"""Native sampler vs llama.cpp's own sampler chain, on the same real 262,144-entry logits row.

Both use top_k 50, top_p 0.95, temperature 0.9, repeat penalty 1.2 over the last 40 tokens, in
llama.cpp's default order (penalties, top-k, top-p, temperature, draw). llama.cpp's side is
`llama_sampler_sample(chain, ctx, -1)`: it builds its candidate array from the context's
logits row and applies the chain. Ours copies the row into a scratch buffer (the engine does
not need to: its penalty edits llama.cpp's row in place) and samples it. Both accept the token
they draw. Rounds are interleaved (A B A B) after a warm-up; the check compares the two
distributions of drawn tokens.

Two more rows, interleaved in the same rounds, cost what the OpenAI-style options add: our
sampler with presence and frequency penalties (PENALTIES) and four logit_bias entries (the
row's three best tokens banned with -100, the tenth best nudged by +1.5), and
`top_logprobs(row, token, 5)` on the row our sampler penalised (what the engine does for a
request asking for logprobs: one log-softmax over the whole row).

    python benchmarks/bench_sampling.py [--model PATH] [--rounds 7] [--calls 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import llama_cpp as C

sys.path.insert(0, str(Path(__file__).parent))
from rawloop import RawContext
from table import Table, write_json

from lollms_fast._native import USING_EXTENSIONS, sampling

PARAMS = dict(temperature=0.9, top_k=50, top_p=0.95, repeat_penalty=1.2, repeat_last_n=40)
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.3)


def default_model() -> Path:
    from lollms_fast.modelfiles import ensure_default_model
    return ensure_default_model(Path(__file__).resolve().parent.parent / ".cache" / "models")


def llama_chain(n_vocab: int, history: list[int], seed: int) -> object:
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
        n_vocab, PARAMS["repeat_last_n"], PARAMS["repeat_penalty"], 0.0, 0.0))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(PARAMS["top_k"]))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(PARAMS["top_p"], 1))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(PARAMS["temperature"]))
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    for t in history:
        C.llama_sampler_accept(chain, t)
    return chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not USING_EXTENSIONS:
        sys.exit("the native modules are not in use (LOLLMS_FAST_NO_EXTENSIONS is set)")

    raw = RawContext(args.model or default_model(), n_ctx=512)
    prompt = raw.tokenize("The old lighthouse keeper looked at the sea and said that")
    raw.prefill(prompt, 0)
    row = raw.logits(-1).copy()  # the real row; llama.cpp keeps its own in the context
    history = prompt[-PARAMS["repeat_last_n"]:]

    ours = sampling.Sampler(seed=1234, **PARAMS)
    ours.accept_many(history)
    theirs = llama_chain(raw.n_vocab, history, 1234)
    best10 = [int(t) for t in np.argsort(-row, kind="stable")[:10]]
    bias = {**{t: -100.0 for t in best10[:3]}, best10[9]: 1.5}
    extra = sampling.Sampler(seed=1234, **PARAMS, **PENALTIES, logit_bias=bias)
    extra.accept_many(history)
    scratch = np.empty_like(row)

    def timed(sampler: sampling.Sampler, n: int, draws: list[int]) -> float:
        """Microseconds per sample() + accept() on a fresh copy of the row."""
        t0 = time.perf_counter()
        for _ in range(n):
            np.copyto(scratch, row)
            token = sampler.sample(scratch)
            sampler.accept(token)
            draws.append(token)
        return (time.perf_counter() - t0) / n * 1e6

    def run_ours(n: int, draws: list[int]) -> float:
        return timed(ours, n, draws)

    def run_extra(n: int, draws: list[int]) -> float:
        return timed(extra, n, draws)

    penalised = row.copy()
    last = extra.sample(penalised)  # a row as the engine passes it: penalised, then sampled

    def run_logprobs(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            sampling.top_logprobs(penalised, last, 5)
        return (time.perf_counter() - t0) / n * 1e6

    def run_theirs(n: int, draws: list[int]) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            draws.append(C.llama_sampler_sample(theirs, raw.ctx, -1))  # accepts it too
        return (time.perf_counter() - t0) / n * 1e6

    table = Table(f"sampler: one call on a {raw.n_vocab}-entry logits row "
                  f"(top_k 50, top_p 0.95, temp 0.9, repeat penalty 1.2 over 40)")
    a = table.row("llama.cpp sampler chain", "us/call", higher_is_better=False)
    b = table.row("lollms_fast native Sampler", "us/call", reference=a.name,
                  higher_is_better=False)
    c = table.row("+ presence/freq penalty, 4 biases", "us/call", reference=b.name,
                  higher_is_better=False)
    d = table.row("top_logprobs(n=5), whole row", "us/call", higher_is_better=False)
    draws_a: list[int] = []
    draws_b: list[int] = []
    draws_c: list[int] = []
    run_theirs(30, [])
    run_ours(30, [])
    run_extra(30, [])
    run_logprobs(30)
    for _ in range(args.rounds):
        a.samples.append(run_theirs(args.calls, draws_a))
        b.samples.append(run_ours(args.calls, draws_b))
        c.samples.append(run_extra(args.calls, draws_c))
        d.samples.append(run_logprobs(args.calls))

    # correctness: both draw from the same head of the same distribution (the penalty can
    # push at most repeat_last_n tokens out of the top k, hence the wider set)
    width = PARAMS["top_k"] + PARAMS["repeat_last_n"]
    top = set(np.argsort(-row)[:width].tolist())
    ca, cb = collections.Counter(draws_a), collections.Counter(draws_b)
    tv = 0.5 * sum(abs(ca[t] / len(draws_a) - cb[t] / len(draws_b)) for t in set(ca) | set(cb))
    table.checks[f"every draw among the row's top {width}"] = set(ca) | set(cb) <= top
    table.checks["total variation between the two draw distributions"] = round(tv, 3)
    table.checks["distinct tokens drawn (llama.cpp, ours)"] = (len(ca), len(cb))
    banned = set(best10[:3])
    table.checks["no banned token drawn with the biases"] = not banned & set(draws_c)
    logprob, best = sampling.top_logprobs(penalised, last, 5)
    table.checks["top_logprobs: the sampled token's, the best"] = (
        round(logprob, 4), best[0][0], round(best[0][1], 4))
    table.print()
    ok = set(ca) | set(cb) <= top and tv < 0.1 and not banned & set(draws_c)
    print("correctness:", "OK" if ok else "FAILED")
    write_json(args.json, [table], {"params": PARAMS, "penalties": PENALTIES,
                                    "logit_bias": bias, "rounds": args.rounds,
                                    "calls": args.calls, "n_threads": 2})
    C.llama_sampler_free(theirs)
    raw.close()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
