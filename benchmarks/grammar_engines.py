"""llguidance vs xgrammar for JSON-schema constrained decoding on the o200k_harmony vocabulary.

    .venv/bin/pip install xgrammar                                 # the comparison's other engine (not a dependency)
    .venv/bin/python benchmarks/grammar_engines.py                 # markdown tables (about 10 s on 2 cores)
    .venv/bin/python benchmarks/grammar_engines.py --runs 3 --json   # one JSON object on stdout

Run it from the repository root (it imports gptoss for the tokenizer). Everything runs on the CPU, in
this process, single request at a time; the only thing that varies between runs is the timings.

What it measures, per engine:

* setup: building the engine's tokenizer object from the 201088-entry vocabulary (once), and the first
  compile of a trivial schema after it (one-time lazy initialisation, if any).
* compile: schema text -> ready matcher, the median of --runs runs, each with a fresh compiler (xgrammar:
  a new GrammarCompiler, so its cache cannot hide the work; llguidance has no compile cache, its
  LLMatcher constructor is the compile). For xgrammar the cached time (same compiler, same schema
  again) is reported too.
* mask: walking a valid instance of the schema token by token (the JSON text tokenized with
  enc.encode), computing the next-token bitmask before each token (timed) and consuming the token
  (timed separately). Mean and p99 per token over all tokens of all runs, the first mask of a walk on
  its own (llguidance builds its lexer lazily, so its first masks cost more), and whether every token
  of the instance was allowed by the mask before it was consumed. "request" = compile + all masks +
  all consumes of one walk, the grammar cost one request pays.
* coverage: about 25 schemas, one JSON Schema feature each, with a hand-written valid and invalid
  instance. A schema is supported when it compiles, every token of the valid instance is allowed
  and the matcher accepts <|return|> at its end, and the invalid instance is refused (some token not
  allowed, or <|return|> not allowed at its end).
* special tokens: how many of the 1090 special ids each engine allows inside a JSON string, and
  whether a grammar can name a special token (<|channel|>).
* harmony: a Lark grammar for a whole harmony completion (optional analysis message, then a final
  message whose body is the schema), mask time per token over its tokens and acceptance; for xgrammar
  both the same Lark and an equivalent structural tag (TokenFormat for the special tokens,
  AnyTokensFormat without the special ids for the analysis text, JSONSchemaFormat for the body).

xgrammar gets its vocabulary as raw bytes for the 199998 byte-pair tokens and the special tokens'
names for 199998..201087 ("named"). It then treats a special token as the text of its name, so the
Lark syntax <|channel|> works, but so does the literal text "<|channel|>" inside a JSON string. The
special-token table also shows the other choice ("empty": the special tokens as empty strings, which
xgrammar then treats as special and never allows inside text, but whose names Lark cannot resolve).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptoss.chat.tokenizer import get_tokenizer  # noqa: E402

VOCAB_SIZE = 201_088  # logits of the model; the tokenizer's ids are 0..201087 with 199998.. special
NUM_TEXT_TOKENS = 199_998
RETURN, CALL, ENDOFTEXT = 200_002, 200_012, 199_999
STOP_TOKENS = [RETURN, CALL, ENDOFTEXT]


# --------------------------------------------------------------------------------------------------
# Schemas


def obj(prop_schema: dict) -> dict:
    """A scalar feature wrapped as {"v": ...}, the shape a structured output has."""
    return {"type": "object", "properties": {"v": prop_schema}, "required": ["v"], "additionalProperties": False}


# (name, feature, schema, valid instance, invalid instance)
COVERAGE = [
    ("nested_object", "nested objects",
     {"type": "object", "properties": {"user": {"type": "object", "properties": {
         "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}},
      "required": ["user"]},
     {"user": {"name": "Ann", "age": 30}}, {"user": {"name": "Ann", "age": "30"}}),
    ("required_optional", "required + optional",
     {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]},
     {"a": "x"}, {"b": 1}),
    ("additional_false", "additionalProperties: false",
     {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False},
     {"x": 1}, {"x": 1, "y": 2}),
    ("additional_true", "additionalProperties: true",
     {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": True},
     {"x": 1, "extra": [1, "two", None]}, {"x": "one"}),
    ("additional_schema", "additionalProperties: {schema}",
     {"type": "object", "additionalProperties": {"type": "integer"}},
     {"a": 1, "b": 2}, {"a": 1, "b": "2"}),
    ("array_bounds", "array items + minItems/maxItems",
     obj({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}),
     {"v": [1, 2, 3]}, {"v": [1, 2, 3, 4]}),
    ("enum", "enum (mixed types)",
     obj({"enum": ["red", "green", 1, None]}),
     {"v": "green"}, {"v": "yellow"}),
    ("const", "const",
     {"type": "object", "properties": {"v": {"const": "1.0"}, "k": {"const": 42}}, "required": ["v", "k"],
      "additionalProperties": False},
     {"v": "1.0", "k": 42}, {"v": "1.0", "k": 43}),
    ("anyOf", "anyOf",
     obj({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]}),
     {"v": "abc"}, {"v": "abcd"}),
    ("oneOf", "oneOf (disjoint by const)",
     {"oneOf": [
         {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
          "required": ["kind", "r"], "additionalProperties": False},
         {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
          "required": ["kind", "side"], "additionalProperties": False}]},
     {"kind": "square", "side": 2}, {"kind": "triangle", "side": 2}),
    ("allOf", "allOf",
     {"type": "object", "allOf": [
         {"properties": {"a": {"type": "integer"}}, "required": ["a"]},
         {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     {"a": 1, "b": "x"}, {"a": 1}),
    ("ref_defs", "$ref into $defs",
     {"$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                            "required": ["street", "city"], "additionalProperties": False}},
      "type": "object", "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}},
      "required": ["home"], "additionalProperties": False},
     {"home": {"street": "1 Main St", "city": "Oslo"}, "work": {"street": "2 Side St", "city": "Bergen"}},
     {"home": {"street": "1 Main St"}}),
    ("ref_recursive", "recursive $ref",
     {"$defs": {"node": {"type": "object", "properties": {
         "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
         "required": ["value", "children"], "additionalProperties": False}},
      "$ref": "#/$defs/node"},
     {"value": 1, "children": [{"value": 2, "children": [{"value": 3, "children": []}]}]},
     {"value": 1, "children": [{"value": "2", "children": []}]}),
    ("string_length", "string minLength/maxLength",
     obj({"type": "string", "minLength": 2, "maxLength": 5}), {"v": "abcd"}, {"v": "a"}),
    ("pattern", "string pattern (anchored ^...$)",
     obj({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}), {"v": "ABC-1234"}, {"v": "AB-1234"}),
    ("pattern_prefix", "string pattern \"^ab\" (JSON Schema patterns are searches, not full matches)",
     obj({"type": "string", "pattern": "^ab"}), {"v": "abc"}, {"v": "xab"}),
    ("format_date_time", "format: date-time",
     obj({"type": "string", "format": "date-time"}), {"v": "2024-05-17T12:34:56Z"}, {"v": "yesterday"}),
    ("format_email", "format: email",
     obj({"type": "string", "format": "email"}), {"v": "ann@example.com"}, {"v": "ann.example.com"}),
    ("format_uuid", "format: uuid",
     obj({"type": "string", "format": "uuid"}), {"v": "123e4567-e89b-12d3-a456-426614174000"},
     {"v": "123e4567e89b12d3a456426614174000"}),
    ("integer_range", "integer minimum/maximum",
     obj({"type": "integer", "minimum": 1, "maximum": 10}), {"v": 10}, {"v": 11}),
    ("exclusive_minimum", "integer exclusiveMinimum",
     obj({"type": "integer", "exclusiveMinimum": 0}), {"v": 1}, {"v": 0}),
    ("number_range", "number minimum/maximum",
     obj({"type": "number", "minimum": -1.5, "maximum": 2.5}), {"v": 2.25}, {"v": 2.75}),
    ("multiple_of", "multipleOf",
     obj({"type": "integer", "multipleOf": 5}), {"v": 25}, {"v": 26}),
    ("prefix_items", "prefixItems (tuple)",
     obj({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}),
     {"v": ["a", 1]}, {"v": [1, "a"]}),
    ("unique_items", "uniqueItems",
     obj({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), {"v": [1, 2, 3]}, {"v": [1, 1]}),
    ("pattern_properties", "patternProperties",
     {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
     {"x_a": 1, "x_b": 2}, {"y": 1}),
    ("not", "not",
     obj({"type": "integer", "not": {"const": 3}}), {"v": 4}, {"v": 3}),
    ("if_then_else", "if/then/else",
     {"type": "object", "properties": {"country": {"enum": ["US", "CA"]}, "zip": {"type": "string"}},
      "required": ["country", "zip"],
      "if": {"properties": {"country": {"const": "US"}}},
      "then": {"properties": {"zip": {"pattern": "^[0-9]{5}$"}}},
      "else": {"properties": {"zip": {"pattern": "^[A-Z][0-9][A-Z] [0-9][A-Z][0-9]$"}}}},
     {"country": "US", "zip": "12345"}, {"country": "US", "zip": "K1A 0B1"}),
    ("type_array", "type: [\"string\", \"null\"]",
     obj({"type": ["string", "null"]}), {"v": None}, {"v": 1}),
]

_ITEMS = [f"item_{i:03d}" for i in range(300)]

# (name, description, schema, valid instance): the schemas whose compile and mask time are reported.
BENCH = [
    ("tool_args", "function-call arguments: strings, bounded int, enum, date, nested object, array",
     {"type": "object", "properties": {
         "query": {"type": "string", "minLength": 1},
         "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
         "language": {"enum": ["en", "de", "fr", "es", "it", "nl", "no", "sv", "da", "fi"]},
         "filters": {"type": "object", "properties": {
             "since": {"type": "string", "format": "date"},
             "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
             "safe": {"type": "boolean"}}, "required": ["since", "tags"], "additionalProperties": False}},
      "required": ["query", "max_results", "filters"], "additionalProperties": False},
     {"query": "weather forecast for Oslo next week", "max_results": 10, "language": "en",
      "filters": {"since": "2024-05-17", "tags": ["weather", "norway", "forecast"], "safe": True}}),
    ("records", "array of 5 records (int, string, email, number, bool)",
     {"type": "object", "properties": {"rows": {"type": "array", "items": {
         "type": "object", "properties": {
             "id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string", "format": "email"},
             "score": {"type": "number"}, "active": {"type": "boolean"}},
         "required": ["id", "name", "email", "score", "active"], "additionalProperties": False}}},
      "required": ["rows"], "additionalProperties": False},
     {"rows": [{"id": i, "name": n, "email": f"{n.lower()}@example.com", "score": 0.5 + i, "active": i % 2 == 0}
               for i, n in enumerate(["Ann", "Bob", "Cleo", "Dag", "Eve"])]}),
    ("tree", "recursive $ref (tree of depth 4)",
     COVERAGE[[c[0] for c in COVERAGE].index("ref_recursive")][2],
     {"value": 1, "children": [{"value": 2, "children": [{"value": 3, "children": [{"value": 4, "children": []}]}]},
                               {"value": 5, "children": []}]}),
    ("enum300", "enum of 300 strings, 4 picks",
     {"type": "object", "properties": {"picks": {"type": "array", "items": {"enum": _ITEMS}}},
      "required": ["picks"], "additionalProperties": False},
     {"picks": ["item_007", "item_123", "item_250", "item_299"]}),
    ("any_json", "{\"type\": \"object\"}: free-form JSON",
     {"type": "object"},
     {"title": "Notes", "count": 3, "ratio": -0.125, "ok": False, "none": None,
      "items": [{"k": "a", "v": [1, 2, 3]}, {"k": "b", "v": {"deep": "yes"}}], "text": "Line one\nLine two \u00e9"}),
]

HARMONY_LARK = """start: analysis? final
analysis: <|channel|> "analysis" <|message|> REASON <|end|> <|start|> "assistant"
REASON: /(.|\\n)*/
final: <|channel|> "final" <|message|> body <|return|>
body: %json SCHEMA
"""
HARMONY_PREFIX = "<|channel|>analysis<|message|>Some reasoning here.<|end|><|start|>assistant<|channel|>final<|message|>"


def dumps(instance) -> str:
    return json.dumps(instance, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Engines: the same few calls over both libraries


def mask_bit(bm: torch.Tensor, token: int) -> bool:
    return bool((int(bm[0, token >> 5]) >> (token & 31)) & 1)


def allowed_array(bm: torch.Tensor) -> np.ndarray:
    """The mask as VOCAB_SIZE booleans."""
    bits = np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")
    return bits[:VOCAB_SIZE].astype(bool)


class Engine:
    name: str
    version: str

    def compile_schema(self, schema_text: str, fresh: bool = True):
        """Schema text -> a matcher ready for its first mask. Raises on a compile error."""
        raise NotImplementedError

    def compile_lark(self, lark: str):
        raise NotImplementedError

    def fill(self, m, bm) -> None:
        raise NotImplementedError

    def consume(self, m, token: int) -> bool:
        raise NotImplementedError

    def terminated(self, m) -> bool:
        raise NotImplementedError


class Llguidance(Engine):
    name = "llguidance"

    def __init__(self, enc):
        import llguidance
        import llguidance.torch
        from llguidance import LLMatcher, LLTokenizer, grammar_from
        self.version = _dist_version("llguidance")
        self._LLMatcher, self._grammar_from, self._fill = LLMatcher, grammar_from, llguidance.torch.fill_next_token_bitmask
        specials = {k: v for k, v in enc._special_tokens.items() if k != "<|endofprompt|>"}
        t = time.perf_counter()
        self.tok = LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks, special_tokens=specials,
                                             pattern=enc._pat_str, eos_token=RETURN, n_vocab=VOCAB_SIZE)
        self.setup_s = time.perf_counter() - t
        self.allocate = lambda: llguidance.torch.allocate_token_bitmask(1, self.tok.vocab_size)

    def _matcher(self, grammar: str):
        m = self._LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def compile_schema(self, schema_text, fresh=True):
        return self._matcher(self._grammar_from("json_schema", schema_text))

    def compile_lark(self, lark):
        return self._matcher(self._grammar_from("lark", lark))

    def fill(self, m, bm):
        self._fill(m, bm, 0)

    def consume(self, m, token):
        return m.consume_token(token)

    def terminated(self, m):
        return m.is_stopped() and not m.is_error()

    def error(self, m) -> str:
        return m.get_error()


class Xgrammar(Engine):
    name = "xgrammar"

    def __init__(self, enc, threads: int, specials_as: str = "named"):
        import xgrammar as xgr
        self.xgr, self.version, self.threads = xgr, _dist_version("xgrammar"), threads
        specials = {v: k for k, v in enc._special_tokens.items() if k != "<|endofprompt|>"}
        t = time.perf_counter()
        vocab = [enc.decode_single_token_bytes(i) for i in range(NUM_TEXT_TOKENS)]
        vocab += [specials[i].encode() if specials_as == "named" else b"" for i in range(NUM_TEXT_TOKENS, VOCAB_SIZE)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=STOP_TOKENS)
        self.setup_s = time.perf_counter() - t
        self.compiler = self.new_compiler()
        self.allocate = lambda: xgr.allocate_token_bitmask(1, VOCAB_SIZE)

    def new_compiler(self):
        return self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile_schema(self, schema_text, fresh=True):
        if fresh:
            self.compiler = self.new_compiler()
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(schema_text))

    def compile_lark(self, lark):
        return self.xgr.GrammarMatcher(self.new_compiler().compile_lark(lark))

    def compile_structural_tag(self, tag):
        return self.xgr.GrammarMatcher(self.new_compiler().compile_structural_tag(tag))

    def fill(self, m, bm):
        m.fill_next_token_bitmask(bm)

    def consume(self, m, token):
        return m.accept_token(token)

    def terminated(self, m):
        # is_completed: a grammar that itself ends with <|return|> (harmony) is done without a stop token
        return m.is_terminated() or m.is_completed()

    def error(self, m) -> str:
        return ""


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


# --------------------------------------------------------------------------------------------------
# Measurements


def walk(engine: Engine, m, tokens: list[int], bm) -> dict:
    """Mask before each token, check its bit, consume it; at the end the mask must allow <|return|> and
    consuming it must stop the matcher. Stops at the first token the mask refuses."""
    mask_ns, consume_ns = [], []
    refused_at, disagree = None, 0
    for i, t in enumerate(tokens):
        t0 = time.perf_counter_ns()
        engine.fill(m, bm)
        t1 = time.perf_counter_ns()
        mask_ns.append(t1 - t0)
        ok = mask_bit(bm, t)
        t2 = time.perf_counter_ns()
        consumed = engine.consume(m, t) if ok else False
        consume_ns.append(time.perf_counter_ns() - t2)
        if not ok:
            refused_at = i
            break
        if not consumed:
            disagree += 1  # the mask allowed it but the matcher refused it: a bug in the engine
            refused_at = i
            break
    accepted_end = False
    if refused_at is None:
        t0 = time.perf_counter_ns()
        engine.fill(m, bm)
        mask_ns.append(time.perf_counter_ns() - t0)
        if mask_bit(bm, RETURN) and engine.consume(m, RETURN):
            accepted_end = engine.terminated(m)
    return {"mask_ns": mask_ns, "consume_ns": consume_ns, "refused_at": refused_at,
            "all_allowed": refused_at is None, "accepted": refused_at is None and accepted_end, "disagree": disagree}


def median(xs):
    return statistics.median(xs) if xs else None


def ms(ns_list):
    a = np.asarray(ns_list, dtype=np.float64) / 1e6
    return {"mean_ms": float(a.mean()), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "n": int(a.size)}


def bench_schema(engine: Engine, schema: dict, instance, enc, runs: int) -> dict:
    text, tokens = json.dumps(schema), enc.encode(dumps(instance))
    compile_s, cached_s, masks, first_masks, consumes, request_s = [], [], [], [], [], []
    all_allowed = accepted = True
    error = None
    bm = engine.allocate()
    for _ in range(runs):
        t = time.perf_counter()
        try:
            m = engine.compile_schema(text, fresh=True)
        except Exception as e:  # noqa: BLE001 - a compile error is a result here
            error = _short(e)
            break
        c = time.perf_counter() - t
        compile_s.append(c)
        if isinstance(engine, Xgrammar):
            t = time.perf_counter()
            engine.compile_schema(text, fresh=False)
            cached_s.append(time.perf_counter() - t)
        r = walk(engine, m, tokens, bm)
        all_allowed &= r["all_allowed"]
        accepted &= r["accepted"]
        masks += r["mask_ns"]
        first_masks.append(r["mask_ns"][0])
        consumes += r["consume_ns"]
        request_s.append(c + (sum(r["mask_ns"]) + sum(r["consume_ns"])) / 1e9)
    if error:
        return {"error": error, "tokens": len(tokens)}
    return {"tokens": len(tokens), "compile_ms": median(compile_s) * 1e3,
            "cached_compile_ms": median(cached_s) * 1e3 if cached_s else None,
            "first_mask_ms": median(first_masks) / 1e6, "mask": ms(masks), "consume": ms(consumes),
            "request_ms": median(request_s) * 1e3, "all_allowed": all_allowed, "accepted": accepted}


def coverage(engine: Engine, enc) -> tuple[list[dict], list[int]]:
    rows, pooled = [], []
    bm = engine.allocate()
    for name, feature, schema, valid, invalid in COVERAGE:
        row = {"schema": name, "feature": feature}
        text = json.dumps(schema)
        try:
            m = engine.compile_schema(text, fresh=True)
        except Exception as e:  # noqa: BLE001
            row.update(compiles=False, error=_short(e), accepts_valid=None, rejects_invalid=None, supported=False)
            rows.append(row)
            continue
        vt, it = enc.encode(dumps(valid)), enc.encode(dumps(invalid))
        rv = walk(engine, m, vt, bm)
        ri = walk(engine, engine.compile_schema(text, fresh=False), it, bm)
        pooled += rv["mask_ns"]
        row.update(compiles=True, error=None, accepts_valid=rv["accepted"], rejects_invalid=not ri["accepted"],
                   valid_refused_at=rv["refused_at"], invalid_refused_at=ri["refused_at"],
                   disagree=rv["disagree"] + ri["disagree"])
        row["supported"] = row["accepts_valid"] and row["rejects_invalid"]
        if not rv["accepted"]:
            row["note"] = (f"valid {dumps(valid)} refused at token {rv['refused_at']} "
                           f"({enc.decode(vt[:rv['refused_at'] + 1])!r} so far)" if rv["refused_at"] is not None
                           else f"valid {dumps(valid)}: all tokens allowed, <|return|> not accepted at the end")
        elif ri["accepted"]:
            row["note"] = f"invalid {dumps(invalid)} accepted (keyword not enforced)"
        rows.append(row)
    return rows, pooled


def specials_in_string(engine: Engine, enc) -> int:
    """How many special ids the mask allows right after the opening quote of a free string."""
    m = engine.compile_schema(json.dumps({"type": "object", "properties": {"s": {"type": "string"}},
                                          "required": ["s"]}))
    for t in enc.encode('{"s":"'):
        assert engine.consume(m, t)
    bm = engine.allocate()
    engine.fill(m, bm)
    return int(allowed_array(bm)[NUM_TEXT_TOKENS:].sum())


def specials_in_string_structural(engine: "Xgrammar", enc) -> int:
    """specials_in_string for a JSON schema inside a structural tag that excludes "<|" from strings."""
    from xgrammar.structural_tag import JSONSchemaFormat, StructuralTag
    tag = StructuralTag(format=JSONSchemaFormat(
        json_schema={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}, excludes=["<|"]))
    m = engine.compile_structural_tag(tag)
    for t in enc.encode('{"s":"'):
        assert engine.consume(m, t)
    bm = engine.allocate()
    engine.fill(m, bm)
    return int(allowed_array(bm)[NUM_TEXT_TOKENS:].sum())


def lark_special_token(engine: Engine, enc) -> dict:
    """Can Lark name <|channel|>, and does it then match the token only (not its spelling in text)?"""
    out = {}
    for label, lark in (("<|channel|>", 'start: <|channel|> "x"'), ("<[200005]>", 'start: <[200005]> "x"')):
        try:
            m = engine.compile_lark(lark)
        except Exception as e:  # noqa: BLE001
            out[label] = f"error: {_short(e, 80)}"
            continue
        bm = engine.allocate()
        engine.fill(m, bm)
        a = allowed_array(bm)
        lt = enc.encode("<")[0]
        yn = lambda b: "yes" if b else "no"  # noqa: E731
        out[label] = f"allows {int(a.sum())} token(s): <|channel|> {yn(a[200005])}, text '<' {yn(a[lt])}"
    return out


def harmony_structural_tag(schema: dict, string_excludes: list[str] = ()):
    """The harmony grammar as an xgrammar structural tag: special tokens by id (TokenFormat), the
    analysis text as any tokens but the special ones, the final message's body the JSON schema."""
    from xgrammar.structural_tag import (AnyTokensFormat, ConstStringFormat, JSONSchemaFormat, OptionalFormat,
                                         SequenceFormat, StructuralTag, TokenFormat)
    tok = lambda i: TokenFormat(token=i)  # noqa: E731
    channel, message, end, start = 200005, 200008, 200007, 200006
    analysis = SequenceFormat(elements=[
        tok(channel), ConstStringFormat(value="analysis"), tok(message),
        AnyTokensFormat(exclude_tokens=list(range(NUM_TEXT_TOKENS, VOCAB_SIZE))),
        tok(end), tok(start), ConstStringFormat(value="assistant")])
    return StructuralTag(format=SequenceFormat(elements=[
        OptionalFormat(content=analysis), tok(channel), ConstStringFormat(value="final"), tok(message),
        JSONSchemaFormat(json_schema=schema, excludes=list(string_excludes)), tok(RETURN)]))


