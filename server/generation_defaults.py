"""--generation-config and --override-generation-config: the server's sampling defaults, as vLLM
computes them (vllm/config/model.py `get_diff_sampling_param`).

`auto` (vLLM's default) reads MODEL/generation_config.json, a directory reads DIR's, `vllm`
reads nothing; the override's keys win over the file's. Of what is read, the sampling keys below
become request defaults: a request field the client leaves out takes the default, one it sends
wins (`max_new_tokens` is the default of `max_tokens`, which completions fix at 16 as vLLM does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLING_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature",
                 "top_k", "top_p", "min_p", "max_new_tokens", "skip_special_tokens")
FILE_NAME = "generation_config.json"


class GenerationConfigError(ValueError):
    """The generation config cannot be read; the message is one line for the operator."""


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise GenerationConfigError(f"{path} is not a JSON object")
    return raw


def read_generation_config(source: str, model_dir: str) -> dict[str, Any]:
    """The generation config `source` names (auto, vllm or a directory), as a dict."""
    if source == "vllm":
        return {}
    if source == "auto":
        path = Path(model_dir) / FILE_NAME
        return _read(path) if path.is_file() else {}
    path = Path(source).expanduser() / FILE_NAME
    if not path.is_file():
        raise GenerationConfigError(f"--generation-config {source}: no {FILE_NAME} in that "
                                    "directory (or use auto or vllm)")
    return _read(path)


def sampling_defaults(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Request defaults: the sampling keys of `config` updated by `overrides`, None dropped,
    max_new_tokens renamed max_tokens."""
    merged = {**config, **overrides}
    defaults = {key: merged[key] for key in SAMPLING_KEYS if merged.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def parse_override(text: str) -> dict[str, Any]:
    """--override-generation-config '{"temperature": 0.5}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenerationConfigError(f"--override-generation-config: invalid JSON: {exc}") \
            from exc
    if not isinstance(value, dict):
        raise GenerationConfigError("--override-generation-config must be a JSON object")
    return value
