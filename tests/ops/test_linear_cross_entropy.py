"""Fused LM head + cross-entropy: the op against float64 eager, what it saves for backward, the
pass on hand-written models and a PEFT Llama (fused, kept because the logits are returned,
refused with the reason), loss_only, the options."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (VOCAB, batch_for, llama_batch_with_prompt, peft_wrap, saved_for_backward, saved_tensors,
                     tiny_causal_lm, train_and_compare)

import unsloth_compile
from unsloth_compile import Config, Report
from unsloth_compile.kernels import linear_cross_entropy as lce
from unsloth_compile.passes.linear_cross_entropy import LOGITS_RETURNED, fuse_linear_cross_entropy
from unsloth_compile.training_outputs import loss_only, restore_logits

OP = torch.ops.unsloth.linear_cross_entropy.default
# steps between the head and the loss, as the pass hands them to the op
STEPS = {
    "none": ([], []),
    "upcast": (["to:float32"], [0.0]),  # transformers' logits.float()
    "softcap": (["div", "tanh", "mul"], [3.0, 0.0, 3.0]),  # Gemma 2: tanh(x / c) * c
    "scale": (["mul"], [0.7]),  # Cohere: logits * logit_scale
    "divide": (["div"], [1.3]),  # Granite: logits / logits_scaling
}


def _eager_steps(z, steps, values):
    for step, value in zip(steps, values):
        z = z * value if step == "mul" else z / value if step == "div" else torch.tanh(z) if step == "tanh" \
            else z.to(lce.step_dtype(step))
    return z


def _inputs(rows=38, dim=24, vocab=53, dtype=torch.float32, seed=0, ignore_every=3, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=g, dtype=dtype)
    w = torch.randn(vocab, dim, generator=g, dtype=dtype) / dim ** 0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t


def _grads(fn, tensors):
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if x is not None else None for x in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad if x is not None and x.requires_grad else None for x in leaves]


def _eager_loss(steps, values, reduction, ignore_index=-100, rows_shape=None):
    def fn(h, w, b, t):
        logits = _eager_steps(F.linear(h, w, b), steps, values)
        return F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=ignore_index,
                               reduction=reduction)
    return fn


def _fused_loss(steps, values, reduction, chunk_rows, ignore_index=-100):
    def fn(h, w, b, t):
        return OP(h, w, b, t, ignore_index, reduction, steps, values, chunk_rows)
    return fn


def _assert_matches_float64(tensors, steps, values, reduction, chunk_rows, ignore_index=-100):
    """The op in fp32 against eager in float64: loss and every gradient."""
    f64 = [x.double().requires_grad_(x.requires_grad) if x is not None and x.is_floating_point() else x
           for x in tensors]
    steps64 = [lce.cast_step(torch.float64) if s.startswith("to:") else s for s in steps]
    want, want_grads = _grads(_eager_loss(steps64, values, reduction, ignore_index), f64)
    got, got_grads = _grads(_fused_loss(steps, values, reduction, chunk_rows, ignore_index), tensors)
    assert got.dtype == lce.logits_dtype(tensors[0].dtype, steps)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == tensors[("hidden", "weight", "bias").index(name)].dtype
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])  # 38 rows: not a multiple of 7; one chunk for all
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("steps", list(STEPS))
def test_op_matches_float64_eager(steps, reduction, chunk_rows):
    h, w, b, t = _inputs()  # vocab 53: prime; every third row ignored
    for x in (h, w, b):
        x.requires_grad_(True)
    _assert_matches_float64([h.reshape(2, 19, -1), w, b, t.reshape(2, 19)], *STEPS[steps], reduction, chunk_rows)


@pytest.mark.parametrize("rows,ignore_every", [(1, 0), (1, 1), (5, 1), (2, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_edge_rows(rows, ignore_every, reduction):
    """One row (batch 1, sequence 1); every row ignored ("mean" is 0/0 = nan as in torch, the
    gradients zero); a custom ignore_index."""
    h, w, b, t = _inputs(rows=rows, ignore_every=ignore_every)
    for x in (h, w, b):
        x.requires_grad_(True)
    _assert_matches_float64([h[None], w, b, t[None]], ["to:float32"], [0.0], reduction, 3)
    t2 = t.clone()
    t2[t2 == -100] = 7  # 7 is a class index here, used as ignore_index
    _assert_matches_float64([h, w, b, t2], [], [], reduction, 2, ignore_index=7)


def test_frozen_head_gets_no_weight_gradient(monkeypatch):
    """Only the gradients asked for are computed: a frozen weight (and no bias) gets none, and
    without grad mode no gradient is computed at all."""
    flags = []
    real = lce.linear_cross_entropy_forward

    def spy(*args):
        flags.append(args[-4:-1])  # grad_hidden, grad_weight, grad_bias (then chunk_loss)
        return real(*args)
    monkeypatch.setattr(lce, "linear_cross_entropy_forward", spy)
    h, w, _, t = _inputs(bias=False)
    h.requires_grad_(True)
    loss = OP(h, w, None, t, -100, "mean", [], [], 5)
    loss.backward()
    assert flags == [(True, False, False)] and w.grad is None and h.grad is not None
    with torch.no_grad():
        OP(h, w, None, t, -100, "mean", [], [], 5)
    assert flags[-1] == (False, False, False)


def test_backward_scales_by_the_incoming_gradient():
    h, w, b, t = _inputs()
    for x in (h, w, b):
        x.requires_grad_(True)
    want, want_grads = _grads(lambda *a: 2.5 * _eager_loss([], [], "sum")(*a), [h, w, b, t])
    got, got_grads = _grads(lambda *a: 2.5 * OP(*a, -100, "sum", [], [], 4), [h, w, b, t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,steps,tol", [(torch.float32, [], 1e-5), (torch.float16, ["to:float32"], 2e-3)])
def test_triton_chunk_loss_equals_the_torch_chunks(monkeypatch, dtype, steps, tol):
    """A chunk's loss and gradient by the Triton cross-entropy kernels (impl "auto": CUDA, or
    the interpreter here) equal the plain-torch chunks (impl "reference"): 53 columns (no
    multiple of a tile), ignored rows, chunks of 5 of 38 rows, weight and bias gradients."""
    from unsloth_compile.kernels.launch_args import interpreting
    from unsloth_compile.ops import cross_entropy

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton path runs on CUDA or in the interpreter (TRITON_INTERPRET=1)")
    calls = []
    real = cross_entropy.triton_chunk_loss
    monkeypatch.setattr(cross_entropy, "triton_chunk_loss", lambda *a: calls.append(1) or real(*a))
    h, w, b, t = _inputs(dtype=dtype)
    results = {}
    for impl in ("auto", "reference"):
        leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
        loss = OP(*leaves, t, -100, "mean", steps, [0.0] * len(steps), 5, impl)
        loss.backward()
        results[impl] = [loss.detach()] + [x.grad for x in leaves]
    assert len(calls) == 8  # ceil(38 / 5) chunks, all on the Triton path; none with "reference"
    for got, want in zip(results["auto"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_opcheck():
    h, w, b, t = _inputs(rows=12)
    h, w, b = (x.requires_grad_(True) for x in (h, w, b))
    torch.library.opcheck(OP, (h.reshape(3, 4, -1), w, b, t.reshape(3, 4), -100, "mean", ["to:float32"], [0.0], 5))
    torch.library.opcheck(torch.ops.unsloth.linear_cross_entropy_forward.default,
                          (h, w, None, t, -100, "sum", ["div", "tanh", "mul"], [2.0, 0.0, 2.0], 5, True, True, False))


def test_saved_for_backward_holds_no_rows_by_vocab_tensor():
    """What autograd keeps between forward and backward: dh (rows x D) and, for a trainable
    head, dW (V x D); never a (rows x V) tensor."""
    rows, dim, vocab = 64, 8, 301
    for trainable in (False, True):
        h, w, _, t = _inputs(rows=rows, dim=dim, vocab=vocab, bias=False)
        h.requires_grad_(True)
        w.requires_grad_(trainable)
        loss, tensors = saved_tensors(lambda: OP(h, w, None, t, -100, "mean", ["to:float32"], [0.0], 8))
        saved = [tuple(x.shape) for x in tensors]
        del tensors
        loss.backward()
        big = [s for s in saved if torch.Size(s).numel() >= rows * vocab]
        assert not big, saved
        assert (rows, dim) in saved and ((vocab, dim) in saved) == trainable, saved


# ----------------------------------------------------------------------------- hand-written models


NO_LORA = {"inner": "aot_eager", "summary": False}  # these models have no adapter: no "nothing fused" warning


class HandWrittenLM(nn.Module):
    """Embedding -> a trainable layer -> head -> `F.cross_entropy(head(h).view(-1, V), y)`."""

    def __init__(self, vocab=37, dim=16, head="trainable", steps="upcast", reduction="mean", ce_kwargs=None,
                 return_logits=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layer = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=head == "bias")
        if head == "tied":
            self.head.weight = self.emb.weight
        if head == "frozen":
            self.head.weight.requires_grad_(False)
        self.vocab, self.steps, self.reduction = vocab, steps, reduction
        self.ce_kwargs, self.return_logits = ce_kwargs or {}, return_logits

    def forward(self, ids, labels):
        logits = self.head(torch.tanh(self.layer(self.emb(ids))))
        if self.steps == "upcast":
            logits = logits.float()
        elif self.steps == "softcap":
            logits = torch.tanh(logits / 5.0) * 5.0
        elif self.steps == "scale":
            logits = logits * 0.5
        loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), reduction=self.reduction,
                               **self.ce_kwargs)
        return (loss, logits) if self.return_logits else loss


def _lm_batches(vocab=37, batch=3, seq=7):
    def make(step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
        labels[:, ::3] = -100
        return ids, labels
    return make


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("head,steps,reduction", [("trainable", "upcast", "mean"), ("frozen", "softcap", "sum"),
                                                  ("tied", "scale", "mean"), ("bias", "none", "mean")])
def test_hand_written_model_fuses_and_trains_like_eager(head, steps, reduction):
    result = train_and_compare(HandWrittenLM(head=head, steps=steps, reduction=reduction), _lm_batches(), steps=2,
                               loss_fn=_first, options=NO_LORA)
    report = result.report
    assert report.counters["linear_cross_entropy.fused"] == report.graphs == 1, str(report)
    (site,) = [s for s in report.sites if s.pattern == "linear_cross_entropy"]
    assert site.module == "head" and site.details["weight_grad"] == (head != "frozen"), str(report)
    assert site.details["bias"] == (head == "bias") and site.details["reduction"] == reduction
    assert site.details["steps"] == {"upcast": ["to:float32"], "softcap": ["div", "tanh", "mul"], "scale": ["mul"],
                                     "none": []}[steps]


def test_pass_invariants_meta_code_idempotent():
    """passes/README.md's invariants: true meta on the new node, the head and the loss gone from
    the generated code, a second run finds nothing, the rewritten graph computes what the
    module does."""
    model = HandWrittenLM(head="frozen", steps="softcap")
    ids, labels = _lm_batches()(0)
    reports, graphs = [], []

    def rewrite(gm, example_inputs):
        reports.append(Report())
        fuse_linear_cross_entropy(gm, Config(), reports[-1])
        graphs.append(gm)
        return gm.forward
    out = torch.compile(model, backend=rewrite, fullgraph=True)(ids, labels)
    torch.testing.assert_close(out, model(ids, labels))
    (gm,) = graphs
    (node,) = [n for n in gm.graph.nodes if n.target is OP]
    assert node.meta["example_value"].shape == () and node.meta["val"] is node.meta["example_value"]
    code = gm.code
    assert "torch.ops.unsloth.linear_cross_entropy" in code and "functional.cross_entropy" not in code
    assert code.count("torch._C._nn.linear(") == 1  # the layer's; the head's is inside the op
    again = Report()
    fuse_linear_cross_entropy(gm, Config(), again)
    assert again.sites == [] and reports[0].counters["linear_cross_entropy.fused"] == 1


def test_changing_sequence_length_fuses_every_graph():
    """A new sequence length each step: Dynamo recompiles with a symbolic row count, the site
    still fuses (chunk_rows depends on the vocabulary only)."""
    def batches(step):
        return _lm_batches(seq=7 + 2 * step)(step)
    report = train_and_compare(HandWrittenLM(head="tied"), batches, steps=3, loss_fn=_first, options=NO_LORA).report
    assert report.counters["linear_cross_entropy.fused"] == report.graphs == 2, str(report)
    assert isinstance(report.fused[-1].details["rows"], str)  # symbolic: "3*s.."


def test_real_inductor_trains_like_eager():
    """The default inner compiler (what runs on a GPU): Inductor calls the op as an extern
    kernel with the fake impl's shapes and strides; a trainable tied head, softcap."""
    report = train_and_compare(HandWrittenLM(head="tied", steps="softcap"), _lm_batches(), steps=2, loss_fn=_first,
                               options={"summary": False}).report
    assert report.counters["linear_cross_entropy.fused"] == 1, str(report)


