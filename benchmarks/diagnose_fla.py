"""Where fla-core's Gated DeltaNet kernels disagree with the torch twin (CUDA GPU, fla-core).

    PYTHONPATH=. python3 benchmarks/diagnose_fla.py

Each row is one way of calling fla (chunked varlen or fused recurrent; a one-token sequence in
the pack or not; grouped value heads HV > HK or HV == HK; q/k L2-normalised in fla's kernel or
before it; per-sequence initial states or none; bf16 or fp32 inputs) against
kernels.gated_delta.gated_delta_rule on the same inputs: NaN counts and relative errors of the
output and the final state.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

from loramux.kernels import gated_delta


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(lengths, hk, hv, l2_in_kernel, init, dtype, dk=128, dv=128, packed=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, N = sum(lengths), len(lengths)
    rand = lambda *s: torch.randn(s, generator=gen, device="cuda")  # noqa: E731
    q, k, v = rand(T, hk, dk).to(dtype), rand(T, hk, dk).to(dtype), rand(T, hv, dv).to(dtype)
    g = -F.softplus(rand(T, hv)) * 0.5
    beta = rand(T, hv).sigmoid().to(dtype)
    state = rand(N, hv, dk, dv) * 0.1 if init else torch.zeros(N, hv, dk, dv, device="cuda")
    starts = [0, *itertools.accumulate(lengths)]
    want_o, want_s = gated_delta.gated_delta_rule(
        q, k, v, g, beta, state, torch.tensor(starts, device="cuda"), lengths)
    fq, fk = q, k
    if not l2_in_kernel:
        fq, fk = (F.normalize(t.float(), dim=-1, eps=1e-6).to(dtype) for t in (q, k))
    kw = dict(initial_state=state.clone() if init else None, output_final_state=True,
              use_qk_l2norm_in_kernel=l2_in_kernel)
    if all(n == 1 for n in lengths) and packed:  # one batch row, the sequences as cu_seqlens
        o, s = fused_recurrent_gated_delta_rule(
            fq[None], fk[None], v[None], g[None], beta[None],
            cu_seqlens=torch.tensor(starts, device="cuda"), **kw)
        o = o[0]
        kind = "recurrent packed"
    elif all(n == 1 for n in lengths):
        o, s = fused_recurrent_gated_delta_rule(fq[:, None], fk[:, None], v[:, None],
                                                g[:, None], beta[:, None], **kw)
        o = o[:, 0]
        kind = "recurrent"
    else:
        o, s = chunk_gated_delta_rule(fq[None], fk[None], v[None], g[None], beta[None],
                                      cu_seqlens=torch.tensor(starts, device="cuda"),
                                      cu_seqlens_cpu=torch.tensor(starts), **kw)
        o = o[0]
        kind = "chunked"
    print(f"{kind:9} lengths={lengths} HK={hk} HV={hv} l2_in_kernel={l2_in_kernel} "
          f"init={init} {str(dtype)[6:]}: nan o {o.isnan().sum().item()} s "
          f"{s.isnan().sum().item()} (twin o {want_o.isnan().sum().item()} s "
          f"{want_s.isnan().sum().item()}), err o {rel(o.float(), want_o.float()):.2e} "
          f"s {rel(s.float(), want_s):.2e}", flush=True)


def main() -> None:
    for lengths in ([37, 128, 301, 64], [37, 128, 1, 301, 64], [1, 1, 1, 1]):
        for hk, hv in ((16, 32), (16, 16)):
            for l2, init in itertools.product((True, False), (True, False)):
                for dtype in (torch.bfloat16, torch.float32):
                    try:
                        case(lengths, hk, hv, l2, init, dtype)
                        if lengths[0] == 1 and lengths[-1] == 1:
                            case(lengths, hk, hv, l2, init, dtype, packed=True)
                    except Exception as exc:  # a refused combination is a finding too
                        print(f"lengths={lengths} HK={hk} HV={hv} l2={l2} init={init} "
                              f"{dtype}: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
