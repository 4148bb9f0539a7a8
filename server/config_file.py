"""`--config FILE`: vLLM's YAML file of serve options, read into command-line arguments.

Each key is a long flag name (`max-model-len` or `max_model_len`; `model` for the checkpoint),
each value its argument: a scalar, a list (a flag that takes several values), a mapping (passed
as JSON, as `--override-generation-config` takes it), or true / false for a switch (false
leaves it out). The file's flags go before the command line's, so a flag given on both wins
from the command line, as in vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


class ConfigFileError(ValueError):
    """A --config file that cannot be read as serve options; the message is one line."""


def expand_config_file(argv: list[str]) -> list[str]:
    """argv with `--config FILE` (or `--config=FILE`) replaced by the file's flags, placed
    right after the subcommand so that the command line's own flags override them."""
    argv = list(argv)
    path = _take_config(argv)
    if path is None:
        return argv
    first = argv.index("serve") + 1 if "serve" in argv[:1] else 0
    return argv[:first] + _read_flags(path) + argv[first:]


def _take_config(argv: list[str]) -> str | None:
    """Remove `--config FILE` from argv (in place) and return FILE."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise ConfigFileError("--config needs a FILE")
            path = argv[i + 1]
            del argv[i:i + 2]
            return path
        if arg.startswith("--config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _read_flags(path: str) -> list[str]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigFileError(f"--config {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigFileError(f"--config {path} is not valid YAML: "
                              f"{str(err).splitlines()[0]}") from err
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path} must be a mapping of flag names to values, "
                              f"found a {type(data).__name__}")
    flags: list[str] = []
    for key, value in data.items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise ConfigFileError(f"--config {path}: {key!r} is not a flag name (write "
                                  "max-model-len: 4096, without dashes)")
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, *map(_scalar, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, _scalar(value)]
    return flags


def _scalar(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
