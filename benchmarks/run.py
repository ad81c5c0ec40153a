"""The whole comparison in one command: lollms_fast vs llama.cpp's llama-server vs
llama-cpp-python's server vs raw loops.

    .venv/bin/python benchmarks/build_llama_server.py   # once: the llama-server peer
    .venv/bin/python benchmarks/run.py [--quick] [--json OUT.json] [--model PATH]
    .venv/bin/python benchmarks/plot.py OUT.json docs/benchmark.png

Method (BENCHMARKS.md): every contender runs in this one process tree, n_threads=2,
temperature 0 (and, in the sampling phase, the same sampling parameters for all), a fixed
n_predict, the prompts of benchmarks/prompts.json; rounds are interleaved (raw, lollms_fast,
llama-server, llama-cpp-python, raw, ...) after a warm-up; medians, min, max and ratios from
one run. Contenders:

- raw greedy loop / raw batched loop (benchmarks/rawloop.py), in this process;
- llama-server, llama.cpp's C++ server built from the llama.cpp vendored in the pinned
  llama-cpp-python (build_llama_server.py), a subprocess with lollms_fast's 8 slots of 2,048
  tokens, driven through its OpenAI streaming API (`/v1/completions`, `stream: true`);
- llama-cpp-python's server (`python -m llama_cpp.server`), a subprocess, the same API;
- lollms_fast (`python -m lollms_fast serve`), a subprocess, driven through Socket.IO
  `generate_msg` (delta mode) with a browser-like cookie session, through its own
  `/v1/completions` (the same request as the two others: "lollms_fast /v1"), and its REST
  routes.

Sampling. The greedy phases are repeated for single streams and 8 clients with temperature
0.9, top_k 40, top_p 0.95, repeat penalty 1.1 over 64 (lollms_fast, its /v1 and llama-server;
llama-cpp-python's server answers one request at a time and is measured greedy only). The
OpenAI servers get them in each request (llama-server also min_p 0: its default 0.05 is a
sampler the others do not run); lollms_fast's Socket.IO answers take them from its settings,
changed through `/update_setting` for that phase.

Shared prompt format. For the throughput phases lollms_fast runs a benchmark personality
written into its data dir ("completion": empty conditioning, prefixes, link and
anti-prompts, no welcome message), so the tokens it decodes are exactly BOS + the prompt,
the same tokens the raw loop and llama-cpp-python decode. At temperature 0 the three texts
must then be equal (checked every single-stream round). The second-turn phase uses the
default personality (a real chat layout with its conditioning).

Counting tokens. The answers have a fixed n_predict; `final` carries no token count, so an
answer that ends with finish_reason "length" counts n_predict tokens, and one that ends
early (end-of-generation token) counts the tokens of its text (re-tokenized with the model's
tokenizer). An OpenAI stream that reports `usage` (llama-server, lollms_fast /v1) counts
`completion_tokens`, checked against n_predict when it ends with "length". The raw loops
count what they sampled (EOG excluded).

Metrics and how each is taken:
- single-stream tokens/s: (tokens - 1) / (last piece - first piece) as the client sees it;
  the raw loop: (tokens - 1) / time from its first sampled token to its last;
- TTFT cold: send -> first piece (raw: prefill + first argmax);
- TTFT second turn: a discussion whose turn 1 is a ~1,000-token prompt; turn 2's
  send -> first piece on the same server (prefix reused) vs the same turn (generate_msg_from
  the turn-2 user message) on a freshly started server, both as its very first request and
  after one unrelated warm-up answer (the conservative reference for the ratio);
- aggregate tokens/s with N clients: all tokens / (first send -> last final); per-client
  gaps between pieces pooled, p50 and p99; time to first token, median of the N clients;
- CPU per token outside llama_decode: server process CPU (all threads, /proc) from the first
  piece to `final`, per token, minus the raw loop's CPU per token spent inside llama_decode
  (its CPU in the same window minus its own time outside the decode calls; llama.cpp's
  threads spin while they wait, so time a server takes from them shows up here too); and
  the CPU of the server's event-loop thread alone, per token (exact: no subtraction);
- cancel: `stop_gen` -> `final` after 8 pieces, pieces between them, pieces after `final`;
- REST: bench_rest's seeded 10,000-discussion database and in-server stall ticker, 50
  clients on /list_discussions and /load_discussion while 8 Socket.IO answers stream;
- peak RSS: the kernel's VmHWM of each server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from llama_cpp import llama_cpp as C

from lollms_fast.bench import (
    LollmsClient,
    Stream,
    completion_stream,
    openai_body,
    openai_stream,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_rest  # noqa: E402
from bench_sampling import default_model  # noqa: E402
from build_llama_server import built_path as built_llama_server  # noqa: E402
from rawloop import RawContext  # noqa: E402
from servers import (  # noqa: E402
    ServerProcess,
    llama_cpp_server,
    llama_server,
    lollms_server,
    peak_rss_mb,
)
from table import Row, Table, write_json  # noqa: E402

PROMPTS: list[str] = json.loads((HERE / "prompts.json").read_text())
THREADS, CTX_SIZE, PARALLEL, N_BATCH = 2, 2048, 8, 512
COMPLETION = ("english", "benchmark", "completion")  # language, category, folder
RAW, LOLLMS, PEER = "raw loop", "lollms_fast", "llama-cpp-python server"
V1, SERVER = "lollms_fast /v1", "llama-server"  # lollms_fast's OpenAI API; llama.cpp's server
GREEDY: dict[str, Any] = {"temperature": 0.0, "repeat_penalty": 1.0, "seed": 0}
SAMPLING: dict[str, Any] = {"temperature": 0.9, "top_k": 40, "top_p": 0.95,
                            "repeat_penalty": 1.1, "repeat_last_n": 64, "seed": 0}
CANCEL_AFTER = 8  # pieces received before stop_gen
TURN2 = "Thank you. Now write a title for these notes."
HISTORY_TOKENS = 950  # turn 1's prompt size, so turn 2 follows ~1,000 tokens of history
# llama-server's greedy text may part from the raw loop's where the raw loop's two best
# logits are this close: another KV layout or prompt split moves a logit by hundredths, up to
# 0.19 seen here (a slot that already held the BOS)
NEAR_TIE = 0.25


@dataclass(frozen=True)
class Mode:
    n_predict: int
    single_rounds: int
    agg_rounds: int
    clients: tuple[int, ...]
    ttft_rounds: int
    cancel_rounds: int
    rest_requests: int
    rest_clients: int = 50
    streams: int = 8


FULL = Mode(n_predict=128, single_rounds=5, agg_rounds=3, clients=(1, 2, 4, 8),
            ttft_rounds=3, cancel_rounds=5, rest_requests=400)
QUICK = Mode(n_predict=48, single_rounds=2, agg_rounds=1, clients=(1, 8), ttft_rounds=1,
             cancel_rounds=2, rest_requests=100)


# ------------------------------------------------------------------ helpers


def write_completion_personality(data_dir: Path) -> None:
    """A personality that adds nothing around the prompt (see the module docstring)."""
    folder = data_dir / "personalities" / Path(*COMPLETION)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": "completion", "author": "benchmarks", "version": "1.0.0",
        "personality_conditioning": "", "welcome_message": "", "user_message_prefix": "",
        "ai_message_prefix": "", "link_text": "", "anti_prompts": [],
    }))


def completion_env() -> dict[str, str]:
    language, category, folder = COMPLETION
    return {"LOLLMS_PERSONALITY_LANGUAGE": language, "LOLLMS_PERSONALITY_CATEGORY": category,
            "LOLLMS_PERSONALITY": folder}


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Tokens:
    """The model's tokenizer (from the raw context), for prompts and for counting."""

    def __init__(self, raw: RawContext) -> None:
        self.raw = raw

    def prompt(self, text: str) -> list[int]:
        return self.raw.tokenize(text)  # BOS + text, special tokens parsed (as the servers)

    def count(self, text: str) -> int:
        return max(0, len(self.raw.tokenize(text)) - 1)  # without the BOS

    def of(self, s: Stream, n_predict: int) -> int:
        """Tokens of one streamed answer (see "Counting tokens")."""
        return n_predict if s.finish_reason == "length" else self.count(s.text)


