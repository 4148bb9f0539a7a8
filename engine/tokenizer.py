"""Tokenizer loading (offline, from the checkpoint directory) and end-of-sequence ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loramux.engine.config import ModelConfig

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The checkpoint's transformers tokenizer, or None when it ships none (token-id use only)."""
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: only token-id prompts will work", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(path: str, config: ModelConfig, tokenizer) -> frozenset[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, together."""
    ids = set(config.eos_token_ids)
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
