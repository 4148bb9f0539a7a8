"""Request bodies of the OpenAI and vLLM endpoints, and their mapping onto engine types.

Unknown fields are ignored, as OpenAI clients send optional fields freely. Fields that OpenAI or
vLLM define and loramux does not honour yet are refused with a 400 naming them whenever they ask
for something (`_UNHONOURED`); sent with their neutral value they are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from loramux.engine.request import SEED_MAX, SEED_MIN, LoRARequest, SamplingParams
from loramux.server.settings import adapter_name_problem


_NUMBERS = {int, float, bool, type(None)}


def _invalid_text_at(data: Any) -> str | None:
    """The key path of the first string (or key) in a JSON value that is not valid Unicode:
    JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder
    takes. Walks iteratively, so any nesting depth is fine."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                key_path = (*path, str(key).encode("utf-8", "backslashreplace").decode())
                if isinstance(key, str) and not _is_unicode(key):
                    return ".".join(key_path)
                stack.append((key_path, item))
        elif isinstance(value, list) and not set(map(type, value)) <= _NUMBERS:  # token ids
            stack.extend(((*path, str(i)), item) for i, item in enumerate(value))
        elif isinstance(value, str) and not _is_unicode(value):
            return ".".join(path)
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Body(BaseModel):
    # NaN and Infinity are not JSON, though Python's parser reads them: refuse them as values.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _invalid_text_at(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode", "contains a lone UTF-16 surrogate, which is not valid "
                "Unicode text", {"field": where})  # server.errors appends field to the loc
        return data


class StreamOptions(_Body):
    include_usage: bool = False


# Known request fields that loramux does not implement yet, with the values that ask for nothing.
_UNHONOURED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "min_tokens": (None, 0),
    "bad_words": (None, []), "allowed_token_ids": (None,),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "structured_outputs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "guided_decoding_backend": (None,),
    "prompt_logprobs": (None,), "best_of": (None, 1), "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0), "suffix": (None, ""), "truncate_prompt_tokens": (None,),
    "logits_processors": (None, []), "audio": (None,), "prediction": (None,),
    "modalities": (None, ["text"]), "web_search_options": (None,),
}


class _GenerationRequest(_Body):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (vLLM extras too)."""

    model: str
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # int64, as vLLM
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unhonoured(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            asked = [f for f, neutral in _UNHONOURED.items()
                     if f in raw and not any(raw[f] == v and type(raw[f]) is type(v)
                                             or raw[f] is v for v in neutral)]
            if asked:
                raise ValueError(f"{', '.join(asked)}: not supported by loramux yet; leave "
                                 f"{'it' if len(asked) == 1 else 'them'} out of the request")
        return raw

    _max_tokens_field: ClassVar[str] = "max_tokens"

    def with_defaults(self, defaults: Mapping[str, Any]) -> _GenerationRequest:
        """The request with the server's sampling defaults (--generation-config) in each field
        the client left out; `max_tokens` only where it is still None (completions' 16 stays,
        as in vLLM). Defaults for fields this request type lacks are not applied."""
        fields, update = type(self).model_fields, {}
        for key, value in defaults.items():
            name = self._max_tokens_field if key == "max_tokens" else key
            if name in fields and name not in self.model_fields_set and (
                    key != "max_tokens" or getattr(self, name) is None):
                update[name] = value
        return self.model_copy(update=update) if update else self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, max_tokens=max_tokens, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


MAX_PROMPTS = 256  # prompts in one completions request; each is one engine request


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is text or token ids, or a list of either (a batch)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, prompt: Any) -> Any:
        batch = cls._as_batch(prompt)
        if not batch or any(len(p) == 0 for p in batch):
            raise ValueError("prompt must not be empty (nor any prompt of a list)")
        if len(batch) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request (got {len(batch)})")
        return prompt

    @staticmethod
    def _as_batch(prompt: Any) -> list:
        batched = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        return list(prompt) if batched else [prompt] if len(prompt) else []

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a batch answers with `n` choices per prompt, in order."""
        return self._as_batch(self.prompt)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # tool_calls, name... pass to the chat template
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list) and any(p.type != "text" for p in content):
            raise ValueError("only text content parts are supported")
        return content

    def template_dict(self) -> dict:
        """The message as chat templates expect it: content is one string."""
        raw = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            raw["content"] = "".join(part.text or "" for part in self.content)
        return raw


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class LoadLoRAAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    is_3d_lora_weight: bool | None = None
    base_model_name: str | None = None

    @field_validator("lora_name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        if problem := adapter_name_problem(name):
            raise ValueError(problem)
        return name

    def lora_request(self, resolved_path: str) -> LoRARequest:
        """The engine's request; lora_int_id 0 until the engine registers it."""
        return LoRARequest(lora_name=self.lora_name, lora_int_id=0,
                           lora_path=resolved_path, base_model_name=self.base_model_name,
                           load_inplace=self.load_inplace,
                           is_3d_lora_weight=self.is_3d_lora_weight)


class UnloadLoRAAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM's body; lora_int_id is accepted and unused)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def unapplied_defaults(defaults: Mapping[str, Any]) -> list[str]:
    """The sampling defaults (--generation-config) that no generation route has a field for.
    A value its field refuses is a ValueError of one line naming it."""
    fields = ChatCompletionRequest.model_fields
    for key, value in defaults.items():
        if key not in fields:
            continue
        try:
            ChatCompletionRequest.model_validate(
                {"model": "-", "messages": [{"role": "user", "content": "-"}], key: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"sampling default {key}={value!r} is invalid: {reason}") from None
    return [key for key in defaults if key not in fields]
