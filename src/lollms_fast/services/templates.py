"""Chat templates: OpenAI-style messages -> the model's prompt, as token segments.

A GGUF may carry its chat format as a Jinja template (`tokenizer.chat_template`, the
Hugging Face convention). `ChatTemplate` compiles it once in jinja2's
`ImmutableSandboxedEnvironment` (no attribute starting with `_`, no unsafe callables, no
mutation of lists and dicts, `str.format` sandboxed) with a few hardenings of our own: an
unsafe attribute raises at once instead of rendering as empty, `*` and `**` cannot build huge
values, and the output is capped (loops that only burn CPU are not stopped). A model file can
be a hostile input (CVE-2024-34359 was a template that ran shell commands in
llama-cpp-python); every render failure or sandbox violation is a `ChatTemplateError`, a 400
`BadRequest`.

**Segments, not a string.** The project's rule is that text a client sends never becomes a
control token (`<start_of_turn>`...). A template outputs one string in which its own markup
and the message contents are mixed, so it is rendered twice:

1. with every message content replaced by a sentinel: a per-render random number between two
   private-use characters (no whitespace and no letters, so `trim`, `upper`, `title` leave it
   alone). The output is split at the sentinels: everything between them is the template's
   own text (tokenized with special-token parsing on), each sentinel stands for its
   message's content (tokenized with parsing off). The template's text is a function of the
   roles, the message count and the template alone: no client text can be in it, whatever
   the template does.
2. with the real contents, only to check the assembly: when the real output equals the
   template's text with each content put back (verbatim, or stripped, as templates that
   `trim` their contents do), `Rendered.exact` is True.

When the check fails the template did something else to a content (escaped it with
`tojson`, cut the reasoning out of past answers, chose a branch by what the content says).
Then the segments are still those of step 1 with each content verbatim: the turn structure
is the template's and the answer is usable, but the prompt may differ from the template's own
in the spots where it rewrote a content (`exact` is False, logged once per template). The
other candidates are worse: tokenizing the real output with parsing on lets a client forge
turns; with parsing off the model sees its own markup as plain text; finding the template's
text inside the real output again is ambiguous exactly when a client typed that text. A
template that cuts a sentinel apart (`content[:10]`) leaves part of it in its own text: that
render is refused (ChatTemplateError), as a prompt with a fragment in it is no use.

**BOS.** Templates usually start with `{{ bos_token }}`. A rendered prefix equal to the BOS
text is dropped and reported as `Rendered.add_bos`: the caller asks its tokenizer to add BOS
(which it does when the model uses one), so there is never a second BOS from the template.

**No template.** `PersonalityTemplate` lays the messages out as the lollms personality does
(services/prompt.py, the 2023 format): conditioning, turns as prefix + content + link, then
the AI prefix. The client's leading system message(s) *replace* the personality's
conditioning (an API client brings its own instructions; the personality still gives the
layout); a system message later in the conversation stays in place, as its text and the link.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, Protocol

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadRequest
from .prompt import PromptStyle, Tokenize

log = logging.getLogger("lollms_fast.templates")

Segment = tuple[str, bool]  # (text, is template text: tokenized with special-token parsing)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# template text a render may add on top of the contents (a guard against runaway templates)
MAX_TEMPLATE_CHARS = 1 << 20
# the largest string or list `*` may build, and exponent `**` may use, inside a template
MAX_REPEAT = 1 << 20
MAX_EXPONENT = 1024

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around a sentinel


class TemplateError(ValueError):
    """The template does not compile (the model's chat format cannot be used)."""


class ChatTemplateError(BadRequest):
    """Rendering failed: the template refused the messages (`raise_exception`), broke, or
    tried something the sandbox forbids."""


class SpecialTokens(Protocol):
    """What a template needs from the model's vocabulary (engine.backend.Backend)."""

    def special_token_text(self, kind: Literal["bos", "eos"]) -> str | None: ...


@dataclass(frozen=True)
class Rendered:
    segments: tuple[Segment, ...]
    add_bos: bool  # tokenize the first segment with add_bos (the model's BOS, if it uses one)
    exact: bool = True  # the segments spell exactly what the template renders

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


# ---------------------------------------------------------------------- messages

def normalize_messages(raw: object, param: str = "messages") -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role": system|user|assistant, "content": str}].

    `developer` is a system message; content is a string or a list of text parts (joined);
    an assistant message may have null content. Anything else (tool calls, images) is a
    BadRequest naming the offending `param`.
    """
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{param} must be a non-empty array of messages", param=param)
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"{where}.role must be one of system, developer, user, "
                             f"assistant (got {role!r}); tools are not supported",
                             param=f"{where}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise BadRequest(f"{where}: tool calls are not supported", param=where)
        out.append({"role": ROLES[role],
                    "content": _content(message.get("content"), role, f"{where}.content")})
    return out


def _content(content: object, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise BadRequest(f"{where}[{j}] must be a text part ({{\"type\": \"text\", "
                             f"\"text\": ...}}); got type {kind!r}", param=f"{where}[{j}]")
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(text)
    return "".join(texts)


# ---------------------------------------------------------------------- the sandbox

class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # the stock sandbox renders a forbidden attribute as empty and fails only when it is
        # used further; a chat template has no business asking, so refuse at once
        raise SecurityError(f"access to attribute {attribute!r} of a "
                            f"{type(obj).__name__!r} object is not allowed")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                        and len(seq) * count > MAX_REPEAT):
                    raise SecurityError(f"`*` would build a value of {len(seq) * count} "
                                        f"items (at most {MAX_REPEAT})")
        elif (operator == "**" and isinstance(right, int) and isinstance(left, int)
              and abs(right) > MAX_EXPONENT):
            raise SecurityError(f"`**` with an exponent of {right} (at most {MAX_EXPONENT})")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: object) -> NoReturn:
    raise ChatTemplateError(f"the model's chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # as Hugging Face's templates expect it: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> _Sandbox:
    # the options Hugging Face renders chat templates with (and llama.cpp emulates)
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                   autoescape=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


_ENV = _environment()


# ---------------------------------------------------------------------- templates

class ChatTemplate:
    """A model's Jinja chat template, compiled once (TemplateError if it does not compile).
    `render` is thread-safe."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            raise TemplateError(f"the chat template does not compile{where}: {exc}") from exc
        except Exception as exc:  # the parser on hostile input (deep nesting...)
            raise TemplateError(f"the chat template does not compile: {exc!r}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._warned = False

    @classmethod
    def from_backend(cls, source: str, backend: SpecialTokens) -> ChatTemplate:
        return cls(source, backend.special_token_text("bos") or "",
                   backend.special_token_text("eos") or "")

    def render(self, messages: Sequence[Mapping[str, str]],
               add_generation_prompt: bool = True) -> Rendered:
        """`messages` as normalize_messages returns them -> segments for the model."""
        contents = [m["content"] for m in messages]
        nonce = f"{secrets.randbelow(10**16):016d}"
        marked = [{"role": m["role"], "content": f"{_OPEN}{nonce}{i}{_CLOSE}"}
                  for i, m in enumerate(messages)]
        budget = MAX_TEMPLATE_CHARS + 2 * sum(len(c) for c in contents)
        now = datetime.now()
        skeleton = self._run(marked, add_generation_prompt, now, budget)
        real = self._run([dict(m) for m in messages], add_generation_prompt, now, budget)

        # text, index, text, index, ..., text
        parts = re.split(f"{_OPEN}{nonce}(\\d+){_CLOSE}", skeleton)
        texts = parts[0::2]
        indexes = [int(i) for i in parts[1::2]]
        if any(nonce in t or _OPEN in t or _CLOSE in t for t in texts):
            raise ChatTemplateError("the model's chat template cuts message contents apart; "
                                    "the server cannot render it safely")
        add_bos = bool(self.bos_token) and texts[0].startswith(self.bos_token)
        if add_bos:
            texts[0] = texts[0][len(self.bos_token):]
            if real.startswith(self.bos_token):
                real = real[len(self.bos_token):]

        chosen = _match(texts, [contents[i] for i in indexes], real)
        exact = chosen is not None
        if chosen is None:
            chosen = [contents[i] for i in indexes]
            if not self._warned:
                self._warned = True
                log.warning("the model's chat template rewrites message contents; the "
                            "prompt keeps them as the client sent them")
        segments: list[Segment] = []
        for k, text in enumerate(texts):
            if text:
                segments.append((text, True))
            if k < len(chosen) and chosen[k]:
                segments.append((chosen[k], False))
        return Rendered(tuple(segments), add_bos, exact)

    def _run(self, messages: list[dict[str, str]], add_generation_prompt: bool,
             now: datetime, budget: int) -> str:
        def strftime_now(fmt: str) -> str:
            return now.strftime(str(fmt))

        try:
            out: list[str] = []
            size = 0
            for piece in self._template.generate(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token, eos_token=self.eos_token,
                    strftime_now=strftime_now):
                size += len(piece)
                if size > budget:
                    raise ChatTemplateError(
                        f"the model's chat template output exceeds {budget} characters")
                out.append(piece)
            return "".join(out)
        except ChatTemplateError:
            raise
        except SecurityError as exc:
            raise ChatTemplateError(f"the model's chat template did something the sandbox "
                                    f"forbids: {exc}") from None
        except Exception as exc:  # a template bug: UndefinedError, TypeError, RecursionError..
            raise ChatTemplateError(f"the model's chat template failed: "
                                    f"{type(exc).__name__}: {exc}") from None


def _match(texts: list[str], contents: list[str], real: str) -> list[str] | None:
    """The form of each content (verbatim or stripped) with which template text and contents
    spell `real` exactly, or None. `texts` has one more entry than `contents`."""
    pos = 0
    chosen: list[str] = []
    for k, text in enumerate(texts):
        if not real.startswith(text, pos):
            return None
        pos += len(text)
        if k == len(contents):
            break
        following = texts[k + 1]
        content = contents[k]
        for form in _forms(content):
            if real.startswith(form, pos) and real.startswith(following, pos + len(form)):
                break
        else:
            return None
        chosen.append(form)
        pos += len(form)
    return chosen if pos == len(real) else None


def _forms(content: str) -> Iterator[str]:
    yield content
    for form in (content.strip(), content.lstrip(), content.rstrip()):
        if form != content:
            yield form


class PersonalityTemplate:
    """The personality's layout for a model without a chat template (module docstring)."""

    def __init__(self, style: PromptStyle) -> None:
        self.style = style

    def render(self, messages: Sequence[Mapping[str, str]],
               add_generation_prompt: bool = True) -> Rendered:
        style = self.style
        segments: list[Segment] = []
        leading = 0
        while leading < len(messages) and messages[leading]["role"] == "system":
            leading += 1
        if leading:
            for message in messages[:leading]:
                segments += [(message["content"], False), (style.link, True)]
        else:
            segments.append((style.conditioning, True))
        for message in messages[leading:]:
            role = message["role"]
            if role == "system":
                segments += [(message["content"], False), (style.link, True)]
            else:
                segments += style.turn_segments(message["content"], ai=role == "assistant")
        if add_generation_prompt:
            segments.append((style.ai_prefix, True))
        return Rendered(tuple(s for s in segments if s[0]), add_bos=True)


def tokens_of(rendered: Rendered, tokenize: Tokenize) -> list[int]:
    """The prompt's tokens: template text with special-token parsing, contents without."""
    out: list[int] = []
    own: dict[str, list[int]] = {}  # template text recurs turn after turn
    first = rendered.add_bos
    for text, trusted in rendered.segments:
        if first:
            out += tokenize(text, True, trusted)
            first = False
        elif trusted:
            if text not in own:
                own[text] = tokenize(text, False, True)
            out += own[text]
        else:
            out += tokenize(text, False, False)
    if first:  # add_bos and nothing else
        out += tokenize("", True, True)
    return out
