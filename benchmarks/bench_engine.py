"""The engine (scheduler + native sampling + stop detection + asyncio hand-off) vs raw loops.

Single stream: decode tokens/s from the first piece to the end, engine vs a raw llama_decode +
greedy loop on the same prompt (target >= 0.97). Aggregate: generated tokens / wall time
(prompts included) with N = 1, 2, 4, 8 concurrent requests, engine vs the raw batched loop.
Greedy (temperature 0, no repeat penalty), n_threads=2, the committed prompt set, each
contender in its own context of the same model; rounds interleaved (A B A B) after a warm-up.
The engine's prefix cache is dropped before every run so both sides decode the whole prompt.

Correctness: single-stream engine text must equal the raw loop's text in every round; for
batched runs every request must produce the same number of tokens as the raw loop's sequence
or end at EOG (text may differ: CPU batching changes logits slightly, see DESIGN.md).

    python benchmarks/bench_engine.py [--model PATH] [--rounds 5] [--n-predict 64]
                                      [--streams 1,2,4,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import default_model
from rawloop import RawContext
from table import Table, write_json

from lollms_fast._native import USING_EXTENSIONS
from lollms_fast.engine import Engine, GenerationRequest, SamplingParams
from lollms_fast.engine.backend import Backend, BackendParams

PROMPTS = json.loads((Path(__file__).parent / "prompts.json").read_text())
PARALLEL, CTX_SLOT, N_BATCH, THREADS = 8, 512, 512, 2


async def engine_run(engine: Engine, prompts: list[list[int]], n_predict: int
                     ) -> tuple[list[str], list[int], float, float]:
    """Texts, token counts, decode time (first piece to end) and wall time (prompts too)."""
    params = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=n_predict)
    engine.drop_cache()
    t0 = time.perf_counter()
    gens = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    first: list[float] = []

    async def drain(gen) -> None:  # type: ignore[no-untyped-def]
        async for _ in gen:
            if not first:
                first.append(time.perf_counter())

    await asyncio.gather(*(drain(g) for g in gens))
    end = time.perf_counter()
    finishes = [g.finish for g in gens]
    return ([f.text for f in finishes], [f.n_generated for f in finishes],
            end - first[0], end - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not USING_EXTENSIONS:
        sys.exit("the native modules are not in use (LOLLMS_FAST_NO_EXTENSIONS is set)")
    model = args.model or default_model()
    streams = [int(s) for s in args.streams.split(",")]

    raw = RawContext(model, n_ctx=CTX_SLOT * PARALLEL, n_batch=N_BATCH, n_threads=THREADS,
                     n_seq_max=PARALLEL)
    backend = Backend(BackendParams(model, n_ctx=CTX_SLOT * PARALLEL, n_batch=N_BATCH,
                                    n_threads=THREADS, n_seq_max=PARALLEL))
    engine = Engine(backend, parallel=PARALLEL, n_ctx_slot=CTX_SLOT, n_batch=N_BATCH,
                    queue_size=0)
    engine.start()
    loop = asyncio.new_event_loop()
    prompts = [raw.tokenize(p) for p in PROMPTS]
    n = args.n_predict

    single = Table(f"single stream, greedy, n_predict {n}: decode tokens/s "
                   f"(first token to last)")
    raw_row = single.row("raw llama_decode + greedy loop", "tok/s")
    eng_row = single.row("lollms_fast engine", "tok/s", reference=raw_row.name)
    agg = Table(f"aggregate tokens/s (generated / wall time incl. prompts), greedy, "
                f"n_predict {n}")
    mismatches: list[str] = []
    count_errors: list[str] = []

    def single_round(i: int, record: bool) -> None:
        prompt = prompts[i % len(prompts)]
        r = raw.greedy(prompt, n)
        texts, counts, decode_s, _ = loop.run_until_complete(engine_run(engine, [prompt], n))
        if texts[0] != raw.text(r.tokens[0]):
            mismatches.append(f"prompt {i % len(prompts)}")
        if record:
            raw_row.samples.append((len(r.tokens[0]) - 1) / r.decode_s)
            eng_row.samples.append((counts[0] - 1) / decode_s)

    def aggregate_round(k: int, record: bool) -> None:
        batch = prompts[:k]
        r = raw.batched_greedy(batch, n)
        _, counts, _, wall = loop.run_until_complete(engine_run(engine, batch, n))
        for seq, (raw_tokens, count) in enumerate(zip(r.tokens, counts, strict=True)):
            if count != len(raw_tokens) and count < n and len(raw_tokens) == n:
                count_errors.append(f"{k} streams, request {seq}: {count} vs {len(raw_tokens)}")
        if record:
            agg.row(f"raw batched loop, {k} streams", "tok/s").samples.append(
                r.n_generated / (r.prompt_s + r.decode_s))
            agg.row(f"lollms_fast engine, {k} streams", "tok/s",
                    reference=f"raw batched loop, {k} streams").samples.append(sum(counts) / wall)

    single_round(0, record=False)  # warm-up
    for i in range(args.rounds):
        single_round(i, record=True)
    for k in streams:
        aggregate_round(k, record=False)
        for _ in range(max(2, args.rounds - 2)):
            aggregate_round(k, record=True)
    engine_1 = agg.rows.get("lollms_fast engine, 1 streams")
    for k in streams:
        row = agg.rows[f"lollms_fast engine, {k} streams"]
        if engine_1 is not None and k > 1:
            scaled = agg.row(f"engine {k} streams / engine 1 stream", "x")
            scaled.samples.append(row.median / engine_1.median)

    single.checks["engine text == raw greedy text, every round"] = not mismatches or mismatches
    agg.checks["token counts match the raw loop (or EOG)"] = not count_errors or count_errors
    single.print()
    agg.print()
    ok = not mismatches and not count_errors
    print("correctness:", "OK" if ok else "FAILED")
    write_json(args.json, [single, agg], {"n_threads": THREADS, "parallel": PARALLEL,
                                          "ctx_slot": CTX_SLOT, "n_batch": N_BATCH,
                                          "n_predict": n, "rounds": args.rounds})
    engine.close()
    raw.close()
    loop.close()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
