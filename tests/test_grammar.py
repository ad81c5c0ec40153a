"""Structured output at the backend level: llama.cpp's grammar sampler (`Backend.grammar`)
and the JSON grammars (`json_grammar`), on the real default model.

The decode loop here is the one a scheduler would run: greedy argmax from the raw row; when
the grammar refuses that token, mask the row and take the argmax again; accept; stop at an
end-of-generation token. Prompts show one example answer first, so the 270M model answers
briefly (left alone it rambles past any token budget).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from chatkit import gemma_chat
from lollms_fast.engine.backend import (
    JSON_OBJECT_GBNF,
    Backend,
    BackendParams,
    Grammar,
    json_grammar,
)
from lollms_fast.engine.batch import Batch
from lollms_fast.errors import BadRequest, ModelNotReady

N_MAX = 60  # token budget of one constrained answer


def open_backend(model: Path) -> Backend:
    return Backend(BackendParams(model, n_ctx=1024, n_batch=256, n_threads=2, n_seq_max=1))


@pytest.fixture(scope="module")
def backend(default_model_path: Path) -> Iterator[Backend]:
    b = open_backend(default_model_path)
    try:
        yield b
    finally:
        b.close()


def token(backend: Backend, text: str) -> int:
    ids = backend.tokenize(text, add_special=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def special(backend: Backend, name: str) -> int:
    ids = backend.tokenize(name, add_special=False, parse_special=True)
    assert len(ids) == 1, (name, ids)
    return ids[0]


def feed(grammar: Grammar, backend: Backend, text: str) -> None:
    """Accept the tokens of `text`, each checked by the fast path first."""
    for t in backend.tokenize(text, add_special=False):
        assert grammar.allows(t), (text, backend.piece(t))
        grammar.accept(t)


def finite_ids(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isfinite(row))


_rows: dict[str, np.ndarray] = {}


def prompt_row(backend: Backend, prompt: str) -> np.ndarray:
    """A real logits row: the last one of `prompt`, decoded as sequence 0 (a copy; each
    prompt is decoded once per test session)."""
    if prompt not in _rows:
        _rows[prompt] = _decode_row(backend, prompt)
    return _rows[prompt].copy()


def _decode_row(backend: Backend, prompt: str) -> np.ndarray:
    tokens = backend.tokenize(prompt, add_special=True, parse_special=True)
    backend.seq_rm(0, 0, -1)
    batch = Batch(len(tokens))
    index = batch.add(0, tokens, 0, True)
    assert backend.decode(batch) == 0
    return backend.logits(index).copy()


COLOUR = gemma_chat("Reply in JSON. Name a colour.")  # the prompt of the single-row tests


def constrained_greedy(backend: Backend, grammar: Grammar, prompt: str) -> tuple[str, int]:
    """Greedy decode under `grammar`; returns the text and how many rows were masked."""
    tokens = backend.tokenize(prompt, add_special=True, parse_special=True)
    backend.seq_rm(0, 0, -1)
    batch = Batch(max(len(tokens), 1))
    index = batch.add(0, tokens, 0, True)
    assert backend.decode(batch) == 0
    pos, masked = len(tokens), 0
    pieces: list[bytes] = []
    for _ in range(N_MAX):
        row = backend.logits(index)
        t = int(np.argmax(row))
        if not grammar.allows(t):
            grammar.mask(row)
            masked += 1
            # the grammar is unfinished here (no EOG was accepted): something is allowed
            assert np.isfinite(row).any()
            t = int(np.argmax(row))
            assert grammar.allows(t)
        grammar.accept(t)
        if backend.is_eog(t):
            return b"".join(pieces).decode("utf-8"), masked
        pieces.append(backend.piece(t))
        batch.clear()
        index = batch.add(0, [t], pos, True)
        pos += 1
        assert backend.decode(batch) == 0
    pytest.fail(f"no end of generation in {N_MAX} tokens: {b''.join(pieces)!r}")


# ---------------------------------------------------------------- the grammar sampler


def test_allows_mask_and_accept_on_real_tokens(backend: Backend) -> None:
    g = backend.grammar(JSON_OBJECT_GBNF)
    brace, x, space = token(backend, "{"), token(backend, "x"), token(backend, " ")
    eot = special(backend, "<end_of_turn>")
    assert backend.is_eog(eot)
    assert g.allows(brace)
    assert not g.allows(x)
    assert not g.allows(space)  # nothing before the object
    assert not g.allows(eot)  # an empty answer is not an object

    row = prompt_row(backend, COLOUR)
    g.mask(row)
    ids = finite_ids(row)
    assert brace in ids and x not in ids and eot not in ids
    assert all(backend.piece(int(i)).startswith(b"{") for i in ids), ids
    with pytest.raises(ValueError, match="not allowed"):
        g.accept(x)  # llama.cpp would abort on it; the grammar refuses it first

    feed(g, backend, '{"a": [1, -2.5e3, "x\\n\\u00e9", true, null], "b": {}}')
    # complete: only end-of-generation tokens are left, all of them
    row = prompt_row(backend, COLOUR)
    g.mask(row)
    ids = finite_ids(row)
    assert len(ids) > 0 and eot in ids
    assert all(backend.is_eog(int(i)) for i in ids)
    assert g.allows(eot)
    assert not g.allows(token(backend, "}")) and not g.allows(space)
    g.accept(eot)
    g.close()


def test_end_of_generation_only_where_the_grammar_may_end(backend: Backend) -> None:
    # "a" then optionally "b": after "a" both EOG and "b" are allowed, after "ab" only EOG
    g = backend.grammar('root ::= "a" "b"?')
    eos = special(backend, "<eos>")
    assert backend.is_eog(eos)
    assert not g.allows(eos)
    g.accept(token(backend, "a"))
    assert g.allows(eos) and g.allows(token(backend, "b"))
    g.accept(token(backend, "b"))
    assert g.allows(eos) and not g.allows(token(backend, "b"))
    g.close()


def test_fast_path_agrees_with_the_full_mask(backend: Backend) -> None:
    g = backend.grammar(json_grammar({"type": "object", "properties": {
        "name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name", "n"]}))
    rng = np.random.default_rng(7)
    base = prompt_row(backend, COLOUR)
    top = np.argpartition(base, -100)[-100:]
    for prefix in ("", '{ "name": "Al', 'ice", "n": 4'):
        feed(g, backend, prefix)
        row = base.copy()
        g.mask(row)
        allowed = np.isfinite(row)
        probe = np.concatenate([top, rng.integers(0, backend.n_vocab, 2000),
                                finite_ids(row)[:200]])
        fast = np.array([g.allows(int(t)) for t in probe])
        assert (fast == allowed[probe]).all()
        assert (g.allowed(probe) == allowed[probe]).all()  # the batched check too
        kept = ~allowed[probe] | (row[probe] == base[probe])
        assert kept.all()  # the allowed entries keep their logits
    g.close()


def top_allowed(row: np.ndarray, k: int) -> set[int]:
    ids = finite_ids(row)
    return {int(i) for i in ids[np.argsort(-row[ids], kind="stable")[:k]]}


def test_mask_top_keeps_the_best_allowed_tokens(backend: Backend) -> None:
    g = backend.grammar(JSON_OBJECT_GBNF)
    base = prompt_row(backend, COLOUR)
    # states: start (few tokens allowed: widening rounds), inside a string (most allowed),
    # complete (only end-of-generation: rarely among the best, the whole row is masked)
    for prefix in ("", '{"colour": "bl', 'ue"}'):
        feed(g, backend, prefix)
        full = base.copy()
        g.mask(full)
        for k in (1, 5, 40):
            row = base.copy()
            g.mask_top(row, k)
            kept = finite_ids(row)
            assert set(kept.tolist()) == top_allowed(full, k), (prefix, k)
            assert (row[kept] == base[kept]).all()
    g.close()


@pytest.mark.parametrize("gbnf", [
    'root ::= "\u2603 ok"',  # a snowman: several bytes, maybe several tokens
    'root ::= [0-9]{3} "-" [0-9]{2}',
    json_grammar({"type": "string", "enum": ["zebra crossing", "quokka"]}),
], ids=["multibyte", "digits", "enum"])
def test_mask_always_leaves_a_way_forward(backend: Backend, gbnf: str) -> None:
    # walk the grammar with one fixed real row: each step masks it, takes the best token
    # left and accepts it, until the grammar completes and an end-of-generation wins
    g = backend.grammar(gbnf)
    base = prompt_row(backend, COLOUR)
    text = b""
    for _ in range(20):
        row = base.copy()
        g.mask(row)
        assert np.isfinite(row).any(), text
        t = int(np.argmax(row))
        g.accept(t)
        if backend.is_eog(t):
            break
        text += backend.piece(t)
    else:
        pytest.fail(f"the grammar never completed: {text!r}")
    assert text.decode("utf-8") in ("\u2603 ok", '"zebra crossing"', '"quokka"') or (
        len(text) == 6 and text[3:4] == b"-")
    g.close()


def test_control_tokens_never_pass_as_text(backend: Backend) -> None:
    # llama.cpp's grammar reads <start_of_turn> as its spelled name, which a JSON string
    # would take; the answer's text renders it as nothing, so it is refused
    g = backend.grammar(JSON_OBJECT_GBNF)
    feed(g, backend, '{"a": "')
    sot = special(backend, "<start_of_turn>")
    assert not backend.is_eog(sot) and backend.piece(sot) == b""
    assert not g.allows(sot)
    row = prompt_row(backend, COLOUR)
    g.mask(row)
    assert not np.isfinite(row[sot])
    assert np.isfinite(row[token(backend, "x")])
    g.close()


def test_whitespace_is_bounded(backend: Backend) -> None:
    space, newline = token(backend, " "), token(backend, "\n")
    g = backend.grammar(JSON_OBJECT_GBNF)
    feed(g, backend, "{ ")
    assert not g.allows(space) and not g.allows(newline)
    g.close()
    g = backend.grammar(JSON_OBJECT_GBNF)
    feed(g, backend, "{\n" + " " * 16)
    assert not g.allows(space)
    g.close()
    # the converter's grammars: one optional space between tokens
    g = backend.grammar(json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}))
    feed(g, backend, "{ ")
    assert not g.allows(space) and not g.allows(newline)
    g.close()


@pytest.mark.parametrize("schema", [None, {"type": "object", "properties": {
    "a": {"type": "string"}}, "required": ["a"]}], ids=["json_object", "schema"])
def test_strings_hold_no_raw_control_characters(backend: Backend,
                                                schema: dict[str, Any] | None) -> None:
    g = backend.grammar(json_grammar(schema))
    feed(g, backend, '{"a": "x')
    assert not g.allows(token(backend, "\n")) and not g.allows(token(backend, "\t"))
    feed(g, backend, '\\n"')  # the escaped form is fine
    g.close()


def test_bad_tokens_rows_and_closing(default_model_path: Path) -> None:
    b = open_backend(default_model_path)
    g = b.grammar(JSON_OBJECT_GBNF)
    with pytest.raises(ValueError, match="outside"):
        g.allows(b.n_vocab)
    with pytest.raises(ValueError, match="outside"):
        g.allowed([0, -1])
    with pytest.raises(ValueError, match="entries"):
        g.mask(np.zeros(10, dtype=np.float32))
    g.close()
    g.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        g.allows(1)
    kept = b.grammar(JSON_OBJECT_GBNF)
    b.close()  # frees the grammars it made before the vocabulary they point into
    kept.close()
    with pytest.raises(ModelNotReady):
        kept.allows(1)
    with pytest.raises(ModelNotReady):
        b.grammar(JSON_OBJECT_GBNF)


@pytest.mark.parametrize("gbnf, root, message", [
    ("", "root", "empty"),
    ('root ::= "a" (', "root", "syntax error"),
    ('root ::= item\n', "root", "undefined rule"),
    ('start ::= "a"', "root", "'root'"),  # no such start rule
    ('root ::= root "a" | "b"', "root", "left recursion"),
])
def test_invalid_grammar_is_a_bad_request(backend: Backend, gbnf: str, root: str,
                                          message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        backend.grammar(gbnf, root)


def test_another_start_rule(backend: Backend) -> None:
    g = backend.grammar('start ::= "a"', root="start")
    assert g.allows(token(backend, "a")) and not g.allows(token(backend, "b"))
    g.close()


# ---------------------------------------------------------------- JSON schemas


@pytest.mark.parametrize("schema, message", [
    ({"type": "frobnicate"}, "Unrecognized schema"),
    ({"$ref": "https://example.com/schema.json"}, "local references"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/a"}}}, "local references"),
    ({"$ref": "#/$defs/missing"}, "Error resolving ref #/[$]defs/missing"),
    ({"type": "string", "pattern": "abc"}, "Pattern must start"),
    ({"type": "object", "properties": ["a"]}, "unsupported JSON schema"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_unsupported_schema_is_a_bad_request(schema: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        json_grammar(schema)


def test_json_object_grammar_is_ours_and_object_rooted() -> None:
    assert json_grammar(None) == JSON_OBJECT_GBNF
    assert "root   ::= object" in JSON_OBJECT_GBNF


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30},
                   "age": {"type": "integer"},
                   "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]}},
    "required": ["name", "age", "city"],
}
BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                 "minItems": 1, "maxItems": 3},
        "author": {"type": "object", "required": ["first", "last"],
                   "properties": {"first": {"type": "string", "maxLength": 20},
                                  "last": {"type": "string", "maxLength": 20}}},
    },
    "required": ["title", "tags", "author"],
}
SHAPE = {
    "$defs": {"point": {"type": "object", "additionalProperties": False,
                        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                        "required": ["x", "y"]}},
    "type": "object",
    "properties": {"kind": {"const": "segment"},
                   "ends": {"type": "array", "items": {"$ref": "#/$defs/point"},
                            "minItems": 2, "maxItems": 2},
                   "closed": {"type": "boolean"}},
    "required": ["kind", "ends", "closed"],
}

CASES = {
    "json_object": (None, gemma_chat("Reply in JSON. What is the capital of Italy?",
                               '{"capital": "Rome"}',
                               "Reply in JSON. What is the capital of France?")),
    "enum_and_required": (PERSON, gemma_chat("Reply in JSON. A person who lives in Rome.",
                                       '{"name": "Marco", "age": 41, "city": "Rome"}',
                                       "Reply in JSON. A person who lives in Tokyo.")),
    "nesting_and_arrays": (BOOK, gemma_chat(
        "Reply in JSON. A novel.",
        '{"title": "Dune", "tags": ["desert", "empire"], '
        '"author": {"first": "Frank", "last": "Herbert"}}',
        "Reply in JSON. A detective novel.")),
    "ref_const_boolean": (SHAPE, gemma_chat(
        "Reply in JSON. A segment from the origin to (3, 4).",
        '{"kind": "segment", "ends": [{"x": 0, "y": 0}, {"x": 3, "y": 4}], "closed": false}',
        "Reply in JSON. A segment from (1, 1) to (5, 2).")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_constrained_greedy_decode_gives_valid_json(backend: Backend, case: str) -> None:
    schema, prompt = CASES[case]
    g = backend.grammar(json_grammar(schema))
    text, _masked = constrained_greedy(backend, g, prompt)
    g.close()
    value = json.loads(text)
    assert isinstance(value, dict), text
    if schema is not None:
        jsonschema.validate(value, schema)