@pytest.mark.parametrize("ce_kwargs,reason", [
    ({"label_smoothing": 0.1}, "label_smoothing=0.1 is not fused"),
    ({"reduction": "none"}, "reduction='none' is not fused"),
])
def test_refused_arguments_are_reported_and_left_as_eager(ce_kwargs, reason):
    reduction = ce_kwargs.pop("reduction", "mean")
    model = HandWrittenLM(reduction=reduction, ce_kwargs=ce_kwargs)
    loss_fn = (lambda out: out.sum()) if reduction == "none" else _first
    result = train_and_compare(model, _lm_batches(), steps=1, loss_fn=loss_fn, options=NO_LORA)
    report = result.report
    assert not report.counters["linear_cross_entropy.fused"]
    assert report.refusal_reasons() == {reason + (" (only 0)" if "smoothing" in reason else " (mean or sum)"): 1}


def test_logits_also_returned_are_kept():
    result = train_and_compare(HandWrittenLM(return_logits=True), _lm_batches(), steps=1, loss_fn=_first,
                               options=NO_LORA)
    (site,) = result.report.sites
    assert (site.decision, site.reason) == ("kept", LOGITS_RETURNED)


def test_head_computed_otherwise_is_refused_with_reason():
    class MatmulHead(HandWrittenLM):
        def forward(self, ids, labels):
            logits = self.layer(self.emb(ids)) @ self.head.weight.t() + 1.0  # not a linear, and a shift
            return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))
    report = train_and_compare(MatmulHead(), _lm_batches(), steps=1, options=NO_LORA).report
    (site,) = report.refused
    assert site.reason.startswith("the logits come from") and "not from a linear head" in site.reason


