"""Length buckets (unsloth_compile/length_buckets.py): each training batch padded up to a bucket
by `unsloth_compile.compile`, the per-token outputs cut back, and nothing changed at the batch's
own positions: losses, logits and every LoRA gradient equal eager's on the unpadded batch, for
padded, unmasked, packed and BERT batches; Dynamo compiles a bounded number of graphs however
many lengths come; batches that padding could change are passed on unpadded, with the reason."""

from __future__ import annotations

import logging

import pytest
import torch

import unsloth_compile
from unsloth_compile.backend import cudagraphs_decision
from unsloth_compile.config import Config
from unsloth_compile.length_buckets import LengthBuckets, bucket_length, cut_outputs, is_causal_model

from helpers import VOCAB, peft_wrap, tiny_causal_lm, train_and_compare


def test_buckets_are_few_aligned_and_tight():
    for length in range(1, 5000):
        bucket = bucket_length(length)
        assert bucket >= length and bucket % 16 == 0
        assert bucket - length <= max(15, length // 8), (length, bucket)  # at most 1/8 more tokens
    assert len({bucket_length(n) for n in range(256, 2049)}) <= 25
    assert [bucket_length(n) for n in (5, 16, 17, 100, 1843, 2000, 2049)] == [16, 16, 32, 112, 1920, 2048, 2304]


def _padded_llama_batch(step: int, length: int, masked: bool = True) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, VOCAB, (3, length), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if masked:  # right padding per row, as a padding collator makes it
        mask = torch.ones(3, length, dtype=torch.long)
        for row, own in enumerate((length, max(2, length - 3), max(2, length // 2))):
            mask[row, own:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def _compile_in_place(model, options: dict):
    return unsloth_compile.compile(model, summary=False, report=False, **options)


def _train_pair(model, batches: list[dict], options=None):
    """Eager and `unsloth_compile.compile`'d copies (length buckets on) trained side by side on
    `batches`, every output compared too (helpers.train_and_compare). Returns the compiled model."""
    return train_and_compare(model, batches.__getitem__, steps=len(batches),
                             options={"inner": "aot_eager", **(options or {})}, compile_fn=_compile_in_place,
                             compare_outputs=True).compiled


def _frames_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.smoke
def test_padded_batches_of_many_lengths_equal_eager_with_few_compiles():
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = peft_wrap(tiny_causal_lm("llama"))
    lengths = [13, 9, 31, 27, 18, 30, 7]  # buckets 16, 16, 32, 32, 32, 32, 16
    compiled = _train_pair(model, [_padded_llama_batch(i, n) for i, n in enumerate(lengths)])
    wrapper = compiled._compiled_call_impl
    assert isinstance(wrapper, LengthBuckets)
    assert wrapper.buckets_seen == {16, 32}
    assert _frames_compiled() == 1  # a padded first batch: dynamic from the first compile


def test_unmasked_causal_batches_are_padded_without_a_mask(monkeypatch):
    torch.manual_seed(1)
    torch._dynamo.reset()
    model = peft_wrap(tiny_causal_lm("llama"))
    seen = []
    compiled = _train_pair(model, [_padded_llama_batch(i, n, masked=False) for i, n in enumerate([11, 21])])
    wrapper = compiled._compiled_call_impl
    inner = wrapper.compiled_call
    monkeypatch.setattr(wrapper, "compiled_call", lambda *a, **kw: seen.append(kw) or inner(*a, **kw))
    compiled(**_padded_llama_batch(5, 11, masked=False))
    assert "attention_mask" not in seen[0] and seen[0]["input_ids"].shape == (3, 16)
    assert (seen[0]["labels"][:, 11:] == -100).all()


def test_packed_rows_pad_with_a_sequence_of_their_own():
    """A packed row (position_ids restarting, no mask) is padded with a new sequence starting at
    0, and the loss and gradients equal eager's on the unpadded row (with attention_packed off,
    as eager's SDPA attends across the packed sequences; tests/passes/test_packing.py checks the
    packed attention itself)."""
    torch.manual_seed(2)
    torch._dynamo.reset()
    model = peft_wrap(tiny_causal_lm("llama"))

    def packed(step, sizes):
        g = torch.Generator().manual_seed(step)
        total = sum(sizes)
        ids = torch.randint(3, VOCAB, (1, total), generator=g)
        positions = torch.cat([torch.arange(n) for n in sizes])[None]
        labels = ids.clone()
        labels[0, torch.cumsum(torch.tensor(sizes), 0)[:-1]] = -100
        return {"input_ids": ids, "position_ids": positions, "labels": labels}

    compiled = _train_pair(model, [packed(0, [5, 7, 3]), packed(1, [9, 12])], {"attention_packed": "off"})
    wrapper = compiled._compiled_call_impl
    _, kwargs, length, bucket = wrapper.pad((), packed(2, [4, 6, 9]))
    assert (length, bucket) == (19, 32)
    assert kwargs["position_ids"][0, 19:].tolist() == list(range(13))
    assert kwargs["input_ids"].shape == (1, 32) and "attention_mask" not in kwargs


def test_bert_gets_the_mask_a_collator_would_build():
    """BERT (bidirectional): called with input_ids alone, the padded call gets ones then zeros as
    its mask, and the classifier's logits (batch, labels) are not sliced."""
    torch.manual_seed(3)
    torch._dynamo.reset()
    model = peft_wrap(tiny_causal_lm("bert"), target_modules=["query", "value", "dense"])
    assert not is_causal_model(model)
    for module in model.modules():  # dropout draws depend on the shape: off, to compare with eager
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def batch(step, length):
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(3, VOCAB, (4, length), generator=g),
                "labels": torch.randint(0, 5, (4,), generator=g)}

    compiled = _train_pair(model, [batch(0, 10), batch(1, 23)])
    _, kwargs, _, bucket = compiled._compiled_call_impl.pad((), batch(2, 10))
    assert kwargs["attention_mask"].tolist() == [[1] * 10 + [0] * 6] * 4 and bucket == 16


def test_per_token_outputs_are_cut_and_others_kept():
    from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

    qa = QuestionAnsweringModelOutput(loss=torch.tensor(1.0), start_logits=torch.randn(2, 16),
                                      end_logits=torch.randn(2, 16), hidden_states=(torch.randn(2, 16, 8),))
    cut = cut_outputs(qa, 13, 16)
    assert cut.start_logits.shape == (2, 13) and cut["end_logits"].shape == (2, 13)
    assert cut.hidden_states[0].shape == (2, 13, 8) and cut.loss.shape == ()
    classified = cut_outputs(SequenceClassifierOutput(logits=torch.randn(2, 16)), 13, 16)
    assert classified.logits.shape == (2, 16)  # (batch, labels): not per token


def test_batches_that_padding_could_change_pass_unpadded(caplog):
    model = peft_wrap(tiny_causal_lm("llama"))
    calls = []
    wrapper = LengthBuckets(model, lambda *a, **kw: calls.append((a, kw)))
    ids = torch.randint(3, VOCAB, (2, 10))
    with caplog.at_level(logging.INFO, logger="unsloth_compile.summary"):
        wrapper(input_ids=ids, loss_weights=torch.rand(2, 10))  # unknown token-aligned argument
        wrapper(ids, torch.ones(2, 10))  # a second positional tensor
        wrapper(input_ids=ids, attention_mask=torch.ones(2, 1, 10, 10))  # a 4-D mask
        model.eval()
        wrapper(input_ids=ids)  # evaluation / generation
    assert [kw.get("input_ids", a[0] if a else None).shape[1] for a, kw in calls] == [10, 10, 10, 10]
    text = caplog.text
    assert "'loss_weights'" in text and "by position" in text and "padding mask" in text


def test_causal_classifier_without_pad_token_is_not_padded():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=VOCAB, num_hidden_layers=1, num_labels=3, pad_token_id=None)
    model = tf.LlamaForSequenceClassification(cfg)
    wrapper = LengthBuckets(model, lambda *a, **kw: kw)
    assert wrapper(input_ids=torch.randint(3, VOCAB, (1, 10)))["input_ids"].shape == (1, 10)
    cfg.pad_token_id = 0
    padded = LengthBuckets(model, lambda *a, **kw: kw)(input_ids=torch.randint(3, VOCAB, (1, 10)))
    assert padded["input_ids"].shape == (1, 16) and (padded["input_ids"][0, 10:] == 0).all()


def test_option_off_compiles_without_the_wrapper():
    model = unsloth_compile.compile(peft_wrap(tiny_causal_lm("llama")), inner="aot_eager", bucket_lengths=False)
    assert not isinstance(model._compiled_call_impl, LengthBuckets)
    with pytest.raises(ValueError, match="bucket_lengths"):
        unsloth_compile.compile(peft_wrap(tiny_causal_lm("llama")), bucket_lengths="yes")


def test_dynamic_graphs_run_as_cuda_graphs_only_when_asked():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if not torch.cuda.is_available():
        pytest.importorskip("torch._subclasses.fake_tensor")
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        length = shape_env.create_unbacked_symint()
        inputs = [torch.empty(4, length, device="cuda")]
    assert cudagraphs_decision(Config(), inputs) == (False, "dynamic shapes")
    assert cudagraphs_decision(Config(cudagraphs=True), inputs) == (True, "cudagraphs=True")
    assert cudagraphs_decision(Config(cudagraphs=False), inputs)[0] is False


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_an_all_ones_mask_is_passed_on_as_none_and_a_padding_mask_kept(family, caplog):
    """A batch without padding spelled with an all-ones attention_mask reaches the compiled
    call without it (said once), as the batch without a mask does; a mask with a zero is kept.
    Training on the all-ones spelling equals eager on it."""
    model = peft_wrap(tiny_causal_lm(family), **({"target_modules": ["query", "value"]} if family == "bert" else {}))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    calls = []
    wrapper = LengthBuckets(model, lambda *a, **kw: calls.append(kw))
    ids = torch.randint(3, VOCAB, (2, 16))
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 12:] = 0
    with caplog.at_level(logging.INFO, logger="unsloth_compile.summary"):
        wrapper(input_ids=ids, attention_mask=torch.ones(2, 16, dtype=torch.long))
        wrapper(input_ids=ids, attention_mask=torch.ones(2, 16, dtype=torch.bool))
        wrapper(input_ids=ids, attention_mask=padding)
    assert ["attention_mask" in kw for kw in calls] == [False, False, True]
    assert torch.equal(calls[2]["attention_mask"], padding)
    assert caplog.text.count("all-ones attention_mask") == 1

    def batch(step, length):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(3, VOCAB, (2, length), generator=g)
        labels = torch.randint(0, 5, (2,), generator=g) if family == "bert" else ids
        return {"input_ids": ids, "attention_mask": torch.ones(2, length, dtype=torch.long), "labels": labels}

    torch._dynamo.reset()
    _train_pair(model, [batch(0, 16), batch(1, 16)])
