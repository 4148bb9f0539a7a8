"""Structured outputs on the engine (host) side, with llguidance.

`Grammars` (one per engine) holds llguidance's view of the tokenizer (built once: every token's
bytes, the model's vocabulary width, the EOS ids), the compiled grammars of recent requests, and
the executor of the batch mask fill. Each constrained sequence owns a `Constraint` (an
llguidance matcher; a reasoning request's waits for its `</think>` first). Each step the engine fills, in one parallel call, the token bitmask of
every sampling row whose sequence has a constraint and puts each row's bitmask in the plan; the
worker masks those logits rows before sampling; the engine then advances each matcher by the
sampled token and ends the request when the grammar is complete. Matchers live here, on the
host, so preemption (recompute) leaves them as they are.

A bitmask row is int32 [ceil(V / 32)]: bit j of word i allows token 32 i + j.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

import torch

from loramux.engine.errors import InvalidRequest
from loramux.engine.request import StructuredOutputs

logger = logging.getLogger(__name__)

# Whitespace between JSON tokens when any_whitespace (vLLM's default): nothing, one space, or a
# newline and up to 32 blanks of indentation, so compact, inline and pretty-printed JSON all fit
# and a model that prefers blanks still reaches the end of the value.
JSON_WHITESPACE = r"[ ]?|\n[ \t]{0,32}"
_CACHE_SIZE = 256  # compiled grammars kept


class GrammarUnavailable(InvalidRequest):
    """Structured outputs cannot run with this model's tokenizer."""


class Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by each sampled one.
    With start_after the grammar waits (`active` False: no mask) until that token is sampled."""

    def __init__(self, matcher, start_after: int | None = None) -> None:
        self.matcher = matcher
        self.start_after = start_after
        self.active = start_after is None

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete (only EOS may follow, or
        EOS was taken). A token the grammar refuses (a mask the sampler did not honour) raises."""
        if not self.active:
            self.active = token == self.start_after
            return False
        if not self.matcher.consume_token(token):
            raise InvalidRequest(f"the output left its grammar at token {token}: "
                                 f"{self.matcher.get_error()}")
        return self.matcher.is_stopped()


class Grammars:
    """llguidance's view of the tokenizer is built on the first structured request (about 5 s
    for a 150k-token vocabulary), not at engine start: engines that never see one never pay."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self.width = (vocab_size + 31) // 32  # int32 words of a bitmask row
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutputs, str] = OrderedDict()
        self._hf_tokenizer, self._eos_ids = tokenizer, eos_ids
        self._tokenizer, self.problem = None, None
        self._built = False

    def _build(self) -> None:
        """llguidance's tokenizer, once (under the lock); sets `problem` if it cannot be."""
        self._built = True
        if self._hf_tokenizer is None:
            self.problem = "this model has no tokenizer"
            return
        import llguidance
        import llguidance.hf

        start = time.perf_counter()
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size,
                eos_token=sorted(t for t in self._eos_ids if t < self.vocab_size))
        except (ValueError, RuntimeError, TypeError) as exc:
            self.problem = f"its tokenizer is not one llguidance can read ({exc})"
            logger.warning("structured outputs are off: %s", self.problem)
            return
        self._executor = llguidance.LLExecutor()
        self._llguidance = llguidance
        logger.info("structured outputs: llguidance tokenizer of %d tokens built in %.1f s",
                    self.vocab_size, time.perf_counter() - start)

    def compile(self, spec: StructuredOutputs) -> str:
        """The checked llguidance grammar of a spec (cached); a bad one is an InvalidRequest
        naming the request field and the problem. Safe to call from any thread."""
        with self._lock:
            if not self._built:
                self._build()
        if self._tokenizer is None:
            raise GrammarUnavailable(f"{spec.source}: structured outputs are not available for "
                                     f"this model: {self.problem}")
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        grammar = self._grammar(spec)
        is_error, messages = self._llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer)
        if is_error:
            raise InvalidRequest(f"{spec.source}: invalid {_kind(spec)}: {messages[0].strip()}")
        with self._lock:
            self._compiled[spec] = grammar
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return grammar

    def _grammar(self, spec: StructuredOutputs) -> str:
        ll = self._llguidance
        if spec.json is not None or spec.json_object:
            try:
                schema = json.loads(spec.json) if spec.json is not None else {"type": "object"}
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"{spec.source}: the JSON schema is not JSON: {exc}") from exc
            options = ({"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE}
                       if spec.any_whitespace else {"whitespace_flexible": False})
            try:
                return ll.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except (ValueError, TypeError) as exc:
                raise InvalidRequest(f"{spec.source}: invalid JSON schema: {exc}") from exc
        if spec.regex is not None:
            return ll.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return ll.grammar_from("choice", list(spec.choice))
        try:
            return ll.grammar_from("grammar", spec.grammar)
        except ValueError as exc:
            raise InvalidRequest(f"{spec.source}: invalid grammar: {exc}") from exc

    def constraint(self, spec: StructuredOutputs) -> Constraint:
        grammar = self.compile(spec)
        return Constraint(self._llguidance.LLMatcher(self._tokenizer, grammar), spec.start_after)

    def fill(self, constraints: list[Constraint]) -> torch.Tensor:
        """The next-token bitmasks of all constraints [n, width] int32, in one parallel call."""
        from llguidance.torch import fill_next_token_bitmask_par

        bitmask = torch.empty(len(constraints), self.width, dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor,
                                    [(c.matcher, i) for i, c in enumerate(constraints)], bitmask)
        return bitmask


def _kind(spec: StructuredOutputs) -> str:
    if spec.json is not None or spec.json_object:
        return "JSON schema"
    return "regex" if spec.regex is not None else "choice" if spec.choice else "grammar"