def harmony(engine: Engine, enc, schema: dict, instance, runs: int, structural: bool = False) -> dict:
    lark = HARMONY_LARK.replace("SCHEMA", json.dumps(schema))
    if structural:
        tag = harmony_structural_tag(schema)
        engine = _Structural(engine, tag)
    tokens = enc.encode(HARMONY_PREFIX + dumps(instance), allowed_special="all")
    compile_s, masks = [], []
    ok = True
    reason_specials = None
    bm = engine.allocate()
    for _ in range(runs):
        t = time.perf_counter()
        try:
            m = engine.compile_lark(lark)
        except Exception as e:  # noqa: BLE001
            return {"error": _short(e)}
        compile_s.append(time.perf_counter() - t)
        r = walk(engine, m, tokens, bm)  # walk() ends with <|return|>, the end of the final message
        ok &= r["accepted"]
        masks += r["mask_ns"]
    # Inside REASON (after "<|channel|>analysis<|message|>Some"): which special tokens may come next?
    m = engine.compile_lark(lark)
    for t in enc.encode("<|channel|>analysis<|message|>Some", allowed_special="all"):
        engine.consume(m, t)
    engine.fill(m, bm)
    a = allowed_array(bm)[NUM_TEXT_TOKENS:]
    reason_specials = int(a.sum())
    # Inside a JSON string of the final message
    m = engine.compile_lark(lark)
    for t in enc.encode('<|channel|>final<|message|>{"query":"', allowed_special="all"):
        engine.consume(m, t)
    engine.fill(m, bm)
    return {"tokens": len(tokens) + 1, "compile_ms": median(compile_s) * 1e3, "mask": ms(masks), "accepted": ok,
            "refused_at": r["refused_at"] if r["refused_at"] is not None else (None if r["accepted"] else len(tokens)),
            "refused_token": enc.decode([tokens[r["refused_at"]]]) if r["refused_at"] is not None
            else (None if r["accepted"] else "<|return|>"),
            "specials_allowed_in_reason": reason_specials,
            "specials_allowed_in_json_string": int(allowed_array(bm)[NUM_TEXT_TOKENS:].sum())}


