"""Each LoRA form the pass must recognise, and each it must refuse with a reason."""

import copy

import pytest
import torch
import torch.nn as nn

import unsloth_compile
from helpers import batch_for, count_lora_layers, peft_wrap, saved_tensors, tiny_causal_lm, train_and_compare


def llama_batch(step):
    return batch_for("llama", seed=step)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_base_bias(bias):
    """bias="all"/"lora_only": the base bias of LoRA layers trains; its gradient comes from the op."""
    model = peft_wrap(tiny_causal_lm("qwen2"), lora_dropout=0.0, bias=bias, target_modules=["q_proj", "k_proj", "v_proj"])
    trainable_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("base_layer.bias")]
    assert trainable_biases, "the config should make the q/k/v biases trainable"
    result = train_and_compare(model, llama_batch)
    assert result.report.counters["lora_linear.fused"] == 6


def test_lora_bias_on_B():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, lora_bias=True, target_modules=["q_proj", "down_proj"])
    assert any("lora_B" in n and n.endswith(".bias") for n, _ in model.named_parameters())
    result = train_and_compare(model, llama_batch)
    assert result.report.counters["lora_linear.fused"] == 4


def test_rslora_scale():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, use_rslora=True, r=8, lora_alpha=4)
    result = train_and_compare(model, llama_batch)
    assert result.report.counters["lora_linear.fused"] == count_lora_layers(model)


def test_fp32_adapters_on_bf16_base():
    """PEFT's default autocast_adapter_dtype keeps adapters fp32 on a bf16 base: the pass absorbs
    the casts, the op returns fp32 gradients for the fp32 adapters."""
    model = peft_wrap(tiny_causal_lm("llama", torch.bfloat16), lora_dropout=0.1)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}
    # bf16 activations: eager and compiled round at the same places (the reference op mirrors
    # eager's casts); the remaining difference is aot_eager's decompositions of norms/softmax.
    result = train_and_compare(model, llama_batch, rtol=2e-2, atol=2e-3)
    assert result.report.counters["lora_linear.fused"] == count_lora_layers(model)
    assert {s.details["adapter_dtype"] for s in result.report.fused} == {"float32"}
    assert {s.details["base_dtype"] for s in result.report.fused} == {"bfloat16"}


def test_two_active_adapters_are_concatenated():
    from peft import LoraConfig

    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=0.0, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():  # set_adapter may freeze one of them; train both
        if "lora_" in n:
            p.requires_grad_(True)
    result = train_and_compare(model, llama_batch)
    assert result.report.counters["lora_linear.fused"] == 4
    assert all(s.details["adapters"] == 2 and s.details["rank"] == 6 for s in result.report.fused)


class HandWrittenLoRA(nn.Module):
    """The textbook LoRA module: nn.Linear adapters, dropout, float scale."""

    def __init__(self, k, n, r, dropout=0.0, bias=True):
        super().__init__()
        self.base = nn.Linear(k, n, bias=bias)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(k, r, bias=False)
        self.lora_B = nn.Linear(r, n, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = 2.0 / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale


class MatmulLoRA(nn.Module):
    """The paper's form: A stored (in, r), B (r, out), a 0-d tensor scale, a residual add."""

    def __init__(self, k, r):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, k) / k**0.5, requires_grad=False)
        self.A = nn.Parameter(torch.randn(k, r) / k**0.5)
        self.B = nn.Parameter(torch.randn(r, k) / r**0.5)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return x + (x @ self.weight.T + (x @ self.A @ self.B) * self.scale)


def _sequential_batch(k, rows=(3, 5)):
    return lambda step: (torch.randn(*rows, k, generator=torch.Generator().manual_seed(step)),)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hand_written_lora_module(dropout):
    model = nn.Sequential(HandWrittenLoRA(24, 20, 3, dropout), nn.GELU(), HandWrittenLoRA(20, 24, 5, dropout, bias=False))
    result = train_and_compare(model, _sequential_batch(24))
    assert result.report.counters["lora_linear.fused"] == 2
    assert [s.module for s in result.report.fused] == ["2", "0"]


def test_matmul_form_with_tensor_scale_and_residual():
    model = MatmulLoRA(16, 4)
    result = train_and_compare(model, _sequential_batch(16))
    assert result.report.counters["lora_linear.fused"] == 1
    assert result.report.counters["lora_linear.residual_folded"] == 1


def test_trainable_base_weight_is_refused():
    model = nn.Sequential(HandWrittenLoRA(16, 16, 2))
    model[0].base.weight.requires_grad_(True)
    result = train_and_compare(model, _sequential_batch(16))
    assert result.report.counters["lora_linear.fused"] == 0
    assert result.report.refusal_reasons() == {
        "trainable base weight (the fused op never computes a gradient for W)": 1}


