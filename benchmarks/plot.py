"""The README's plot from a `benchmarks/run.py --json` file: aggregate tokens/s against the
number of concurrent clients for every contender, and time-to-first-token bars; with
`--markdown`, the README's headline table from the same file.

    .venv/bin/python benchmarks/plot.py results.json docs/benchmark.png [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt

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


def markdown(doc: dict[str, Any]) -> str:
    """The README's headline table (medians of one run) from the same JSON."""
    rows = {r["name"]: r for t in doc["tables"] for r in t["rows"]}

    def cell(name: str, fmt: str = "{:.0f}") -> str:
        r = rows.get(name)
        return "–" if r is None else fmt.format(r["median"])

    top = max(doc["plot"]["clients"])
    lol, peer, raw = "lollms_fast", "llama-cpp-python server", "raw greedy loop"
    lines = [
        "| median of one run | lollms_fast | llama-cpp-python server | raw llama.cpp loop |",
        "|---|---|---|---|",
        f"| single-stream decode, tokens/s | {cell(lol + ': decode')} | "
        f"{cell(peer + ': decode')} | {cell(raw + ': decode')} |",
        f"| aggregate tokens/s, {top} clients | {cell(f'{lol}, {top} clients')} | "
        f"{cell(f'{peer}, {top} clients')} | "
        f"{cell(f'raw batched loop, {top} sequences')} (batched) |",
        f"| gap between pieces p50 / p99, {top} clients, ms | "
        f"{cell(f'{lol}, {top} clients: p50')} / {cell(f'{lol}, {top} clients: p99')} | "
        f"{cell(f'{peer}, {top} clients: p50')} / {cell(f'{peer}, {top} clients: p99')} | |",
        f"| time to first token, new short prompt, ms | {cell(lol + ': TTFT cold')} | "
        f"{cell(peer + ': TTFT cold')} | {cell(raw + ': TTFT (prefill)')} |",
        f"| time to first token, 2nd turn after ~1,000 tokens, ms | "
        f"{cell('same server (prefix reused)')} (fresh server: "
        f"{cell('fresh server, after a warm-up answer')}) | | |",
        f"| event-loop thread CPU per token, µs | {cell(lol + ': event-loop thread CPU')} | "
        f"{cell(peer + ': event-loop thread CPU')} | |",
        f"| `stop_gen` -> `final`, ms (one decode step: "
        f"{cell('one decode step (single stream), for scale', '{:.1f}')}) | "
        f"{cell('stop_gen -> final', '{:.1f}')} | | |",
        f"| REST p50 / p99 with 50 clients + 8 streams, ms: `/list_discussions` (10,000) | "
        f"{cell('/list_discussions (10,000): p50')} / "
        f"{cell('/list_discussions (10,000): p99')} | | |",
        f"| longest event-loop stall while 8 answers stream, ms | "
        f"{cell('longest event-loop stall, 8 streams only')} | | |",
        f"| peak RSS, MB | {cell('lollms_fast server (8 slots x 2048)')} (8 slots) | "
        f"{cell('llama-cpp-python server (n_ctx 2048)')} (1 slot) | |",
    ]
    head = doc.get("headline", {})
    if head:
        lines.append("")
        lines.append("| ratio, same run | measured | target |")
        lines.append("|---|---|---|")
        names = {"single_stream_vs_raw": "single stream, Socket.IO vs raw greedy loop",
                 "second_turn_ttft_vs_fresh_server":
                     "2nd-turn time to first token, prefix reused vs fresh server"}
        for key, v in head.items():
            label = names.get(key, key.replace("_", " ").replace("vs llama cpp server",
                                                                  "vs llama-cpp-python"))
            lines.append(f"| {label} | {v['value']:.2f} | {v['target']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="output of benchmarks/run.py --json")
    ap.add_argument("png", type=Path, nargs="?", help="where to write the plot")
    ap.add_argument("--markdown", action="store_true",
                    help="print the README's headline table")
    args = ap.parse_args()
    doc = json.loads(args.json.read_text())
    if args.png:
        plot(doc, args.png)
        print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KB)")
    if args.markdown:
        print(markdown(doc))


if __name__ == "__main__":
    main()
