"""Packed rows on CUDA: the block-diagonal mask runs on a fused SDPA kernel and the packed,
compiled (Inductor) step computes what each sequence computes alone in eager.

GPU only. SDPA's math path is disabled while the compiled step is traced and run, so a call
that no fused kernel takes fails instead of passing slowly. bf16 with fp32 adapters (PEFT's
default); llama-shaped heads (head_dim 64, grouped kv heads).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

gpu = pytest.mark.gpu

LENGTHS = (1, 7, 13, 300, 513, 37, 130)  # 1001 tokens: not a multiple of 8


def _model(family):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    common = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
    cfg = transformers.LlamaConfig(**common) if family == "llama" else transformers.Qwen2Config(**common)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    base = cls(cfg).to("cuda", torch.bfloat16)
    return peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     init_lora_weights=False))


def _losses(logits, seqs):
    out, start = [], 0
    for s in seqs:
        n = s.shape[1]
        if n > 1:
            out.append(F.cross_entropy(logits[0, start:start + n - 1].float(), s[0, 1:]))
        start += n
    return torch.stack(out)


@gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_on_fused_kernels_match_each_sequence_alone(family):
    from unsloth_compile.report import collect_reports

    model = _model(family).train()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1024, (1, n), generator=g).cuda() for n in LENGTHS]
    ids = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None].cuda()

    model.zero_grad()
    # a one-token sequence has no next token to score: it is packed, but has no loss of its own
    expected = torch.cat([_losses(model(input_ids=s).logits, [s]) for s in seqs if s.shape[1] > 1])
    expected.sum().backward()
    expected_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="unsloth")
    torch.backends.cuda.enable_math_sdp(False)
    try:
        with collect_reports() as report:
            losses = _losses(compiled(input_ids=ids, position_ids=positions).logits, seqs)
            losses.sum().backward()
    finally:
        torch.backends.cuda.enable_math_sdp(True)
    assert report.counters["attention.packed"] == 2 and not report.counters["attention.refused"]
    assert report.counters["lora_linear.fused"] == 14
    # bf16 activations: the packed step differs from the lone sequences by rounding only (attending
    # across a boundary moves these losses by O(1))
    torch.testing.assert_close(losses, expected, rtol=2e-2, atol=2e-2)
    for name, grad in expected_grads.items():
        got = dict(model.named_parameters())[name].grad.float()
        cos = F.cosine_similarity(got.flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
