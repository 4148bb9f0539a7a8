"""A tiny Qwen3-MoE checkpoint with what structured outputs, tools and reasoning need: a
byte-level BPE tokenizer (every JSON character is spellable, as with Qwen's), Qwen3's
`<tool_call>` / `<think>` added tokens, a Qwen3-style chat template (tools, tool calls, tool
results, `enable_thinking`), and one 2D and one 3D adapter. Random weights, built offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramux.engine.demo import write_random_adapter
from tests.tiny import tiny_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>",
         "</tool_response>"]  # Qwen3's: added tokens that are not special (they stay in text)

# Qwen3's chat template, less its reasoning_content history handling.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": \
<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}\
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}\
{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}\
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}\
{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

_CORPUS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"answer": 42, "ok": true, "items": [1, 2, 3], "note": null, "score": -0.5e3}',
    "the quick brown fox jumps over the lazy dog. Hello, world! What is the weather today?",
    "def f(x):\n    return [x, {'a': 1}]\n\n\tSELECT * FROM t WHERE id = 7;",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "I think the answer is yes, no, maybe. Let me think about the user's question first.",
]


def write_tokenizer(path: Path, vocab_size: int = 600) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(path)


def build_chat_model(root: Path) -> dict[str, Path]:
    """{"model": dir, "a2d": adapter dir, "a3d": adapter dir} under root."""
    from transformers import AutoTokenizer

    write_tokenizer(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = tiny_model("qwen3_moe", seed=5, vocab_size=len(tokenizer),
                       max_position_embeddings=4096,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    config = model.config.to_dict()
    write_random_adapter(root / "a2d", config, layout="2d", seed=2, rank=4, alpha=8)
    write_random_adapter(root / "a3d", config, layout="3d", seed=3, rank=4, alpha=8)
    torch.manual_seed(0)
    return {"model": root / "model", "a2d": root / "a2d", "a3d": root / "a3d"}
