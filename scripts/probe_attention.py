"""Which attention kernel runs, eager vs compiled, for the two presets' attention (GPU probe).

    python scripts/probe_attention.py [--out DIR]

For a one-layer Llama (llama-1b shapes: 4 x 2048 tokens, 32 query / 8 kv heads) and a one-layer
BERT (bert-large shapes: 32 x 384, dropout 0.1, with and without an all-ones attention_mask),
runs forward + backward of the layer:
- eager;
- torch.compile(backend=<recorder>): AOTAutograd's forward and backward graphs, listing the
  attention ops they hold (which fused SDPA kernel, or the math decomposition);
- torch.compile(backend="inductor"), timed;
- the same under torch.nn.attention.sdpa_kernel priority lists (flash first / cuDNN first),
  to see whether the choice made at trace time is what costs.
Prints one table (ms per fwd+bwd, median of CUDA-event timings) and the ops per graph.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

RECORDED: dict[str, list[str]] = {}
_INTERESTING = ("attention", "softmax", "sdpa", "dropout", "philox", "rand")


def recorder(tag: str):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            ops = [str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and any(s in str(n.target).lower() for s in _INTERESTING)]
            RECORDED[f"{tag} {kind}"] = ops
            return make_boxed_func(gm.forward)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


def build(kind: str):
    from transformers import BertConfig, LlamaConfig
    from transformers.models.bert.modeling_bert import BertModel
    from transformers.models.llama.modeling_llama import LlamaModel

    with torch.device("cuda"):
        if kind == "llama":
            cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=1024, attn_implementation="sdpa")
            return LlamaModel(cfg).to(torch.bfloat16)
        cfg = BertConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096,
                         vocab_size=1024, attn_implementation="sdpa")
        return BertModel(cfg, add_pooling_layer=False).to(torch.bfloat16)


def batch(kind: str, mask: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    if kind == "llama":
        return {"input_ids": torch.randint(0, 1024, (4, 2048), device="cuda", generator=g)}
    ids = torch.randint(0, 1024, (32, 384), device="cuda", generator=g)
    out = {"input_ids": ids}
    if mask:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def step(fn, inputs):
    out = fn(**inputs).last_hidden_state
    out.float().square().mean().backward()


def time_ms(fn, inputs, iters=20) -> float:
    for _ in range(3):
        step(fn, inputs)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


PRIORITIES = {
    "default": None,
    "flash-first": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH],
    "cudnn-first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH],
    "efficient-first": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH],
}


def priority(name):
    order = PRIORITIES[name]
    return contextlib.nullcontext() if order is None else sdpa_kernel(order, set_priority=True)


def explain_choice() -> None:
    """Why each fused backend is or is not usable for BERT's no-mask dropout call, with real
    and with fake tensors (AOTAutograd traces with fake ones): can_use_*(debug=True) warns
    the reason."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                     can_use_flash_attention)

    def args(make):
        q = make((32, 384, 16, 64)).transpose(1, 2)
        k = make((32, 384, 16, 64)).transpose(1, 2)
        v = make((32, 384, 16, 64)).transpose(1, 2)
        return q, k, v

    for label, ctx in (("real", contextlib.nullcontext()), ("fake", FakeTensorMode())):
        with ctx:
            q, k, v = args(lambda shape: torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True))
            for mask_label, mask in (("no mask", None),
                                     ("bool mask", torch.ones(32, 1, 384, 384, device="cuda", dtype=torch.bool))):
                params = SDPAParams(q, k, v, mask, 0.1, False, False)
                for name, fn in (("flash", can_use_flash_attention), ("efficient", can_use_efficient_attention),
                                 ("cudnn", can_use_cudnn_attention)):
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        ok = fn(params, True)
                    why = "; ".join(str(w.message)[:200] for w in caught)
                    print(f"CHOICE {label} {mask_label:<9} {name:<9} {ok} {why}", flush=True)
                try:
                    choice = torch._fused_sdp_choice(q, k, v, mask, 0.1, False)
                except Exception as error:  # noqa: BLE001
                    choice = f"error {error}"
                print(f"CHOICE {label} {mask_label:<9} _fused_sdp_choice -> {choice}", flush=True)


