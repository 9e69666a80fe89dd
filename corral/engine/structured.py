"""Constrained decoding: JSON schema, regex, choice and grammar constraints through xgrammar.

A request's `SamplingParams.structured` names one constraint. `StructuredCompiler.compile`
turns it into an xgrammar CompiledGrammar (cached per constraint; done by the caller before the
request is queued, so compile errors never reach the engine thread). Each sequence then gets
its own GrammarMatcher; every step `apply_masks` writes the allowed-token bitmask of all
constrained rows into the batch's logits in one call, and `accept` advances a matcher with the
token that was picked. Rows without a constraint are untouched, so both kinds share a batch.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


@dataclass
class StructuredOutput:
    """Exactly one constraint on a request's output (vLLM's StructuredOutputsParams).

    json_schema: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a
    regular expression the whole output matches; choice: one of these strings; grammar: an
    EBNF grammar (xgrammar / GBNF syntax, `root ::= ...`). `param` is the request field the
    constraint came from, used in error messages.
    """

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    param: str | None = field(default=None, compare=False)
    compiled: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise StructuredOutputError(
                "give exactly one of json_schema, json_object, regex, choice, grammar"
                + (f" (got {', '.join(set_)})" if set_ else ""), self.param)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise StructuredOutputError("choice must be a non-empty list of non-empty "
                                            "strings", self.param)
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable identity for the compile cache."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json_schema" and not isinstance(value, str):
            value = json.dumps(value, sort_keys=True)
        elif kind == "choice":
            value = json.dumps(value)
        return kind, str(value)


def _choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class StructuredCompiler:
    """Compiles constraints for one tokenizer; thread-safe, with an LRU cache of grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = 256):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        # xgrammar's own cache keys on the grammar text; ours also keeps the parsed result of
        # schema serialisation and bounds memory.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutput):
        """The CompiledGrammar for `so` (also stored on `so.compiled`). Raises
        StructuredOutputError naming the problem for an invalid or unsupported constraint."""
        if so.compiled is not None:
            return so.compiled
        key = so.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                so.compiled = hit
                return hit
        compiled = self._compile(so)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        so.compiled = compiled
        return compiled

    def _compile(self, so: StructuredOutput):
        kind, c = so.kind, self._compiler
        try:
            if kind == "json_schema":
                schema = so.json_schema
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except ValueError as e:
                        raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}",
                                                    so.param) from None
                if not isinstance(schema, (dict, bool)):
                    raise StructuredOutputError("a JSON schema must be an object", so.param)
                # compact JSON: a small model given free whitespace can pad forever
                return c.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return c.compile_regex(so.regex)
            if kind == "choice":
                return c.compile_grammar(_choice_grammar(so.choice))
            return c.compile_grammar(so.grammar)
        except StructuredOutputError:
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json_schema": "JSON schema", "json_object": "JSON object",
                    "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            # xgrammar prefixes "[time] /path/file.cc:line: "; keep the message only
            reason = reason.split(": ", 1)[1] if reason.startswith("[") and ": " in reason \
                else reason
            raise StructuredOutputError(f"invalid or unsupported {what}: {reason}",
                                        so.param) from None

    def matcher(self, so: StructuredOutput):
        """A fresh GrammarMatcher for one sequence (the constraint must be compiled)."""
        return self._xgr.GrammarMatcher(self.compile(so))

    def apply_masks(self, logits, matchers: list, blocked_rows: list[int] = ()) -> None:
        """In place: -inf on every token the row's matcher forbids. logits [N, V] (a torch
        tensor); matchers[i] is None for an unconstrained row; blocked_rows: rows whose end
        tokens were forbidden (min_tokens), which may be left with no token at all."""
        import torch  # here: importing SamplingParams must stay light for the CLI

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        xgr = self._xgr
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(mask, i)
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)
        # A row left with no token (min_tokens forbade the only allowed one, the end token)
        # would sample NaN: let it end instead.
        check = [i for i in blocked_rows if matchers[i] is not None]
        if check:  # only then: a full-row check costs more than the mask itself on a busy CPU
            dead = torch.isneginf(logits[check]).all(dim=-1).tolist()
            stops = torch.tensor(self.stop_token_ids, device=logits.device)
            for i, d in zip(check, dead):
                if d:
                    logits[i, stops] = 0.0


def accept(matcher, token: int) -> bool:
    """Advance `matcher` by the sampled token; False if the grammar rejects it."""
    return bool(matcher.accept_token(token))
