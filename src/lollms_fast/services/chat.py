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
from ..engine.scheduler import Engine, Finish, Generation, GenerationRequest, SamplingParams
from ..engine.types import FinishReason
from ..errors import BadRequest, Conflict, LollmsError, NotFound
from ..parsing import check_text, parse_id
from ..personalities.model import Personality
from ..storage.base import MSG_CONDITIONING, MSG_NORMAL, NewMessage, Store
from .discussions import DiscussionService
from .history import branch, default_leaf, history_turns
from .personalities import PersonalityService
from .prompt import BuiltPrompt, PromptStyle, build_prompt
from .sessions import ClientSession
from .settings import SettingsService

log = logging.getLogger("lollms_fast.chat")

USER_SENDER = "user"  # the 2023 server hard-coded it
UNTITLED = "untitled"
CHECKPOINT_INTERVAL_S = 1.0
# history may always use 1/HISTORY_SHARE of the context, however large n_predict is
HISTORY_SHARE = 4
# a message is accepted while it leaves 1/MIN_ANSWER_SHARE of the context (or n_predict)
MIN_ANSWER_SHARE = 8

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
OnStart = Callable[[Generation], None]


class EngineSource(Protocol):
    current: Engine | None  # the running engine, or None while there is no model


@dataclass(frozen=True)
class Target:
    """What one generation answers: the user message, its discussion and its history."""

    discussion_id: int
    user_message_id: int | None  # None: the user row is still to be written (generate_msg)
    prompt: str
    history: list[Mapping[str, Any]]  # the branch before the prompt, oldest first
    conditioning: str | None  # the discussion's stored conditioning row, if it has one


MakeTarget = Callable[[Personality], Awaitable[Target]]


def sampling_params(config: Config, personality: Personality) -> SamplingParams:
    """The personality's model_* values unless the config overrides them (SPEC section 5).
    n_predict is a maximum: the answer also ends (`length`) where the slot's context does."""
    if config.override_personality_model_parameters:
        return SamplingParams(temperature=config.temperature, top_k=config.top_k,
                              top_p=config.top_p, repeat_penalty=config.repeat_penalty,
                              repeat_last_n=config.repeat_last_n, n_predict=config.n_predict,
                              seed=config.seed)
    m = personality.model_params
    return SamplingParams(temperature=m.temperature, top_k=m.top_k, top_p=m.top_p,
                          repeat_penalty=m.repeat_penalty, repeat_last_n=m.repeat_last_n,
                          n_predict=m.n_predict or config.n_predict, seed=config.seed)


