"""Regional compilation (option compile_regions="layers", unsloth_compile/regions.py): the repeated
blocks of a tiny Llama and a tiny BERT compiled once per block class, the rest compiled around
them; losses, logits and every LoRA gradient equal eager's, every LoRA site fused, the number of
backend compiles the same for 2 and 6 layers and bounded over many lengths; the refusal where no
repeated block exists; the option refused by the plain backend."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import unsloth_compile
from unsloth_compile.regions import BlockCall, find_block_lists
from unsloth_compile.report import collect_reports

from helpers import VOCAB, count_lora_layers, peft_wrap


def _llama(layers: int) -> torch.nn.Module:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, num_hidden_layers=layers)
    return peft_wrap(tf.LlamaForCausalLM(cfg))


def _bert(layers: int) -> torch.nn.Module:
    import transformers as tf

    # dropout off: the regions draw their dropout masks in another order than eager
    cfg = tf.BertConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64,
                        num_labels=5, vocab_size=VOCAB, num_hidden_layers=layers, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, problem_type="single_label_classification")
    return peft_wrap(tf.BertForSequenceClassification(cfg))


def _llama_batch(step: int, length: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, max(2, length - 3):] = 0  # right padding in one row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _bert_batch(step: int, length: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, VOCAB, (2, length), generator=g),
            "labels": torch.randint(0, 5, (2,), generator=g)}


def _train_pair(model, batches, **options):
    """Eager and compile_regions="layers" copies trained side by side on `batches`: every loss,
    tensor output and LoRA gradient compared. Returns (compiled model, merged report)."""
    options = {"inner": "aot_eager", "summary": False, "report": False, "compile_regions": "layers", **options}
    eager = model
    with collect_reports() as report:
        compiled = unsloth_compile.compile(copy.deepcopy(model), **options)
    named_e = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    params_c = [p for p in compiled.parameters() if p.requires_grad]
    assert named_e and any("lora_A" in n for n, _ in named_e)
    opt_e = torch.optim.AdamW([p for _, p in named_e], lr=1e-3)
    opt_c = torch.optim.AdamW(params_c, lr=1e-3)
    with collect_reports() as graphs:
        for step, batch in enumerate(batches):
            out_e, out_c = eager(**batch), compiled(**batch)
            for key, value in out_e.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(out_c[key], value, rtol=1e-4, atol=1e-5,
                                               msg=lambda m, key=key: f"step {step} {key}: {m}")
            out_e.loss.backward()
            out_c.loss.backward()
            for (name, pe), pc in zip(named_e, params_c):
                assert pc.grad is not None, f"step {step}: no gradient for {name}"
                torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, name=name: f"step {step} grad of {name}: {m}")
            opt_e.step(), opt_c.step(), opt_e.zero_grad(), opt_c.zero_grad()
    report.merge(graphs)
    return compiled, report


def _lora_sites(report) -> tuple[set, set]:
    fused = {s.module for s in report.sites if s.pattern == "lora_linear" and s.decision == "fused"}
    refused = {s.module for s in report.refused if s.pattern == "lora_linear"}
    return fused, refused


def test_finds_the_decoder_layers_through_peft():
    model = _llama(4)
    (found,) = find_block_lists(model)
    assert found.path == "base_model.model.model.layers"
    assert found.holder is model.get_base_model().model
    assert len(found.blocks) == 4
    (found,) = find_block_lists(_bert(3))
    assert found.path == "base_model.model.bert.encoder.layer"


@pytest.mark.smoke
def test_llama_layers_equal_eager_and_every_lora_site_fused():
    model = _llama(4)
    batches = [_llama_batch(step, n) for step, n in enumerate((12, 20, 12))]
    compiled, report = _train_pair(model, batches)
    fused, refused = _lora_sites(report)
    # one block's seven projections (paths inside the block), and no LoRA linear refused
    assert fused == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert not refused
    layers = compiled.get_base_model().model.layers
    assert all(isinstance(layer._compiled_call_impl, BlockCall) for layer in layers)
    assert report.counters["compile_regions.compiled"] == 1
    # the head and loss reached a graph of the backend too: the rest of the model is compiled
    assert any(s.pattern == "linear_cross_entropy" for s in report.sites)


def test_bert_layers_equal_eager_and_every_lora_site_fused():
    model = _bert(4)
    batches = [_bert_batch(step, n) for step, n in enumerate((12, 20, 9))]
    _, report = _train_pair(model, batches)
    fused, refused = _lora_sites(report)
    assert {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense"} <= fused
    assert {"classifier", "pooler.dense"} <= fused  # outside the blocks: compiled around them
    assert not refused


def _backend_compiles(model_fn, layers: int, lengths) -> int:
    torch._dynamo.reset()
    model = model_fn(layers)
    batch = _llama_batch if model_fn is _llama else _bert_batch
    _, report = _train_pair(model, [batch(step, n) for step, n in enumerate(lengths)])
    return report.graphs


@pytest.mark.parametrize("model_fn", [_llama, _bert], ids=["llama", "bert"])
def test_compiles_do_not_grow_with_the_number_of_layers(model_fn):
    lengths = (12, 20)
    two, six = _backend_compiles(model_fn, 2, lengths), _backend_compiles(model_fn, 6, lengths)
    assert two == six, f"{two} backend compiles with 2 layers, {six} with 6"


def test_lengths_add_no_compiles_beyond_the_bounded_set():
    model = _llama(3)
    lengths = (12, 20, 33, 47, 9, 64, 40, 27)  # buckets 16, 32, 48, 48, 16, 64, 48, 32
    compiled, report = _train_pair(model, [_llama_batch(step, n) for step, n in enumerate(lengths)])
    assert compiled._compiled_call_impl.buckets_seen == {16, 32, 48, 64}
    block_graphs = sum(1 for s in report.sites if s.pattern == "lora_linear" and s.module == "self_attn.q_proj")
    # the first batch needed padding: the blocks are compiled for a dynamic length at once, one
    # graph for the first block (whose input needs no gradient) and one for the rest
    assert block_graphs == 2, block_graphs
    # and no compile after the first step: every later length reuses the dynamic graphs
    torch._dynamo.reset()
    _, first = _train_pair(_llama(3), [_llama_batch(0, lengths[0])])
    assert report.graphs == first.graphs


def test_summary_counts_every_block_a_shared_graph_fuses(caplog):
    """One region graph serves all blocks: the summary counts the model's LoRA layers it fuses
    (all of them), not the sites of one block, and says it once."""
    model = _llama(3)
    compiled = unsloth_compile.compile(model, inner="aot_eager", report=False, compile_regions="layers")
    with caplog.at_level(logging.INFO, logger="unsloth_compile"):
        for step, length in enumerate((12, 20)):
            compiled(**_llama_batch(step, length)).loss.backward()
    total = count_lora_layers(model)
    fused_lines = [r.getMessage() for r in caplog.records if "LoRA linears" in r.getMessage()]
    assert any(f"fused {total}/{total} LoRA linears (1 graph)" in line for line in fused_lines), fused_lines
    assert sum("LoRA linears (" in line for line in fused_lines) == 1, fused_lines
    assert any("warm-up done" in line and f"fused {total}/{total}" in line for line in fused_lines), fused_lines


def test_cached_calls_run_the_blocks_uncompiled_and_say_so(caplog):
    model = _llama(2)
    compiled = unsloth_compile.compile(copy.deepcopy(model), inner="aot_eager", summary=False, report=False,
                                       compile_regions="layers")
    model.eval(), compiled.eval()
    ids = _llama_batch(0, 10)["input_ids"]
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="unsloth_compile.summary"):
        out_c = compiled(input_ids=ids, use_cache=True)
        out_e = model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-4, atol=1e-5)
    assert "called with a key/value cache" in caplog.text


def test_training_calls_get_no_cache():
    model = _llama(2)
    compiled = unsloth_compile.compile(copy.deepcopy(model), inner="aot_eager", summary=False, report=False,
                                       compile_regions="layers")
    out = compiled(**_llama_batch(0, 12))
    assert getattr(out, "past_key_values", None) is None and getattr(out, "cache", None) is None


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_refused_without_repeated_blocks_and_compiled_whole():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_TwoLinears(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    compiled_model = copy.deepcopy(model)
    x = torch.randn(3, 16)
    with collect_reports() as report, pytest.warns(UserWarning, match="compile_regions='layers' refused: no repeated"):
        unsloth_compile.compile(compiled_model, inner="aot_eager", summary=False, compile_regions="layers")
        out = compiled_model(x)
    torch.testing.assert_close(out, model(x))
    (site,) = [s for s in report.sites if s.pattern == "compile_regions"]
    assert site.decision == "refused" and "whole model is compiled" in site.reason
    assert report.counters["lora_linear.fused"] == 2  # compiled as today
    assert count_lora_layers(compiled_model) == 2


def test_bad_value_and_plain_backend_are_refused():
    with pytest.raises(unsloth_compile.UnslothCompileError, match="compile_regions='blocks' is not valid; "
                                                                    "choose one of 'model', 'layers'"):
        unsloth_compile.compile(_llama(2), compile_regions="blocks")
    compiled = torch.compile(_llama(2), backend="unsloth", options={"compile_regions": "layers", "inner": "aot_eager"})
    with pytest.raises(Exception, match="is an option of unsloth_compile.compile"):
        compiled(**_llama_batch(0, 8))


def test_inductor_regions_equal_eager():
    """One small run through Inductor's C++ backend: the regions' graphs as they run on a GPU, minus CUDA."""
    model = _llama(2)
    _, report = _train_pair(model, [_llama_batch(0, 12)], inner="inductor")
    fused, refused = _lora_sites(report)
    assert len(fused) == 7 and not refused


def test_a_deep_copy_runs_its_own_layers():
    model = _llama(2)
    compiled = unsloth_compile.compile(copy.deepcopy(model), inner="aot_eager", summary=False, report=False,
                                       compile_regions="layers")
    twin = copy.deepcopy(compiled)  # uncompiled, as a deep copy of any compiled module
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "layers.1.mlp.down_proj.lora_B" in n).add_(1.0)
        batch = _llama_batch(0, 12)
        assert not torch.allclose(twin(**batch).logits, compiled(**batch).logits)
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_summary_counts_a_shared_graph_refusal_in_every_block():
    """A site refused in a block graph is refused in every block running it: 2 layers, one of 7
    sites refused in the shared graph -> 12 of 14 fused."""
    import weakref

    from unsloth_compile.report import Report, Site
    from unsloth_compile.summary import SummaryLedger

    model = _llama(2)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    report = Report()
    for name in names:
        report.add(Site(name, "lora_linear", "refused" if name == "mlp.up_proj" else "fused", "why"))
    ledger = SummaryLedger()
    ledger.model, ledger.n_lora = weakref.ref(model), count_lora_layers(model)
    level, message = ledger.note_graph(report, [])
    assert "fused 12/14 LoRA linears" in message, message
