"""`loramux serve [MODEL]`: vLLM's flag names, parsed into Settings.

A vLLM command line (`vllm serve MODEL ...` with `loramux` for `vllm`) starts unchanged: vLLM's
spellings of loramux's flags are read here, vLLM's other flags are judged in
server/vllm_flags.py (accepted quietly, with a warning, or refused with one line).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from loramux.engine.config import SUPPORTED_ARCHITECTURES
from loramux.engine.demo import ensure_demo
from loramux.server.config_file import ConfigFileError, expand_config_file
from loramux.server.generation_defaults import GenerationConfigError, parse_override
from loramux.server.launch import run
from loramux.server.reasoning import PARSERS as REASONING_PARSERS
from loramux.server.settings import (
    API_KEY_ENV,
    DEMO_SERVED_NAME,
    PLUGINS_ENV,
    RESOLVER_DIR_ENV,
    RUNTIME_LORA_ENV,
    LoraModule,
    Settings,
    SettingsError,
    env_flag,
    parse_lora_module,
)
from loramux.server.tool_calls import PARSERS as TOOL_PARSERS
from loramux.server.vllm_flags import (
    FlagRefused,
    add_compat_flags,
    judge_compat_flags,
    vllm_spellings,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (usage stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int:
    """vLLM's spellings of a count: 32k = 32000, 1.5m = 1500000, 32K = 32768 (whole numbers
    only with the binary suffixes), or a plain integer; >= 1."""
    text = text.strip()
    match = _HUMAN_INT.fullmatch(text)
    if match is None:
        value = int(text)
    elif match.group(2) in _DECIMAL:
        value = int(float(match.group(1)) * _DECIMAL[match.group(2)])
    elif "." in match.group(1):
        raise argparse.ArgumentTypeError(f"no decimals with the binary suffix {match.group(2)} "
                                         f"(did you mean {text.lower()}?)")
    else:
        value = int(match.group(1)) * _BINARY[match.group(2)]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _model_len(text: str) -> int | None:
    """--max-model-len: a count, or vLLM's auto / -1 (None: the model's own length)."""
    return None if text.strip().lower() in ("auto", "-1") else human_int(text)


def _lora_module(text: str) -> LoraModule:
    try:
        return parse_lora_module(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; use 0.0.0.0 in containers)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) clients use for the base model in `model`; the first is the "
                        "one listed as parent of adapters (default: MODEL, or 'demo')")
    g.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` (one of the keys) on /v1/* "
                        f"(default: ${API_KEY_ENV}; /health, /version and /metrics stay open)")
    g.add_argument("--max-request-body-bytes", type=_positive_int, default=None, metavar="N",
                   help="largest request body; a bigger one is a 413 before it is parsed "
                        "(default: 4 MiB, or 64 bytes per token of --max-model-len if more)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may finish before they are "
                        "ended with an error (new requests get 503 meanwhile; default 30)")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="log level of loramux and uvicorn (default info)")
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=["debug", "info", "warning", "error", "critical", "trace"],
                   help="log level of uvicorn alone (default: --log-level)")
    g.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no access-log line per HTTP request")
    g.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                   help="Jinja chat template replacing the tokenizer's: a file, or the "
                        "template itself (as in vLLM: a value with {, } or a newline)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide whether to call tools (tool_choice auto); "
                        "needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                   help="how tool calls are written: hermes is Qwen3's <tool_call>{json}"
                        "</tool_call> (required and named tool choices use it always)")
    g.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                   help="qwen3: <think>...</think> goes to reasoning_content")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="request sampling defaults (temperature, top_p, top_k, min_p, "
                        "penalties, max_new_tokens as max_tokens): auto reads "
                        "MODEL/generation_config.json, DIR reads DIR's, vllm none (default "
                        "auto, as vLLM); fields a request sends win")
    g.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help='sampling defaults over the generation config, e.g. '
                        '\'{"temperature": 0.5}\'')


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=Settings.dtype,
                   help="auto, float32, bfloat16 or float16 (auto: checkpoint dtype on CUDA, "
                        "float32 on CPU)")
    g.add_argument("--device", default=Settings.device, help="auto, cuda, cuda:N or cpu")
    g.add_argument("--tensor-parallel-size", "-tp", type=_positive_int,
                   default=Settings.tensor_parallel_size, metavar="N",
                   help="split every layer over N ranks, one process each (GPU r on CUDA): "
                        "attention heads, MLP and expert intermediate dims, with their LoRA "
                        f"(default {Settings.tensor_parallel_size})")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="with -tp N, split the routed experts by expert id over the N ranks "
                        "instead of by intermediate dim (needs --kernel-backend torch for now)")
    g.add_argument("--load-format", default=Settings.load_format, choices=["auto", "dummy"],
                   help="dummy: random weights of the real architecture (for benchmarks)")
    g.add_argument("--kernel-backend", default=Settings.kernel_backend,
                   choices=["auto", "triton", "torch"],
                   help="LoRA/MoE ops: Triton kernels or their torch twins (auto: Triton on "
                        "CUDA, torch elsewhere)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs (by default decode steps replay graphs "
                        "captured at start-up on CUDA with the Triton kernels)")
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: MODEL)")
    g.add_argument("--seed", type=int, default=Settings.seed, help="seed of the engine's sampler")
    g.add_argument("--max-model-len", type=_model_len, default=None,
                   help="longest prompt + completion in tokens, e.g. 4096, 32k (32000) or 32K "
                        "(32768) (default, or auto: the model's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=_positive_int, default=Settings.max_num_seqs,
                   help=f"most requests running at once (default {Settings.max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=human_int,
                   default=Settings.max_num_batched_tokens,
                   help="token budget of one engine step; longer prompts prefill in chunks")
    g.add_argument("--block-size", type=_positive_int, default=Settings.block_size,
                   help=f"tokens per paged KV-cache block (default {Settings.block_size})")
    g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=_positive_int,
                   default=None, help="fixed number of KV blocks (default: sized from memory)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=Settings.kv_cache_memory_gb,
                   help=f"KV-cache memory on CPU (default {Settings.kv_cache_memory_gb}); on "
                        "CUDA the cache takes what --gpu-memory-utilization leaves after the "
                        "weights")
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=Settings.gpu_memory_utilization,
                   help="fraction of GPU memory the engine may use "
                        f"(default {Settings.gpu_memory_utilization})")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="reuse the KV blocks of prompt prefixes computed before under the same "
                        "adapter (default: on, except for models with recurrent state)")


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    g.add_argument("--max-loras", type=_positive_int, default=Settings.max_loras,
                   help="GPU adapter slots: most distinct adapters in one step "
                        f"(default {Settings.max_loras})")
    g.add_argument("--max-lora-rank", type=_positive_int, default=Settings.max_lora_rank,
                   help="largest adapter rank; slot buffers are sized for it "
                        f"(default {Settings.max_lora_rank})")
    g.add_argument("--max-cpu-loras", type=_positive_int, default=None,
                   help="adapters kept in CPU memory (LRU; default: --max-loras)")
    g.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="MODULE",
                   help="adapters loaded at start-up: name=path items or JSON objects "
                        '{"name","path","base_model_name","is_3d_lora_weight"}')
    g.add_argument("--enable-mixed-moe-lora-format", action="store_true",
                   help="accept 2D (per-expert) and 3D (fused, PEFT target_parameters) expert "
                        "adapters side by side")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
                        f"${RUNTIME_LORA_ENV}=1 or true)")
    g.add_argument("--allowed-lora-roots", nargs="+", type=Path, default=[], metavar="DIR",
                   help="runtime loads must name a path under one of these directories "
                        "(symlinks resolved; default: any path)")
    g.add_argument("--lora-resolver-dir", type=Path, default=None, metavar="DIR",
                   help="load an adapter on its first request: `model` NAME not loaded yet is "
                        "read from DIR/NAME (one subdirectory per adapter; links must stay in "
                        f"DIR). vLLM's spelling: ${RESOLVER_DIR_ENV} with ${RUNTIME_LORA_ENV}=1")
    g.add_argument("--redact-paths", action=argparse.BooleanOptionalAction, default=None,
                   help="keep absolute server paths out of error messages and /v1/models "
                        "(default: on with --allowed-lora-roots or --lora-resolver-dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loramux", description="Multi-LoRA serving for Mixture-of-Experts "
                                                 "models with an OpenAI-compatible API.",
                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="start the OpenAI-compatible server", allow_abbrev=False,
        description="Start the OpenAI-compatible server. Without MODEL, serve the built-in "
                    "tiny demo model with its 2D and 3D demo adapters. vLLM's flags are "
                    "accepted (also spelled with underscores); see 'vLLM compatibility'.")
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help="Hugging Face checkpoint directory (default: the built-in demo); "
                            "architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    serve.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                       help="MODEL given as a flag, as vLLM also takes it")
    serve.add_argument("--config", metavar="FILE",
                       help="read flags from a YAML file, as vLLM does (max-model-len: 4096; "
                            "lists for flags of several values, true for switches); flags on "
                            "the command line win")
    _add_server_flags(serve)
    _add_engine_flags(serve)
    _add_lora_flags(serve)
    add_compat_flags(serve)
    return parser


def _demo_overrides(args: argparse.Namespace) -> dict:
    """The demo base is 2D-native and ships a 3D adapter: LoRA and mixed format go on."""
    demo = ensure_demo()
    demo_modules = [LoraModule(name, str(path))
                    for name, path in sorted(demo.adapters.items())]
    return dict(model=str(demo.model_dir),
                served_model_names=tuple(args.served_model_name or [DEMO_SERVED_NAME]),
                enable_lora=True, enable_mixed_moe_lora_format=True,
                lora_modules=tuple(demo_modules) + tuple(args.lora_modules))


def _model(args: argparse.Namespace) -> str | None:
    if args.model and args.model_flag and args.model != args.model_flag:
        raise SettingsError(f"MODEL given twice ({args.model} and --model {args.model_flag}); "
                            "give it once")
    return args.model or args.model_flag


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = args.api_key or [os.environ.get(API_KEY_ENV, "")]
    return tuple(key for key in keys if key)


def _resolver_plugin_on() -> bool:
    """vLLM loads its lora_filesystem_resolver plugin when VLLM_PLUGINS is unset or names it."""
    plugins = os.environ.get(PLUGINS_ENV)
    return plugins is None or "lora_filesystem_resolver" in plugins.replace(" ", "").split(",")


def _resolver_dir(args: argparse.Namespace, runtime_updating: bool) -> Path | None:
    """--lora-resolver-dir, else vLLM's filesystem resolver convention: its directory in
    VLLM_LORA_RESOLVER_CACHE_DIR, consulted only with runtime LoRA updating on."""
    if args.lora_resolver_dir is not None:
        return args.lora_resolver_dir
    env = os.environ.get(RESOLVER_DIR_ENV, "").strip()
    return Path(env) if env and runtime_updating and _resolver_plugin_on() else None


def resolver_env_ignored(settings: Settings) -> str | None:
    """The warning when vLLM's resolver directory is set but, as in vLLM, not consulted."""
    if (os.environ.get(RESOLVER_DIR_ENV, "").strip() and settings.lora_resolver_dir is None
            and _resolver_plugin_on()):
        return (f"{RESOLVER_DIR_ENV} is ignored without {RUNTIME_LORA_ENV}=1 (as in vLLM); "
                "--lora-resolver-dir DIR needs no other setting")
    return None


