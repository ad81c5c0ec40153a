"""The engine: scheduling logic on the scripted fake backend (it says so), then the real model.

Real-model comparisons of batched vs solo runs go by teacher forcing with a tolerance (DESIGN
"Numerics of batching"), never by exact text.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes import BYTE0, ScriptedBackend
from lollms_fast.engine import Engine, Finish, Generation, GenerationRequest, SamplingParams
from lollms_fast.engine.backend import Backend, BackendParams
from lollms_fast.errors import BadRequest, Busy

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=64)


@asynccontextmanager
async def running(backend: Any, **kw: Any) -> AsyncIterator[Engine]:
    options = dict(parallel=2, n_ctx_slot=256, n_batch=32, queue_size=4)
    options.update(kw)
    engine = Engine(backend, **options)
    engine.start()
    try:
        yield engine
    finally:
        await asyncio.to_thread(engine.close)


async def collect(gen: Generation) -> tuple[list[str], Finish]:
    pieces = [p async for p in gen]
    return pieces, await gen.wait()


def ask(engine: Engine, text: str, params: SamplingParams = GREEDY,
        anti_prompts: tuple[str, ...] = ()) -> Generation:
    return engine.submit(GenerationRequest(engine.tokenize(text, True), params, anti_prompts))


# ---------------------------------------------------------------- scripted backend

async def test_pieces_are_whole_characters_one_per_step() -> None:
    backend = ScriptedBackend([b"Hel", b"lo \xf0\x9f", b"\x98", b"\x80", b"!"])
    async with running(backend) as engine:
        pieces, finish = await collect(ask(engine, "hi"))
    assert pieces == ["Hel", "lo ", "😀", "!"]
    assert finish == Finish("stop", None, n_prompt=3, n_reused=0, n_generated=6,
                            text="Hello 😀!")
    assert backend.closed


async def test_anti_prompt_is_cut_and_never_streamed() -> None:
    backend = ScriptedBackend([b"Hi", b" Us", b"er", b": more"])
    async with running(backend) as engine:
        pieces, finish = await collect(ask(engine, "x", anti_prompts=("user:",)))
    assert "".join(pieces) == finish.text == "Hi "
    assert finish.reason == "stop" and finish.n_generated == 4


async def test_n_predict_and_full_context_end_with_length() -> None:
    backend = ScriptedBackend([b"a", b"b"], eog_after=False)
    async with running(backend, n_ctx_slot=8) as engine:
        _, capped = await collect(ask(engine, "x", SamplingParams(n_predict=3)))
        _, full = await collect(ask(engine, "abcd"))  # 5 prompt tokens in an 8-cell slot
    assert (capped.reason, capped.n_generated, capped.text) == ("length", 3, "aba")
    # the 4th sampled token has no position left to be decoded at
    assert (full.reason, full.n_generated) == ("length", 4)


async def test_prompts_that_cannot_fit_are_bad_requests() -> None:
    async with running(ScriptedBackend([b"a"]), n_ctx_slot=8) as engine:
        with pytest.raises(BadRequest):
            ask(engine, "x" * 7)  # BOS + 7 = 8 tokens: no room for an answer
        with pytest.raises(BadRequest):
            engine.submit(GenerationRequest([], GREEDY))


async def test_queue_overflow_is_busy_and_shutdown_cancels_everyone() -> None:
    gate = threading.Semaphore(0)  # no decode happens until released
    backend = ScriptedBackend([b"a"], eog_after=False, gate=gate)
    engine = Engine(backend, parallel=1, n_ctx_slot=64, n_batch=8, queue_size=1)
    engine.start()
    running_gen, queued_gen = ask(engine, "one"), ask(engine, "two")
    with pytest.raises(Busy):
        ask(engine, "three")
    closer = asyncio.create_task(asyncio.to_thread(engine.close))
    while not closer.done():
        gate.release()
        await asyncio.sleep(0.001)
    assert (await running_gen.wait()).reason == "cancelled"
    assert (await queued_gen.wait()).reason == "cancelled"
    assert backend.closed


async def test_cancel_lands_before_the_next_decode() -> None:
    gate = threading.Semaphore(0)
    backend = ScriptedBackend([b"a"], eog_after=False, gate=gate)
    async with running(backend) as engine:
        gen = ask(engine, "x")
        stream = gen.__aiter__()
        gate.release()  # the prompt's decode: the first token comes out
        assert await stream.__anext__() == "a"
        gen.cancel()  # the engine may already wait in the next decode: it is allowed to finish
        decodes_at_cancel = len(backend.calls) + 1
        gate.release(100)
        finish = await gen.wait()
    assert finish.reason == "cancelled"
    assert finish.n_generated <= 2
    assert len(backend.calls) <= decodes_at_cancel


async def test_cancel_while_queued_never_takes_a_slot() -> None:
    gate = threading.Semaphore(0)
    backend = ScriptedBackend([b"a"], gate=gate)
    async with running(backend, parallel=1) as engine:
        first, second = ask(engine, "1"), ask(engine, "2")
        second.cancel()
        second.cancel()  # idempotent
        gate.release(100)
        assert (await second.wait()) == Finish("cancelled", None, 2, 0, 0, "")
        assert (await first.wait()).reason == "stop"
    assert all(seq == 0 for call in backend.calls for seq, *_ in call)


async def test_one_batch_mixes_generation_with_prompt_chunks() -> None:
    backend = ScriptedBackend([b"x", b"y", b"z", b"w"])
    async with running(backend, parallel=3, n_batch=6) as engine:
        gens = [ask(engine, "a" * n) for n in (3, 11, 17)]
        results = [await collect(g) for g in gens]
    for pieces, finish in results:
        assert pieces == ["x", "y", "z", "w"] and finish.reason == "stop"
    assert all(len(call) <= 6 for call in backend.calls)
    mixed = [c for c in backend.calls
             if len({seq for seq, *_ in c}) > 1 and any(not w for *_, w in c)]
    assert mixed, "a generating slot's token never shared a decode with a prompt chunk"


async def test_prefix_reuse_takes_the_best_slot_and_decodes_only_the_suffix() -> None:
    backend = ScriptedBackend([b"ok"])
    async with running(backend, parallel=2) as engine:
        await collect(ask(engine, "first discussion, turn one"))
        await collect(ask(engine, "another discussion entirely"))
        before = engine.stats()["prompt_decoded"]
        _, finish = await collect(ask(engine, "first discussion, turn one and two"))
        decoded = engine.stats()["prompt_decoded"] - before
    prompt_len = len("first discussion, turn one") + 1
    assert finish.n_reused == prompt_len
    assert decoded == finish.n_prompt - prompt_len == len(" and two")


async def test_a_repeated_prompt_reuses_the_slot_holding_it() -> None:
    """A slot whose cache is a long answer to a prompt is taken again for the same prompt
    (most of the prompt is there), not left for the free slot of lowest id."""
    backend = ScriptedBackend([b"x"], eog_after=False)
    prompt = "a long system prompt that many requests repeat"
    long_answer = SamplingParams(temperature=0, repeat_penalty=1.0, n_predict=200)
    forever = SamplingParams(temperature=0, n_predict=100000)
    async with running(backend, parallel=3) as engine:
        busy = [ask(engine, f"hold slot {i}", forever) for i in range(2)]
        await collect(ask(engine, prompt, long_answer))  # slot 2: prompt + 200 tokens
        busy[1].cancel()  # slot 1 is free again, and its id is lower
        await busy[1].wait()
        before = engine.stats()["prompt_decoded"]
        _, finish = await collect(ask(engine, prompt + "?", long_answer))
        decoded = engine.stats()["prompt_decoded"] - before
        busy[0].cancel()
        await busy[0].wait()
    assert finish.n_reused == len(prompt) + 1 and decoded == 1  # only the "?"


async def test_batches_are_in_sequence_order() -> None:
    """llama.cpp splits a batch over per-slot KV streams into micro-batches of consecutive
    sequence ids: every decode lists its sequences in increasing order."""
    backend = ScriptedBackend([b"x"], eog_after=False)
    params = SamplingParams(temperature=0, repeat_penalty=1.0, n_predict=6)
    async with running(backend, parallel=3) as engine:
        gens = [ask(engine, text, params) for text in ("one", "two two", "three three three")]
        for g in gens:
            await collect(g)
        gens = [ask(engine, f"later {i} " * (i + 1), params) for i in range(3)]
        for g in gens:
            await collect(g)
    for call in backend.calls:
        seqs = [seq for seq, _, _, _ in call]
        assert seqs == sorted(seqs), call


async def test_a_decode_error_ends_only_that_request() -> None:
    backend = ScriptedBackend([b"a", b"b", b"c"], fail_token=BYTE0 + ord("!"))
    async with running(backend, parallel=2) as engine:
        good, bad = ask(engine, "fine"), ask(engine, "boom!")
        (_, good_finish), (_, bad_finish) = await collect(good), await collect(bad)
        _, after = await collect(ask(engine, "still serving"))
    assert bad_finish.reason == "error" and "llama_decode failed (-1)" in bad_finish.error
    assert (good_finish.reason, good_finish.text) == ("stop", "abc")
    assert (after.reason, after.text) == ("stop", "abc")
    assert engine.stats()["errors"] == 1


async def test_a_failing_sampler_ends_the_request_not_the_engine() -> None:
    def factory(request: GenerationRequest) -> Any:
        if request.params.seed == 13:
            raise ValueError("unlucky")
        from lollms_fast.engine.scheduler import default_sampler
        return default_sampler(request)

    async with running(ScriptedBackend([b"a"]), sampler_factory=factory) as engine:
        _, bad = await collect(ask(engine, "x", SamplingParams(seed=13)))
        _, good = await collect(ask(engine, "x", SamplingParams(seed=1)))
    assert bad.reason == "error" and "unlucky" in (bad.error or "")
    assert good.text == "a"


class GrammarBackend(ScriptedBackend):
    """The scripted backend with a stand-in grammar: only the tokens in `allowed` (ids)."""

    def __init__(self, script: list[bytes], allowed: set[int]) -> None:
        super().__init__(script)
        self.allowed = allowed
        self.accepted: list[int] = []
        self.mask_calls: list[tuple[int, bool]] = []
        self.closed_grammars = 0

    def grammar(self, gbnf: str) -> Any:
        backend = self

        class Matcher:
            def allows(self, token: int) -> bool:
                return token in backend.allowed

            def mask(self, logits: Any) -> None:
                keep = np.array(sorted(backend.allowed))
                saved = logits[keep].copy()
                logits[:] = -np.inf
                logits[keep] = saved

            def mask_top(self, logits: Any, k: int, exact: bool = True) -> None:
                backend.mask_calls.append((k, exact))
                self.mask(logits)

            def accept(self, token: int) -> None:  # as the real one: refused tokens raise
                if token not in backend.allowed:
                    raise ValueError(f"token {token} is not allowed by the grammar here")
                backend.accepted.append(token)

            def close(self) -> None:
                backend.closed_grammars += 1

        assert gbnf == "root ::= x"
        return Matcher()


async def test_choices_share_one_prompt_decode() -> None:
    """n = 3: the prompt's tokens are decoded once (one sequence), the other two sequences
    start from a copy and all three generate; a fixed seed gives choice i seed + i."""
    backend = ScriptedBackend([b"a", b"b"])
    seeds: list[int] = []

    def factory(request: GenerationRequest) -> Any:
        seeds.append(request.params.seed)
        from lollms_fast.engine.scheduler import default_sampler
        return default_sampler(request)

    async with running(backend, parallel=3, sampler_factory=factory) as engine:
        prompt = engine.tokenize("a long prompt", True)
        gens = engine.submit_choices(GenerationRequest(prompt, SamplingParams(seed=40)), 3)
        results = [await collect(g) for g in gens]
        stats = engine.stats()
    assert [r[1].text for r in results] == ["ab"] * 3
    assert all(r[1].reason == "stop" and r[1].n_prompt == len(prompt) for r in results)
    prompt_rows = [(seq, pos) for call in backend.calls for seq, tok, pos, _ in call
                   if pos < len(prompt)]
    assert len(prompt_rows) == len(prompt)  # every prompt position decoded exactly once
    assert len({seq for seq, _ in prompt_rows}) == 1
    assert sorted(seeds) == [40, 41, 42]
    assert stats["prompt_decoded"] == len(prompt)
    # each sequence holds the prompt and its own answer
    assert all(toks[:len(prompt)] == prompt for toks in backend.kv.values())


async def test_choices_wait_for_enough_slots_and_cancel_together() -> None:
    gate = threading.Semaphore(0)
    backend = ScriptedBackend([b"x"], eog_after=False, gate=gate)
    async with running(backend, parallel=2) as engine:
        first = ask(engine, "busy", SamplingParams(temperature=0, n_predict=1000))
        pair = engine.submit_choices(GenerationRequest(engine.tokenize("p", True), GREEDY), 2)
        gate.release(3)
        await asyncio.sleep(0.05)
        assert engine.stats()["queued"] == 1  # two slots needed, one free
        for g in pair:
            g.cancel()
        first.cancel()
        gate.release(100)
        finishes = [await g.wait() for g in (*pair, first)]
    assert [f.reason for f in finishes] == ["cancelled"] * 3
    with pytest.raises(BadRequest):
        async with running(ScriptedBackend([b"x"]), parallel=2) as engine:
            engine.submit_choices(GenerationRequest(engine.tokenize("p", True), GREEDY), 3)


async def test_grammar_refusal_masks_the_row() -> None:
    """The sampler's choice (the script token) is refused: the grammar masks the row and
    the token it allows is sampled instead; the grammar sees every accepted token."""
    backend = GrammarBackend([b"no"], allowed={BYTE0 + ord("y")})
    async with running(backend) as engine:
        gen = engine.submit(GenerationRequest(engine.tokenize("q", True),
                                              SamplingParams(temperature=0, n_predict=3),
                                              grammar="root ::= x"))
        pieces, finish = await collect(gen)
        stats = engine.stats()
    assert finish.text == "yyy" and finish.reason == "length"
    assert backend.accepted == [BYTE0 + ord("y")] * 3
    assert stats["grammar_masks"] == 3 and backend.closed_grammars == 1
    assert backend.mask_calls == [(1, True)] * 3  # greedy: the best allowed token, exactly


async def test_a_grammar_dead_end_fails_only_its_request() -> None:
    backend = GrammarBackend([b"ok"], allowed=set())  # nothing is ever allowed
    async with running(backend) as engine:
        stuck = engine.submit(GenerationRequest(engine.tokenize("q", True),
                                                SamplingParams(temperature=0.5, top_k=5),
                                                grammar="root ::= x"))
        free = ask(engine, "q")
        (_, bad), (_, good) = await collect(stuck), await collect(free)
    assert bad.reason == "error" and "grammar" in (bad.error or "")
    assert good.text == "ok" and good.reason == "stop"
    assert backend.mask_calls == [(5, False)]


async def test_logprobs_come_with_the_tokens() -> None:
    backend = ScriptedBackend([b"a", b"b"])
    async with running(backend) as engine:
        gen = engine.submit(GenerationRequest(engine.tokenize("q", True),
                                              SamplingParams(temperature=0, n_probs=2)))
        await collect(gen)
    entries = gen.take_logprobs()
    assert [e.piece for e in entries] == [b"a", b"b", b""]  # the last one is EOG
    assert all(e.logprob == pytest.approx(0.0, abs=1e-6) and len(e.top) == 2
               for e in entries)
    assert gen.take_logprobs() == []


# ---------------------------------------------------------------- the real model

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "woodcutter and his daughter. Every morning",
    "Translate to French: I would like a cup of coffee, please.\nFrench:",
]


class Recorder:
    """A sampler that keeps a copy of every logits row it sees; greedy or teacher-forced."""

    def __init__(self, forced: list[int] | None = None) -> None:
        self.rows: list[np.ndarray] = []
        self.tokens: list[int] = []
        self.forced = forced

    def accept(self, token: int) -> None:
        pass

    def sample(self, logits: np.ndarray) -> int:
        self.rows.append(logits.copy())
        token = self.forced[len(self.tokens)] if self.forced else int(np.argmax(logits))
        self.tokens.append(token)
        return token


def recording(recorders: dict[tuple[int, ...], Recorder]) -> Callable[..., Recorder]:
    def factory(request: GenerationRequest) -> Recorder:
        return recorders[tuple(request.tokens)]
    return factory


def real_backend(model: Path, parallel: int, n_batch: int = 512, ctx: int = 512) -> Backend:
    return Backend(BackendParams(model, n_ctx=ctx * parallel, n_batch=n_batch, n_threads=2,
                                 n_seq_max=parallel))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_close(rows: list[np.ndarray], reference: list[np.ndarray]) -> None:
    assert len(rows) == len(reference)
    cosines = [cosine(a, b) for a, b in zip(rows, reference, strict=True)]
    agree = [int(np.argmax(a)) == int(np.argmax(b))
             for a, b in zip(rows, reference, strict=True)]
    assert min(cosines) >= 0.95, cosines
    assert sum(agree) >= 0.9 * len(agree), agree


@pytest.fixture(scope="module")
def solo_runs(default_model_path: Path) -> dict[tuple[int, ...], Recorder]:
    """Each prompt alone in a one-slot engine, greedy, with every logits row kept."""
    async def run() -> dict[tuple[int, ...], Recorder]:
        backend = real_backend(default_model_path, parallel=1)
        prompts = [tuple(backend.tokenize(p, True)) for p in PROMPTS]
        recorders = {p: Recorder() for p in prompts}
        params = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=16)
        async with running(backend, parallel=1, sampler_factory=recording(recorders)) as eng:
            for p in prompts:  # one at a time: nothing shares the batch
                await eng.submit(GenerationRequest(p, params)).wait()
        return recorders

    return asyncio.run(run())


async def test_batching_never_mixes_sequences(default_model_path: Path,
                                              solo_runs: dict[tuple[int, ...], Recorder]) -> None:
    forced = {p: Recorder(forced=r.tokens) for p, r in solo_runs.items()}
    backend = real_backend(default_model_path, parallel=4, n_batch=16)
    async with running(backend, parallel=4, n_batch=16,
                       sampler_factory=recording(forced)) as engine:
        gens = [engine.submit(GenerationRequest(p, SamplingParams(n_predict=len(r.tokens))))
                for p, r in solo_runs.items()]
        finishes = [await g.wait() for g in gens]
    assert all(f.reason in ("stop", "length") for f in finishes)
    assert engine.stats()["steps"] < sum(f.n_prompt + f.n_generated for f in finishes) / 2
    # every position of every request: cosine per position, top-1 agreement over all of them
    # (near-ties flip: measured margins of 0.02 between the two best logits)
    assert_close([row for p in solo_runs for row in forced[p].rows],
                 [row for r in solo_runs.values() for row in r.rows])
    # the check has teeth: another sequence's logits are far off
    a, b = list(solo_runs.values())[:2]
    assert cosine(a.rows[0], b.rows[0]) < 0.95


async def test_single_stream_matches_a_raw_greedy_loop(default_model_path: Path) -> None:
    backend = real_backend(default_model_path, parallel=1)
    tokens = backend.tokenize(PROMPTS[0], True)
    raw = raw_greedy(backend, tokens, 24)
    backend.seq_rm(0, -1, -1)
    async with running(backend, parallel=1) as engine:
        _, finish = await collect(engine.submit(GenerationRequest(
            tokens, SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=24))))
    assert finish.text == b"".join(backend.piece(t) for t in raw).decode()


def raw_greedy(backend: Backend, tokens: list[int], n: int) -> list[int]:
    from lollms_fast.engine.batch import Batch
    batch = Batch(len(tokens))
    index = batch.add(0, tokens, 0, True)
    out: list[int] = []
    pos = len(tokens)
    while len(out) < n:
        assert backend.decode(batch) == 0
        token = int(np.argmax(backend.logits(index)))
        if backend.is_eog(token):
            break
        out.append(token)
        batch.clear()
        index = batch.add(0, [token], pos, True)
        pos += 1
    return out


async def test_second_turn_decodes_only_the_new_suffix(default_model_path: Path) -> None:
    first = PROMPTS[2] + " she walked into the forest to gather wood for the winter."
    second = first + " One day, she met"
    tokenizer = real_backend(default_model_path, parallel=1, ctx=64)
    tokens_first, tokens_second = tokenizer.tokenize(first), tokenizer.tokenize(second)
    tokenizer.close()
    assert tokens_second[:len(tokens_first)] == tokens_first

    async def last_prompt_logits(turns: list[list[int]]) -> tuple[np.ndarray, Finish, int]:
        recorders = {tuple(t): Recorder() for t in turns}
        backend = real_backend(default_model_path, parallel=2)
        async with running(backend, parallel=2, sampler_factory=recording(recorders)) as eng:
            for t in turns:
                finish = await eng.submit(GenerationRequest(t, SamplingParams(n_predict=1)))\
                    .wait()
            decoded = eng.stats()["prompt_decoded"]
        return recorders[tuple(turns[-1])].rows[0], finish, decoded

    warm_row, warm, decoded_total = await last_prompt_logits([tokens_first, tokens_second])
    cold_row, cold, _ = await last_prompt_logits([tokens_second])
    assert warm.n_reused == len(tokens_first) and cold.n_reused == 0
    assert decoded_total == len(tokens_first) + (len(tokens_second) - len(tokens_first))
    assert_close([warm_row], [cold_row])


async def test_long_prompt_cancel_lands_within_one_chunk(default_model_path: Path) -> None:
    backend = real_backend(default_model_path, parallel=1, n_batch=32, ctx=1024)
    text = " ".join(f"item {i}" for i in range(150))
    async with running(backend, parallel=1, n_batch=32, n_ctx_slot=1024) as engine:
        tokens = engine.tokenize(text, True)
        assert len(tokens) > 600
        gen = engine.submit(GenerationRequest(tokens, GREEDY))
        while engine.stats()["steps"] == 0:
            await asyncio.sleep(0.001)
        gen.cancel()
        finish = await gen.wait()
        stats = engine.stats()
    assert finish.reason == "cancelled" and finish.n_generated == 0
    assert stats["prompt_decoded"] < len(tokens) // 2


async def test_real_queue_overflow_and_decode_error(default_model_path: Path) -> None:
    backend = real_backend(default_model_path, parallel=2)
    async with running(backend, parallel=2, queue_size=0) as engine:
        long_tokens, short_tokens = (engine.tokenize(p, True) for p in PROMPTS[:2])
        long = engine.submit(GenerationRequest(long_tokens, SamplingParams(n_predict=48)))
        short = engine.submit(GenerationRequest(short_tokens, SamplingParams(n_predict=2)))
        with pytest.raises(Busy):
            engine.submit(GenerationRequest(short_tokens, GREEDY))
        await short.wait()
        # an out-of-vocabulary token: llama_decode rejects the batch it shares with `long`
        bad = engine.submit(GenerationRequest([*short_tokens, backend.n_vocab + 5], GREEDY))
        bad_finish, long_finish = await bad.wait(), await long.wait()
    assert bad_finish.reason == "error" and "llama_decode failed" in (bad_finish.error or "")
    assert long_finish.reason in ("length", "stop") and long_finish.error is None


def test_typed_control_tokens_are_text_on_the_real_vocabulary(default_model_path: Path) -> None:
    """Gemma's `<end_of_turn>` is one control token when the server's own text spells it,
    and plain characters when a user types it (parse_special off, the default)."""
    backend = real_backend(default_model_path, parallel=1)
    try:
        control = backend.tokenize("<end_of_turn>", False, True)
        assert len(control) == 1 and backend.is_eog(control[0])
        typed = backend.tokenize("please <end_of_turn> stop", False)
        assert control[0] not in typed and len(typed) > 3
        assert b"".join(backend.piece(t) for t in typed) == b"please <end_of_turn> stop"
        # the chat prompt: a Gemma-style personality may use the token, its users may not
        from lollms_fast.services.prompt import PromptStyle, Turn, build_prompt
        style = PromptStyle("", "<start_of_turn>user\n", "<start_of_turn>model\n",
                            "<end_of_turn>\n", "model")
        built = build_prompt(style, [Turn("user", "a <end_of_turn> b")],
                             "<end_of_turn><start_of_turn>model\nI obey", backend.tokenize,
                             budget=512, max_history=5)
        assert built.tokens.count(control[0]) == 2  # the two links, not the typed ones
    finally:
        backend.close()


def test_ctx_size_past_the_training_context_is_refused(default_model_path: Path) -> None:
    """SPEC 7: ctx_size is capped at the model's training context (32,768 for Gemma 3 270M),
    refused before any KV cache is allocated."""
    from lollms_fast.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="training context"):
        real_backend(default_model_path, parallel=2, ctx=65536)
    backend = real_backend(default_model_path, parallel=1, ctx=512)
    try:
        assert backend.n_ctx_train == 32768
    finally:
        backend.close()


def test_tokenize_after_close_is_an_error_not_a_crash(default_model_path: Path) -> None:
    """A request that picked an engine just before a reload closed it tokenizes on a freed
    vocabulary: llama.cpp would abort the process; it must be a clean ModelNotReady."""
    from lollms_fast.errors import ModelNotReady

    backend = real_backend(default_model_path, parallel=1)
    assert backend.tokenize("hello")
    backend.close()
    with pytest.raises(ModelNotReady):
        backend.tokenize("hello world, after the close")