# ----------------------------------------------------------------------------- transformers + PEFT


def _llama(tie=False):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(cfg)


def test_peft_llama_with_loss_only_fuses_and_trains_like_eager():
    """The common case: PEFT LoRA on every projection, frozen head; the loss and every LoRA
    gradient (through the head's input) as eager for 2 AdamW steps."""
    model = loss_only(peft_wrap(tiny_causal_lm("llama")))
    report = train_and_compare(model, llama_batch_with_prompt, steps=2).report
    assert report.counters["linear_cross_entropy.fused"] == report.graphs == 1, str(report)
    assert report.counters["lora_linear.fused"] == 14 and not report.refused, str(report)
    (site,) = [s for s in report.fused if s.pattern == "linear_cross_entropy"]
    assert site.module == "base_model.model.lm_head" and not site.details["weight_grad"]
    assert site.details["steps"] == ["to:float32"] and site.details["reduction"] == "mean"


def test_full_fine_tuning_of_a_tied_llama_with_num_items_in_batch():
    """Trainable tied embedding/head (its gradient from both uses), Trainer's gradient
    accumulation form: reduction "sum" divided by num_items_in_batch."""
    model = loss_only(_llama(tie=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight

    def batch(step):
        b = llama_batch_with_prompt(step)
        b["num_items_in_batch"] = torch.tensor(30)
        return b
    report = train_and_compare(model, batch, steps=2).report
    (site,) = [s for s in report.fused if s.pattern == "linear_cross_entropy"]
    assert site.details["weight_grad"] and site.details["reduction"] == "sum", str(report)


def test_stock_llama_returns_logits_so_the_site_is_kept():
    report = unsloth_compile.explain(peft_wrap(tiny_causal_lm("llama")), **batch_for("llama"))
    (site,) = [s for s in report.sites if s.pattern == "linear_cross_entropy"]
    assert (site.module, site.decision, site.reason) == ("base_model.model.lm_head", "kept", LOGITS_RETURNED)
    assert not report.refused


def test_lora_on_the_head_is_refused_with_reason():
    model = loss_only(peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj", "lm_head"]))
    report = unsloth_compile.explain(model, **batch_for("llama"))
    (site,) = [s for s in report.sites if s.pattern == "linear_cross_entropy"]
    assert site.decision == "refused" and "LoRA adapters" in site.reason, str(report)
    assert report.counters["lora_linear.fused"] == 3


def test_option_off_and_chunk_option():
    model = loss_only(peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"]))
    report = unsloth_compile.explain(model, **batch_for("llama"), options={"fuse_cross_entropy": False})
    assert not [s for s in report.sites if s.pattern == "linear_cross_entropy"]
    torch._dynamo.reset()
    report = unsloth_compile.explain(model, **batch_for("llama"), options={"cross_entropy_chunk_mib": 1})
    (site,) = [s for s in report.fused if s.pattern == "linear_cross_entropy"]
    assert site.details["chunk_rows"] == lce.chunk_rows_for(VOCAB, 2**20) == 2**20 // (4 * VOCAB)
    assert Config(cross_entropy_chunk_mib="64").cross_entropy_chunk_mib == 64
    for bad in (0, -1, 1.5, True, "x"):
        with pytest.raises(ValueError, match="cross_entropy_chunk_mib"):
            Config(cross_entropy_chunk_mib=bad)


def test_saved_bytes_compiled_fused_vs_unfused():
    """End to end under aot_eager: the fused graph saves no logits for backward (the unfused
    one saves the fp32 logits or their softmax, rows x V)."""
    rows, vocab = 3 * 40, 997
    model = HandWrittenLM(vocab=vocab, head="frozen")
    ids, labels = _lm_batches(vocab, batch=3, seq=40)(0)

    def saved_bytes(options):
        compiled = torch.compile(copy.deepcopy(model), backend="unsloth", options={"inner": "aot_eager", **options})
        compiled(ids, labels).backward()  # compile outside the measurement
        return saved_for_backward(lambda: compiled(ids, labels))[0]
    unfused = saved_bytes({"fuse_cross_entropy": False})
    fused = saved_bytes({})
    assert unfused - fused >= rows * vocab * 4, (unfused, fused)


# ----------------------------------------------------------------------------- loss_only


def test_loss_only_drops_logits_in_training_only_and_survives_deepcopy():
    model = tiny_causal_lm("llama")
    signature = inspect.signature(model.forward)
    assert loss_only(loss_only(model)) is model  # idempotent
    assert inspect.signature(model.forward) == signature  # Trainer reads it to keep the batch's columns
    batch = batch_for("llama")
    out = model(**batch)
    assert out.logits is None and out.loss is not None and "logits" not in out
    copied = copy.deepcopy(model)
    assert copied.forward.__self__ is copied  # bound to the copy, not the original
    model.eval()
    assert model(**batch).logits.shape == (2, 12, VOCAB)
    assert model(input_ids=batch["input_ids"]).logits is not None  # no loss: returned as is
    model.train()
    restore_logits(model)
    assert "forward" not in model.__dict__ and model(**batch).logits is not None


def test_trainer_with_loss_only_fuses_trains_like_eager_and_still_predicts_logits(tmp_path):
    """The documented path: loss_only + UnslothCompileCallback under Trainer (its column
    filtering reads the forward's signature); losses as the eager Trainer's; evaluation and
    prediction (eval mode) still get the logits."""
    import transformers as tf

    from unsloth_compile import UnslothCompileCallback
    from unsloth_compile.report import collect_reports

    ids = torch.randint(2, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "labels": ids}] * 6

    def train(model, out, callbacks=()):
        args = tf.TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                                    learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                    save_strategy="no", disable_tqdm=True)
        trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
        trainer.train()
        return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    model = peft_wrap(tiny_causal_lm("llama"))
    _, losses_eager = train(copy.deepcopy(model), tmp_path / "eager")
    with collect_reports() as report:
        trainer, losses = train(loss_only(model), tmp_path / "compiled",
                                [UnslothCompileCallback({"inner": "aot_eager", "summary": False})])
    assert report.counters["linear_cross_entropy.fused"] == 1, str(report)
    torch.testing.assert_close(losses, losses_eager, rtol=1e-4, atol=1e-4)
    assert trainer.predict(data[:2]).predictions.shape == (2, 12, VOCAB)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True])
