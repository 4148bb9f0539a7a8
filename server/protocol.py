"""Request bodies of the OpenAI and vLLM endpoints, and their mapping onto engine types.

Unknown fields are ignored, as OpenAI clients send optional fields freely. Fields that OpenAI or
vLLM define and loramux does not honour yet are refused with a 400 naming them whenever they ask
for something (`_UNHONOURED`); sent with their neutral value they are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from loramux.engine.request import (SEED_MAX, SEED_MIN, LoRARequest, SamplingParams,
                                   StructuredOutputs)
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
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "guided_decoding_backend": (None, "auto", "guidance"), "guided_whitespace_pattern": (None,),
    "prompt_logprobs": (None,), "best_of": (None, 1), "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0), "suffix": (None, ""), "truncate_prompt_tokens": (None,),
    "logits_processors": (None, []), "audio": (None,), "prediction": (None,),
    "modalities": (None, ["text"]), "web_search_options": (None,),
    "echo": (None, False),  # chat's (prepend the last message): completions honour their own
}


class JsonSchemaFormat(_Body):
    """response_format.json_schema (OpenAI's shape). `strict` is accepted: the schema is always
    enforced by the grammar."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputsBody(_Body):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def spec(self, source: str = "structured_outputs") -> StructuredOutputs:
        return _structured(source, self.json_, self.regex, self.choice, self.grammar,
                           bool(self.json_object), not self.disable_any_whitespace)


def _structured(source: str, schema: dict | str | None, regex: str | None,
                choice: list[str] | None, grammar: str | None, json_object: bool = False,
                any_whitespace: bool = True) -> StructuredOutputs:
    if isinstance(schema, dict):
        schema = json.dumps(schema)
    return StructuredOutputs(json=schema, json_object=json_object, regex=regex,
                             choice=None if choice is None else tuple(choice), grammar=grammar,
                             any_whitespace=any_whitespace, source=source)


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
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # logits processors (vLLM's ranges); None: the server default (--generation-config), else off
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    min_tokens: int | None = Field(None, ge=0)
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        bad = [key for key in bias or {} if not key.strip().lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids (integers), got {bad[:5]}")
        return bias

    @model_validator(mode="before")
    @classmethod
    def _refuse_unhonoured(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            asked = [f for f, neutral in _UNHONOURED.items() if f not in cls._honoured
                     and f in raw and not any(raw[f] == v and type(raw[f]) is type(v)
                                             or raw[f] is v for v in neutral)]
            if asked:
                raise ValueError(f"{', '.join(asked)}: not supported by loramux yet; leave "
                                 f"{'it' if len(asked) == 1 else 'them'} out of the request")
        return raw

    _max_tokens_field: ClassVar[str] = "max_tokens"
    _honoured: ClassVar[frozenset[str]] = frozenset()  # of _UNHONOURED, on this route

    def with_defaults(self, defaults: Mapping[str, Any]) -> _GenerationRequest:
        """The request with the server's sampling defaults (--generation-config) in each field
        the client left out or sent as null; `max_tokens` only where it is still None
        (completions' 16 stays, as in vLLM). Defaults for fields this request type lacks are
        not applied."""
        fields, update = type(self).model_fields, {}
        for key, value in defaults.items():
            name = self._max_tokens_field if key == "max_tokens" else key
            if name not in fields:
                continue
            current = getattr(self, name)
            if current is None or (key != "max_tokens" and name not in self.model_fields_set):
                update[name] = value
        return self.model_copy(update=update) if update else self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @model_validator(mode="after")
    def _one_structure(self) -> _GenerationRequest:
        given = [name for name, value in self._structures().items() if value]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each ask for a structured output: give "
                             "only one of them")
        return self

    def _structures(self) -> dict[str, bool]:
        guided = [self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar]
        return {"response_format": (self.response_format is not None
                                    and self.response_format.type != "text"),
                "structured_outputs": self.structured_outputs is not None,
                "guided_*": any(g is not None for g in guided)}

    def structured_outputs_spec(self) -> StructuredOutputs | None:
        """The grammar the request asks for, whichever spelling it used (at most one)."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return StructuredOutputs(json_object=True, source="response_format")
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.json_schema
            return _structured("response_format.json_schema.schema",
                               {"type": "object"} if schema is None else schema, None, None, None)
        if self.structured_outputs is not None:
            return self.structured_outputs.spec()
        guided = {f"guided_{kind}": getattr(self, f"guided_{kind}")
                  for kind in ("json", "regex", "choice", "grammar")}
        if given := [name for name, value in guided.items() if value is not None]:
            return _structured(", ".join(given), *guided.values())
        return None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         structured: StructuredOutputs | None = None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, max_tokens=max_tokens, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=structured or self.structured_outputs_spec(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(key): value for key, value in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens or 0, bad_words=tuple(self.bad_words or ()),
            allowed_token_ids=(None if self.allowed_token_ids is None
                               else tuple(self.allowed_token_ids)),
        )


MAX_PROMPTS = 256  # prompts in one completions request; each is one engine request


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is text or token ids, or a list of either (a batch).
    `echo` puts the prompt before the completion, and with `logprobs` the prompt tokens'
    logprobs before the completion's (the first token's None), as vLLM; `max_tokens` 0 with
    echo answers the prompt alone (loglikelihood evaluation). `prompt_logprobs` is vLLM's."""

    _honoured: ClassVar[frozenset[str]] = frozenset({"prompt_logprobs", "echo"})

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only accepted with echo (the prompt alone)")
        return self

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

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: one token is generated (as vLLM does) and not returned."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        return self._sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs,
                                     prompt_logprobs=prompt_logprobs)


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


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: required and named choices always follow the schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    _honoured: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice",
                                                     "parallel_tool_calls"})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    # None: "auto" when tools are given, else "none" (vLLM's default)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_fits(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice: a required or named tool choice needs tools")
            if any(self._structures().values()):
                raise ValueError("tool_choice: a required or named tool choice cannot be "
                                 "combined with a structured output (response_format, "
                                 "structured_outputs, guided_*)")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r} in tools")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    @property
    def effective_tool_choice(self) -> str:
        """none, auto, required, or the named function's name."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def thinking(self) -> bool:
        """Qwen3's enable_thinking (on unless chat_template_kwargs turns it off)."""
        return (self.chat_template_kwargs or {}).get("enable_thinking", True) is not False

    def template_tools(self) -> list[dict] | None:
        """tools as the chat template takes them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

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
