"""Generation for one client: the one place where storage and the engine meet.

history (the branch being answered) -> prompt tokens (trimmed by tokens) -> engine ->
pieces streamed to the client as `message` events -> the AI row saved at start, at most once
a second while it grows, and at the end -> `final`.

The event order and payloads are SPEC section 4. Every path out of `generate` ends with a
`final` event (finish_reason `error` when something went wrong, with an `infos` carrying the
message), so a client is never left waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Config
from ..engine.scheduler import Finish, Generation, GenerationRequest, SamplingParams
from ..errors import BadRequest, Conflict, LollmsError, NotFound
from ..personalities.model import Personality
from ..storage.discussions import MSG_CONDITIONING, MSG_NORMAL, DiscussionStore, NewMessage
from .discussions import DiscussionService
from .history import branch, default_leaf
from .personalities import PersonalityService
from .prompt import BuiltPrompt, PromptStyle, Turn, build_prompt
from .sessions import ClientSession
from .settings import SettingsService

log = logging.getLogger("lollms_fast.chat")

USER_SENDER = "user"  # the 2023 server hard-coded it
UNTITLED = "untitled"
CHECKPOINT_INTERVAL_S = 1.0
# the prompt always keeps at least this share of the context, however large n_predict is
MIN_PROMPT_SHARE = 4

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


class EngineLike(Protocol):
    n_ctx_slot: int

    def submit(self, request: GenerationRequest) -> Generation: ...

    def tokenize(self, text: str, add_bos: bool) -> list[int]: ...


class EngineSource(Protocol):
    current: Any  # the running engine, or None while there is no model


@dataclass(frozen=True)
class Target:
    """What one generation answers: the user message, its discussion and its history."""

    discussion_id: int
    user_message_id: int | None  # None: the user row is still to be written (generate_msg)
    prompt: str
    history: list[Mapping[str, Any]]  # the branch before the prompt, oldest first
    conditioning: str | None  # the discussion's stored conditioning row, if it has one


def sampling_params(config: Config, personality: Personality) -> SamplingParams:
    """The personality's model_* values unless the config overrides them (SPEC section 5).
    n_predict is capped so the prompt keeps a share of the context."""
    if config.override_personality_model_parameters:
        values = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                      repeat_penalty=config.repeat_penalty,
                      repeat_last_n=config.repeat_last_n, n_predict=config.n_predict)
    else:
        d = personality.data
        values = dict(temperature=d["model_temperature"], top_k=d["model_top_k"],
                      top_p=d["model_top_p"], repeat_penalty=d["model_repeat_penalty"],
                      repeat_last_n=d["model_repeat_last_n"],
                      n_predict=d["model_n_predicts"] or config.n_predict)
    cap = config.ctx_size - config.ctx_size // MIN_PROMPT_SHARE
    values["n_predict"] = max(1, min(int(values["n_predict"]), cap))
    return SamplingParams(seed=config.seed, **values)


def anti_prompts(personality: Personality) -> tuple[str, ...]:
    """The personality's anti-prompts plus its turn prefixes: a small model that starts
    writing the user's next turn is cut there instead of talking to itself."""
    found: list[str] = []
    for text in [*personality.anti_prompts, personality.user_message_prefix,
                 personality.ai_message_prefix]:
        text = text.strip()
        if text and text.lower() not in (f.lower() for f in found):
            found.append(text)
    return tuple(found)


def prompt_style(personality: Personality, conditioning: str | None) -> PromptStyle:
    return PromptStyle(
        conditioning=personality.conditioning() if conditioning is None else conditioning,
        user_prefix=personality.user_message_prefix,
        ai_prefix=personality.ai_message_prefix,
        link=personality.link_text,
        ai_name=personality.name,
    )


