"""Request-level types that cross the engine boundary: parameters in, outputs out."""

from __future__ import annotations

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
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = True
    source: str = field(default="structured_outputs", compare=False)

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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
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
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be a 64-bit signed integer, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str)
                                               else self.stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, best first


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
    # time.monotonic() of arrival, scheduled (first), first_token, last_token and finished
    metrics: dict = field(default_factory=dict)
    error: Exception | None = None  # set when the request failed inside the engine
