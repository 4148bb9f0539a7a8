"""Request-level types that cross the engine boundary: parameters in, outputs out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from loramux.engine.errors import InvalidRequest


@dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with (vLLM's LoRARequest fields).

    lora_int_id: the registration's id. The engine replaces the value given with one from its
                 own counter when it registers the adapter (ids are never reused, so a cache
                 entry or GPU slot of an unloaded adapter never matches a new one).
    is_3d_lora_weight: None = detect from the files; True/False is checked against detection.
    load_inplace: replace the weights of an adapter of the same name for new requests.
    allowed_roots: non-empty: every file of the adapter read (also re-reads) must resolve, links
                   followed, under one of these directories.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None
    load_inplace: bool = False
    is_3d_lora_weight: bool | None = None
    allowed_roots: tuple[str, ...] = ()


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seeds are int64, as in vLLM


@dataclass(frozen=True)
class StructuredOutputs:
    """A grammar the output must follow (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema (JSON text), any JSON object, a regex, a list of choices, or a grammar (Lark, or
    GBNF/EBNF as vLLM's `grammar`). The engine ends the request when the grammar is complete.

    any_whitespace: JSON may carry whitespace between tokens (vLLM's default), bounded in length
                    so a model cannot loop on it; False writes compact JSON.
    source: the request field it came from, for error messages (not part of its identity).
    start_after: a token id (a reasoning model's `</think>`): the output is free up to and
                 including its first occurrence and follows the grammar after it (not part of
                 the grammar's identity either).
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = True
    source: str = field(default="structured_outputs", compare=False)
    start_after: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                        else [])
        if len(given) != 1:
            raise InvalidRequest(f"{self.source}: give exactly one of json, json_object, regex, "
                                 f"choice, grammar (got {', '.join(given) or 'none'})")
        if self.choice is not None and not self.choice:
            raise InvalidRequest(f"{self.source}: choice must list at least one string")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus top-k
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's plus top-k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None
    # logits processors (engine/processors.py), applied after any grammar mask, as vLLM's
    presence_penalty: float = 0.0  # minus this for each token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # tokens of prompt + output: positive logits / p, others * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); a mapping is accepted
    min_tokens: int = 0  # EOS and stop token ids masked, stop strings unchecked, until reached
    bad_words: tuple[str, ...] = ()  # never produced (their last token is masked after the rest)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be produced

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        for name in ("stop", "bad_words"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple([value] if isinstance(value, str) else value))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be a 64-bit signed integer, got {self.seed}"),
            *self._processor_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)

    def _processor_checks(self) -> list[tuple[bool, str]]:
        """vLLM's ranges; logit_bias within OpenAI's [-100, 100] (vLLM clamps, we refuse).
        Token ids are checked against the vocabulary by the engine."""
        bad_bias = [token for token, bias in self.logit_bias if not -100 <= bias <= 100]
        return [
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (not bad_bias, f"logit_bias of token ids {bad_bias} must be in [-100, 100]"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (all(word.strip() for word in self.bad_words),
             "bad_words must not hold empty or blank words"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids must list at least one token id"),
        ]

    @property
    def has_processors(self) -> bool:
        """Whether any logits processor is on (rows without pay nothing for them)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens or self.bad_words
                    or self.allowed_token_ids is not None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, best first
    rank: int | None = None  # 1 + how many tokens are more likely (prompt logprobs only)


@dataclass
class CompletionOutput:
    """One of a request's n samples. Cumulative fields plus the delta of the latest event."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What Engine.generate yields after each step that changed the request."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_name: str | None = None
    # prompt_logprobs: per prompt token, None for the first (nothing predicts it), then its
    # logprob given the tokens before it (with the top-k), once the prompt is prefilled
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # time.monotonic() of arrival, scheduled (first), first_token, last_token and finished
    metrics: dict = field(default_factory=dict)
    error: Exception | None = None  # set when the request failed inside the engine