class Cpu:
    """A server's CPU (whole process, and its event-loop thread) from its first piece on."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start: tuple[float, float] | None = None
        self.total_s = self.loop_s = 0.0

    def first(self, _stream: Stream) -> None:  # the clients' on_piece hook
        if self.start is None:
            self.start = (self.server.cpu_s(), self.server.main_thread_cpu_s())

    def end(self) -> Cpu:
        assert self.start is not None, "no piece arrived"
        self.total_s = self.server.cpu_s() - self.start[0]
        self.loop_s = self.server.main_thread_cpu_s() - self.start[1]
        return self


@dataclass
class RawTimed:
    tokens: list[int]
    ttft_s: float  # prefill + first argmax
    decode_s: float  # first sampled token -> last
    cpu_s: float  # process CPU (all threads) in the decode window
    outside_s: float  # wall time of the decode window spent outside llama_decode


def timed_greedy(raw: RawContext, prompt: list[int], n_predict: int, apart: int = 0
                 ) -> RawTimed:
    """rawloop's greedy loop, also timing its decode calls and its CPU (same semantics:
    stop at EOG or n_predict, EOG not counted). `apart`: decode the first tokens on their
    own first, as a server whose prefix cache already holds them has them (the rounding
    of a decode depends on what is in its batch)."""
    raw.clear()
    t0 = time.perf_counter()
    if apart:
        raw.decode([(t, i, 0, False) for i, t in enumerate(prompt[:apart])])
        raw.decode([(t, apart + i, 0, i == len(prompt) - apart - 1)
                    for i, t in enumerate(prompt[apart:])])
    else:
        raw.prefill(prompt, 0)
    token = int(np.argmax(raw.logits(-1)))
    t1, c1 = time.perf_counter(), time.process_time()
    out: list[int] = []
    inside = 0.0
    pos = len(prompt)
    while not C.llama_vocab_is_eog(raw.vocab, token):
        out.append(token)
        if len(out) >= n_predict:
            break
        d0 = time.perf_counter()
        raw.decode([(token, pos, 0, True)])
        inside += time.perf_counter() - d0
        pos += 1
        token = int(np.argmax(raw.logits(0)))
    t2, c2 = time.perf_counter(), time.process_time()
    return RawTimed(out, t1 - t0, t2 - t1, c2 - c1, (t2 - t1) - inside)


def parting_step(raw: RawContext, tokens: list[int], text: str) -> int:
    """The first of the raw loop's tokens whose bytes leave `text` (len(tokens): the raw
    loop ended where `text` goes on, or the reverse)."""
    target, done = text.encode(), b""
    for step, token in enumerate(tokens):
        done += raw.piece(token)
        if not target.startswith(done):
            return step
    return len(tokens)


def top2_margin(raw: RawContext, prompt: list[int], tokens: list[int], step: int) -> float:
    """The gap between the two highest logits when timed_greedy chose its token number
    `step`, replayed the way it ran (the prompt in one batch, then a token per decode)."""
    raw.clear()
    raw.prefill(prompt, 0)
    row = raw.logits(-1)
    for pos, token in enumerate(tokens[:step], start=len(prompt)):
        raw.decode([(token, pos, 0, True)])
        row = raw.logits(0)
    second, first = np.partition(row, -2)[-2:]
    return float(first - second)


@contextlib.contextmanager
def flash_attention_off() -> Iterator[None]:
    """RawContext takes llama.cpp's default context parameters, where flash attention is
    "auto" (on, on CPU); llama-cpp-python's server creates its context with it off. The two
    give slightly different logits, so greedy texts may part after a near-tie; a raw loop
    with it off is the right reference for llama-cpp-python's text."""
    original = C.llama_context_default_params

    def patched() -> Any:
        params = original()
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        return params
    C.llama_context_default_params = patched
    try:
        yield
    finally:
        C.llama_context_default_params = original