def prompt_budgets(n_ctx: int, n_predict: int) -> tuple[int, int]:
    """(history budget, prompt limit) in tokens for a slot of `n_ctx`.

    History is added, newest turn first, while the prompt stays within `n_ctx - n_predict`
    (but it may always use a quarter of the context, however large n_predict is). The new
    message itself is refused only if it leaves less room for the answer than an eighth of
    the context, or n_predict if that is smaller: n_predict is a maximum, not a reservation.
    """
    history_budget = n_ctx - min(n_predict, n_ctx - n_ctx // HISTORY_SHARE)
    limit = n_ctx - min(n_predict, max(1, n_ctx // MIN_ANSWER_SHARE))
    return history_budget, limit


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


def stored_conditioning(path: Sequence[Mapping[str, Any]]) -> str | None:
    """The conditioning row at the root of the branch: its text was expanded ({{date}})
    when the discussion was made, so it stays the same on every turn and the prompt's
    prefix can be reused from the engine's cache."""
    for m in path:
        if m["type"] == MSG_CONDITIONING:
            return str(m["content"])
    return None


class ChatService:
    def __init__(self, store: Store, discussions: DiscussionService,
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
        self.failed_to_start = 0  # answers refused before reaching the engine (metrics)
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ entry points

    async def generate_msg(self, session: ClientSession, emit: Emit, prompt: Any,
                           *, delta: bool = False, on_start: OnStart | None = None) -> None:
        """`generate_msg {"prompt"}`: a new user turn in the client's current discussion."""
        answer = _Answer(self, session, emit, delta, on_start, echo=prompt)
        await answer.run(lambda _personality: self._new_turn(session, prompt))

    async def generate_msg_from(self, session: ClientSession, emit: Emit, message_id: Any,
                                echo: Any = None, *, delta: bool = False,
                                on_start: OnStart | None = None) -> None:
        """`generate_msg_from {"id"}`: a new answer to message `id`, beside earlier ones."""
        answer = _Answer(self, session, emit, delta, on_start, echo=echo)
        await answer.run(lambda p: self._regenerate(session, message_id, p))

    def _started(self) -> None:
        self._running += 1
        self._idle.clear()

    def _ended(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    # ------------------------------------------------------------------ targets

    async def _new_turn(self, session: ClientSession, prompt: Any) -> Target:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        check_text("prompt", prompt)  # stored as the user's message, on any store
        limit = self.settings.config.max_prompt_chars
        if len(prompt) > limit:  # checked before anything is tokenized or written
            raise BadRequest(f"the prompt has {len(prompt)} characters; at most {limit} are "
                             f"accepted (max_prompt_chars)")
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
        message_id = parse_id("id", raw_id)
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
        limit = self.settings.config.max_prompt_chars
        if len(str(message["content"])) > limit:
            raise BadRequest(f"message {message['id']} is longer than max_prompt_chars "
                             f"({limit} characters): it cannot be answered")
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
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            log.warning("%d generation(s) still running at shutdown", self._running)


class _Answer:
    """One answer in progress, from the request to its `final` event: who asked, where the
    events go, and the ids known so far (they fill in as the rows are written)."""

    def __init__(self, chat: ChatService, session: ClientSession, emit: Emit, delta: bool,
                 on_start: OnStart | None, echo: Any) -> None:
        self.chat = chat
        self.session = session
        self.emit = emit
        self.delta = delta
        self.on_start = on_start
        self.echo = echo
        self.personality: Personality | None = None
        self.discussion_id = session.discussion_id
        self.user_message_id: int | None = None
        self.ai_message_id: int | None = None
        self.submitted = False  # handed to the engine

    @property
    def ids(self) -> dict[str, Any]:
        return {"user_message_id": self.user_message_id, "ai_message_id": self.ai_message_id,
                "discussion_id": self.discussion_id}

    async def run(self, make_target: MakeTarget) -> None:
        chat, session = self.chat, self.session
        self.personality = await chat.personalities.current()
        if session.generating:
            await self.fail(Conflict(
                "a generation is already running for this client; stop it first"))
            return
        engine = chat.engines.current
        if engine is None:
            await self.fail(None, status="model_not_ready",
                            text="the model is not loaded (yet): check the server log")
            return
        session.generating = True
        chat._started()
        try:
            await self.generate(engine, make_target)
        finally:
            session.generating = False
            chat._ended()

    async def generate(self, engine: Engine, make_target: MakeTarget) -> None:
        chat, personality = self.chat, self.personality
        assert personality is not None
        config = chat.settings.config
        params = sampling_params(config, personality)
        try:
            target = await make_target(personality)
            self.discussion_id = target.discussion_id
            self.user_message_id = target.user_message_id
            built = await asyncio.to_thread(self.build, engine, target, config, params)
            generation = engine.submit(GenerationRequest(built.tokens, params,
                                                         anti_prompts(personality)))
            self.submitted = True
        except LollmsError as exc:  # bad input, busy engine: nothing was written
            await self.fail(exc)
            return
        except Exception as exc:
            log.exception("could not start a generation")
            await self.fail(exc)
            return

        stop = generation.cancel
        self.session.stop_callbacks.append(stop)
        chat.active.add(generation)
        try:
            if self.on_start is not None:
                self.on_start(generation)
            await self.stream(target, generation)
        finally:
            generation.cancel()  # no-op once finished; frees the slot if we got here early
            chat.active.discard(generation)
            if stop in self.session.stop_callbacks:
                self.session.stop_callbacks.remove(stop)

    def build(self, engine: Engine, target: Target, config: Config,
              params: SamplingParams) -> BuiltPrompt:
        """Tokenizing the history is CPU work: it runs in a thread, off the event loop."""
        assert self.personality is not None
        history_budget, limit = prompt_budgets(engine.n_ctx_slot, params.n_predict)
        return build_prompt(
            PromptStyle.of(self.personality, target.conditioning),
            history_turns(target.history),
            target.prompt,
            engine.tokenize,
            budget=history_budget,
            limit=limit,
            max_history=config.nb_messages_to_remember,
            max_turn_chars=config.max_prompt_chars,
        )

    async def stream(self, target: Target, generation: Generation) -> None:
        store, personality = self.chat.store, self.personality
        assert personality is not None
        try:
            if self.user_message_id is None:
                self.user_message_id = await store.add_message(
                    target.discussion_id,
                    NewMessage(USER_SENDER, target.prompt, MSG_NORMAL, parent=_leaf_id(target)))
            self.ai_message_id = await store.add_message(
                target.discussion_id, NewMessage(personality.name, "", MSG_NORMAL,
                                                 parent=self.user_message_id))
        except Exception as exc:
            log.exception("could not write the new messages")
            generation.cancel()
            await self.fail(exc)
            return
        ai_id = self.ai_message_id
        self.session.select(target.discussion_id, ai_id)
        await self.emit("infos", {
            "status": "generation_started", "type": "input_message_infos",
            "bot": personality.name, "user": _user_name(personality),
            "message": self.echo if isinstance(self.echo, str) else target.prompt,
            **self.ids})

        text = ""
        saver = _Checkpointer(store, ai_id, self.chat.checkpoint_interval)
        base = {**self.ids, "message_type": 0}
        error: str | None = None
        try:
            async for piece in generation:
                text += piece
                await self.emit("message", {"data": piece if self.delta else text, **base})
                saver.maybe_save(text)
        except Exception as exc:  # the client's socket failing must not lose the answer
            log.exception("streaming to the client failed")
            error = f"streaming failed: {type(exc).__name__}"
            generation.cancel()
        finish = await generation.wait()
        await saver.close(text)
        reason = FinishReason.ERROR if error else finish.reason
        if reason is FinishReason.ERROR:
            await self.emit("infos", self.error_infos(error or finish.error
                                                      or "generation failed"))
        await self.emit("final", {"data": text, "ai_message_id": ai_id,
                                  "parent": self.user_message_id,
                                  "discussion_id": target.discussion_id,
                                  "finish_reason": reason.value})
        _log_finish(ai_id, finish)

    async def fail(self, exc: BaseException | None, status: str = "error",
                   text: str | None = None) -> None:
        """The answer could not start: `infos` with the reason, then an empty `final`."""
        if not self.submitted:  # the engine counts what reached it
            self.chat.failed_to_start += 1
        if text is None:
            text = (exc.message if isinstance(exc, LollmsError)
                    else f"internal error: {type(exc).__name__}")
        await self.emit("infos", self.error_infos(text, status))
        await self.emit("final", {"data": "", "ai_message_id": self.ai_message_id,
                                  "parent": self.user_message_id,
                                  "discussion_id": self.discussion_id,
                                  "finish_reason": FinishReason.ERROR.value})

    def error_infos(self, text: str, status: str = "error") -> dict[str, Any]:
        personality = self.personality
        assert personality is not None
        return {"status": status, "type": "input_message_infos", "bot": personality.name,
                "user": _user_name(personality), "message": text, "error": text, **self.ids}


class _Checkpointer:
    """Saves the growing answer at most once per interval, never two writes at a time."""

    def __init__(self, store: Store, message_id: int, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.message_id = message_id
        self.interval = interval
        self.clock = clock
        self.last = clock()
        self.pending: asyncio.Task[bool] | None = None

    def maybe_save(self, text: str) -> None:
        now = self.clock()
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
    return personality.user_name or USER_SENDER


def _log_finish(ai_id: int, finish: Finish) -> None:
    log.debug("message %d finished: %s, %d prompt tokens (%d reused), %d generated",
              ai_id, finish.reason, finish.n_prompt, finish.n_reused, finish.n_generated)
