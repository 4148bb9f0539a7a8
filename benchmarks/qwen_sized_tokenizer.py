"""A Qwen-sized byte-level BPE tokenizer built offline, for benchmarks that need a realistic vocabulary.

Qwen2/3 use byte-level BPE with 151,643 regular tokens, Qwen2's pre-tokenizer regex and a byte-level
decoder. This trains the same kind of tokenizer, with the same vocabulary size and pre-tokenizer, on
the Python sources installed on this machine (no download), and saves it with Qwen3's special tokens.
Its entries are code-flavoured rather than web text, but their number, lengths and byte-level
structure are those a grammar engine sees with a real Qwen tokenizer.

  python benchmarks/qwen_sized_tokenizer.py OUT_DIR [--corpus-mb 60]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

QWEN_VOCAB = 151_643  # regular tokens of Qwen2/3; the specials follow
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                 "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                 "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                 "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(limit_bytes: int) -> Iterator[str]:
    """Python sources of the interpreter and its site-packages, up to limit_bytes."""
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    total = 0
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            total += len(text)
            yield text
            if total >= limit_bytes:
                return


def build(out: Path, corpus_mb: int = 60) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=QWEN_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(corpus_mb << 20), trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus-mb", type=int, default=60)
    args = parser.parse_args()
    build(args.out, args.corpus_mb)
    from transformers import AutoTokenizer
    print(f"{args.out}: {len(AutoTokenizer.from_pretrained(args.out))} tokens", file=sys.stderr)
