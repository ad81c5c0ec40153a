"""OpenAI-compatible completions on the shared engine (SPEC section 9).

request body -> a checked `CompletionRequest` (BadRequest naming the `param` otherwise)
  -> prompt tokens: chat messages through the model's chat template (or the personality's
     layout), or the raw prompt of /v1/completions
  -> `Engine.submit_choices` per prompt (n choices share one prompt decode)
  -> a `Completion`: the running generations, read by server/routes_openai.py.

Nothing here touches the discussions database: these requests are stateless, as OpenAI's.
They still share the engine's slots, batch and prefix cache with the lollms API, so a client
that resends a growing conversation decodes only its new suffix.

Defaults a request does not set: temperature, top_k and top_p come from the server's
settings (an administrator's choice, as the lollms API uses them); repeat_penalty is 1.0
(OpenAI has no repeat penalty: its presence/frequency penalties do that job); max_tokens is
the setting n_predict, bounded by what the slot's context has left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, cast

import orjson

from ..config import Config
from ..engine.backend import json_grammar
from ..engine.scheduler import (
    Engine,
    Generation,
    GenerationRequest,
    GrammarBackend,
    SamplingParams,
)
from ..engine.types import FinishReason, TokenLogprob
from ..errors import BadRequest, LollmsError, ModelNotReady, NotFound
from .chat import anti_prompts
from .engine_control import EngineControl
from .personalities import PersonalityService
from .prompt import PromptStyle
from .settings import SettingsService
from .templates import (
    ChatTemplate,
    PersonalityTemplate,
    SpecialTokens,
    TemplateError,
    normalize_messages,
    tokens_of,
)

log = logging.getLogger("lollms_fast.openai")

CHAT = "chat.completion"
TEXT = "text_completion"
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # /v1/completions prompt arrays
# response_format json_schema: its size, and the repetition bounds its grammar unrolls
MAX_SCHEMA_BYTES = 32 * 1024
MAX_REPETITION = 1000
REPETITION_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength"})
# chat_template_file values naming a template shipped in lollms_fast/chat_templates/
BUILTIN = "builtin:"
BUILTIN_TEMPLATES = frozenset({"gemma", "chatml"})


# (JSON schema, or None for any JSON object) -> GBNF text (engine.backend.json_grammar)
GrammarMaker = Callable[[dict[str, Any] | None], str]


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/chat/completions or /v1/completions body."""

    kind: str  # CHAT or TEXT
    model: str | None
    messages: list[dict[str, str]]  # CHAT: role + text content
    prompts: list[str]  # TEXT: one or several prompts
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    params: SamplingParams  # n_predict is set per prompt, once its length is known
    grammar: str | None  # response_format as GBNF


# ---------------------------------------------------------------------- body parsing

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number between {lo:g} and {hi:g}", param=name)
    return float(value)


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None
         ) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # an integral float, if exact (JSON integers beyond 64 bits arrive as rounded floats)
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer between {lo} and {hi}", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOPS
            or not all(isinstance(s, str) for s in items)):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOPS} strings",
                         param="stop")
    return tuple(s for s in items if s)


def _logit_bias(value: Any, n_vocab: int) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must be an object mapping token ids to numbers",
                         param="logit_bias")
    out: list[tuple[int, float]] = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if not 0 <= token < n_vocab or not str(key).strip().lstrip("+").isdigit():
            raise BadRequest(f"logit_bias: {key!r} is not a token id of this model "
                             f"(0 .. {n_vocab - 1})", param="logit_bias")
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise BadRequest("logit_bias values must be numbers between -100 and 100",
                             param="logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def _response_format(value: Any, make_grammar: GrammarMaker) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadRequest("response_format must be an object with a type",
                         param="response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return make_grammar(None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema, an object",
                             param="response_format")
        _check_schema_size(schema)
        return make_grammar(schema)
    raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object, "
                     f"json_schema)", param="response_format")


