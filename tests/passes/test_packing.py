"""passes/packed_attention.py: padding-free batches (sequences packed into one row, position_ids
restarting at each sequence, no attention_mask) attend only within their own sequence.

The oracle is the unpacked eager model: each sequence run alone. Packed and compiled, every
sequence's loss and every LoRA gradient must match it. transformers' decoders called with
their config's default use_cache=True skip their own packed-sequence detection (a cache is in
play) and attend across the boundaries, eagerly and compiled; with use_cache=False they build
the block-diagonal mask themselves. Both spellings are checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unsloth_compile import Config, Report
from unsloth_compile.passes.attention import SDPA_TARGETS
from unsloth_compile.passes.packed_attention import mask_packed_sequences
from unsloth_compile.report import collect_reports

from helpers import VOCAB, dynamo_graphs, peft_wrap, tiny_causal_lm

LENGTHS = (1, 7, 13, 3)  # awkward: a single token, primes, not multiples of anything


def _sequences(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (1, n), generator=g) for n in lengths]


def _packed(seqs):
    ids = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    return ids, positions


def _sequence_losses(logits, seqs):
    """Each sequence's mean next-token loss, from the packed (1, T, V) or a lone (1, n, V) row."""
    losses, start = [], 0
    for s in seqs:
        n = s.shape[1]
        if n > 1:
            losses.append(F.cross_entropy(logits[0, start:start + n - 1], s[0, 1:]))
        start += n
    return torch.stack(losses) if losses else logits.new_zeros(0)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _model(family, seed=0):
    torch.manual_seed(seed)
    model = peft_wrap(tiny_causal_lm(family))
    model.train()  # no dropout in the tiny configs: train mode, deterministic
    return model


def _unpacked_eager(model, seqs):
    model.zero_grad()
    logits = [model(input_ids=s).logits for s in seqs]
    losses = torch.cat([_sequence_losses(l, [s]) for l, s in zip(logits, seqs)])
    losses.sum().backward()
    return torch.cat(logits, 1).detach(), losses.detach(), _lora_grads(model)


def _packed_compiled(model, seqs, options=None, **kwargs):
    model.zero_grad()
    ids, positions = _packed(seqs)
    compiled = torch.compile(model, backend="unsloth", options={"inner": "aot_eager", **(options or {})})
    with collect_reports() as report:
        logits = compiled(input_ids=ids, position_ids=positions, **kwargs).logits
    losses = _sequence_losses(logits, seqs)
    losses.sum().backward()
    return logits.detach(), losses.detach(), _lora_grads(model), report


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("use_cache", [None, False])
@pytest.mark.parametrize("route", ["auto", "varlen"])
def test_packed_losses_and_lora_grads_match_unpacked_eager(family, use_cache, route):
    """"auto" on CPU is the block-diagonal mask; "varlen" is torch.ops.unsloth.packed_attention
    (its reference here, flash-attention's varlen kernels on CUDA)."""
    torch._dynamo.reset()
    model = _model(family)
    seqs = _sequences()
    expected_logits, expected_losses, expected_grads = _unpacked_eager(model, seqs)
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    logits, losses, grads, report = _packed_compiled(model, seqs, options={"attention_packed": route}, **kwargs)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)  # the 1-token one too
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) == 28  # 14 LoRA sites, A and B
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert report.counters["lora_linear.fused"] == 14 and not report.counters["lora_linear.refused"]
    if use_cache is None:  # transformers passed is_causal=True: the pass masks the boundaries
        assert report.counters["attention.packed"] == 2
        assert report.counters["attention.packed_varlen"] == (2 if route == "varlen" else 0)