def test_plain_mlp_is_not_mistaken_for_lora():
    """Two stacked linears that are not low-rank are an ordinary block, not an adapter."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    report = unsloth_compile.explain(model, torch.randn(2, 8))
    assert report.sites == []


def _explain(model, batch):
    return unsloth_compile.explain(model, **batch, options={"inner": "eager"})


def test_dora_is_refused_with_reason():
    model = peft_wrap(tiny_causal_lm("llama", layers=1), target_modules=["q_proj"], use_dora=True)  # DoRA breaks the graph in each layer: one shows it
    report = _explain(model, batch_for("llama"))
    assert report.counters["lora_linear.fused"] == 0
    reasons = report.refusal_reasons()
    assert "DoRA (use_dora=True) is not fused" in reasons
    # DoRA graph-breaks inside PEFT; fragments without DoRA's magnitude say so instead of guessing
    assert set(reasons) <= {"DoRA (use_dora=True) is not fused",
                            "unrecognised LoRA form in a graph fragment: a graph break inside the LoRA layer "
                            "split it (torch._dynamo.explain(model)(...) shows where)"}


def test_embedding_lora_is_refused_and_linear_still_fused():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["embed_tokens", "q_proj"])
    report = _explain(model, batch_for("llama"))
    assert report.counters["lora_linear.fused"] == 2
    assert report.refusal_reasons() == {"LoRA on Embedding layers is not fused": 1}
    assert [s.module for s in report.refused] == ["base_model.model.model.embed_tokens"]


def test_conv_lora_is_refused():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    model = peft_wrap(ConvNet(), target_modules=["conv", "head"], r=2)
    report = unsloth_compile.explain(model, torch.randn(2, 3, 8, 8))
    assert report.counters["lora_linear.fused"] == 1
    assert report.refusal_reasons() == {"LoRA on Conv2d layers is not fused": 1}


def test_merged_and_disabled_adapters_are_reported():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"])
    model.merge_adapter()
    report = _explain(model, batch_for("llama"))
    assert report.counters["lora_linear.fused"] == 0
    assert report.refusal_reasons() == {"adapters merged or disabled: only the base layer runs": 2}
    model.unmerge_adapter()
    torch._dynamo.reset()
    with model.disable_adapter():
        report = _explain(model, batch_for("llama"))
    assert report.refusal_reasons() == {"adapters merged or disabled: only the base layer runs": 2}


def test_sequence_classification_wrapper_is_not_a_lora_layer():
    """PEFT SEQ_CLS with modules_to_save: the LoraModel wrapper itself must not be reported as
    a LoRA layer that 'runs its base only'."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("bert"), LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value", "dense"], init_lora_weights=False))
    report = _explain(model, batch_for("bert"))
    assert report.refused == [], str(report)
    assert report.counters["lora_linear.fused"] == count_lora_layers(model)


def test_float_scale_that_changes_between_calls_stays_fused():
    """After a float attribute changes, Dynamo passes it as a 0-d tensor input and multiplies by
    its item(): the site must still fuse, with the tensor as the op's scale_tensor."""
    model = nn.Sequential(HandWrittenLoRA(16, 12, 2))
    batches = _sequential_batch(16)
    result = train_and_compare(model, batches, steps=1)
    assert result.report.counters["lora_linear.fused"] == 1
    for scale in (0.25, 0.125):
        model[0].scale = scale
        result = train_and_compare(model, batches, steps=1)
        # Dynamo may compile more than once around the change: every graph must fuse the site.
        report = result.report
        assert report.refused == [] and report.counters["lora_linear.fused"] == report.graphs >= 1, str(report)


class DropoutLoRA(nn.Module):
    """A hand-written LoRA linear with dropout on the adapter input (rank 4, scale 2)."""

    def __init__(self, k: int, n: int, p: float):
        super().__init__()
        self.base = nn.Linear(k, n, bias=False).requires_grad_(False)
        self.A = nn.Linear(k, 4, bias=False)
        self.B = nn.Linear(4, n, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.base(x) + self.B(self.A(self.drop(x))) * 2.0


def test_compiled_dropout_lora_saves_a_mask_not_the_dropped_input():
    """With lora_dropout the pass hands the op the dropout's boolean mask: the compiled graph
    saves x and that mask for backward, not the dropped input in the adapter dtype, and still
    trains like eager (same random stream, see the models' dropout tests)."""

    torch.manual_seed(0)
    eager_model = DropoutLoRA(32, 48, p=0.3)
    model = torch.compile(copy.deepcopy(eager_model), backend="unsloth", options={"inner": "aot_eager"})
    x = torch.randn(8, 32, requires_grad=True)
    model(x).sum().backward()  # compile outside the hook (tracing saves fake tensors)
    torch.manual_seed(1)
    out, saved = saved_tensors(lambda: model(x))
    full = [t for t in saved if t.shape == x.shape]
    assert sorted(str(t.dtype) for t in full) == ["torch.bool", "torch.float32"], [t.dtype for t in full]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in full)
    torch.manual_seed(1)
    expected = eager_model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + [p for p in model.parameters() if p.requires_grad], grad)
    want = torch.autograd.grad(expected, [x] + [p for p in eager_model.parameters() if p.requires_grad], grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


def test_compiled_dropout_mask_statistics(monkeypatch):
    """The masks the op receives in a compiled model: keep rate 1 - p within 4 sigma, a fresh
    draw every step, the same mask in forward and in backward (saved, not redrawn), and the
    scale 1 / (1 - p)."""
    from unsloth_compile.ops import lora

    p, K = 0.3, 512
    seen = []
    rebuild = lora.dropout_input

    def record(x, lora_A, mask, scale):
        seen.append((mask.clone(), scale))
        return rebuild(x, lora_A, mask, scale)

    monkeypatch.setattr(lora, "dropout_input", record)

    model = torch.compile(DropoutLoRA(K, 64, p=p), backend="unsloth", options={"inner": "aot_eager"})
    x = torch.randn(64, K, requires_grad=True)
    for _ in range(2):
        model(x).sum().backward()
    assert len(seen) == 4, "one rebuild in forward and one in backward per step"
    (m1, s1), (m1_bwd, _), (m2, _), (m2_bwd, _) = seen
    assert torch.equal(m1, m1_bwd) and torch.equal(m2, m2_bwd)
    assert not torch.equal(m1, m2), "the mask must be drawn anew each step"
    assert s1 == pytest.approx(1 / (1 - p))
    n = m1.numel()
    sigma = ((1 - p) * p / n) ** 0.5
    for mask in (m1, m2):
        assert mask.dtype == torch.bool and mask.shape == x.shape
        assert abs(mask.float().mean().item() - (1 - p)) < 4 * sigma
