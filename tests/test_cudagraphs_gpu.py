"""CUDA graphs (backend option `cudagraphs`, on by default for static shapes): training stays
what eager computes.

GPU only. A tiny PEFT Llama in fp32 (so that the compiled step can be held to eager closely)
trains under the default `backend="unsloth"` (Inductor with cudagraph trees) and eagerly, side
by side, in the ways that stress recorded graphs: a plain loop, gradient accumulation (the
previous backward's gradients are alive when the next forward replays), sequence lengths that
change (Dynamo makes the graph dynamic; those run without graphs), a LoRA rank change
between steps (recompilation, new recordings), and losses kept as tensors across steps (read
only at the end, after later replays).
"""

from __future__ import annotations

import copy

import pytest
import torch

gpu = pytest.mark.gpu


def _model():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    base = transformers.LlamaForCausalLM(cfg).to("cuda")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
    return model


def _train(model, batches, accumulate=1, resize_at=None, keep_tensors=False):
    from unsloth_compile.rank import set_rank

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step, ids in enumerate(batches):
        if resize_at is not None and step == resize_at:
            torch.manual_seed(123)  # a grow draws the new rows: the same ones in both runs
            set_rank(getattr(model, "_orig_mod", model), 6, optimizer=opt)
        loss = model(input_ids=ids, labels=ids).loss
        (loss / accumulate).backward()
        losses.append(loss.detach() if keep_tensors else loss.item())
        if (step + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [float(loss) for loss in losses]  # kept tensors are read only now


def _batches(lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, n), generator=g).cuda() for n in lengths]


@gpu
@pytest.mark.parametrize("case", ["plain", "accumulate", "dynamic", "resize", "keep"])
def test_cuda_graphs_train_like_eager(case):
    import unsloth_compile  # noqa: F401

    lengths = {"dynamic": [16, 24, 16, 40, 24, 16]}.get(case, [16] * 6)
    kwargs = {"accumulate": {"accumulate": 2}, "resize": {"resize_at": 3},
              "keep": {"keep_tensors": True}}.get(case, {})
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="unsloth")  # the default: graphs for static shapes
    expected = _train(eager, _batches(lengths), **kwargs)
    got = _train(compiled, _batches(lengths), **kwargs)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-3, atol=2e-3)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=2e-3, atol=2e-3, msg=lambda m, name=name: f"{name}: {m}")


@gpu
def test_default_records_cuda_graphs_and_the_option_turns_them_off():
    from torch._inductor import cudagraph_trees

    import unsloth_compile  # noqa: F401

    for cudagraphs, expected in ((None, True), (False, False), (True, True)):  # None is the default
        torch._dynamo.reset()
        cudagraph_trees.reset_cudagraph_trees()
        model = _model()
        compiled = torch.compile(model, backend="unsloth", options={"cudagraphs": cudagraphs})
        _train(compiled, _batches([16] * 3))
        manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
        recorded = manager is not None and len(manager.roots) > 0
        assert recorded is expected, cudagraphs


@gpu
def test_bucketed_varying_lengths_run_without_cuda_graphs_unless_asked():
    """`unsloth_compile.compile` pads each batch to a length bucket and compiles one dynamic graph;
    by default that graph runs as plain Inductor code (a recording per bucket met costs more than
    its replays save), cudagraphs=True records it per bucket. Losses equal eager's either way."""
    from torch._inductor import cudagraph_trees

    import unsloth_compile

    lengths = [20, 37, 50, 20, 37]  # every one needs padding: the first graph is dynamic at once
    expected = _train(_model(), _batches(lengths))
    for cudagraphs, recorded in ((None, False), (True, True)):
        torch._dynamo.reset()
        cudagraph_trees.reset_cudagraph_trees()
        compiled = unsloth_compile.compile(_model(), cudagraphs=cudagraphs)
        got = _train(compiled, _batches(lengths))
        manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
        assert (manager is not None and len(manager.roots) > 0) is recorded, cudagraphs
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-3, atol=2e-3)
