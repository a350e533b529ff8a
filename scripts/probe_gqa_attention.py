"""Grouped-query attention on the GPU: k and v repeated to the query heads (what transformers
does under tracing) against SDPA's `enable_gqa=True` on the 8 kv heads, per SDPA kernel.

    python scripts/probe_gqa_attention.py [--batch 4 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64]

For each variant: forward + backward time (median of CUDA-event timings, the repeat and its
backward's sum over the query-head groups included), the bytes the forward keeps for backward
(the storages autograd keeps, each once, q/k/v included), and the largest difference of
the output and of dq, dk, dv from the first variant that ran. A kernel that refuses the inputs
is reported with torch's reason, not skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def step(q, k, v, gqa: bool, backend):
    groups = q.shape[1] // k.shape[1]
    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    with ctx:
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(args.batch, args.heads, args.seq, args.head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(args.batch, args.kv_heads, args.seq, args.head_dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    variants = [(f"{'gqa' if gqa else 'repeat'}+{name}", gqa, backend)
                for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                      ("flash", SDPBackend.FLASH_ATTENTION),
                                      ("efficient", SDPBackend.EFFICIENT_ATTENTION))
                for gqa in (False, True)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, q {tuple(q.shape)}, k/v {tuple(k.shape)}")
    print(f"| variant | fwd+bwd ms | saved MiB | max |out diff| | max |dq,dk,dv diff| | note |")
    print("|---|---|---|---|---|---|")
    first = None
    for name, gqa, backend in variants:
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        try:
            storages = {}

            def pack(t):  # what autograd keeps for backward, each storage once (inputs included)
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = step(qq, kk, vv, gqa, backend)
            saved = sum(storages.values())
            out.backward(dout)
            grads = (qq.grad, kk.grad, vv.grad)
            times = []
            for i in range(args.iters + 5):
                for t in (qq, kk, vv):
                    t.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(qq, kk, vv, gqa, backend).backward(dout)
                end.record()
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(start.elapsed_time(end))
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:160]
            print(f"| {name} | - | - | - | - | refused: {reason} |")
            continue
        if first is None:
            first = (out.detach(), [g.detach() for g in grads])
            diff_out = diff_grad = 0.0
        else:
            diff_out = float((out.detach() - first[0]).abs().max())
            diff_grad = max(float((g - f).abs().max()) for g, f in zip(grads, first[1]))
        print(f"| {name} | {statistics.median(times):.3f} | {saved / 2**20:.0f} | {diff_out:.2e} | {diff_grad:.2e} | |")


if __name__ == "__main__":
    main()
