"""KV cache tiers (SPEC section 10). First the tier logic on the scripted backend, whose
"state" is its token list (so what was restored is exactly checkable); then the real model:
restored states give the same logits as decoding again, and a discussion resumes after a
clean restart and after a kill -9."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes import SCRIPT0, ScriptedBackend
from lollms_fast.engine import Engine, EngineMetrics, GenerationRequest, SamplingParams
from lollms_fast.engine.kvcache import MIN_TOKENS, KVCache, prefix_key

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=4)
META = {"model_sha256": "0" * 64, "n_ctx_slot": 2048}


def tokens_of(text: str) -> list[int]:
    return ScriptedBackend([b"x"]).tokenize(text)


@asynccontextmanager
async def engine_with(kv: KVCache | None, parallel: int = 1,
                      backend: ScriptedBackend | None = None) -> AsyncIterator[Engine]:
    engine = Engine(backend or ScriptedBackend([b"a", b"b"]), parallel=parallel,
                    n_ctx_slot=2048, n_batch=64, queue_size=8, kv_cache=kv,
                    metrics=EngineMetrics())
    engine.start()
    try:
        yield engine
    finally:
        await asyncio.to_thread(engine.close)


async def run(engine: Engine, tokens: list[int]) -> None:
    gen = engine.submit(GenerationRequest(tokens, GREEDY))
    async for _ in gen:
        pass
    await gen.wait()


def decoded_since(backend: ScriptedBackend, start: int) -> int:
    return sum(len(call) for call in backend.calls[start:])


A = tokens_of("discussion A " * 20)  # 260 tokens
B = tokens_of("discussion B " * 20)
ANSWER = [SCRIPT0, SCRIPT0 + 1]  # "a", "b" decoded into the slot (then end-of-generation)


async def test_an_evicted_sequence_comes_back_from_ram_and_decodes_only_the_new_turn(
        ) -> None:
    kv = KVCache(None, ram_budget=1 << 20, disk_budget=0, meta=META)
    backend = ScriptedBackend([b"a", b"b"])
    async with engine_with(kv, backend=backend) as engine:
        await run(engine, A)
        await run(engine, B)  # one slot: A's sequence leaves it, into the RAM tier
        assert backend.states_saved == 1 and kv.sizes()["ram_entries"] == 1
        turn = A + ANSWER + tokens_of("next")[1:]  # A, its answer, then a new turn
        mark = len(backend.calls)
        before = engine.stats()
        await run(engine, turn)
        after = engine.stats()
        assert backend.states_restored == 1
        # only the new turn was decoded: the restored prefix is A and its answer, and the 4
        # tokens of the new turn go through the model (then the 2 answer tokens it samples
        # before its end-of-generation)
        assert after["prompt_decoded"] - before["prompt_decoded"] == 4
        assert after["prompt_reused"] - before["prompt_reused"] == len(A) + 2
        assert decoded_since(backend, mark) == 4 + 2
        assert engine.metrics.kv_lookups["ram"] == 1


async def test_without_tiers_the_same_turn_decodes_everything() -> None:
    backend = ScriptedBackend([b"a", b"b"])
    async with engine_with(None, backend=backend) as engine:
        await run(engine, A)
        await run(engine, B)
        before = engine.stats()
        await run(engine, A + ANSWER + tokens_of("next")[1:])
        shared = len(tokens_of("discussion "))  # the slot still holds B, which starts so
        decoded = engine.stats()["prompt_decoded"] - before["prompt_decoded"]
        assert decoded == len(A) + len(ANSWER) + 4 - shared


async def test_the_disk_tier_survives_the_engine(tmp_path: Path) -> None:
    directory = tmp_path / "kv"
    kv = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20, meta=META)
    async with engine_with(kv) as engine:
        await run(engine, A)
        await run(engine, B)  # A: RAM and (written through) disk
    # the engine's close saved B's slot and waited for the files
    assert len(list(directory.glob("*.kv"))) == 2
    again = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20, meta=META)
    assert again.sizes()["disk_entries"] == 2 and again.sizes()["ram_entries"] == 0
    backend = ScriptedBackend([b"a", b"b"])
    async with engine_with(again, backend=backend) as engine:
        await run(engine, B + ANSWER + tokens_of("more")[1:])
        stats = engine.stats()
        assert stats["prompt_reused"] == len(B) + 2 and stats["prompt_decoded"] == 4
        assert engine.metrics.kv_lookups["disk"] == 1
        assert backend.kv[0][:len(B) + 2] == B + ANSWER  # the stored sequence came back


async def test_another_model_and_damaged_files_are_misses(tmp_path: Path) -> None:
    directory = tmp_path / "kv"
    kv = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20, meta=META)
    async with engine_with(kv) as engine:
        await run(engine, A)
        await run(engine, B)
    other = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20,
                    meta={**META, "model_sha256": "f" * 64})
    assert other.sizes()["disk_entries"] == 0 and other.lookup(A + [5]) is None
    other.close()
    # truncate A's file: found at start (its header is intact), refused when loaded
    path = directory / f"{prefix_key(A + ANSWER)}.kv"
    path.write_bytes(path.read_bytes()[:-100])
    damaged = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20, meta=META)
    backend = ScriptedBackend([b"a", b"b"])
    async with engine_with(damaged, backend=backend) as engine:
        await run(engine, A + ANSWER + tokens_of("x")[1:])
        assert engine.stats()["prompt_decoded"] == len(A) + 3  # decoded again, no error
        assert engine.metrics.kv_lookups["miss"] == 1
        assert damaged.stats.damaged == 1 and not path.exists()
        assert backend.states_restored == 0
    # a bit flip in the state: the checksum refuses it
    kv2 = KVCache(directory, ram_budget=1 << 20, disk_budget=1 << 20, meta=META)
    target = directory / f"{prefix_key(B + ANSWER)}.kv"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    hit = kv2.lookup(B + [7])
    assert hit is not None and hit.tier == "disk"
    assert kv2.load(hit) is None and kv2.stats.damaged == 1
    kv2.close()


async def test_budgets_hold_under_churn(tmp_path: Path) -> None:
    state_bytes = 4 * 300  # the scripted state of one ~300-token sequence
    kv = KVCache(tmp_path / "kv", ram_budget=3 * state_bytes, disk_budget=5 * state_bytes,
                 meta=META)
    async with engine_with(kv, parallel=2) as engine:
        for i in range(20):
            await run(engine, tokens_of(f"topic {i:02d} " * 30))
            sizes = kv.sizes()
            assert sizes["ram_bytes"] <= 3 * state_bytes
        kv.flush()
        sizes = kv.sizes()
        assert sizes["disk_bytes"] <= 5 * state_bytes and sizes["disk_entries"] >= 3
        on_disk = sum(p.stat().st_size for p in (tmp_path / "kv").glob("*.kv"))
        assert on_disk <= 5 * (state_bytes + 4 * 400 + 512)  # states + tokens + headers


async def test_short_sequences_are_not_stored_and_prefixes_are_superseded() -> None:
    kv = KVCache(None, ram_budget=1 << 20, disk_budget=0, meta=META)
    kv.put(list(range(MIN_TOKENS - 1)), bytearray(b"x" * 8))
    assert kv.sizes()["ram_entries"] == 0
    first = list(range(100))
    kv.put(first, bytearray(np.asarray(first, "<i4").tobytes()))
    longer = first + list(range(100, 180))
    kv.put(longer, bytearray(np.asarray(longer, "<i4").tobytes()))
    assert kv.sizes()["ram_entries"] == 1  # the longer one serves both
    hit = kv.lookup(first + [999])  # the longer one serves the shorter prefix
    assert hit is not None and hit.length == len(first)
    hit = kv.lookup(longer + [1])
    assert hit is not None and hit.length == len(longer)
    assert kv.lookup(list(range(1, 200))) is None  # nothing shared


def test_a_write_interrupted_by_a_crash_leaves_no_entry(tmp_path: Path) -> None:
    directory = tmp_path / "kv"
    directory.mkdir()
    (directory / ".kv.abc123").write_bytes(b"half a file")  # a temp file mid-write
    (directory / "deadbeef.kv").write_bytes(b"LFKV")  # not even a header
    kv = KVCache(directory, ram_budget=0, disk_budget=1 << 20, meta=META)
    assert kv.sizes()["disk_entries"] == 0
    assert not (directory / ".kv.abc123").exists()
    kv.close()


# ---------------------------------------------------------------- the real model


def test_a_restored_state_gives_the_logits_of_decoding_again(default_model_path: Path
                                                             ) -> None:
    from test_engine import assert_close, real_backend

    from lollms_fast.engine.batch import Batch

    backend = real_backend(default_model_path, parallel=2, ctx=1024)
    try:
        prefix = backend.tokenize("The history of the printing press begins in " * 12)
        probe = backend.tokenize(" Gutenberg", False)
        batch = Batch(512)

        def decode(seq: int, tokens: list[int], pos0: int) -> np.ndarray:
            batch.clear()
            index = batch.add(seq, tokens, pos0, True)
            assert backend.decode(batch) == 0
            return backend.logits(index).copy()

        decode(0, prefix, 0)
        state = backend.state_get(0)
        assert len(state) > 1000 * len(prefix)  # about 10 KB per token
        backend.seq_rm(0, -1, -1)
        assert backend.state_set(1, state)  # into another sequence
        restored = decode(1, probe, len(prefix))
        backend.seq_rm(1, -1, -1)
        fresh = decode(0, prefix + probe, 0)
        assert_close([restored], [fresh])
    finally:
        backend.close()



# ---------------------------------------------------------------- restarts of a real server


def _start(data_dir: Path, model: Path, port: int) -> Any:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}
    return subprocess.Popen(
        [sys.executable, "-m", "lollms_fast", "--data-dir", str(data_dir), "--model",
         str(model), "--port", str(port), "--host", "127.0.0.1", "--parallel", "1",
         # room for the whole history: with 2048 a long sampled answer (n_predict 1024)
         # pushes the first user turn out of the next prompt, which then shares only the
         # conditioning with the stored sequence
         "--ctx-size", "4096"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


async def _ready(port: int, proc: Any) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read()
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the server did not start")


async def _kv_counts(b: Any) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with b.http.get("/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lollms_kv_cache_lookups_total":
                out[s.labels["tier"]] = s.value
            elif s.name == "lollms_prompt_tokens_reused_total":
                out["reused"] = s.value
    return out


LONG = ("Here is a long note about the history of lighthouses, their keepers, their lamps "
        "and the ships they guided through storms along rocky coasts. ") * 14


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_a_discussion_resumes_from_the_disk_tier_after_a_restart(
        tmp_path: Path, default_model_path: Path, stop: str) -> None:
    """Discussion A is answered; with `kill9` another discussion then takes the only slot,
    so A's state is written to disk before the kill; with `sigterm` A is still in its slot
    and the clean shutdown saves it. After the restart A's next turn comes from the disk
    tier: hundreds of prompt tokens reused instead of decoded."""
    import signal

    from chatkit import Browser, free_port

    data = tmp_path / "data"

    async def scenario() -> None:
        port = free_port()
        proc = _start(data, default_model_path, port)
        try:
            await _ready(port, proc)
            b = await Browser.open(f"http://127.0.0.1:{port}")
            _, first = await b.get("/new_discussion", title="A")
            await b.generate(LONG + "What did keepers do at night?")
            if stop == "kill9":
                await b.get("/new_discussion", title="B")
                await b.generate(LONG.replace("lighthouses", "windmills") + "Why?")
                for _ in range(300):  # A's state is written through to disk
                    if list((data / "kv_cache").glob("*.kv")):
                        break
                    await asyncio.sleep(0.1)
            await b.close()
            if stop == "kill9":
                proc.send_signal(signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            assert list((data / "kv_cache").glob("*.kv"))
        finally:
            if proc.poll() is None:
                proc.kill()
        port = free_port()
        proc = _start(data, default_model_path, port)
        try:
            await _ready(port, proc)
            b = await Browser.open(f"http://127.0.0.1:{port}")
            await b.post("/load_discussion", {"id": first["id"]})
            final = await b.generate("And during storms?")
            assert final["discussion_id"] == first["id"]
            counts = await _kv_counts(b)
            assert counts["disk"] == 1, counts
            assert counts["reused"] > 300, counts
            await b.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except Exception:
                proc.kill()

    asyncio.run(scenario())


async def test_on_the_real_model_an_evicted_discussion_decodes_only_its_new_turn(
        default_model_path: Path) -> None:
    """One slot, two discussions: A, then B takes the slot, then A's next turn (A's prompt,
    its answer tokenized again, a new line). Only the tokens after what A's stored state
    shares with that prompt are decoded."""
    from test_engine import real_backend

    backend = real_backend(default_model_path, parallel=1, ctx=2048)
    kv = KVCache(None, ram_budget=256 << 20, disk_budget=0,
                 meta={"model_sha256": "test", **backend.state_format})
    engine = Engine(backend, parallel=1, n_ctx_slot=2048, n_batch=256, queue_size=4,
                    kv_cache=kv, metrics=EngineMetrics())
    engine.start()
    params = SamplingParams(temperature=0.0, repeat_penalty=1.0, n_predict=12)

    async def answer(tokens: list[int]) -> str:
        gen = engine.submit(GenerationRequest(tokens, params))
        async for _ in gen:
            pass
        return (await gen.wait()).text

    try:
        a = engine.tokenize("Notes about rivers and their floods. " * 20, True)
        text = await answer(a)
        await answer(engine.tokenize("Notes about bread and its ovens. " * 20, True))
        turn = a + engine.tokenize(text, False) + engine.tokenize("\nWhy?\n", False)
        slot_state = kv.sizes()
        assert slot_state["ram_entries"] == 1  # A left the slot for B
        before = engine.stats()
        await answer(turn)
        after = engine.stats()
        reused = after["prompt_reused"] - before["prompt_reused"]
        decoded = after["prompt_decoded"] - before["prompt_decoded"]
        assert engine.metrics.kv_lookups["ram"] == 1
        assert reused >= len(a) and reused + decoded == len(turn)
        assert decoded <= len(turn) - len(a)  # the new turn, at most the re-read answer too
    finally:
        await asyncio.to_thread(engine.close)