def test_attention_never_crosses_a_sequence_boundary():
    """Changing every token of the first sequences changes nothing after them."""
    torch._dynamo.reset()
    model = _model("llama").eval()
    seqs = _sequences()
    other = [torch.randint(2, VOCAB, s.shape, generator=torch.Generator().manual_seed(9)) for s in seqs[:2]]
    compiled = torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})
    with torch.no_grad():
        ids, positions = _packed(seqs)
        before = compiled(input_ids=ids, position_ids=positions).logits
        ids, positions = _packed(other + list(seqs[2:]))
        after = compiled(input_ids=ids, position_ids=positions).logits
    boundary = sum(s.shape[1] for s in seqs[:2])
    assert not torch.allclose(before[:, :boundary], after[:, :boundary])
    torch.testing.assert_close(after[:, boundary:], before[:, boundary:], rtol=1e-5, atol=1e-6)


def test_pass_rewrites_causal_calls_to_the_block_diagonal_mask():
    torch._dynamo.reset()
    model = _model("llama")
    ids, positions = _packed(_sequences())
    (gm,) = dynamo_graphs(model, input_ids=ids, position_ids=positions)
    report = Report()
    mask_packed_sequences(gm, Config(), report)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert len(calls) == 2 and report.counters["attention.packed"] == 2
    masks = {n.kwargs["attn_mask"] for n in calls}
    assert len(masks) == 1  # built once per graph
    for n in calls:
        assert n.kwargs.get("is_causal") is False and not n.kwargs.get("enable_gqa", False)
        k, q = n.args[1].meta["example_value"], n.args[0].meta["example_value"]
        assert k.shape[1] == q.shape[1]  # k and v at the query heads: a masked call takes no GQA
    # the mask's value for these positions: causal inside each sequence, nothing across
    mask = _evaluate_mask(gm, masks.pop(), positions)
    expected = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in LENGTHS])
    assert torch.equal(mask[0, 0], expected)


def _evaluate_mask(gm, mask_node, positions):
    """Run the graph's mask-building nodes on real position_ids."""
    env = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if "position_ids" in node.name:
                env[node] = positions
            continue
        if not all(a in env for a in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        env[node] = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" \
            else node.target(*args, **kwargs)
        if node is mask_node:
            return env[node]
    raise AssertionError("mask not computed from position_ids alone")


def test_unpacked_position_ids_give_the_causal_model():
    """position_ids 0..L-1 per row (one sequence each): the mask is SDPA's causal mask."""
    torch._dynamo.reset()
    model = _model("qwen2").eval()
    ids = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(11)[None].expand(2, -1)
    expected = model(input_ids=ids, use_cache=False).logits
    with collect_reports() as report:
        got = torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})(
            input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert report.counters["attention.packed"] == 2


def test_packed_rows_with_changing_total_length_compile_dynamic():
    """Every step packs a different total length: symbolic sizes, still exact."""
    torch._dynamo.reset()
    model = _model("llama").eval()
    compiled = torch.compile(model, backend="unsloth", dynamic=True, options={"inner": "aot_eager"})
    for seed, lengths in enumerate([(4, 9, 2), (1, 6, 5, 8), (13,)]):
        seqs = _sequences(lengths, seed=seed)
        ids, positions = _packed(seqs)
        with torch.no_grad(), collect_reports() as report:
            got = compiled(input_ids=ids, position_ids=positions).logits
            expected = torch.cat([model(input_ids=s).logits for s in seqs], 1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not report.counters["attention.refused"]


def test_attention_mask_in_the_batch_leaves_the_calls_alone():
    """With an attention_mask transformers does not unpack (eager's rule): nothing rewritten."""
    torch._dynamo.reset()
    model = _model("llama")
    ids, positions = _packed(_sequences())
    (gm,) = dynamo_graphs(model, input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids))
    report = Report()
    mask_packed_sequences(gm, Config(), report)
    assert not report.sites


def test_option_off_leaves_packed_rows_as_transformers_runs_them():
    torch._dynamo.reset()
    model = _model("llama")
    seqs = _sequences()
    *_, report = _packed_compiled(model, seqs, options={"attention_packed": False})
    assert not report.counters["attention.packed"]
