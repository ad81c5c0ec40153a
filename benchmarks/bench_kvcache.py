"""KV cache tiers (SPEC section 10): time to first token with the RAM/disk tiers against
without them, on the engine with the real default model, in one run.

- rotation: D discussions (default 24), each with about 1,000 tokens of history, take turns
  over 8 slots, so every turn finds its discussion evicted from the slots. Median time to
  first token of the measured rounds, tiers on vs tiers off (target <= 0.06).
- restart: a discussion of about 1,000 tokens continues right after its engine is closed and
  a new one started on the same data dir (the clean shutdown saved its slot to disk), vs a
  new engine without a disk tier (target <= 0.06).
- cost: single-stream decode tokens/s with tiers on (no eviction) vs off (target >= 0.99).

Each turn's prompt is the previous prompt, the answer's text tokenized again, and a new user
line, as the chat service builds it. Contenders interleave; greedy, n_threads 2.

    python benchmarks/bench_kvcache.py [--discussions 24] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import default_model
from table import Table, write_json

from lollms_fast.engine import Engine, Finish, GenerationRequest, SamplingParams
from lollms_fast.engine.backend import Backend, BackendParams
from lollms_fast.engine.kvcache import KVCache

PARALLEL, CTX_SLOT, N_BATCH, THREADS = 8, 2048, 512, 2
MB = 1024 * 1024
TURN = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=8)
TOPICS = ["rivers", "bread", "volcanoes", "chess", "bees", "glass", "trains", "tides", "paper",
          "bridges", "clocks", "salt", "owls", "copper", "maps", "violins", "rain", "cheese",
          "kites", "ships", "moss", "ink", "honey", "stars", "wool", "sand", "lamps", "ice"]


def history_text(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    line = (f"Notes on {topic}, part {{n}}: the {topic} of discussion {i} have a long story, "
            f"with many details worth keeping in mind for the questions that follow. ")
    return "".join(line.format(n=n) for n in range(36))  # about 1,000 tokens


def new_backend(model: Path) -> Backend:
    return Backend(BackendParams(model, n_ctx=CTX_SLOT * PARALLEL, n_batch=N_BATCH,
                                 n_threads=THREADS, n_seq_max=PARALLEL))


def new_engine(model: Path, kv_dir: Path | None, tiers: bool) -> Engine:
    backend = new_backend(model)
    kv = None
    if tiers:
        kv = KVCache(kv_dir, ram_budget=2048 * MB, disk_budget=4096 * MB if kv_dir else 0,
                     meta={"model_sha256": "bench", **backend.state_format})
    engine = Engine(backend, parallel=PARALLEL, n_ctx_slot=CTX_SLOT, n_batch=N_BATCH,
                    queue_size=64, kv_cache=kv)
    engine.start()
    return engine


async def timed(engine: Engine, prompt: list[int], params: SamplingParams
                ) -> tuple[float, float, Finish]:
    """(submission time, first piece time, finish) of one generation."""
    t0 = time.perf_counter()
    gen = engine.submit(GenerationRequest(prompt, params))
    first = None
    async for _ in gen:
        if first is None:
            first = time.perf_counter()
    finish = await gen.wait()
    return t0, first or time.perf_counter(), finish


async def turn(engine: Engine, prompt: list[int]) -> tuple[float, str]:
    """(time to first token, answer text)."""
    t0, first, finish = await timed(engine, prompt, TURN)
    return first - t0, finish.text


async def rotation(model: Path, discussions: int, rounds: int, tiers: bool) -> list[float]:
    engine = new_engine(model, None, tiers)
    try:
        prompts = [engine.tokenize(history_text(i), True) for i in range(discussions)]
        ttfts: list[float] = []
        for r in range(rounds + 1):  # round 0 builds the histories (not measured)
            for i in range(discussions):
                ttft, answer = await turn(engine, prompts[i])
                if r > 0:
                    ttfts.append(ttft)
                prompts[i] = (prompts[i] + engine.tokenize(answer, False)
                              + engine.tokenize(f"\nAnd what about part {r}?\n", False))
        return ttfts
    finally:
        await asyncio.to_thread(engine.close)


async def restart(model: Path, tiers: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        kv_dir = Path(tmp) / "kv"
        first = new_engine(model, kv_dir, tiers=True)
        prompt = first.tokenize(history_text(7), True)
        _, answer = await turn(first, prompt)
        prompt = prompt + first.tokenize(answer, False) + first.tokenize("\nGo on.\n", False)
        await asyncio.to_thread(first.close)  # a clean shutdown saves the slot
        second = new_engine(model, kv_dir if tiers else None, tiers)
        try:
            ttft, _ = await turn(second, prompt)
            return ttft
        finally:
            await asyncio.to_thread(second.close)


async def decode_rate(model: Path, tiers: bool, n: int = 128) -> float:
    engine = new_engine(model, None, tiers)
    try:
        prompt = engine.tokenize("Write a long story about a lighthouse keeper.", True)
        params = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=n)
        _, first, finish = await timed(engine, prompt, params)
        return (finish.n_generated - 1) / (time.perf_counter() - first)
    finally:
        await asyncio.to_thread(engine.close)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--discussions", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or default_model()
    table = Table(f"KV tiers, {args.discussions} discussions over {PARALLEL} slots")

    for tiers in (True, False):
        name = "rotation TTFT, " + ("tiers" if tiers else "no tiers")
        row = table.row(name, "ms", reference=None if not tiers else
                        "rotation TTFT, no tiers", higher_is_better=False)
        row.samples += [t * 1000 for t in
                        await rotation(model, args.discussions, args.rounds, tiers)]
    for _ in range(args.restarts):
        for tiers in (True, False):
            name = "restart TTFT, " + ("disk tier" if tiers else "no disk tier")
            table.row(name, "ms", reference=None if not tiers else
                      "restart TTFT, no disk tier", higher_is_better=False).samples.append(
                await restart(model, tiers) * 1000)
    for _ in range(3):
        for tiers in (True, False):
            name = "single-stream decode, " + ("tiers on" if tiers else "tiers off")
            table.row(name, "tok/s", reference=None if not tiers else
                      "single-stream decode, tiers off").samples.append(
                await decode_rate(model, tiers))
    # rows were created tiers-first; print the references first for reading
    table.print()
    on = statistics.median(table.rows["rotation TTFT, tiers"].samples)
    off = statistics.median(table.rows["rotation TTFT, no tiers"].samples)
    print(f"\nrotation ratio {on / off:.3f} (target <= 0.06)")
    if args.json:
        write_json(args.json, [table])


if __name__ == "__main__":
    asyncio.run(main())
