"""Server settings: the parsed command line as one typed object, and its EngineConfig."""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramux.engine.config import (CacheConfig, EngineConfig, LoraConfig, ParallelConfig,
                                  SchedulerConfig, make_config)
from loramux.server.generation_defaults import (
    GenerationConfigError,
    read_generation_config,
    sampling_defaults,
)

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
RESOLVER_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"  # vLLM's lora_filesystem_resolver directory
PLUGINS_ENV = "VLLM_PLUGINS"
API_KEY_ENV = "VLLM_API_KEY"
DEMO_SERVED_NAME = "demo"


class SettingsError(ValueError):
    """A flag value is invalid; the message is shown to the operator as one line."""


@dataclass(frozen=True)
class LoraModule:
    """One --lora-modules item: an adapter loaded at start-up."""

    name: str
    path: str
    base_model_name: str | None = None
    is_3d_lora_weight: bool | None = None


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter, or None. Routers read vllm:lora_requests_info's
    comma-joined adapter lists, so a comma would read as two adapters; control characters would
    forge log lines and label values."""
    if "," in name:
        return f"adapter name {name!r} contains ',', which separates adapters in metrics"
    if any(not ch.isprintable() for ch in name):
        return f"adapter name {name!r} contains control or non-printable characters"
    return None


def parse_lora_module(item: str) -> LoraModule:
    """`name=path` or a JSON object {"name", "path", "base_model_name", "is_3d_lora_weight"}."""
    if item.lstrip().startswith("{"):
        try:
            raw = json.loads(item)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"--lora-modules: invalid JSON {item!r}: {exc}") from exc
        unknown = set(raw) - {"name", "path", "base_model_name", "is_3d_lora_weight"}
        if unknown or not raw.get("name") or not raw.get("path"):
            raise SettingsError(f"--lora-modules: {item!r} needs string keys name and path "
                                f"(optional base_model_name, is_3d_lora_weight)")
        return LoraModule(raw["name"], raw["path"], raw.get("base_model_name"),
                          raw.get("is_3d_lora_weight"))
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise SettingsError(f"--lora-modules: expected name=path or a JSON object, got {item!r}")
    return LoraModule(name, path)


_JINJA_CHARS = "{}\n"


def load_chat_template(value: str | None) -> str | None:
    """--chat-template as vLLM reads it: a file's contents, else the value itself when it looks
    like a template (has one of `{`, `}` or a newline; backslash escapes such as \\n are
    decoded), else an error (a path that cannot be opened)."""
    if value is None:
        return None
    try:
        return Path(value).expanduser().read_text()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if not any(ch in value for ch in _JINJA_CHARS):
            raise SettingsError(f"--chat-template {value}: looks like a file path, but cannot "
                                f"be read: {exc}") from exc
    return codecs.decode(value, "unicode_escape")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    """The flags. Engine defaults are the engine's config dataclasses' (engine/config.py)."""

    model: str
    served_model_names: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    log_level: str = "info"
    uvicorn_log_level: str | None = None  # None: --log-level
    access_log: bool = True
    generation_config: str = "auto"  # auto, vllm or a directory holding generation_config.json
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # --chat-template: a path or the template itself
    enable_auto_tool_choice: bool = False  # tool_choice auto (needs tool_call_parser)
    tool_call_parser: str | None = None  # hermes: the Qwen3 / Hermes <tool_call> format
    reasoning_parser: str | None = None  # qwen3: <think>...</think> as reasoning_content
    dtype: str = EngineConfig.dtype
    device: str = EngineConfig.device
    tensor_parallel_size: int = ParallelConfig.tensor_parallel_size
    enable_expert_parallel: bool = ParallelConfig.enable_expert_parallel
    load_format: str = EngineConfig.load_format
    kernel_backend: str = EngineConfig.kernel_backend
    enforce_eager: bool = EngineConfig.enforce_eager
    tokenizer: str | None = EngineConfig.tokenizer
    seed: int = EngineConfig.seed
    max_model_len: int | None = SchedulerConfig.max_model_len
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    block_size: int = CacheConfig.block_size
    num_kv_blocks: int | None = CacheConfig.num_blocks
    kv_cache_memory_gb: float = CacheConfig.kv_cache_memory_gb
    gpu_memory_utilization: float = CacheConfig.gpu_memory_utilization
    enable_prefix_caching: bool | None = CacheConfig.enable_prefix_caching
    enable_lora: bool = LoraConfig.enabled
    max_loras: int = LoraConfig.max_loras
    max_lora_rank: int = LoraConfig.max_lora_rank
    max_cpu_loras: int | None = LoraConfig.max_cpu_loras
    enable_mixed_moe_lora_format: bool = LoraConfig.enable_mixed_moe_lora_format
    lora_modules: tuple[LoraModule, ...] = ()
    allow_runtime_lora_updating: bool = False
    allowed_lora_roots: tuple[Path, ...] = ()
    lora_resolver_dir: Path | None = None  # adapters loaded on their first request, by name
    redact_paths: bool | None = None  # None: on with allowed_lora_roots or lora_resolver_dir
    max_request_body_bytes: int | None = None  # None: admission.default_max_body_bytes
    shutdown_timeout: float = 30.0
    # derived in __post_init__: request defaults (--generation-config) and the template text
    sampling_defaults: dict[str, Any] = field(init=False, repr=False, compare=False)
    chat_template_text: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise SettingsError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.lora_modules and not self.enable_lora:
            raise SettingsError("--lora-modules needs --enable-lora")
        if self.allow_runtime_lora_updating and not self.enable_lora:
            raise SettingsError("runtime LoRA updating needs --enable-lora")
        names = [m.name for m in self.lora_modules]
        clash = {n for n in names if names.count(n) > 1 or n in self.served_model_names}
        if clash:
            raise SettingsError(f"--lora-modules: name(s) {sorted(clash)} used twice")
        for name in names:
            if problem := adapter_name_problem(name):
                raise SettingsError(f"--lora-modules: {problem}")
        if self.shutdown_timeout < 0:
            raise SettingsError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        for root in self.allowed_lora_roots:
            if not root.is_dir():
                raise SettingsError(f"--allowed-lora-roots: {root} is not a directory")
        if self.lora_resolver_dir is not None:
            if not self.enable_lora:
                raise SettingsError(f"--lora-resolver-dir (or {RESOLVER_DIR_ENV}) needs "
                                    "--enable-lora")
            if not self.lora_resolver_dir.is_dir():
                raise SettingsError(f"--lora-resolver-dir (or {RESOLVER_DIR_ENV}): "
                                    f"{self.lora_resolver_dir} is not a directory")
        try:
            config = read_generation_config(self.generation_config, self.model)
        except GenerationConfigError as exc:
            raise SettingsError(str(exc)) from exc
        object.__setattr__(self, "sampling_defaults",
                           sampling_defaults(config, self.override_generation_config))
        object.__setattr__(self, "chat_template_text", load_chat_template(self.chat_template))

    @property
    def hides_paths(self) -> bool:
        """Clients that only name adapters (resolver) or are confined to roots learn no paths."""
        if self.redact_paths is not None:
            return self.redact_paths
        return bool(self.allowed_lora_roots) or self.lora_resolver_dir is not None

    @property
    def base_name(self) -> str:
        return self.served_model_names[0]

    def to_engine_config(self) -> EngineConfig:
        """The only place that knows both the flags and the engine's config types."""
        try:
            return make_config(
                self.model, dtype=self.dtype, device=self.device,
                load_format=self.load_format, kernel_backend=self.kernel_backend,
                tensor_parallel_size=self.tensor_parallel_size,
                enable_expert_parallel=self.enable_expert_parallel,
                enforce_eager=self.enforce_eager, seed=self.seed, tokenizer=self.tokenizer,
                block_size=self.block_size, num_blocks=self.num_kv_blocks,
                kv_cache_memory_gb=self.kv_cache_memory_gb,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching, max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len, enabled=self.enable_lora,
                max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                max_cpu_loras=self.max_cpu_loras,
                enable_mixed_moe_lora_format=self.enable_mixed_moe_lora_format)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
