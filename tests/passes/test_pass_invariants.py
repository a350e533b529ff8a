"""passes/README.md invariants: meta stays true, no aliasing, usable in a user's own pipeline."""

import operator

import torch

from unsloth_compile import Config, Report, fuse_lora_linears
from helpers import batch_for, count_lora_layers, dynamo_graphs, peft_wrap, tiny_causal_lm


def capture(model, batch):
    return dynamo_graphs(model, **batch)


def test_user_pipeline_meta_and_generated_code():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.1, target_modules=["q_proj", "o_proj"])
    batch = batch_for("llama")
    (gm,) = capture(model, batch)
    original = set(gm.graph.nodes)
    report = Report()
    fuse_lora_linears(gm, Config(), report)
    assert report.counters["lora_linear.fused"] == count_lora_layers(model) == 4
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.unsloth.lora_linear.default]
    assert len(ops) == 4
    assert gm.code.count("torch.ops.unsloth.lora_linear.default") == 4
    created = [n for n in gm.graph.nodes if n not in original]
    assert len(created) == 16  # 4 x (native_dropout, its mask, op, getitem): dropout as a mask
    masks = [op.args[13] for op in ops]
    assert all(m.target is operator.getitem and m.args[0].target is torch.native_dropout for m in masks)
    assert all(op.args[6] is None and op.args[14] == 1.0 / (1.0 - 0.1) for op in ops)  # no lora_x
    assert not any(n.target is torch.nn.functional.dropout and n.args[1] == 0.1 for n in gm.graph.nodes)
    for node in created:
        assert "example_value" in node.meta, node.format_node()
    for op in ops:
        out, hidden = op.meta["example_value"]
        users = list(op.users)
        assert all(u.target is operator.getitem and u.args[1] == 0 for u in users)
        assert out.shape == op.args[0].meta["example_value"].shape  # q/o: N == K here
        assert hidden.shape == (out.shape[0] * out.shape[1], 4)  # (M, r)
        assert op.meta["val"] is op.meta["example_value"]
    # no adapter linear survives: the LoRA A/B weights are read only by the fused ops
    for node in gm.graph.nodes:
        if node.op == "placeholder" and "lora" in node.target.lower():
            assert all(u.target is torch.ops.unsloth.lora_linear.default for u in node.users), node.target


def test_rewritten_graph_runs_and_matches_the_original_module():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, target_modules="all-linear")
    batch = batch_for("llama")
    (gm,) = capture(model, batch)
    expected = model(**batch).logits

    def backend(gm, example_inputs):
        return fuse_lora_linears(gm).forward

    got = torch.compile(model, backend=backend)(**batch).logits
    torch.testing.assert_close(got, expected)


def test_pass_is_idempotent():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["v_proj"])
    (gm,) = capture(model, batch_for("llama"))
    fuse_lora_linears(gm)
    code = gm.code
    report = Report()
    fuse_lora_linears(gm, Config(), report)
    assert gm.code == code and report.counters["lora_linear.fused"] == 0
