"""Every spelling of the same batch reaches the same rewritten graph.

BERT with `input_ids` alone, with `token_type_ids`, with an all-ones or a padding
`attention_mask`; Llama with and without an all-ones mask. For each: the graph the backend
emits (after the passes) is inspected — LoRA sites fused and residuals folded, the attention
call's form, no stride-0 index reaching an embedding, no all-True mask — and the compiled
step's loss and LoRA gradients equal eager's. transformers 5.17 (the GPU image) builds masks
under tracing that 5.25 does not: `is_torchdynamo_exporting` patched to True reproduces it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unsloth_compile.backend import unsloth
from unsloth_compile.passes.attention import SDPA_TARGETS
from unsloth_compile.report import collect_reports

from helpers import VOCAB, peft_wrap, tiny_causal_lm

B, L = 3, 16


@dataclasses.dataclass
class Emitted:
    """What one compiled spelling looks like after the passes."""
    lora_sites: int
    residual_folds: int
    refused: int
    attention: list  # per SDPA call: (mask shape or None, is_causal)
    broadcast_indices: int  # embedding lookups whose index has stride 0 along a dimension > 1


def _emitted(model, kwargs) -> tuple[Emitted, torch.Tensor]:
    graphs = []

    def backend(gm, example_inputs):
        compiled = unsloth(gm, example_inputs, options={"inner": "aot_eager", "summary": False})
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    with collect_reports() as report:
        loss = torch.compile(model, backend=backend)(**kwargs).loss
    (gm,) = graphs
    nodes = list(gm.graph.nodes)
    attention = []
    for n in nodes:
        if n.op == "call_function" and n.target in SDPA_TARGETS:
            mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
            attention.append((None if mask is None else tuple(mask.meta["example_value"].shape),
                              n.kwargs.get("is_causal", False)))
    broadcast = 0
    for n in nodes:
        if n.op == "call_function" and n.target is torch.nn.functional.embedding:
            index = n.args[0].meta["example_value"]
            broadcast += any(st == 0 and sz > 1 for sz, st in zip(index.shape, index.stride()))
    emitted = Emitted(report.counters["lora_linear.fused"], report.counters["lora_linear.residual_folded"],
                      report.counters["lora_linear.refused"], attention, broadcast)
    return emitted, loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_against_eager(model, kwargs):
    """The compiled loss and LoRA gradients equal eager's; returns what the backend emitted."""
    model.zero_grad()
    expected = model(**kwargs).loss
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad()
    emitted, loss = _emitted(model, kwargs)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    return emitted


# ----------------------------------------------------------------------------- BERT


def _bert_qa():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64,
                        vocab_size=VOCAB, num_hidden_layers=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return peft_wrap(tf.BertForQuestionAnswering(cfg))  # all linear layers, the QA head too


def _bert_spelling(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, L), generator=g)
    batch = {"input_ids": ids, "start_positions": torch.randint(0, L, (B,), generator=g),
             "end_positions": torch.randint(0, L, (B,), generator=g)}
    if "tt" in name:
        batch["token_type_ids"] = torch.zeros_like(ids)
    if "ones" in name:
        batch["attention_mask"] = torch.ones_like(ids)
    if "pad" in name:
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        batch["attention_mask"] = mask
    return batch


BERT_SPELLINGS = ["ids", "ids+tt", "ids+ones", "ids+tt+ones", "ids+pad"]


@pytest.fixture(params=[False, True], ids=["tf-newest", "tf-5.17-masks"])
def masks_under_tracing(request, monkeypatch):
    if request.param:
        import transformers.masking_utils as masking

        monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)
    return request.param


def test_bert_spellings_emit_the_same_lora_graph(masks_under_tracing):
    model = _bert_qa()
    emitted = {name: _check_against_eager(model, _bert_spelling(name)) for name in BERT_SPELLINGS}
    reference = emitted["ids+tt+ones"]
    assert reference.lora_sites == 6  # q, k, v, o, up, down (the 2-wide QA head refused)
    for name, got in emitted.items():
        assert (got.lora_sites, got.residual_folds, got.refused) == \
            (reference.lora_sites, reference.residual_folds, reference.refused), name
        # token_type_ids absent: BERT's buffer, expanded to the batch, is looked up once per row
        assert got.broadcast_indices == 0, name
        assert len(got.attention) == 1, name
    # no mask in the batch: no mask in the graph (none built, or an all-True one dropped)
    for name in ("ids", "ids+tt"):
        assert emitted[name].attention == [(None, False)], name
    # a mask in the batch: one (B, 1, L, L) mask, never materialised over the heads
    for name in ("ids+ones", "ids+tt+ones", "ids+pad"):
        assert emitted[name].attention == [((B, 1, L, L), False)], name


# ----------------------------------------------------------------------------- Llama


def test_llama_with_and_without_an_all_ones_mask(masks_under_tracing):
    torch.manual_seed(0)
    model = peft_wrap(tiny_causal_lm("llama", layers=1))
    ids = torch.randint(2, VOCAB, (B, L), generator=torch.Generator().manual_seed(2))
    bare = _check_against_eager(model, {"input_ids": ids, "labels": ids})
    masked = _check_against_eager(model, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    for got in (bare, masked):
        assert (got.lora_sites, got.residual_folds, got.refused) == (7, 2, 0)
    assert bare.attention == [(None, True)]  # the causal kernel, as eager
    # a mask from the batch cannot be read at compile time: kept, at (B, 1, L, L)
    assert masked.attention == [((B, 1, L, L), False)]


def test_broadcast_index_lookup_with_a_trainable_weight_matches_eager():
    """The rewrite is exact for a trainable table too: the gradient sums the batch's copies."""
    from unsloth_compile import Config, Report
    from unsloth_compile.passes.broadcast_embedding import lookup_broadcast_rows_once

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(5, 8)
            self.register_buffer("rows", torch.tensor([[3, 1, 4, 1, 0, 2, 4]]), persistent=False)

        def forward(self, x):
            return x + self.table(self.rows[:, : x.shape[1]].expand(x.shape[0], -1))

    model, x = Model(), torch.randn(4, 7, 8)
    graphs = []

    def backend(gm, example_inputs):
        report = Report()
        lookup_broadcast_rows_once(gm, Config(), report)
        graphs.append(report)
        return gm.forward

    expected = model(x)
    expected.square().sum().backward()
    expected_grad = model.table.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(model, backend=backend)(x)
    got.square().sum().backward()
    assert graphs[0].counters["embedding.broadcast_index"] == 1
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.table.weight.grad, expected_grad, rtol=1e-5, atol=1e-6)
