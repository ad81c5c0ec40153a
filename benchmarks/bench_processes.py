"""Raw llama.cpp, several processes at once: why replicas on one machine add no throughput
for the same load, and what they add when each gets a full batch.

    .venv/bin/python benchmarks/bench_processes.py [--rounds 2] [--tokens 96]

Each layout starts P processes, each a `rawloop.RawContext` (nothing of lollms_fast) with T
threads decoding B sequences greedily (one llama_decode per step); they load and warm up,
then decode at the same moment. The figure is the sum of their tokens/s. Layouts (P x T,
batch B): 1x1 B12, 2x1 B6 (the same 12 sequences split over two processes), 1x2 B12, 1x1
B6, 2x1 B12 (each process a full batch). On the default model, a step's time hardly
depends on the batch size up to 12 (the pass over the weights dominates), so throughput is
the number of sequences decoding at once divided by the step time: splitting a load over
processes halves each batch and each step's yield, and only more sequences per process
(more load) use the extra core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LAYOUTS = ((1, 1, 12), (2, 1, 6), (1, 2, 12), (1, 1, 6), (2, 1, 12))


def _worker(model: str, threads: int, batch: int, tokens: int, go: Any, out: Any) -> None:
    from rawloop import RawContext

    ctx = RawContext(Path(model), n_ctx=256 * batch, n_threads=threads, n_seq_max=batch)
    prompts = [ctx.tokenize(f"The history of the printing press begins ({i})")
               for i in range(batch)]
    ctx.batched_greedy(prompts, 8)  # warm up
    ctx.clear()
    go.wait()
    run = ctx.batched_greedy(prompts, tokens)
    out.put(run.n_generated / run.decode_s)
    ctx.close()


def layout(model: Path, procs: int, threads: int, batch: int, tokens: int) -> list[float]:
    go, out = mp.Event(), mp.Queue()
    workers = [mp.Process(target=_worker, args=(str(model), threads, batch, tokens, go, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(6)  # every process loaded and warmed up
    go.set()
    rates = [float(out.get()) for _ in workers]
    for w in workers:
        w.join()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per sequence")
    args = parser.parse_args()
    from lollms_fast.modelfiles import ensure_default_model

    model = ensure_default_model(HERE.parent / ".cache" / "models")
    for _ in range(args.rounds):
        for procs, threads, batch in LAYOUTS:
            rates = layout(model, procs, threads, batch, args.tokens)
            print(f"{procs} process(es) x {threads} thread(s), batch {batch:2}: "
                  f"{sum(rates):6.1f} tok/s  (each {[round(r, 1) for r in rates]})",
                  flush=True)


if __name__ == "__main__":
    main()