def _check_schema_size(schema: dict[str, Any]) -> None:
    """The grammar a schema becomes grows with its size and with its repetition bounds
    (minItems 100000 alone is megabytes of rules): both are capped before converting."""
    if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes",
                         param="response_format")
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, item in node.items():
                if key in REPETITION_KEYS and _is_number(item) and item > MAX_REPETITION:
                    raise BadRequest(f"{key} {item} in the JSON schema is above "
                                     f"{MAX_REPETITION}", param="response_format")
                stack.append(item)
        elif isinstance(node, list):
            stack.extend(node)


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if (isinstance(value, list) and value and len(value) <= MAX_PROMPTS
            and all(isinstance(p, str) for p in value)):
        return list(value)
    raise BadRequest(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings",
                     param="prompt")


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the server's settings and the loaded engine."""

    config: Config
    parallel: int
    n_vocab: int


def parse_request(kind: str, body: Mapping[str, Any], limits: Limits,
                  make_grammar: GrammarMaker) -> CompletionRequest:
    config = limits.config
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", param="model")
    messages: list[dict[str, str]] = []
    prompts: list[str] = []
    if kind == CHAT:
        messages = normalize_messages(body.get("messages"))
        chars = sum(len(m["content"]) for m in messages)
    else:
        prompts = _prompts(body.get("prompt"))
        chars = max(len(p) for p in prompts)
    if chars > config.max_prompt_chars:
        raise BadRequest(f"the prompt has {chars} characters; at most "
                         f"{config.max_prompt_chars} are accepted (max_prompt_chars)",
                         param="messages" if kind == CHAT else "prompt",
                         code="context_length_exceeded")
    max_tokens = _int(body, "max_completion_tokens", 1, 1 << 30, None)
    legacy_max_tokens = _int(body, "max_tokens", 1, 1 << 30, None)  # checked even if unused
    if max_tokens is None:
        max_tokens = legacy_max_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("stream_options is only allowed with stream: true",
                             param="stream_options")
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise BadRequest("stream_options.include_usage must be a boolean",
                             param="stream_options")
    n = _int(body, "n", 1, limits.parallel, 1)
    assert n is not None
    n_probs = _logprobs(kind, body)
    seed = _int(body, "seed", -(1 << 63), (1 << 64) - 1, None)
    params = SamplingParams(
        temperature=_float(body, "temperature", 0.0, 2.0, config.temperature),
        top_p=_float(body, "top_p", 0.0, 1.0, config.top_p),
        top_k=_int(body, "top_k", 0, limits.n_vocab, config.top_k) or 0,
        repeat_penalty=_float(body, "repeat_penalty", 0.0, 10.0, 1.0),
        repeat_last_n=_int(body, "repeat_last_n", 0, 1 << 20, config.repeat_last_n) or 0,
        presence_penalty=_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body.get("logit_bias"), limits.n_vocab),
        seed=-1 if seed is None else seed & ((1 << 64) - 1),
        n_probs=n_probs,
    )
    return CompletionRequest(
        kind=kind, model=model, messages=messages, prompts=prompts, max_tokens=max_tokens,
        n=n, stream=stream, include_usage=include_usage, stop=_stops(body.get("stop")),
        params=params, grammar=_response_format(body.get("response_format"), make_grammar))


def _logprobs(kind: str, body: Mapping[str, Any]) -> int:
    """-1 without logprobs, else how many alternatives each token reports."""
    if kind == CHAT:
        wanted = body.get("logprobs", False)
        if wanted is None:
            wanted = False
        if not isinstance(wanted, bool):
            raise BadRequest("logprobs must be a boolean", param="logprobs")
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not wanted:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if wanted else -1
    top = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    return -1 if top is None else top


# ---------------------------------------------------------------------- running


@dataclass
class Choice:
    index: int
    generation: Generation


