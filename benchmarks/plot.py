"""The README's plot from a `benchmarks/run.py --json` file: aggregate tokens/s against the
number of concurrent clients for every contender, and time-to-first-token bars.

    .venv/bin/python benchmarks/plot.py results.json docs/benchmark.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # contender -> (colour, marker)
    "raw batched loop": ("#888888", "s"),
    "lollms_fast": ("#1f77b4", "o"),
    "llama-cpp-python server": ("#d62728", "^"),
}


def plot(doc: dict[str, Any], out: Path) -> None:
    data = doc["plot"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90,
                                      gridspec_kw={"width_ratios": [1, 1.25]})
    clients = data["clients"]
    for name, values in data["aggregate_tok_s"].items():
        colour, marker = STYLE.get(name, ("#2ca02c", "x"))
        dashed = "--" if name == "raw batched loop" else "-"
        left.plot(clients, values, dashed, color=colour, marker=marker, label=name)
    left.set_xscale("log", base=2)
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_xlabel("concurrent clients (raw loop: sequences in one batch)")
    left.set_ylabel("aggregate tokens/s")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("Throughput", fontsize=10)

    labels = list(data["ttft_ms"])
    values = [data["ttft_ms"][k] for k in labels]
    colours = ["#888888" if k.startswith("raw") else
               "#d62728" if k.startswith("llama") else "#1f77b4" for k in labels]
    bars = right.barh(range(len(labels)), values, color=colours)
    right.set_yticks(range(len(labels)), labels, fontsize=8)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("time to first token, ms (log scale)")
    right.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=8, padding=2)
    right.set_title("Time to first token", fontsize=10)
    settings = doc.get("settings", {})
    fig.suptitle(f"{settings.get('model', '')}, n_threads {settings.get('n_threads')}, "
                 f"greedy, n_predict {settings.get('n_predict')} "
                 f"({settings.get('mode', '')} run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="output of benchmarks/run.py --json")
    ap.add_argument("png", type=Path, help="where to write the plot")
    args = ap.parse_args()
    plot(json.loads(args.json.read_text()), args.png)
    print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
