"""Qwen3.5 / Qwen3-Next layers against the transformers modules with the same weights (fp32).

Gated DeltaNet: two sequences fed together in steps that cut them at arbitrary points
(mid-chunk, across the 64-token chunk edge, single tokens, a pure decode step), the states
carried between steps, against transformers fed each sequence in the same pieces through its
own cache (1e-5), and against one transformers forward over the whole sequence (the chunked and
the token-by-token forms of the recurrence differ by up to ~1e-4 on these random weights, in
transformers too). Weights reach our layers through the checkpoint loader, so Qwen3-Next's
head-grouped projections are un-grouped there.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf35

from loramux.engine.model.layers import GatedRMSNorm, RMSNorm
from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.tiny import load_reference, save_tiny_checkpoint

TOL = 1e-5
PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64, 3, 250, 11]
# (tokens of sequence 0, tokens of sequence 1) per step; the last step is decode only
STEPS = [(13, 66), (1, 4), (25, 1), (1, 1)]


def _text_model(ref):
    inner = ref.model
    return getattr(inner, "language_model", inner)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    cache = {}

    def get(arch: str, **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            path = save_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), **overrides)
            cache[key] = (load_model(path)[0], load_reference(path))
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_gated_deltanet_across_steps_matches_transformers(hybrid, arch):
    ours, ref = hybrid(arch)
    layer, ref_layer = ours.model.layers[0].linear_attn, _text_model(ref).layers[0].linear_attn
    la = layer.la
    lengths = [sum(step[i] for step in STEPS) for i in range(2)]
    torch.manual_seed(1)
    xs = [torch.randn(n, ours.config.hidden_size) for n in lengths]
    with torch.inference_mode():
        caches = [DynamicCache(config=_text_model(ref).config) for _ in xs]
        expected = [[], []]
        conv = torch.zeros(2, la.conv_dim, la.conv_kernel - 1)
        recurrent = torch.zeros(2, la.num_value_heads, la.key_head_dim, la.value_head_dim)
        done, outs = [0, 0], [[], []]
        for step in STEPS:
            parts = [xs[i][done[i]:done[i] + n] for i, n in enumerate(step)]
            start = torch.tensor([0, step[0], sum(step)], dtype=torch.int32)
            out, conv, recurrent = layer.mix(torch.cat(parts), None, conv, recurrent, start,
                                             list(step))
            for i, piece in enumerate(out.split(list(step))):
                outs[i].append(piece)
                expected[i].append(ref_layer(parts[i][None], cache=caches[i])[0])
                done[i] += step[i]
        whole = [ref_layer(x[None])[0] for x in xs]
    assert recurrent.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(torch.cat(outs[i]), torch.cat(expected[i]), atol=TOL, rtol=0)
        torch.testing.assert_close(torch.cat(outs[i]), whole[i], atol=2e-4, rtol=0)


def test_gated_deltanet_state_is_needed(hybrid):
    """The oracle check can fail: resuming from a zero state instead of the carried one."""
    ours, ref = hybrid("qwen3_5_moe")
    layer, ref_layer = ours.model.layers[0].linear_attn, _text_model(ref).layers[0].linear_attn
    la, x = layer.la, torch.randn(20, ours.config.hidden_size)
    zero_conv = torch.zeros(1, la.conv_dim, la.conv_kernel - 1)
    zero_rec = torch.zeros(1, la.num_value_heads, la.key_head_dim, la.value_head_dim)
    with torch.inference_mode():
        expected = ref_layer(x[None])[0]
        start = torch.tensor([0, 10], dtype=torch.int32)
        layer.mix(x[:10], None, zero_conv, zero_rec, start, [10])
        second, _, _ = layer.mix(x[10:], None, zero_conv, zero_rec, start, [10])
    assert (second - expected[10:]).abs().max() > 1e-3


def test_norms_match_transformers():
    torch.manual_seed(2)
    x, z, w = torch.randn(5, 16), torch.randn(5, 16), torch.randn(16)
    for ref, ours in ((hf35.Qwen3_5MoeRMSNorm(16, eps=1e-6),
                       RMSNorm(16, 1e-6, torch.float32, torch.device("cpu"), zero_centred=True)),
                      (hf35.Qwen3_5MoeRMSNormGated(16, eps=1e-6),
                       GatedRMSNorm(16, 1e-6, torch.float32, torch.device("cpu")))):
        ref.weight.data.copy_(w)
        ours.weight.data.copy_(w)
        args = (x, z) if isinstance(ours, GatedRMSNorm) else (x,)
        torch.testing.assert_close(ours(*args), ref(*args), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"])
def test_full_attention_layers_match_transformers(hybrid, arch):
    """Hybrid models built of full-attention layers only: gated q_proj, partial RoPE,
    zero-centred norms, shared expert and router against transformers, prefill and decode."""
    ours, ref = hybrid(arch, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    session = PagedSession(ours)
    logits = torch.cat([session.step([(0, PROMPT[:7], -1)])[0],
                        *(session.step([(0, [t], -1)])[0] for t in PROMPT[7:])])
    torch.testing.assert_close(logits, reference_logits(ref, PROMPT), atol=1e-4, rtol=0)