def add(table: Table, name: str, unit: str, value: float, reference: str | None = None,
        higher_is_better: bool = True) -> Row:
    row = table.row(name, unit, reference=reference, higher_is_better=higher_is_better)
    row.samples.append(value)
    return row


# ------------------------------------------------------------------ phases


class Bench:
    def __init__(self, mode: Mode, model: Path, work: Path, llama_server: Path | None
                 ) -> None:
        self.mode, self.model, self.work = mode, model, work
        self.llama_server = llama_server  # the binary; None: left out (--skip-llama-server)
        self.openai: dict[str, ServerProcess] = {}  # contenders driven through /v1
        self._http: aiohttp.ClientSession | None = None
        self.n = mode.n_predict
        # same n_ctx / sequences as the server's engine (ctx_size x parallel, unified KV)
        self.raw = RawContext(model, n_ctx=CTX_SIZE * PARALLEL, n_batch=N_BATCH,
                              n_threads=THREADS, n_seq_max=PARALLEL)
        with flash_attention_off():  # only to check llama-cpp-python's text (not timed)
            self.raw_no_fa = RawContext(model, n_ctx=CTX_SIZE, n_batch=N_BATCH,
                                        n_threads=THREADS, n_seq_max=1)
        self.tok = Tokens(self.raw)
        self.prompt_tokens = [self.tok.prompt(p) for p in PROMPTS]
        self.single = Table(f"single stream, greedy, n_predict {self.n}")
        self.agg = Table(f"aggregate tokens/s with N concurrent clients (all tokens / first "
                         f"send to last final), n_predict {self.n}")
        self.ttft_n = Table("time to first token with N concurrent clients, median client")
        self.gaps = Table("gap between pieces per client, pooled over clients (ms)")
        self.sampled = Table(f"sampling: temperature 0.9, top_k 40, top_p 0.95, repeat "
                             f"penalty 1.1 over 64, n_predict {self.n}")
        self.turns = Table("time to first token, second turn after ~1,000 tokens of history "
                           "(default personality)")
        self.cancel = Table("cancel: stop_gen after 8 pieces (lollms_fast, Socket.IO)")
        self.rest = Table(f"REST under load: {mode.rest_clients} clients while "
                          f"{mode.streams} answers stream (bench_rest database)")
        self.memory = Table("peak RSS (VmHWM)")
        # failures: a wrong answer fails the run
        self.checks: dict[str, list[str]] = {"text": [], "counts": [], "cancel": []}
        # facts worth knowing that are not errors (see where they are recorded)
        self.notes: list[str] = []
        self.phase_s: dict[str, float] = {}
        self._phase: tuple[str, float] | None = None
        self.extra: dict[str, Any] = {}

    def phase(self, name: str) -> None:
        """Progress on the terminal, and each phase's duration for the JSON."""
        now = time.perf_counter()
        if self._phase is not None:
            self.phase_s[self._phase[0]] = now - self._phase[1]
        self._phase = (name, now) if name else None
        if name:
            print(f"{name} ...", flush=True)

    def tables(self) -> list[Table]:
        return [self.single, self.agg, self.ttft_n, self.gaps, self.sampled, self.turns,
                self.cancel, self.rest, self.memory]

    # --------------------------------------------------------------- main servers

    async def main_phases(self) -> None:
        data_dir = self.work / "lollms"
        write_completion_personality(data_dir)
        lollms = lollms_server(model=self.model, data_dir=data_dir, n_predict=self.n,
                               threads=THREADS, ctx_size=CTX_SIZE, parallel=PARALLEL,
                               log_path=self.work / "lollms.log", extra_env=completion_env())
        peer = llama_cpp_server(model=self.model, threads=THREADS, n_ctx=CTX_SIZE,
                                log_path=self.work / "llama_cpp_server.log")
        cpp = None
        if self.llama_server is not None:
            cpp = llama_server(binary=self.llama_server, model=self.model, threads=THREADS,
                               ctx_size=CTX_SIZE, parallel=PARALLEL, n_batch=N_BATCH,
                               log_path=self.work / "llama_server.log")
        servers = [s for s in (lollms, cpp, peer) if s is not None]
        try:
            for server in servers:  # one at a time: each loads the model on 2 cores
                await asyncio.to_thread(server.start)
            clients = [await LollmsClient(lollms.url).open()
                       for _ in range(max(self.mode.clients))]
            # a connection per request, for every OpenAI contender alike: llama-server
            # closes a kept-alive connection after a streamed answer, so reusing it fails
            # the next request ("Can not write request body")
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                self._http = http
                # the OpenAI-driven contenders, in the order each round runs them
                if await answers_completions(http, lollms.url):
                    self.openai[V1] = lollms
                else:
                    self.notes.append("lollms_fast does not answer POST /v1/completions: "
                                      "the lollms_fast /v1 contender is left out")
                    print("note:", self.notes[-1], flush=True)
                if cpp is not None:
                    self.openai[SERVER] = cpp
                self.openai[PEER] = peer
                print("servers up: " + ", ".join(f"{s.name} {s.start_s:.1f} s"
                                                  for s in servers), flush=True)
                await self.single_phase(lollms, clients[0])
                await self.aggregate_phase(clients)
                await self.sampling_phase(lollms, clients)
                await self.cancel_phase(clients[0])
            self.phase("")
            add(self.memory, "lollms_fast server (8 slots x 2048)", "MB",
                lollms.peak_rss_mb(), higher_is_better=False)
            if cpp is not None:
                add(self.memory, "llama-server (8 slots x 2048)", "MB", cpp.peak_rss_mb(),
                    higher_is_better=False)
            add(self.memory, "llama-cpp-python server (n_ctx 2048)", "MB",
                peer.peak_rss_mb(), higher_is_better=False)
            for c in clients:
                await c.close()
        finally:
            for server in servers:
                server.stop()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "only inside main_phases"
        return self._http

    def count(self, s: Stream) -> int:
        """Tokens of one answer: the server's own count when its stream reports `usage`,
        else as "Counting tokens" says."""
        return s.usage_tokens if s.usage_tokens is not None else self.tok.of(s, self.n)

    def check_ended(self, where: str, name: str, s: Stream) -> None:
        """Every answer runs to n_predict or ends at an end-of-generation token; a server
        that counts its tokens must count n_predict for `length`."""
        if s.finish_reason not in ("length", "stop"):
            self.checks["counts"].append(f"{where}, {name}: finish_reason {s.finish_reason}")
        elif s.finish_reason == "length" and s.usage_tokens not in (None, self.n):
            self.checks["counts"].append(f"{where}, {name}: finish_reason length after "
                                         f"{s.usage_tokens} tokens, n_predict {self.n}")

    async def single_phase(self, lollms: ServerProcess, client: LollmsClient) -> None:
        self.phase("single stream")
        for r in range(self.mode.single_rounds + 1):  # round 0 is the warm-up
            i = r % len(PROMPTS)
            record = r > 0
            raw = await asyncio.to_thread(timed_greedy, self.raw, self.prompt_tokens[i],
                                          self.n)
            answers = {LOLLMS: await self.lollms_once(lollms, client, PROMPTS[i])}
            for name, server in self.openai.items():
                answers[name] = await self.openai_timed(name, server, PROMPTS[i])
            # the reference of each: the raw loop with the same attention kernel (flash
            # attention on, as llama.cpp's default, but off in llama-cpp-python's server)
            refs = {name: raw for name in answers}
            if PEER in answers:
                # llama-cpp-python keeps the previous prompt's KV: from the second request
                # on, it has the BOS cached and decodes the rest of the prompt after it
                refs[PEER] = await asyncio.to_thread(timed_greedy, self.raw_no_fa,
                                                     self.prompt_tokens[i], self.n,
                                                     1 if r else 0)
            for name, (s, _cpu) in answers.items():
                await self.check_greedy(f"prompt {i}", name, s, refs[name], i)
            if not record:
                continue
            n_raw = len(raw.tokens)
            ref = add(self.single, "raw greedy loop: decode", "tok/s",
                      (n_raw - 1) / raw.decode_s).name
            for name, (s, _cpu) in answers.items():
                add(self.single, f"{name}: decode", "tok/s",
                    (self.count(s) - 1) / (s.piece_times[-1] - s.t_first), reference=ref)
            ref = add(self.single, "raw greedy loop: TTFT (prefill)", "ms",
                      raw.ttft_s * 1000, higher_is_better=False).name
            for name, (s, _cpu) in answers.items():
                add(self.single, f"{name}: TTFT cold", "ms", s.ttft * 1000, reference=ref,
                    higher_is_better=False)
            add(self.single, "raw greedy loop: CPU outside decode", "us/tok",
                raw.outside_s / (n_raw - 1) * 1e6, higher_is_better=False)
            # minus the CPU a raw loop spends inside llama_decode per token, with the same
            # attention kernel as the server
            for name, (s, cpu) in answers.items():
                ref_run = refs[name]
                decode_cpu = (ref_run.cpu_s - ref_run.outside_s) / (len(ref_run.tokens) - 1)
                add(self.single, f"{name}: CPU outside decode", "us/tok",
                    (cpu.total_s / (self.count(s) - 1) - decode_cpu) * 1e6,
                    higher_is_better=False)
            for name, (s, cpu) in answers.items():
                if name == SERVER:  # no event loop: its first thread runs llama_decode
                    continue
                add(self.single, f"{name}: event-loop thread CPU", "us/tok",
                    cpu.loop_s / (self.count(s) - 1) * 1e6, higher_is_better=False)

    async def check_greedy(self, where: str, name: str, s: Stream, ref: RawTimed,
                           prompt: int) -> None:
        """A single greedy answer must be the raw loop's, text and token count. llama-server
        keeps its KV cache in another layout (a stream per slot, sliding-window layers
        kept to their window), so its attention sums in another order: its text may part
        from the raw loop's where the raw loop's two best tokens were a near-tie, and only
        there (checked; see "Numerics")."""
        raw = self.raw_no_fa if name == PEER else self.raw
        count = len(ref.tokens)
        if s.text != raw.text(ref.tokens) and name == SERVER:
            step = parting_step(raw, ref.tokens, s.text)
            margin = await asyncio.to_thread(top2_margin, raw, self.prompt_tokens[prompt],
                                             ref.tokens, step)
            if margin > NEAR_TIE:
                self.checks["text"].append(f"{where}: {name} text parts from the raw loop's "
                                           f"at token {step}, top-2 logits {margin:.3f} apart")
            else:
                self.notes.append(f"{where}: {name} text parts from the raw loop's at token "
                                  f"{step}, a near-tie (top-2 logits {margin:.3f} apart)")
            self.check_ended(where, name, s)
            return
        if s.text != raw.text(ref.tokens):
            self.checks["text"].append(f"{where}: {name} text != raw greedy text")
        if self.count(s) != count or s.finish_reason not in ("length", "stop"):
            self.checks["counts"].append(f"{where}: {name} {self.count(s)} tokens "
                                         f"({s.finish_reason}), raw loop {count}")

    async def lollms_once(self, server: ServerProcess, client: LollmsClient, prompt: str
                          ) -> tuple[Stream, Cpu]:
        """One answer in a new discussion, and the server's CPU from first piece to final."""
        await client.new_discussion()
        cpu = Cpu(server)
        client.on_piece = cpu.first
        try:
            s = await client.generate(prompt)
        finally:
            client.on_piece = None
        if s.error:
            raise RuntimeError(f"{LOLLMS}: {s.error}")
        return s, cpu.end()

    async def openai_once(self, name: str, server: ServerProcess, prompt: str,
                          sampling: bool = False,
                          on_piece: Callable[[Stream], None] | None = None
                          ) -> Stream:
        """One streamed `/v1/completions` answer. llama-cpp-python's server gets the request
        it always got (greedy); the others ask for `usage` and get min_p off where it is on
        by default (llama-server), so the three sample the same way."""
        if name == PEER:
            assert not sampling, "llama-cpp-python's server is measured greedy only"
            return await completion_stream(self.http, server.url, prompt, self.n,
                                           on_piece=on_piece)
        params = dict(SAMPLING if sampling else GREEDY)
        if name == SERVER:
            params["min_p"] = 0.0
        body = openai_body("completions", prompt, self.n, params, None)
        s = await openai_stream(self.http, server.url, body, on_piece=on_piece)
        if s.error:
            raise RuntimeError(f"{name}: {s.error}")
        return s

    async def openai_timed(self, name: str, server: ServerProcess, prompt: str
                           ) -> tuple[Stream, Cpu]:
        cpu = Cpu(server)
        s = await self.openai_once(name, server, prompt, on_piece=cpu.first)
        return s, cpu.end()

    async def aggregate_phase(self, clients: list[LollmsClient]) -> None:
        self.phase("aggregate")
        top = max(self.mode.clients)
        await self.aggregate_round(top, clients, record=False)  # warm-up
        for _ in range(self.mode.agg_rounds):
            for k in self.mode.clients:
                await self.aggregate_round(k, clients, record=True)
        for k in self.mode.clients:
            if k > 1 and f"{LOLLMS}, 1 clients" in self.agg.rows:
                add(self.agg, f"{LOLLMS}: {k} clients / 1 client", "x",
                    self.agg.rows[f"{LOLLMS}, {k} clients"].median
                    / self.agg.rows[f"{LOLLMS}, 1 clients"].median)

    async def aggregate_round(self, k: int, clients: list[LollmsClient], record: bool,
                              sampling: bool = False) -> None:
        """k clients at once on each server in turn (and, greedy, the raw batched loop)."""
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(k)]
        raw = None
        if not sampling:
            raw = await asyncio.to_thread(self.raw.batched_greedy, self.prompt_tokens[:k],
                                          self.n)
        # lollms_fast: each client in a discussion of its own
        for c in clients[:k]:
            await c.new_discussion()
        t0 = time.perf_counter()
        futures = [await c.start(p) for c, p in zip(clients, prompts, strict=False)]
        lol = list(await asyncio.wait_for(asyncio.gather(*futures), 600))
        runs = {LOLLMS: (lol, max(s.t_end for s in lol) - t0)}
        for name, server in self.openai.items():
            if sampling and name == PEER:
                continue
            t0 = time.perf_counter()
            streams = list(await asyncio.gather(*(self.openai_once(name, server, p, sampling)
                                                  for p in prompts)))
            runs[name] = (streams, max(s.t_end for s in streams) - t0)
        label = f"{k} clients" + (", sampling" if sampling else "")
        for name, (streams, _wall) in runs.items():
            for i, s in enumerate(streams):
                if s.error:
                    raise RuntimeError(f"{label}, {name} #{i}: {s.error}")
                self.check_ended(label, f"{name} #{i}", s)
                # batching changes logits slightly (see "Numerics"): texts are compared only
                # in the single-stream phase, which runs before any batch
        if not record:
            return
        table = self.sampled if sampling else self.agg
        ref = None
        if raw is not None:
            ref = add(self.agg, f"raw batched loop, {k} sequences", "tok/s",
                      raw.n_generated / (raw.prompt_s + raw.decode_s)).name
        # the peers against the raw loop, lollms_fast against the strongest peer present
        order = [n for n in (SERVER, PEER, LOLLMS, V1) if n in runs]
        peer = f"{SERVER}, {label}" if SERVER in runs else f"{PEER}, {label}"
        for name in order:
            streams, wall = runs[name]
            add(table, f"{name}, {label}", "tok/s", sum(self.count(s) for s in streams) / wall,
                reference=ref if name in (SERVER, PEER) else peer)
        for name in order:
            streams = runs[name][0]
            ttft_ref = f"{SERVER}, {label}: TTFT" if SERVER in runs and name != SERVER \
                else None
            add(self.ttft_n, f"{name}, {label}: TTFT", "ms",
                pct([s.ttft for s in streams], 0.5) * 1000, reference=ttft_ref,
                higher_is_better=False)
            gaps = [g for s in streams for g in s.gaps()]
            if gaps:
                add(self.gaps, f"{name}, {label}: p50", "ms", pct(gaps, 0.5) * 1000,
                    higher_is_better=False)
                add(self.gaps, f"{name}, {label}: p99", "ms", pct(gaps, 0.99) * 1000,
                    higher_is_better=False)

    async def lollms_settings(self, client: LollmsClient, values: dict[str, Any]
                              ) -> dict[str, Any]:
        """Change lollms_fast's sampling settings (its Socket.IO answers use them: the config
        overrides the personality's); return what they were."""
        async with client.http.get("/get_config") as resp:
            resp.raise_for_status()
            before = await resp.json()
        for name, value in values.items():
            async with client.http.post("/update_setting", json={"setting_name": name,
                                                                   "setting_value": value}
                                        ) as resp:
                reply = await resp.json()
                if resp.status != 200 or not reply.get("status"):
                    raise RuntimeError(f"update_setting {name}={value}: {reply}")
        return {name: before[name] for name in values}

    async def sampling_phase(self, lollms: ServerProcess, clients: list[LollmsClient]
                             ) -> None:
        """The single stream and the largest N again, sampling (all but llama-cpp-python)."""
        self.phase("sampling")
        greedy = await self.lollms_settings(clients[0], SAMPLING)
        try:
            for r in range(self.mode.single_rounds + 1):  # round 0 is the warm-up
                i = r % len(PROMPTS)
                answers = {LOLLMS: (await self.lollms_once(lollms, clients[0], PROMPTS[i]))[0]}
                for name, server in self.openai.items():
                    if name != PEER:
                        answers[name] = await self.openai_once(name, server, PROMPTS[i],
                                                               sampling=True)
                ref = f"{SERVER}: decode, sampling" if SERVER in answers else None
                for name, s in answers.items():
                    self.check_ended(f"sampling, prompt {i}", name, s)
                    n = self.count(s)
                    if r and n >= 2:  # an answer may end at once: nothing to time then
                        add(self.sampled, f"{name}: decode, sampling", "tok/s",
                            (n - 1) / (s.piece_times[-1] - s.t_first),
                            reference=None if name == SERVER else ref)
            for _ in range(self.mode.agg_rounds):
                await self.aggregate_round(max(self.mode.clients), clients, record=True,
                                           sampling=True)
        finally:
            await self.lollms_settings(clients[0], greedy)

    async def cancel_phase(self, client: LollmsClient) -> None:
        self.phase("cancel")
        step = 1000 / self.single.rows[f"{LOLLMS}: decode"].median
        for r in range(self.mode.cancel_rounds):
            await client.new_discussion()
            enough = asyncio.Event()
            client.on_piece = lambda s: enough.set() if len(s.piece_times) >= CANCEL_AFTER \
                else None
            future = await client.start(PROMPTS[r % len(PROMPTS)])
            try:
                await asyncio.wait_for(enough.wait(), 60)
            finally:
                client.on_piece = None
            t_stop = time.perf_counter()
            await client.stop()
            s = await asyncio.wait_for(future, 60)
            await asyncio.sleep(0.3)  # anything still in flight would arrive by now
            if s.finish_reason != "cancelled":
                self.checks["cancel"].append(f"round {r}: finish_reason {s.finish_reason}")
            if s.late_pieces:
                self.checks["cancel"].append(f"round {r}: {s.late_pieces} pieces after final")
            add(self.cancel, "stop_gen -> final", "ms", (s.t_end - t_stop) * 1000,
                higher_is_better=False)
            add(self.cancel, "pieces between stop_gen and final", "pieces",
                float(sum(1 for t in s.piece_times if t > t_stop)), higher_is_better=False)
            add(self.cancel, "pieces after final", "pieces", float(s.late_pieces),
                higher_is_better=False)
        add(self.cancel, "one decode step (single stream), for scale", "ms", step,
            higher_is_better=False)

    # --------------------------------------------------------------- second turn

    def history_prompt(self) -> str:
        """Turn 1: numbered notes (the committed prompts, repeated) of ~HISTORY_TOKENS."""
        lines = ["Here are my notes for a story collection:"]
        i = 0
        while self.tok.count("\n".join(lines)) < HISTORY_TOKENS:
            lines.append(f"{i + 1}. {PROMPTS[i % len(PROMPTS)]} (idea {i + 1})")
            i += 1
        return "\n".join(lines)

    async def turns_phase(self) -> None:
        self.phase("second turn")
        long_prompt = self.history_prompt()
        self.extra["turn1_prompt_tokens"] = self.tok.count(long_prompt)
        for r in range(self.mode.ttft_rounds):
            data_dir = self.work / f"turns{r}"

            def server() -> ServerProcess:
                # no disk KV tier: the fresh servers must read the history again (they share
                # the data dir, and a tier would resume it: bench_kvcache.py measures that)
                return lollms_server(model=self.model, data_dir=data_dir, n_predict=self.n,
                                     threads=THREADS, ctx_size=CTX_SIZE, parallel=PARALLEL,
                                     log_path=self.work / "lollms_turns.log",
                                     extra_env={"LOLLMS_KV_CACHE_DISK_MB": "0"})

            async def on_fresh(body: Callable[[LollmsClient], Awaitable[Stream]]) -> Stream:
                srv = await asyncio.to_thread(server().start)
                client = await LollmsClient(srv.url).open()
                try:
                    return await body(client)
                finally:
                    await client.close()
                    srv.stop()

            async def conversation(c: LollmsClient) -> Stream:
                discussion = await c.new_discussion()
                first = await c.generate(long_prompt)
                self.extra["turn1_answer_tokens"] = self.tok.of(first, self.n)
                second = await c.generate(TURN2)
                second.ai_message_id = discussion  # keep the discussion id with it
                return second

            warm = await on_fresh(conversation)
            discussion, user_id = warm.ai_message_id, warm.user_message_id
            assert discussion is not None and user_id is not None

            async def same_turn(c: LollmsClient) -> Stream:
                await c.load_discussion(discussion)
                return await c.regenerate(user_id)

            async def same_turn_after_warmup(c: LollmsClient) -> Stream:
                await c.new_discussion()
                await c.generate(PROMPTS[r % len(PROMPTS)])
                return await same_turn(c)

            cold_first = await on_fresh(same_turn)
            cold = await on_fresh(same_turn_after_warmup)
            for s in (cold_first, cold):
                if s.finish_reason not in ("length", "stop"):
                    self.checks["counts"].append(f"second turn, round {r}: finish_reason "
                                                 f"{s.finish_reason}")
                if s.text != warm.text:  # prompt chunks fall differently: rounding may differ
                    self.notes.append(f"second turn, round {r}: the fresh server's text "
                                      f"differs from the prefix-reusing one")
            ref = add(self.turns, "fresh server, after a warm-up answer", "ms",
                      cold.ttft * 1000, higher_is_better=False).name
            add(self.turns, "fresh server, first request", "ms", cold_first.ttft * 1000,
                reference=ref, higher_is_better=False)
            add(self.turns, "same server (prefix reused)", "ms", warm.ttft * 1000,
                reference=ref, higher_is_better=False)

    # --------------------------------------------------------------- REST

    async def rest_phase(self) -> None:
        self.phase("REST under load")
        mode = self.mode
        data_dir = self.work / "rest"
        big_id = await asyncio.to_thread(bench_rest.seed_database,
                                         data_dir / "databases" / "database.db")
        write_completion_personality(data_dir)
        language, category, folder = COMPLETION
        # bench_rest's server reads no LOLLMS_* variables, only the data dir's config file
        (data_dir / "local_config.yaml").write_text(yaml.safe_dump({
            "model": str(self.model), "n_threads": THREADS, "ctx_size": CTX_SIZE,
            "parallel": PARALLEL, "override_personality_model_parameters": True,
            "temperature": 0.0, "repeat_penalty": 1.0, "n_predict": self.n, "seed": 0,
            "personality_language": language, "personality_category": category,
            "personality": folder}))
        server = await asyncio.to_thread(bench_rest.Server, data_dir, True)
        streamers = [await LollmsClient(server.url).open() for _ in range(mode.streams)]
        stop = asyncio.Event()
        streaming = [asyncio.Event() for _ in streamers]

        async def keep_streaming(i: int, c: LollmsClient) -> None:
            # the seeded discussions 1..8 are empty: streaming there adds no discussion, so
            # bench_rest's check of the listing's length still holds
            await c.load_discussion(i + 1)
            c.on_piece = lambda _stream: streaming[i].set()
            while not stop.is_set():
                await c.generate(PROMPTS[i % len(PROMPTS)])

        tasks = [asyncio.create_task(keep_streaming(i, c)) for i, c in enumerate(streamers)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), 120)
            await asyncio.to_thread(server.stall_ms)  # reset
            await asyncio.sleep(3.0)
            add(self.rest, f"longest event-loop stall, {mode.streams} streams only", "ms",
                await asyncio.to_thread(server.stall_ms), higher_is_better=False)
            for route, request in (
                    ("/list_discussions (10,000)", bench_rest.list_request(server.url)),
                    ("/load_discussion (1,000 msgs)",
                     bench_rest.load_request(server.url, big_id))):
                figures = await bench_rest.run_phase(request, mode.rest_clients,
                                                     mode.rest_requests)
                stall = await asyncio.to_thread(server.stall_ms)
                add(self.rest, f"{route}: p50", "ms", figures["p50_ms"],
                    higher_is_better=False)
                add(self.rest, f"{route}: p99", "ms", figures["p99_ms"],
                    higher_is_better=False)
                add(self.rest, f"{route}: longest stall", "ms", stall, higher_is_better=False)
            if not all(not t.done() for t in tasks):
                raise RuntimeError("a background stream ended early")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
            for c in streamers:
                await c.close()
            await asyncio.to_thread(server.close)

    # --------------------------------------------------------------- report

    def headline(self) -> dict[str, Any]:
        """The targets of DESIGN.md, as ratios of this run (with what each says)."""
        single = self.single.rows
        raw = single["raw greedy loop: decode"].median
        top = max(self.mode.clients)
        head: dict[str, Any] = {
            "single_stream_vs_raw": {"value": single[f"{LOLLMS}: decode"].median / raw,
                                     "target": ">= 0.97"}}
        if f"{V1}: decode" in single:
            head["single_stream_v1_vs_raw"] = {
                "value": single[f"{V1}: decode"].median / raw, "target": ">= 0.97",
                "label": "single stream, /v1 vs raw greedy loop"}
        rows = {**self.agg.rows, **self.sampled.rows, **self.ttft_n.rows}
        if SERVER in self.openai:
            for name, tag, via in ((LOLLMS, "", "Socket.IO"), (V1, "_v1", "/v1")):
                for mode, target in (("greedy", ">= 1.0"), ("sampling", ">= 1.2")):
                    label = f"{top} clients" + (", sampling" if mode == "sampling" else "")
                    ours, theirs = rows.get(f"{name}, {label}"), rows[f"{SERVER}, {label}"]
                    if ours is not None:
                        head[f"aggregate_{top}_clients_{mode}{tag}_vs_llama_server"] = {
                            "value": ours.median / theirs.median, "target": target,
                            "label": f"aggregate {top} clients, {mode}, {via} vs llama-server"}
                ours = rows.get(f"{name}, {top} clients: TTFT")
                if ours is not None:
                    head[f"ttft_{top}_clients{tag}_vs_llama_server"] = {
                        "value": ours.median / rows[f"{SERVER}, {top} clients: TTFT"].median,
                        "target": "<= 1.0", "label": f"time to first token, {top} clients, "
                                                     f"{via} vs llama-server"}
        warm = self.turns.rows["same server (prefix reused)"]
        cold = self.turns.rows["fresh server, after a warm-up answer"]
        head[f"aggregate_{top}_clients_vs_llama_cpp_server"] = {
            "value": rows[f"{LOLLMS}, {top} clients"].median
            / rows[f"{PEER}, {top} clients"].median, "target": ">= 2.5"}
        head["second_turn_ttft_vs_fresh_server"] = {"value": warm.median / cold.median,
                                                    "target": "<= 0.15"}
        return head

    def plot_data(self) -> dict[str, Any]:
        ks = list(self.mode.clients)
        top = max(ks)
        series = {"raw batched loop": [self.agg.rows[f"raw batched loop, {k} sequences"].median
                                       for k in ks]}
        for name in (LOLLMS, V1, SERVER, PEER):
            if f"{name}, {top} clients" in self.agg.rows:
                series[name] = [self.agg.rows[f"{name}, {k} clients"].median for k in ks]
        sampled = {name: self.sampled.rows[f"{name}, {top} clients, sampling"].median
                   for name in (LOLLMS, V1, SERVER)
                   if f"{name}, {top} clients, sampling" in self.sampled.rows}
        ttft = {"raw loop, cold": self.single.rows["raw greedy loop: TTFT (prefill)"].median}
        short = {PEER: "llama-cpp-python"}
        for name in (LOLLMS, V1, SERVER, PEER):
            if f"{name}: TTFT cold" in self.single.rows:
                ttft[f"{short.get(name, name)}, cold"] = \
                    self.single.rows[f"{name}: TTFT cold"].median
        for name in (LOLLMS, V1, SERVER):
            if f"{name}, {top} clients: TTFT" in self.ttft_n.rows:
                ttft[f"{name}, {top} clients (median)"] = \
                    self.ttft_n.rows[f"{name}, {top} clients: TTFT"].median
        ttft["lollms_fast turn 2, fresh server"] = \
            self.turns.rows["fresh server, after a warm-up answer"].median
        ttft["lollms_fast turn 2, prefix reused"] = \
            self.turns.rows["same server (prefix reused)"].median
        return {"clients": ks, "aggregate_tok_s": series, "aggregate_sampling_tok_s": sampled,
                "ttft_ms": ttft}


