"""--redact-paths: client-facing text names no absolute server path.

On by default with --allowed-lora-roots or --lora-resolver-dir (clients that are confined, or
only name adapters, should not learn the server's layout). Error messages have each known
server path replaced by a placeholder: an allowed root by `<allowed-root>`, the resolver
directory by `<lora-resolver-dir>`, the model directory by `<model>`, a loaded adapter's
directory by `<adapter NAME>`; `/v1/models` shows an adapter's path relative to its allowed
root or the resolver directory (else its name) and the base model's served name as `root`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loramux.server.settings import Settings


def _spellings(path: str | Path) -> set[str]:
    """A path as given and resolved (symlinks followed), without trailing separators."""
    raw = os.path.abspath(os.path.expanduser(str(path)))
    try:
        resolved = str(Path(raw).resolve())
    except (OSError, RuntimeError):
        resolved = raw
    return {raw, resolved}


class PathRedactor:
    def __init__(self, settings: Settings, engine) -> None:
        self.enabled, self.engine = settings.hides_paths, engine
        resolver = () if settings.lora_resolver_dir is None else (settings.lora_resolver_dir,)
        self.roots = [Path(p) for root in (*settings.allowed_lora_roots, *resolver)
                      for p in _spellings(root)]
        self._fixed: list[tuple[str, str]] = []
        if self.enabled:
            named = [(root, "<allowed-root>") for root in settings.allowed_lora_roots]
            named += [(root, "<lora-resolver-dir>") for root in resolver]
            named += [(settings.model, "<model>")]
            named += [(settings.tokenizer, "<tokenizer>")] if settings.tokenizer else []
            self._fixed = [(s, label) for path, label in named for s in _spellings(path)]

    def text(self, message: str) -> str:
        if not self.enabled:
            return message
        pairs = self._fixed + [(s, f"<adapter {lora.lora_name}>")
                               for lora in self.engine.list_loras()
                               for s in _spellings(lora.lora_path)]
        for path, label in sorted(pairs, key=lambda pair: -len(pair[0])):  # longest first
            message = re.sub(re.escape(path) + r"(?![^/\s'\"`:,;)\]}])", label, message)
        return message

    def adapter_root(self, name: str, path: str) -> str:
        """An adapter card's `root`: its path, or redacted its path under its allowed root
        or the resolver directory."""
        if not self.enabled:
            return path
        for root in self.roots:
            if Path(path).is_relative_to(root):
                return str(Path(path).relative_to(root))
        return name

    def model_root(self, name: str, path: str) -> str:
        return name if self.enabled else path
