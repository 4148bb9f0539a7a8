"""vLLM's flags that loramux has no use for, or cannot honour yet, so a vLLM command line starts
unchanged or stops with one line naming the flag.

Each `Compat` flag is parsed by argparse (so `--help` lists it) and judged after parsing: a value
that means what loramux does anyway is accepted quietly (`-tp 1`, `--kv-cache-dtype auto`), a
harmless one is accepted with one warning line (`--trust-remote-code`), and one that cannot be
honoured stops start-up with one line (`-pp 2`, `--kv-cache-dtype fp8`). Flags that loramux
implements (`--model`, `--max-model-len 32k`, `-tp 2`, `--enable-prefix-caching`, ...) live in
server/cli.py.
Names and spellings follow vLLM's engine/arg_utils.py and entrypoints/common/cli_args.py; as
vLLM's parser does, `--max_model_len` is read as `--max-model-len`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import dataclass


class FlagRefused(ValueError):
    """A vLLM flag value loramux cannot honour; the message is the one line shown."""


@dataclass(frozen=True)
class Compat:
    """A vLLM flag. `neutral`: values (or, for a switch, None meaning "not given") that ask for
    what loramux does anyway. Any other value warns with `warn`, or is refused with `refuse`."""

    flags: tuple[str, ...]
    help: str
    switch: bool = False
    many: bool = False  # takes one or more values
    neutral: tuple[str, ...] = ()
    warn: str | None = None
    refuse: str | None = None

    @property
    def dest(self) -> str:
        return "compat_" + self.flags[0].lstrip("-").replace("-", "_")

    def judge(self, value) -> str | None:
        """None when the value is neutral, else the warning; FlagRefused when refused."""
        if self.switch:
            given = "on" if value else None
        else:
            given = " ".join(value) if self.many and value is not None else value
        if given is None or str(given).lower() in self.neutral:
            return None
        flag = self.flags[0] if self.switch else f"{self.flags[0]} {given}"
        if self.refuse is not None:
            raise FlagRefused(f"{flag}: {self.refuse}")
        return f"{flag}: {self.warn}"


_NOT_LOGGED = "loramux does not log requests; ignored"

COMPAT: tuple[Compat, ...] = (
    Compat(("--pipeline-parallel-size", "-pp"), "accepted when 1", neutral=("1",),
           refuse="pipeline parallelism is not implemented; use -tp N"),
    Compat(("--data-parallel-size", "-dp"), "accepted when 1", neutral=("1",),
           refuse="data parallelism is not implemented; run one server per GPU (or per -tp "
                  "group) behind a router instead"),
    Compat(("--kv-cache-dtype",), "accepted when auto (the KV cache is kept in --dtype)",
           neutral=("auto",), refuse="the KV cache is kept in the model dtype; quantized KV "
                                     "caches are not implemented (use auto)"),
    Compat(("--quantization", "-q"), "refused: quantized checkpoints are not supported",
           neutral=("none",), refuse="quantized checkpoints are not supported"),
    Compat(("--lora-dtype",), "accepted; adapters are kept in --dtype", neutral=("auto",),
           warn="adapters are kept in the serving dtype (--dtype); ignored"),
    Compat(("--tokenizer-mode",), "accepted when auto or hf", neutral=("auto", "hf"),
           refuse="loramux loads Hugging Face tokenizers only (use auto)"),
    Compat(("--scheduling-policy",), "accepted when fcfs", neutral=("fcfs",),
           refuse="requests are scheduled first come, first served only (use fcfs)"),
    Compat(("--max-logprobs",), "accepted; loramux returns up to 20 logprobs per token",
           neutral=("20",), warn="loramux returns up to 20 logprobs per token; ignored"),
    Compat(("--response-role",), "accepted when assistant", neutral=("assistant",),
           refuse="chat answers always have the role assistant"),
    Compat(("--chat-template-content-format",), "accepted when auto or string",
           neutral=("auto", "string"),
           refuse="message content reaches the chat template as one string (use auto)"),
    Compat(("--distributed-executor-backend",), "accepted and ignored",
           warn="the -tp ranks are torch.multiprocessing processes; ignored"),
    Compat(("--lora-target-modules",), "refused: an adapter applies to every module it has",
           refuse="loramux applies an adapter to every module it has weights for"),
    Compat(("--kv-cache-memory-bytes",), "refused: use --num-kv-blocks (or "
           "--kv-cache-memory-gb on CPU)",
           refuse="use --num-kv-blocks, or --kv-cache-memory-gb on CPU"),
    Compat(("--download-dir",), "accepted and ignored (MODEL is a local directory)",
           warn="loramux serves local checkpoint directories and downloads nothing; ignored"),
    Compat(("--revision",), "accepted and ignored (MODEL is a local directory)",
           warn="loramux serves local checkpoint directories; ignored"),
    Compat(("--tokenizer-revision",), "accepted and ignored",
           warn="loramux serves local checkpoint directories; ignored"),
    Compat(("--max-log-len",), "accepted and ignored", warn=_NOT_LOGGED),
    Compat(("--swap-space",), "accepted and ignored", warn="preempted requests are "
           "recomputed, never swapped; ignored"),
    Compat(("--cpu-offload-gb",), "accepted when 0", neutral=("0", "0.0"),
           refuse="weights are not offloaded to the CPU"),
    Compat(("--trust-remote-code",), "accepted and ignored: no code from the checkpoint runs",
           switch=True, warn="loramux runs no code from the checkpoint (its architectures "
                             "are built in); ignored"),
    Compat(("--disable-log-stats",), "accepted and ignored", switch=True,
           warn="loramux logs no periodic stats (see /metrics); ignored"),
    Compat(("--disable-log-requests",), "accepted (loramux does not log requests)",
           switch=True, neutral=("on",)),
    Compat(("--enable-log-requests",), "accepted and ignored", switch=True, warn=_NOT_LOGGED),
    Compat(("--prefix-caching-hash-algo",), "accepted and ignored (blocks are keyed by "
           "BLAKE2b-128)", warn="prefix-cache blocks are keyed by BLAKE2b-128; ignored"),
    Compat(("--enable-chunked-prefill",), "accepted (long prefills are always chunked)",
           switch=True, neutral=("on",)),
    Compat(("--no-enable-chunked-prefill",), "accepted and ignored", switch=True,
           warn="long prefills are always chunked by --max-num-batched-tokens; ignored"),
    Compat(("--fully-sharded-loras",), "accepted and ignored (adapters are sharded with their "
           "layers)", switch=True, warn="under -tp an adapter is sharded with its layers (A "
           "or B split, as vLLM without this flag); ignored"),
    Compat(("--disable-custom-all-reduce",), "accepted and ignored", switch=True,
           warn="the -tp all_reduce is torch.distributed's; ignored"),
    Compat(("--disable-sliding-window",), "accepted (no sliding-window models)", switch=True,
           neutral=("on",)),
    Compat(("--optimization-level", "-O"), "accepted and ignored", warn="loramux compiles "
           "nothing; decode steps replay CUDA graphs (--enforce-eager turns them off); ignored"),
    Compat(("--compilation-config",), "accepted and ignored", warn="loramux compiles nothing; "
           "decode steps replay CUDA graphs (--enforce-eager turns them off); ignored"),
    Compat(("--cudagraph-capture-sizes", "--cuda-graph-sizes"), "accepted and ignored", many=True,
           warn="decode CUDA graphs are captured for 1, 2, 4, ... up to --max-num-seqs; "
                "ignored"),
    Compat(("--disable-fastapi-docs",), "accepted and ignored", switch=True,
           warn="the /docs and /openapi.json routes stay; ignored"),
)

def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "vLLM compatibility", "vLLM flags accepted so a vLLM command line starts unchanged: "
        "values that mean what loramux does anyway are quiet, harmless ones warn, and ones "
        "that cannot be honoured stop start-up with one line")
    for c in COMPAT:
        if c.switch:
            g.add_argument(*c.flags, dest=c.dest, action="store_true", help=c.help)
        else:
            g.add_argument(*c.flags, dest=c.dest, default=None, metavar="VALUE", help=c.help,
                           nargs="+" if c.many else None)


def judge_compat_flags(args: argparse.Namespace) -> list[str]:
    """The warnings the given compat flags earn; FlagRefused for the first refused one."""
    return [w for c in COMPAT if (w := c.judge(getattr(args, c.dest))) is not None]


_DASHED = re.compile(r"^--[^=]*")


def vllm_spellings(argv: Iterable[str]) -> list[str]:
    """vLLM's parser reads `--max_model_len` as `--max-model-len` (names only, not values)."""
    return [_DASHED.sub(lambda m: m.group(0).replace("_", "-"), arg)
            if arg.startswith("--") else arg for arg in argv]
