"""Why the compiled Llama's cuDNN attention backward is slower than eager's (GPU probe).

    python scripts/probe_attention_layout.py

1. Strides: a 2-layer Llama with llama-1b shapes and PEFT LoRA on all projections runs one
   training step eager, under Inductor and under backend="unsloth", inside a dispatch mode
   that prints the strides of every SDPA forward/backward op's tensors.
2. Layouts: the cuDNN SDPA backward alone (B=4, 32 q / 8 kv heads, 2048 tokens, d=64, causal,
   GQA), timed for q/k/v and grad_out in the (B, S, H, D)-major layout eager produces vs
   (B, H, S, D)-contiguous, to see which layout costs.
"""

from __future__ import annotations

import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode


class ShowSdpa(TorchDispatchMode):
    def __init__(self, tag):
        super().__init__()
        self.tag, self.seen = tag, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and name not in self.seen:
            self.seen.add(name)
            desc = [f"{tuple(a.shape)}:{a.stride()}" for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
            print(f"STRIDES {self.tag:<10} {name.split('.')[1]:<48} {' '.join(desc)}", flush=True)
        return func(*args, **(kwargs or {}))


def llama(layers=2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=4096, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def strides():
    import unsloth_compile  # noqa: F401

    ids = torch.randint(0, 4096, (4, 2048), device="cuda")
    for tag in ("eager", "inductor", "unsloth"):
        torch.manual_seed(0)
        model = llama()
        fn = model if tag == "eager" else torch.compile(model, backend=tag)
        for _ in range(2):  # compile outside the mode
            fn(input_ids=ids, labels=ids).loss.backward()
        with ShowSdpa(tag):
            fn(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        del model, fn
        torch._dynamo.reset()


def layouts():
    B, S, Hq, Hkv, D = 4, 2048, 32, 8, 64

    def make(h, bshd):
        if bshd:
            return torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        return torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for qkv_bshd in (True, False):
            for do_bshd in (True, False):
                q, k, v = make(Hq, qkv_bshd), make(Hkv, qkv_bshd), make(Hkv, qkv_bshd)
                try:
                    with sdpa_kernel([backend]):
                        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        g = (torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) if do_bshd
                             else torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16))
                        times = []
                        for i in range(12):
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
                            end.record()
                            torch.cuda.synchronize()
                            if i >= 2:
                                times.append(start.elapsed_time(end))
                    print(f"LAYOUT {backend.name:<20} qkv {'BSHD' if qkv_bshd else 'BHSD'} out-stride "
                          f"{out.stride()} dO {'BSHD' if do_bshd else 'BHSD'}: bwd {statistics.median(times):.3f} ms",
                          flush=True)
                except Exception as error:  # noqa: BLE001
                    print(f"LAYOUT {backend.name:<20} qkv {'BSHD' if qkv_bshd else 'BHSD'} dO "
                          f"{'BSHD' if do_bshd else 'BHSD'}: ERROR {str(error)[:150]}", flush=True)


def bert_reason():
    """BERT without a mask compiles to the math path: with only one fused backend allowed,
    tracing fails and the warnings say why that backend was refused."""
    import warnings

    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertModel

    cfg = BertConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096,
                     vocab_size=1024, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = BertModel(cfg, add_pooling_layer=False).to(torch.bfloat16).train()
    ids = torch.randint(0, 1024, (32, 384), device="cuda")

    def ops(gm, ex):
        print("BERT graph ops:", [str(n.target) for n in gm.graph.nodes if "softmax" in str(n.target)
                                  or "attention" in str(n.target)], flush=True)
        return make_boxed_func(gm.forward)

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                torch.compile(model, backend=aot_autograd(fw_compiler=ops, bw_compiler=ops))(input_ids=ids)
                print(f"BERT {backend.name}: compiled", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"BERT {backend.name}: ERROR {str(error).splitlines()[0][:200]}", flush=True)
        for w in caught:
            if "sdp" in str(w.message).lower() or "attention" in str(w.message).lower() or "kernel" in str(w.message).lower():
                print(f"   WARN {str(w.message)[:300]}", flush=True)


if __name__ == "__main__":
    bert_reason()
    layouts()
    strides()
