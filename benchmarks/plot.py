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
from matplotlib.ticker import NullFormatter

STYLE = {  # contender -> (colour, marker)
    "raw batched loop": ("#888888", "s"),
    "lollms_fast": ("#1f77b4", "o"),
    "lollms_fast /v1": ("#17becf", "D"),
    "llama-server": ("#ff7f0e", "v"),
    "llama-cpp-python server": ("#d62728", "^"),
}
LOL, V1, SERVER, PEER, RAW = ("lollms_fast", "lollms_fast /v1", "llama-server",
                              "llama-cpp-python server", "raw greedy loop")


def colour_of(label: str) -> str:
    """A TTFT bar's colour: its contender's (the longest name it starts with)."""
    for name in sorted(STYLE, key=len, reverse=True):
        if label.startswith(name) or label.startswith(name.removesuffix(" server")):
            return STYLE[name][0]
    return "#888888" if label.startswith("raw") else STYLE[LOL][0]


def plot(doc: dict[str, Any], out: Path) -> None:
    data = doc["plot"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90,
                                      gridspec_kw={"width_ratios": [1, 1.25]})
    clients = data["clients"]
    for name, values in data["aggregate_tok_s"].items():
        colour, marker = STYLE.get(name, ("#2ca02c", "x"))
        dashed = "--" if name == "raw batched loop" else "-"
        left.plot(clients, values, dashed, color=colour, marker=marker, label=name)
    # with sampling: one hollow point per contender at the largest N (runs since issue 15)
    sampled = data.get("aggregate_sampling_tok_s", {})
    for name, value in sampled.items():
        colour, marker = STYLE.get(name, ("#2ca02c", "x"))
        left.plot([max(clients)], [value], marker, color=colour, markerfacecolor="none",
                  markersize=9, label=f"{name}, sampling")
    left.set_xscale("log", base=2)
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_xlabel("concurrent clients (raw loop: sequences in one batch)")
    left.set_ylabel("aggregate tokens/s")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    left.set_title("Throughput", fontsize=10)

    labels = list(data["ttft_ms"])
    values = [data["ttft_ms"][k] for k in labels]
    bars = right.barh(range(len(labels)), values, color=[colour_of(k) for k in labels])
    right.set_yticks(range(len(labels)), labels, fontsize=8)
    right.invert_yaxis()
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(NullFormatter())  # labels on decades only: no overlap
    right.set_xlabel("time to first token, ms (log scale)")
    right.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=8, padding=2)
    right.set_title("Time to first token", fontsize=10)
    settings = doc.get("settings", {})
    how = "greedy (hollow: sampling)" if sampled else "greedy"
    fig.suptitle(f"{settings.get('model', '')}, n_threads {settings.get('n_threads')}, "
                 f"{how}, n_predict {settings.get('n_predict')} "
                 f"({settings.get('mode', '')} run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


RATIO_LABELS = {  # runs before issue 15 name the ratios by key only
    "single_stream_vs_raw": "single stream, Socket.IO vs raw greedy loop",
    "second_turn_ttft_vs_fresh_server":
        "2nd-turn time to first token, prefix reused vs fresh server",
}


def ratio_label(key: str, ratio: dict[str, Any]) -> str:
    if "label" in ratio:
        return str(ratio["label"])
    if key in RATIO_LABELS:
        return RATIO_LABELS[key]
    return key.replace("_", " ").replace("vs llama cpp server", "vs llama-cpp-python")


def markdown(doc: dict[str, Any]) -> str:
    """The README's headline table (medians of one run) from the same JSON. A column per
    contender the run has (lollms_fast over /v1 and llama-server came with issue 15; older
    files give the table they always gave)."""
    rows = {r["name"]: r for t in doc["tables"] for r in t["rows"]}

    def cell(name: str, fmt: str = "{:.0f}") -> str:
        r = rows.get(name)
        return "–" if r is None else fmt.format(r["median"])

    def pair(a: str, b: str) -> str:
        return f"{cell(a)} / {cell(b)}"

    top = max(doc["plot"]["clients"])
    columns = [c for c in (LOL, V1, SERVER, PEER) if f"{c}: decode" in rows] + [RAW]
    heads = {LOL: LOL, V1: V1, SERVER: SERVER, PEER: PEER, RAW: "raw llama.cpp loop"}
    sampling = f"{LOL}, {top} clients, sampling" in rows
    lines = ["| median of one run | " + " | ".join(heads[c] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]

    def line(label: str, cells: dict[str, str]) -> None:
        lines.append(f"| {label} |" + "".join(f" {cells[c]} |" if cells.get(c) else " |"
                                              for c in columns))

    line("single-stream decode, tokens/s",
         {c: cell(f"{c}: decode") for c in columns if c != RAW} | {RAW: cell(RAW + ": decode")})
    if sampling:
        line("single-stream decode with sampling, tokens/s",
             {c: cell(f"{c}: decode, sampling") for c in (LOL, V1, SERVER)})
    line(f"aggregate tokens/s, {top} clients",
         {c: cell(f"{c}, {top} clients") for c in columns if c != RAW}
         | {RAW: f"{cell(f'raw batched loop, {top} sequences')} (batched)"})
    if sampling:
        line(f"aggregate tokens/s, {top} clients, sampling",
             {c: cell(f"{c}, {top} clients, sampling") for c in (LOL, V1, SERVER)})
    line(f"gap between pieces p50 / p99, {top} clients, ms",
         {c: pair(f"{c}, {top} clients: p50", f"{c}, {top} clients: p99")
          for c in columns if c != RAW})
    line("time to first token, new short prompt, ms",
         {c: cell(f"{c}: TTFT cold") for c in columns if c != RAW}
         | {RAW: cell(RAW + ": TTFT (prefill)")})
    if f"{LOL}, {top} clients: TTFT" in rows:
        line(f"time to first token, {top} clients at once (median client), ms",
             {c: cell(f"{c}, {top} clients: TTFT") for c in columns if c != RAW})
    line("time to first token, 2nd turn after ~1,000 tokens, ms",
         {LOL: f"{cell('same server (prefix reused)')} (fresh server: "
               f"{cell('fresh server, after a warm-up answer')})"})
    # llama-server has no event loop: its first thread runs the slots and llama_decode
    line("event-loop thread CPU per token, µs",
         {c: cell(f"{c}: event-loop thread CPU") for c in (LOL, V1, PEER)})
    line(f"`stop_gen` -> `final`, ms (one decode step: "
         f"{cell('one decode step (single stream), for scale', '{:.1f}')})",
         {LOL: cell("stop_gen -> final", "{:.1f}")})
    line("REST p50 / p99 with 50 clients + 8 streams, ms: `/list_discussions` (10,000)",
         {LOL: pair("/list_discussions (10,000): p50", "/list_discussions (10,000): p99")})
    line("longest event-loop stall while 8 answers stream, ms",
         {LOL: cell("longest event-loop stall, 8 streams only")})
    line("peak RSS, MB",
         {LOL: f"{cell('lollms_fast server (8 slots x 2048)')} (8 slots)",
          SERVER: f"{cell('llama-server (8 slots x 2048)')} (8 slots)",
          PEER: f"{cell('llama-cpp-python server (n_ctx 2048)')} (1 slot)"})
    head = doc.get("headline", {})
    if head:
        lines.append("")
        lines.append("| ratio, same run | measured | target |")
        lines.append("|---|---|---|")
        for key, v in head.items():
            lines.append(f"| {ratio_label(key, v)} | {v['value']:.2f} | {v['target']} |")
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