def minimal() -> None:
    """SDPA alone, compiled with the recorder: which aten op AOTAutograd records, per mask /
    dropout / allowed-backend setting."""
    import torch.nn.functional as F

    def make():
        x = torch.randn(32, 384, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return x.transpose(1, 2)

    bool_mask = torch.ones(32, 1, 384, 384, device="cuda", dtype=torch.bool)
    float_mask = torch.zeros(32, 1, 384, 384, device="cuda", dtype=torch.bfloat16)
    cases = {"nomask p=0.1": (None, 0.1), "nomask p=0": (None, 0.0), "bool p=0.1": (bool_mask, 0.1),
             "float p=0.1": (float_mask, 0.1)}
    only = {"all": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION]}
    for case, (mask, p) in cases.items():
        for name, backends in only.items():
            if name != "all" and case != "nomask p=0.1":
                continue
            tag = f"{case} [{name}]"
            torch._dynamo.reset()

            def f(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

            ctx = contextlib.nullcontext() if backends is None else sdpa_kernel(backends)
            try:
                with ctx:
                    torch.compile(f, backend=recorder(tag))(make(), make(), make()).sum().backward()
                print(f"MINIMAL {tag:<28} fw {RECORDED.get(tag + ' fw')} bw {RECORDED.get(tag + ' bw')}", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"MINIMAL {tag:<28} ERROR {str(error)[:300]}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cases", default="llama:default,flash-first,cudnn-first;bert+mask:default,efficient-first;bert:default",
                   help="case:priority,...;... (cases llama, bert+mask, bert)")
    p.add_argument("--why", action="store_true", help="only explain the backend choice (real vs fake tensors)")
    p.add_argument("--minimal", action="store_true", help="only SDPA alone under the recorder")
    args = p.parse_args()
    if args.why:
        explain_choice()
        return
    if args.minimal:
        minimal()
        return
    rows = []
    plan = [(c.split(":")[0], c.split(":")[1].split(",")) for c in args.cases.split(";")]
    for label_in, prios in plan:
        kind, mask = label_in.split("+")[0], label_in.endswith("+mask")
        model = build(kind)
        model.train()
        inputs = batch(kind, mask)
        label = f"{kind}{'+mask' if mask else ''}"
        for prio in prios:
            with priority(prio):
                eager = time_ms(model, inputs)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(model, inputs)
                torch.cuda.synchronize()
                eager_kernels = sorted({e.name[:70] for e in prof.events()
                                        if any(s in e.name.lower() for s in ("flash", "fmha", "attn", "attention", "cudnn", "softmax"))})
                torch._dynamo.reset()
                step(torch.compile(model, backend=recorder(f"{label} {prio}")), inputs)
                torch._dynamo.reset()
                compiled = torch.compile(model)
                ind = time_ms(compiled, inputs)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(compiled, inputs)
                torch.cuda.synchronize()
                ind_kernels = sorted({e.name[:70] for e in prof.events()
                                      if any(s in e.name.lower() for s in ("flash", "fmha", "attn", "attention", "cudnn", "softmax"))})
                torch._dynamo.reset()
            rows.append({"case": label, "priority": prio, "eager_ms": eager, "inductor_ms": ind,
                         "eager_kernels": eager_kernels, "inductor_kernels": ind_kernels,
                         "aot_fw": RECORDED.get(f"{label} {prio} fw"), "aot_bw": RECORDED.get(f"{label} {prio} bw")})
            print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_attention.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{'case':<12} {'priority':<16} {'eager ms':>9} {'inductor ms':>12}")
    for r in rows:
        print(f"{r['case']:<12} {r['priority']:<16} {r['eager_ms']:9.2f} {r['inductor_ms']:12.2f}")


if __name__ == "__main__":
    main()