class _Structural:
    """An engine whose compile_lark compiles a fixed xgrammar structural tag instead."""

    def __init__(self, engine, tag):
        self._e, self._tag = engine, tag

    def compile_lark(self, _lark):
        return self._e.compile_structural_tag(self._tag)

    def __getattr__(self, name):
        return getattr(self._e, name)


def _short(e: Exception, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return (s[: n - 1] + "…") if len(s) > n else s


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------------
# Report


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    cell = lambda c: (c if isinstance(c, str) else fmt(c)).replace("|", "\\|")  # noqa: E731
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    env = res["environment"]
    out = [f"Environment: {env['cpu']} ({env['cpus']} CPUs visible), Python {env['python']}, torch {env['torch']}; "
           f"llguidance {env['llguidance']}, xgrammar {env['xgrammar']} "
           f"(xgrammar compile threads: {env['xgrammar_threads']}; "
           f"llguidance compiles on the calling thread); "
           f"vocabulary {VOCAB_SIZE} tokens; {res['runs']} runs per measurement.", ""]
    out.append("### Setup (once)\n")
    out.append(table(["engine", "tokenizer object (s)", "first trivial compile (ms)"],
                     [[e, s["tokenizer_s"], s["first_compile_ms"]] for e, s in res["setup"].items()]))
    out.append("\n### Compile and mask time per schema\n")
    out.append("compile = schema text to a ready matcher, fresh compiler each run (median); cached = xgrammar's "
               "compiler cache hit; mask = computing the 201088-bit next-token mask, per token over all runs; "
               "first = a walk's first mask (median); request = compile + all masks + consumes of one instance "
               "(median); ok = every token allowed and <|return|> accepted at the end.\n")
    rows = []
    for name, desc, *_ in BENCH:
        for e in res["bench"]:
            r = res["bench"][e][name]
            if "error" in r:
                rows.append([name, e, str(r["tokens"]), f"error: {r['error']}", "", "", "", "", "", "", ""])
                continue
            rows.append([name, e, str(r["tokens"]), r["compile_ms"], r["cached_compile_ms"], r["first_mask_ms"],
                         r["mask"]["mean_ms"], r["mask"]["p99_ms"], r["consume"]["mean_ms"], r["request_ms"],
                         r["all_allowed"] and r["accepted"]])
    out.append(table(["schema", "engine", "tokens", "compile ms", "cached ms", "first mask ms", "mask mean ms",
                      "mask p99 ms", "consume mean ms", "request ms", "ok"], rows))
    out.append("\nSchemas: " + "; ".join(f"`{n}`: {d}" for n, d, *_ in BENCH) + ".\n")
    out.append("Mask time pooled over the valid instances of all coverage schemas each engine compiled:\n")
    out.append(table(["engine", "masks", "mean ms", "p99 ms", "max ms"],
                     [[e, str(p["n"]), p["mean_ms"], p["p99_ms"], p["max_ms"]]
                      for e, p in res["coverage_pooled_mask"].items()]))
    out.append("\n### JSON Schema coverage\n")
    out.append("valid = every token of the valid instance allowed and <|return|> accepted at the end; invalid "
               "refused = some token of the invalid instance not allowed, or <|return|> not allowed at its end.\n")
    engines = list(res["coverage"])
    header = ["schema", "feature"] + [f"{e}: {c}" for e in engines for c in ("compiles", "valid", "invalid refused")]
    rows = []
    for i, (name, feature, *_ ) in enumerate(COVERAGE):
        row = [name, feature]
        for e in engines:
            c = res["coverage"][e][i]
            row += ["yes" if c["compiles"] else "**no**", fmt(c["accepts_valid"]), fmt(c["rejects_invalid"])]
        rows.append(row)
    supported = {e: sum(c["supported"] for c in res["coverage"][e]) for e in engines}
    rows.append(["**supported**", ""] + [s for e in engines for s in (f"**{supported[e]}/{len(COVERAGE)}**", "", "")])
    out.append(table(header, rows))
    notes = [(e, c["schema"], f"does not compile: {c['error']}" if c["error"] else c.get("note"))
             for e in engines for c in res["coverage"][e]]
    notes = [n for n in notes if n[2]]
    if notes:
        out.append("\nFailures:\n")
        out += [f"- {e}, `{s}`: {msg}" for e, s, msg in notes]
    out.append("\n### Special tokens\n")
    out.append(table(["engine / vocabulary", "special ids allowed in a JSON string (of 1090)", "Lark `<|channel|>`",
                      "Lark `<[200005]>`"],
                     [[k, str(v["in_string"]), v["lark"]["<|channel|>"], v["lark"]["<[200005]>"]]
                      for k, v in res["specials"].items()]))
    out.append("\n### Harmony-wrapped grammar (Lark)\n")
    out.append("`start: analysis? final`, the analysis message free text, the final message `%json` of the "
               f"`tool_args` schema, fed with `{HARMONY_PREFIX}` + instance + `<|return|>`.\n")
    rows = []
    for e, h in res["harmony"].items():
        if "error" in h:
            rows.append([e, f"error: {h['error']}", "", "", "", "", "", ""])
        else:
            acc = "yes" if h["accepted"] else f"**no** (refuses `{h['refused_token']}`, token {h['refused_at']})"
            rows.append([e, str(h["tokens"]), h["compile_ms"], h["mask"]["mean_ms"], h["mask"]["p99_ms"], acc,
                         str(h["specials_allowed_in_reason"]), str(h["specials_allowed_in_json_string"])])
    out.append(table(["grammar", "tokens", "compile ms", "mask mean ms", "mask p99 ms", "accepts",
                      "special ids allowed in the analysis text", "in a JSON string of the final message"], rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per compile / walk measurement (default 10)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                    help="xgrammar compile threads (default: CPUs, at most 8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    enc = get_tokenizer()
    engines = [Llguidance(enc), Xgrammar(enc, args.threads)]
    trivial = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    res = {"runs": args.runs, "environment": {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "llguidance": engines[0].version, "xgrammar": engines[1].version, "xgrammar_threads": args.threads},
        "setup": {}, "bench": {}, "coverage": {}, "coverage_pooled_mask": {}, "specials": {}, "harmony": {}}
    for e in engines:
        t = time.perf_counter()
        e.compile_schema(trivial)
        res["setup"][e.name] = {"tokenizer_s": e.setup_s, "first_compile_ms": (time.perf_counter() - t) * 1e3}
    for e in engines:
        res["bench"][e.name] = {name: bench_schema(e, schema, inst, enc, args.runs) for name, _, schema, inst in BENCH}
    for e in engines:
        rows, pooled = coverage(e, enc)
        res["coverage"][e.name] = rows
        res["coverage_pooled_mask"][e.name] = ms(pooled)
    xgr_empty = Xgrammar(enc, args.threads, specials_as="empty")
    for label, e in (("llguidance", engines[0]), ("xgrammar, special tokens as names", engines[1]),
                     ("xgrammar, special tokens as empty strings", xgr_empty)):
        res["specials"][label] = {"in_string": specials_in_string(e, enc), "lark": lark_special_token(e, enc)}
    res["specials"]["xgrammar, names, structural tag JSONSchemaFormat(excludes=[\"<|\"])"] = {
        "in_string": specials_in_string_structural(engines[1], enc), "lark": {"<|channel|>": "–", "<[200005]>": "–"}}
    tool = BENCH[0]
    res["harmony"]["llguidance (Lark)"] = harmony(engines[0], enc, tool[2], tool[3], args.runs)
    res["harmony"]["xgrammar (the same Lark)"] = harmony(engines[1], enc, tool[2], tool[3], args.runs)
    res["harmony"]["xgrammar (structural tag)"] = harmony(engines[1], enc, tool[2], tool[3], args.runs, structural=True)

    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
    else:
        print(markdown(res))


if __name__ == "__main__":
    main()