def settings_from_args(args: argparse.Namespace) -> Settings:
    model = _model(args)
    runtime_updating = args.allow_runtime_lora_updating or env_flag(RUNTIME_LORA_ENV)
    try:
        override = parse_override(args.override_generation_config or "{}")
    except GenerationConfigError as exc:
        raise SettingsError(str(exc)) from exc
    fields = dict(
        model=model, served_model_names=tuple(args.served_model_name or [model]),
        host=args.host, port=args.port, log_level=args.log_level,
        uvicorn_log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout, api_keys=_api_keys(args),
        generation_config=args.generation_config, override_generation_config=override,
        chat_template=args.chat_template, enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        dtype=args.dtype, device=args.device, load_format=args.load_format,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager,
        tokenizer=args.tokenizer, seed=args.seed, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, enable_lora=args.enable_lora,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        enable_mixed_moe_lora_format=args.enable_mixed_moe_lora_format,
        lora_modules=tuple(args.lora_modules),
        allow_runtime_lora_updating=runtime_updating,
        allowed_lora_roots=tuple(args.allowed_lora_roots),
        lora_resolver_dir=_resolver_dir(args, runtime_updating), redact_paths=args.redact_paths,
    )
    if model is None:
        fields.update(_demo_overrides(args))
    return Settings(**fields)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv = expand_config_file(argv)
    except ConfigFileError as exc:
        sys.exit(f"loramux: error: {exc}")
    args = build_parser().parse_args(vllm_spellings(argv))
    try:
        warnings = judge_compat_flags(args)
        settings = settings_from_args(args)
    except (SettingsError, FlagRefused) as exc:
        sys.exit(f"loramux: error: {exc}")
    ignored = resolver_env_ignored(settings)
    return run(settings, [*warnings, ignored] if ignored else warnings)