def history_turns(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    return [Turn(str(m["sender"]), str(m["content"])) for m in messages
            if m["type"] == MSG_NORMAL]


def stored_conditioning(path: Sequence[Mapping[str, Any]]) -> str | None:
    """The conditioning row at the root of the branch: its text was expanded ({{date}})
    when the discussion was made, so it stays the same on every turn and the prompt's
    prefix can be reused from the engine's cache."""
    for m in path:
        if m["type"] == MSG_CONDITIONING:
            return str(m["content"])
    return None


class ChatService:
    def __init__(self, store: DiscussionStore, discussions: DiscussionService,
                 personalities: PersonalityService, settings: SettingsService,
                 engines: EngineSource,
                 checkpoint_interval: float = CHECKPOINT_INTERVAL_S) -> None:
        self.store = store
        self.discussions = discussions
        self.personalities = personalities
        self.settings = settings
        self.engines = engines
        self.checkpoint_interval = checkpoint_interval
        self.active: set[Generation] = set()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ entry points

    async def generate_msg(self, session: ClientSession, emit: Emit, prompt: Any,
                           *, delta: bool = False,
                           on_start: Callable[[Generation], None] | None = None) -> None:
        """`generate_msg {"prompt"}`: a new user turn in the client's current discussion."""
        await self._run(session, emit, delta, on_start,
                        lambda p: self._new_turn(session, prompt), echo=prompt)

    async def generate_msg_from(self, session: ClientSession, emit: Emit, message_id: Any,
                                echo: Any = None, *, delta: bool = False,
                                on_start: Callable[[Generation], None] | None = None
                                ) -> None:
        """`generate_msg_from {"id"}`: a new answer to message `id`, beside earlier ones."""
        await self._run(session, emit, delta, on_start,
                        lambda p: self._regenerate(session, message_id, p), echo=echo)

    # ------------------------------------------------------------------ the run

    async def _run(self, session: ClientSession, emit: Emit, delta: bool,
                   on_start: Callable[[Generation], None] | None,
                   make_target: Callable[[Personality], Awaitable[Target]],
                   echo: Any) -> None:
        personality = await self.personalities.current()
        ids: dict[str, Any] = {"user_message_id": None, "ai_message_id": None,
                               "discussion_id": session.discussion_id}
        if session.generating:
            await self._fail(emit, personality, ids, Conflict(
                "a generation is already running for this client; stop it first"))
            return
        engine: EngineLike | None = self.engines.current
        if engine is None:
            await self._fail(emit, personality, ids, None, status="model_not_ready",
                             text="the model is not loaded (yet): check the server log")
            return
        session.generating = True
        self._running += 1
        self._idle.clear()
        try:
            await self._generate(session, emit, delta, on_start, engine, personality,
                                 make_target, echo, ids)
        finally:
            session.generating = False
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def _generate(self, session: ClientSession, emit: Emit, delta: bool,
                        on_start: Callable[[Generation], None] | None, engine: EngineLike,
                        personality: Personality,
                        make_target: Callable[[Personality], Awaitable[Target]], echo: Any,
                        ids: dict[str, Any]) -> None:
        config = self.settings.config
        params = sampling_params(config, personality)
        try:
            target = await make_target(personality)
            ids["discussion_id"] = target.discussion_id
            ids["user_message_id"] = target.user_message_id
            built = await asyncio.to_thread(self._build, engine, personality, target, config,
                                            params)
            generation = engine.submit(GenerationRequest(built.tokens, params,
                                                         anti_prompts(personality)))
        except LollmsError as exc:  # bad input, busy engine: nothing was written
            await self._fail(emit, personality, ids, exc)
            return
        except Exception as exc:
            log.exception("could not start a generation")
            await self._fail(emit, personality, ids, exc)
            return

        stop = generation.cancel
        session.stop_callbacks.append(stop)
        self.active.add(generation)
        try:
            if on_start is not None:
                on_start(generation)
            await self._stream(session, emit, delta, personality, target, generation, echo,
                               ids)
        finally:
            generation.cancel()  # no-op once finished; frees the slot if we got here early
            self.active.discard(generation)
            if stop in session.stop_callbacks:
                session.stop_callbacks.remove(stop)

    def _build(self, engine: EngineLike, personality: Personality, target: Target,
               config: Config, params: SamplingParams) -> BuiltPrompt:
        """Tokenizing the history is CPU work: it runs in a thread, off the event loop."""
        return build_prompt(
            prompt_style(personality, target.conditioning),
            history_turns(target.history),
            target.prompt,
            engine.tokenize,
            budget=engine.n_ctx_slot - params.n_predict,
            max_history=config.nb_messages_to_remember,
        )

    async def _stream(self, session: ClientSession, emit: Emit, delta: bool,
                      personality: Personality, target: Target, generation: Generation,
                      echo: Any, ids: dict[str, Any]) -> None:
        try:
            user_id = target.user_message_id
            if user_id is None:
                user_id = await self.store.add_message(
                    target.discussion_id,
                    NewMessage(USER_SENDER, target.prompt, MSG_NORMAL, parent=_leaf_id(target)))
                ids["user_message_id"] = user_id
            ai_id = await self.store.add_message(
                target.discussion_id, NewMessage(personality.name, "", MSG_NORMAL,
                                                 parent=user_id))
        except Exception as exc:
            log.exception("could not write the new messages")
            generation.cancel()
            await self._fail(emit, personality, ids, exc)
            return
        ids["ai_message_id"] = ai_id
        session.select(target.discussion_id, ai_id)
        await emit("infos", {
            "status": "generation_started", "type": "input_message_infos",
            "bot": personality.name, "user": _user_name(personality),
            "message": echo if isinstance(echo, str) else target.prompt, **ids})

        text = ""
        saver = _Checkpointer(self.store, ai_id, self.checkpoint_interval)
        base = {**ids, "message_type": 0}
        error: str | None = None
        try:
            async for piece in generation:
                text += piece
                await emit("message", {"data": piece if delta else text, **base})
                saver.maybe_save(text)
        except Exception as exc:  # the client's socket failing must not lose the answer
            log.exception("streaming to the client failed")
            error = f"streaming failed: {type(exc).__name__}"
            generation.cancel()
        finish = await generation.wait()
        await saver.close(text)
        reason = "error" if error else finish.reason
        error = error or finish.error
        if reason == "error":
            await emit("infos", _error_infos(personality, ids, error or "generation failed"))
        await emit("final", {"data": text, "ai_message_id": ai_id, "parent": user_id,
                             "discussion_id": target.discussion_id, "finish_reason": reason})
        _log_finish(ai_id, finish)

    async def _fail(self, emit: Emit, personality: Personality, ids: dict[str, Any],
                    exc: BaseException | None, status: str = "error",
                    text: str | None = None) -> None:
        if text is None:
            text = (exc.message if isinstance(exc, LollmsError)
                    else f"internal error: {type(exc).__name__}")
        await emit("infos", _error_infos(personality, ids, text, status))
        await emit("final", {"data": "", "ai_message_id": ids["ai_message_id"],
                             "parent": ids["user_message_id"],
                             "discussion_id": ids["discussion_id"], "finish_reason": "error"})

    # ------------------------------------------------------------------ targets

    async def _new_turn(self, session: ClientSession, prompt: Any) -> Target:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        messages = None
        if session.discussion_id is not None:
            messages = await self.store.messages(session.discussion_id)
        if messages is None:  # none selected, or it was deleted meanwhile
            await self.discussions.new_discussion(session, UNTITLED)
            assert session.discussion_id is not None
            messages = await self.store.messages(session.discussion_id) or []
        assert session.discussion_id is not None
        ids = {m["id"] for m in messages}
        leaf = (session.last_message_id if session.last_message_id in ids
                else default_leaf(messages))
        path = branch(messages, leaf)
        return Target(session.discussion_id, None, prompt, path, stored_conditioning(path))

    async def _regenerate(self, session: ClientSession, raw_id: Any,
                          personality: Personality) -> Target:
        message_id = _message_id(raw_id)
        discussion_id = await self.store.message_discussion(message_id)
        if discussion_id is None:
            raise NotFound(f"message {message_id} not found")
        messages = await self.store.messages(discussion_id) or []
        by_id = {m["id"]: m for m in messages}
        message = by_id[message_id]
        if message["type"] != MSG_NORMAL:
            raise BadRequest(f"message {message_id} is not a chat message")
        if message["sender"] == personality.name:
            # asked to regenerate an answer: answer its question again
            parent = by_id.get(message["parent"])
            if parent is None or parent["type"] != MSG_NORMAL:
                raise BadRequest(f"message {message_id} does not answer a user message")
            message = parent
        path = branch(messages, int(message["id"]))
        session.select(discussion_id, int(message["id"]))
        return Target(discussion_id, int(message["id"]), str(message["content"]), path[:-1],
                      stored_conditioning(path))

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every running answer and wait (bounded) until each is saved and its
        client told, before the engine and the database close."""
        for generation in list(self.active):
            generation.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d generation(s) still running at shutdown", self._running)


class _Checkpointer:
    """Saves the growing answer at most once per interval, never two writes at a time."""

    def __init__(self, store: DiscussionStore, message_id: int, interval: float) -> None:
        self.store = store
        self.message_id = message_id
        self.interval = interval
        self.last = time.monotonic()
        self.pending: asyncio.Task[bool] | None = None

    def maybe_save(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval or (self.pending and not self.pending.done()):
            return
        self.last = now
        self.pending = asyncio.ensure_future(self.store.update_content(self.message_id, text))

    async def close(self, text: str) -> None:
        if self.pending is not None:
            try:
                await self.pending
            except Exception:  # the final write below carries the same text and more
                log.exception("checkpoint write failed")
        await self.store.update_content(self.message_id, text)


def _leaf_id(target: Target) -> int:
    """The parent of a new user message: the branch's last message (0 when empty)."""
    return int(target.history[-1]["id"]) if target.history else 0


def _user_name(personality: Personality) -> str:
    return str(personality.data.get("user_name") or USER_SENDER)


def _error_infos(personality: Personality, ids: Mapping[str, Any], text: str,
                 status: str = "error") -> dict[str, Any]:
    return {"status": status, "type": "input_message_infos", "bot": personality.name,
            "user": _user_name(personality), "message": text, "error": text, **ids}


def _message_id(raw: Any) -> int:
    """The 2023 UI sends ids as numbers or as strings of digits; nothing else is accepted."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 2**63:
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) < 19:
        return int(raw)
    raise BadRequest("id must be a message id (a non-negative integer)")


def _log_finish(ai_id: int, finish: Finish) -> None:
    log.debug("message %d finished: %s, %d prompt tokens (%d reused), %d generated",
              ai_id, finish.reason, finish.n_prompt, finish.n_reused, finish.n_generated)
