"""The built-in demo: a small deterministic Qwen3-MoE checkpoint with a word-level tokenizer, a
ChatML chat template, and one 2D and one 3D adapter, generated on first use (no network).

The weights are random (seeded), so the demo speaks fluent nonsense drawn from its word list;
it exists to exercise the whole server path, adapters included, on any machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

DEMO_VERSION = "1"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
_WORDS = """
the a an and or but if then so because when while of to in on at by for with from about as into
over after before under between through during without within is are was were be been being have
has had do does did can could will would shall should may might must i you he she it we they me
him her us them my your his its our their this that these those what which who whom whose where
why how all any both each few more most other some such no not only own same than too very just
also now here there again once always never often sometimes today tomorrow yesterday model
adapter expert token batch server request answer question system user assistant hello world
good great small large fast slow new old first last long short high low right left early late
open close start stop run serve load read write learn teach build test make take give find think
know see look want need use try ask tell call work play move live feel keep let begin help show
hear turn mean leave put bring hold stand write sit lose pay meet include continue set change
lead understand watch follow create speak spend grow offer remember love consider appear buy
wait die send expect stay fall cut reach kill remain suggest raise pass sell require report
decide pull time year people way day man thing woman life child world school state family
student group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot right study
book eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education . , ! ? : ; ' " ( ) - 0 1 2 3 4 5 6
7 8 9
""".split()

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + message['content']"
    " + ' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}"
    "{% endif %}"
)

_MODEL = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, num_experts=16, num_local_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=64, intermediate_size=256, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=2048, rope_theta=1000000.0, tie_word_embeddings=False,
    initializer_range=0.3, dtype="float32",
)


@dataclass(frozen=True)
class Demo:
    model_dir: Path
    adapters: dict[str, Path]


def demo_home() -> Path:
    root = os.environ.get("LORAMUX_HOME") or Path.home() / ".cache" / "loramux"
    return Path(root) / f"demo-v{DEMO_VERSION}"


def ensure_demo(home: Path | None = None) -> Demo:
    """The demo's files, generated into `home` (default: $LORAMUX_HOME or ~/.cache/loramux)."""
    home = Path(home) if home else demo_home()
    demo = Demo(home / "model", {"demo-2d": home / "adapter-2d", "demo-3d": home / "adapter-3d"})
    if (home / "COMPLETE").is_file():
        return demo
    logger.info("generating the demo model and adapters in %s (first use)", home)
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=home.parent))
    _write_model(tmp / "model")
    write_random_adapter(tmp / "adapter-2d", _MODEL, layout="2d", seed=2)
    write_random_adapter(tmp / "adapter-3d", _MODEL, layout="3d", seed=3)
    (tmp / "COMPLETE").write_text(DEMO_VERSION)
    if (home / "COMPLETE").is_file():  # another process (a replica) finished first: use its
        shutil.rmtree(tmp)
        return demo
    if home.exists():
        shutil.rmtree(home)
    tmp.rename(home)
    return demo


def _write_model(path: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path.mkdir(parents=True)
    _write_tokenizer(path)
    vocab = _vocab()
    config = Qwen3MoeConfig(**{**_MODEL, "vocab_size": len(vocab),
                               "eos_token_id": vocab["<|im_end|>"], "bos_token_id": None,
                               "pad_token_id": vocab["<|endoftext|>"]})
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)  # per-expert keys on disk: the 2D-native layout


def _vocab() -> dict[str, int]:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(_WORDS))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(_SPECIALS)})
    return vocab


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(_vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"],
        chat_template=_CHAT_TEMPLATE)
    fast.save_pretrained(path)


def write_random_adapter(path: Path, c: dict, layout: str, seed: int, rank: int = 8,
                         alpha: int = 16) -> None:
    """A random PEFT adapter directory for the model of config.json dict `c`, on attention and
    experts, in the 2D (per-expert) or the 3D (target_parameters) file layout."""
    g = torch.Generator().manual_seed(seed)
    H, I = c["hidden_size"], c["moe_intermediate_size"]
    E = c.get("num_experts") or c["num_local_experts"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def lora(d_in: int, d_out: int, r: int = rank) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(r, d_in, generator=g) / d_in**0.5
        b = torch.randn(d_out, r, generator=g) / r**0.5
        return a, b

    tensors: dict[str, torch.Tensor] = {}
    for layer in range(c["num_hidden_layers"]):
        p = f"base_model.model.model.layers.{layer}."
        for proj, d_in, d_out in [("q_proj", H, q_out), ("k_proj", H, kv_out),
                                  ("v_proj", H, kv_out), ("o_proj", q_out, H)]:
            a, b = lora(d_in, d_out)
            tensors[f"{p}self_attn.{proj}.lora_A.weight"] = a
            tensors[f"{p}self_attn.{proj}.lora_B.weight"] = b
        tensors.update(_expert_tensors(p, layout, lora, E, H, I, rank))
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    experts = ["gate_proj", "up_proj", "down_proj"] if layout == "2d" else []
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", *experts],
        "target_parameters": (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
                              if layout == "3d" else None),
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "task_type": "CAUSAL_LM", "base_model_name_or_path": "demo",
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _expert_tensors(p: str, layout: str, lora, E: int, H: int, I: int,
                    r: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if layout == "2d":
        for e in range(E):
            for proj, d_in, d_out in [("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]:
                a, b = lora(d_in, d_out)
                out[f"{p}mlp.experts.{e}.{proj}.lora_A.weight"] = a
                out[f"{p}mlp.experts.{e}.{proj}.lora_B.weight"] = b
        return out
    # 3D, PEFT target_parameters positional names: gate_up is the inner wrapper (base_layer).
    # A rows are expert-major [E*r, in]; B columns rank-major [out, r*E].
    for key, d_in, d_out in [("base_layer.", H, 2 * I), ("", I, H)]:
        pairs = [lora(d_in, d_out) for _ in range(E)]
        a = torch.cat([pa for pa, _ in pairs], dim=0)  # [E*r, in]
        b = torch.stack([pb for _, pb in pairs], dim=2).reshape(d_out, r * E)  # [out, r, E]
        out[f"{p}mlp.experts.{key}lora_A.weight"] = a
        out[f"{p}mlp.experts.{key}lora_B.weight"] = b
    return out