def test_cuda_bf16_against_float64(trainable):
    """bf16 head and hidden (the llama-1b preset's dtypes) with transformers' fp32 upcast: the
    loss and gradients no further from float64 than eager bf16's, within a bound."""
    torch.manual_seed(0)
    rows, dim, vocab = 1024, 256, 32003
    h = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, dim, device="cuda") / dim ** 0.5).bfloat16().requires_grad_(trainable)
    t = torch.randint(0, vocab, (rows,), device="cuda")
    t[::5] = -100
    steps, values = ["to:float32"], [0.0]
    ref_loss, ref_grads = _grads(_eager_loss([lce.cast_step(torch.float64)], [0.0], "mean"),
                                 [h.double().requires_grad_(True), w.double().requires_grad_(trainable), None, t])
    eager_loss, eager_grads = _grads(_eager_loss(steps, values, "mean"), [h, w, None, t])
    loss, grads = _grads(_fused_loss(steps, values, "mean", 100), [h, w, None, t])
    assert abs(loss.double() - ref_loss) <= max(2 * abs(eager_loss.double() - ref_loss), 1e-4 * ref_loss.abs())
    for g, e, r in zip(grads, eager_grads, ref_grads):
        if r is None:
            assert g is None
            continue
        err, eager_err = (g.double() - r).norm() / r.norm(), (e.double() - r).norm() / r.norm()
        assert err <= max(1.5 * eager_err, 1e-2), (err, eager_err)
        assert F.cosine_similarity(g.double().flatten(), r.flatten(), dim=0) > 0.9999


@pytest.mark.gpu
def test_cuda_peak_memory_stays_under_the_full_logits():
    """llama-1b's head at 4 x 2048 tokens: the fused op's forward + backward peak above its
    inputs stays well under the fp32 logits eager materialises (4.2 GB)."""
    rows, dim, vocab = 8192, 2048, 128256
    h = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16) / dim ** 0.5
    t = torch.randint(0, vocab, (rows,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    OP(h, w, None, t, -100, "mean", ["to:float32"], [0.0], lce.chunk_rows_for(vocab, 256 * 2**20)).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < rows * vocab * 4 / 3, f"{extra / 2**30:.2f} GiB above the inputs"