@dataclass
class Completion:
    """The generations of one request, and what its response reports."""

    id: str
    kind: str
    created: int
    model: str
    request: CompletionRequest
    choices: list[Choice]
    prompt_tokens: int  # every prompt once, however many choices share it
    leaders: list[Generation] = field(default_factory=list)

    def cancel(self) -> None:
        for choice in self.choices:
            choice.generation.cancel()

    def usage(self) -> dict[str, Any]:
        completion = sum(c.generation.finish.n_generated for c in self.choices
                         if c.generation.finish is not None)
        cached = sum(g.finish.n_reused for g in self.leaders if g.finish is not None)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class CompletionService:
    def __init__(self, settings: SettingsService, personalities: PersonalityService,
                 engines: EngineControl[Engine]) -> None:
        self.settings = settings
        self.personalities = personalities
        self.engines = engines
        self.active: set[Generation] = set()
        self.started = int(time.time())  # `created` of the model in /v1/models
        # per loaded model: (the chat_template_file setting it was made for, the template;
        # None: the model has none, or it is broken)
        self._templates: weakref.WeakKeyDictionary[
            Engine, tuple[str, ChatTemplate | None]] = weakref.WeakKeyDictionary()

    def engine(self) -> Engine:
        engine = self.engines.current
        if engine is None:
            raise ModelNotReady("no model is loaded yet; retry in a moment")
        return engine

    def model_id(self) -> str:
        """The loaded model's name: its file name without `.gguf`."""
        name = Path(self.settings.config.model).name
        return name[:-5] if name.lower().endswith(".gguf") else name

    def check_model(self, name: str | None) -> None:
        if (self.settings.config.strict_model_names and name is not None
                and name != self.model_id()):
            raise NotFound(f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id()!r}", param="model", code="model_not_found")

    def parse(self, kind: str, body: Mapping[str, Any]) -> CompletionRequest:
        engine = self.engine()
        limits = Limits(self.settings.config, engine.parallel, engine.backend.n_vocab)
        request = parse_request(kind, body, limits, json_grammar)
        choices = request.n * max(1, len(request.prompts))
        if choices > engine.parallel + engine.queue_size:  # would be a 503 even when idle
            raise BadRequest(f"{choices} completions (prompts x n) requested; at most "
                             f"{engine.parallel + engine.queue_size} run or wait at once "
                             f"(parallel + queue_size)", param="prompt")
        if request.grammar is not None and not hasattr(engine.backend, "grammar"):
            raise BadRequest("this model backend cannot constrain its output",
                             param="response_format")
        self.check_model(request.model)
        return request

    async def start(self, request: CompletionRequest) -> Completion:
        """Tokenize (in a thread), check the context, submit every choice."""
        engine = self.engine()
        stops = request.stop
        if request.kind == CHAT:
            template: ChatTemplate | PersonalityTemplate | None = await self._template(engine)
            if template is None:  # the model has no chat format: the personality's layout
                personality = await self.personalities.current()
                template = PersonalityTemplate(PromptStyle.of(personality))
                # and its turn markers end the answer, as in a lollms discussion
                stops = (*stops, *(s for s in anti_prompts(personality) if s not in stops))
            chosen = template
            # rendering and tokenizing a long conversation is CPU work: off the event loop
            prompts = [await asyncio.to_thread(
                lambda: tokens_of(chosen.render(request.messages), engine.tokenize))]
        else:
            # the raw model input: spelled control tokens are parsed, as llama-server does
            # (there is no turn structure here for a user's text to forge)
            prompts = await asyncio.to_thread(
                lambda: [engine.tokenize(p, True, True) for p in request.prompts])
        budgets = [self._n_predict(engine, request, len(tokens)) for tokens in prompts]
        if request.grammar is not None:
            await asyncio.to_thread(self._check_grammar, engine, request.grammar)
        completion = Completion(
            id=("chatcmpl-" if request.kind == CHAT else "cmpl-") + secrets.token_hex(12),
            kind=request.kind, created=int(time.time()), model=self.model_id(),
            request=request, choices=[], prompt_tokens=sum(len(p) for p in prompts))
        try:
            for i, (tokens, n_predict) in enumerate(zip(prompts, budgets, strict=True)):
                params = replace(request.params, n_predict=n_predict)
                generations = engine.submit_choices(
                    GenerationRequest(tokens, params, stops, stops_case_sensitive=True,
                                      grammar=request.grammar), request.n)
                completion.leaders.append(generations[0])
                for j, gen in enumerate(generations):
                    completion.choices.append(Choice(i * request.n + j, gen))
                    self.active.add(gen)
        except LollmsError:
            completion.cancel()
            self.release(completion)
            raise
        return completion

    def release(self, completion: Completion) -> None:
        for choice in completion.choices:
            choice.generation.cancel()  # no-op once finished
            self.active.discard(choice.generation)

    def _n_predict(self, engine: Engine, request: CompletionRequest, n_prompt: int) -> int:
        n_ctx = engine.n_ctx_slot
        if request.max_tokens is not None and n_prompt + request.max_tokens > n_ctx:
            raise BadRequest(f"this model's context per request is {n_ctx} tokens; the "
                             f"request needs {n_prompt + request.max_tokens} ({n_prompt} in "
                             f"the prompt, {request.max_tokens} for the completion)",
                             param="messages" if request.kind == CHAT else "prompt",
                             code="context_length_exceeded")
        if n_prompt >= n_ctx:
            raise BadRequest(f"this model's context per request is {n_ctx} tokens; the "
                             f"prompt has {n_prompt}",
                             param="messages" if request.kind == CHAT else "prompt",
                             code="context_length_exceeded")
        if request.max_tokens is not None:
            return request.max_tokens
        return min(self.settings.config.n_predict, n_ctx - n_prompt)

    async def _template(self, engine: Engine) -> ChatTemplate | None:
        """The chat template: the `chat_template_file` setting's, else the model's own
        (None: the model has none, or it is broken; then the personality's layout)."""
        setting = self.settings.config.chat_template_file
        cached = self._templates.get(engine)
        if cached is not None and cached[0] == setting:
            return cached[1]
        template: ChatTemplate | None = None
        tokens = (cast(SpecialTokens, engine.backend)
                  if hasattr(engine.backend, "special_token_text") else _NO_SPECIAL_TOKENS)
        if setting:
            source = await asyncio.to_thread(self._read_template_file)
            try:
                template = ChatTemplate.from_backend(source, tokens)
            except TemplateError as exc:
                raise LollmsError(f"chat_template_file {setting!r}: {exc}") from None
        else:
            read = getattr(engine.backend, "chat_template", None)
            own: str | None = read() if read is not None else None
            if own:
                try:
                    template = ChatTemplate.from_backend(own, tokens)
                except TemplateError as exc:
                    log.warning("the model's chat template cannot be used (%s); chat "
                                "requests use the personality's layout", exc)
        self._templates[engine] = (setting, template)
        return template

    def _read_template_file(self) -> str:
        """The configured template's source: `builtin:NAME` is one shipped with the package
        (lollms_fast/chat_templates/NAME.jinja), anything else a file."""
        config = self.settings.config
        setting = config.chat_template_file
        try:
            if setting.startswith(BUILTIN):
                name = setting[len(BUILTIN):]
                if name not in BUILTIN_TEMPLATES:
                    raise LollmsError(f"chat_template_file {setting!r}: no such built-in "
                                      f"template ({', '.join(sorted(BUILTIN_TEMPLATES))})")
                folder = resources.files("lollms_fast").joinpath("chat_templates")
                return folder.joinpath(f"{name}.jinja").read_text(encoding="utf-8")
            path = config.chat_template_path
            assert path is not None
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LollmsError(f"chat_template_file {setting!r} cannot be read: {exc}"
                              ) from None

    def _check_grammar(self, engine: Engine, gbnf: str) -> None:
        """Compile the grammar once off the event loop and the engine thread: a grammar
        llama.cpp refuses is a 400 before anything is queued, and the first grammar's scan
        of the vocabulary does not stall the batch."""
        # parse() refused the request if this backend had no grammars
        cast(GrammarBackend, engine.backend).grammar(gbnf).close()

    async def shutdown(self) -> None:
        for generation in list(self.active):
            generation.cancel()


class _NoSpecialTokens:
    """A backend that cannot name its BOS/EOS (the scripted test backend)."""

    def special_token_text(self, kind: str) -> str | None:  # noqa: ARG002
        return None


_NO_SPECIAL_TOKENS = _NoSpecialTokens()


# ---------------------------------------------------------------------- response parts

def finish_reason(generation: Generation) -> str:
    finish = generation.finish
    assert finish is not None
    return FINISH_REASONS.get(finish.reason, "stop")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [
        {"token": e.piece.decode("utf-8", "replace"), "logprob": e.logprob,
         "bytes": list(e.piece),
         "top_logprobs": [{"token": p.decode("utf-8", "replace"), "logprob": lp,
                           "bytes": list(p)} for p, lp in e.top]}
        for e in entries]}


def text_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """Legacy completions `logprobs`: parallel lists, offsets into the choice's text."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        text = e.piece.decode("utf-8", "replace")
        tokens.append(text)
        values.append(e.logprob)
        tops.append({p.decode("utf-8", "replace"): lp for p, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}