async def answers_completions(http: aiohttp.ClientSession, url: str) -> bool:
    """Whether a server has `POST /v1/completions` (lollms_fast got it with issue 15)."""
    body = {"prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
    async with http.post(url + "/v1/completions", json=body) as resp:
        if resp.status in (404, 405):
            return False
        if resp.status != 200:
            raise RuntimeError(f"{url}/v1/completions: HTTP {resp.status}: "
                               f"{(await resp.read())[:300]!r}")
        return True


def llama_server_version(binary: Path) -> str:
    """What `llama-server --version` says (version, commit, compiler, target)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         timeout=60)
    return " ".join((out.stdout + out.stderr).split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    ap.add_argument("--model", type=Path, help="GGUF file (default: the embedded model)")
    ap.add_argument("--json", help="write every sample and the headline here")
    ap.add_argument("--skip-rest", action="store_true", help="leave out the REST phase")
    ap.add_argument("--llama-server", type=Path, metavar="PATH",
                    help="the llama-server binary (default: build_llama_server.py's)")
    ap.add_argument("--skip-llama-server", action="store_true",
                    help="leave out llama-server (and the ratios against it)")
    args = ap.parse_args()
    mode = QUICK if args.quick else FULL
    model = (args.model or default_model()).resolve()
    binary = None
    if not args.skip_llama_server:
        binary = args.llama_server or built_llama_server()
        if binary is None:
            sys.exit("llama-server, the peer every throughput target is stated against, is "
                     "not built. Build it once (about 10 minutes on 2 cores):\n"
                     "  .venv/bin/python benchmarks/build_llama_server.py\n"
                     "or run without it: --skip-llama-server")
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lollms_bench_") as tmp:
        bench = Bench(mode, model, Path(tmp), binary)
        asyncio.run(bench.main_phases())
        asyncio.run(bench.turns_phase())
        if not args.skip_rest:
            asyncio.run(bench.rest_phase())
        bench.phase("")
        add(bench.memory, "benchmark process (raw loops + clients)", "MB",
            peak_rss_mb(os.getpid()), higher_is_better=False)
        bench.raw.close()
        bench.raw_no_fa.close()
    elapsed = time.perf_counter() - started
    for key, problems in bench.checks.items():
        bench.single.checks[key] = "OK" if not problems else problems
    for t in bench.tables():
        if t.rows:
            t.print()
    for note in bench.notes:
        print("note:", note)
    head = bench.headline()
    print("\nheadline ratios (one run):")
    for key, v in head.items():
        print(f"  {key:52} {v['value']:.3f}  (target {v['target']})")
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{elapsed:.0f} s", flush=True)
    settings = {"mode": "quick" if args.quick else "full", "n_threads": THREADS,
                "ctx_size": CTX_SIZE, "parallel": PARALLEL, "n_predict": mode.n_predict,
                "sampling": SAMPLING, "model": model.name, "elapsed_s": elapsed,
                "llama_server": None if binary is None else llama_server_version(binary),
                "loadavg_before": load_before, "loadavg_after": load_after,
                "phase_s": bench.phase_s, "notes": bench.notes, **bench.extra}
    if args.json:
        write_json(args.json, [t for t in bench.tables() if t.rows], settings)
        doc = json.loads(Path(args.json).read_text())
        doc["headline"], doc["plot"] = head, bench.plot_data()
        Path(args.json).write_text(json.dumps(doc, indent=2))
    if any(bench.checks.values()):
        print("correctness: FAILED")
        sys.exit(1)
    print("correctness: OK")


if __name__ == "__main__":
    main()
