"""TRL's SFTTrainer with the callback: TRL's fused LM head stays out of the compiled graph, every LoRA
linear of the backbone is fused, and the losses are eager TRL's (padded, packed, padding-free)."""

import copy
import logging
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import transformers as tf  # noqa: E402

import unsloth_compile  # noqa: E402
from unsloth_compile import summary  # noqa: E402
from unsloth_compile.report import collect_reports  # noqa: E402
from unsloth_compile.trl_support import PATTERN, find_fused_lm_head  # noqa: E402
from helpers import count_reference_lora_calls, peft_wrap  # noqa: E402

FAST = {"inner": "aot_eager"}
SITES = 7  # one layer: q, k, v, o, gate, up, down
WORDS = "the a cat dog sat on mat ran fast slow red blue green big small house tree car".split()
METRICS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks of TRL's fused head


@pytest.fixture(autouse=True)
def _fresh_summary():
    summary.reset()
    yield
    summary.reset()


def word_tokenizer():
    """A word-level tokenizer built here (no hub): pad 0, eos 1, unk 2, one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_dataset(rows=16, seed=0):
    """Random sentences of 3 to 13 words: rows of unequal lengths, so batches are padded or packed."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (rows,), generator=g).tolist()
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist()) for n in lengths]
    return Dataset.from_dict({"text": texts})


def tiny_qwen2():
    torch.manual_seed(0)
    # vocabulary 32 >= the tokenizer's 21: a multiple of 16, so that fp8 would convert the LM head
    cfg = tf.Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    return peft_wrap(tf.Qwen2ForCausalLM(cfg))



def _sft(model, tmp_path, callbacks=(), steps=3, **config):
    from trl import SFTConfig, SFTTrainer

    # TRL turns bf16 and gradient checkpointing on by default: fp32 unless asked, and no
    # checkpointing (these tests are about TRL's head)
    config = {"max_length": 32, "bf16": False, "use_cpu": True, "gradient_checkpointing": False, **config}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer(),
                         callbacks=list(callbacks))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# bf16: the Trainer's CPU autocast rounds the fused op's bf16 products in another order than PEFT's
# modules; fp32: the same arithmetic
CASES = {
    "padding": ({}, 1e-6),
    "packing": ({"packing": True}, 1e-6),
    "padding_free": ({"padding_free": True, "max_length": None}, 1e-6),
    "padding_bf16": ({"bf16": True}, 2e-3),
}


@pytest.mark.smoke
@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_with_callback_matches_eager_trl(case, tmp_path, monkeypatch):
    config, tol = CASES[case]
    model = tiny_qwen2()
    eager = copy.deepcopy(model)
    losses_eager = _sft(eager, tmp_path / "eager", **config)
    calls = count_reference_lora_calls(monkeypatch)
    with collect_reports() as report:
        losses = _sft(model, tmp_path / "compiled", [unsloth_compile.UnslothCompileCallback(FAST)], **config)
    lora = [s for s in report.sites if s.pattern == "lora_linear"]
    assert {s.decision for s in lora} == {"fused"} and len({s.module for s in lora}) == SITES
    assert [s.module for s in report.sites if s.pattern == PATTERN] == ["base_model.model"]
    assert calls == {"forward": 3 * SITES, "backward": 3 * SITES}  # every site ran fused, every step
    assert len(losses) == 3
    torch.testing.assert_close(losses, losses_eager, rtol=tol, atol=tol)
    trained, trained_eager = _trainable(model), _trainable(eager)
    for name, value in trained.items():
        torch.testing.assert_close(value, trained_eager[name], rtol=tol * 10, atol=tol * 10, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_sft_trainer_on_cuda_with_callback_matches_eager_trl(checkpointing, tmp_path):
    """The reported setup: bf16, TRL's Triton kernels on CUDA, Inductor; TRL's default checkpointing too."""
    config = {"bf16": True, "use_cpu": False, "gradient_checkpointing": checkpointing}
    model = tiny_qwen2()
    eager = copy.deepcopy(model)
    losses_eager = _sft(eager, tmp_path / "eager", **config)
    with collect_reports() as report:
        losses = _sft(model, tmp_path / "compiled", [unsloth_compile.UnslothCompileCallback()], **config)
    lora = [s for s in report.sites if s.pattern == "lora_linear"]
    assert {s.decision for s in lora} == {"fused"} and len({s.module for s in lora}) == SITES
    torch.testing.assert_close(losses, losses_eager, rtol=5e-3, atol=5e-3)  # bf16 products in another order


# ----------------------------------------------------------------------------- TRL's Triton kernels


@pytest.fixture
def trl_triton_head(monkeypatch):
    """TRL's head on its Triton kernels, as on CUDA: on CPU they run in the Triton interpreter
    (TRITON_INTERPRET=1, conftest). Where Dynamo traced them, it failed on CPU inside the interpreter
    and on CUDA in the kernel's compile (fp64 scalars); TRL before 1.16 launches them on any device."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRL's Triton kernels on CPU tensors need the Triton interpreter (set on machines without "
                    "CUDA); on CUDA the gpu test runs them")
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    for module in (chunked, trl_utils):
        monkeypatch.setattr(module, "_use_triton", lambda device: True, raising=False)

    def torch_fold(*args, **kwargs):
        raise AssertionError("TRL's torch fold ran instead of its Triton kernel")

    for fold in ("_forward_tile", "_backward_tile"):  # TRL >= 1.16's fold for devices without Triton
        if hasattr(chunked, fold):
            monkeypatch.setattr(chunked, fold, torch_fold)


def test_sft_trainer_on_trl_triton_kernels_matches_eager_trl(trl_triton_head, tmp_path):
    model = tiny_qwen2()
    eager = copy.deepcopy(model)
    losses_eager = _sft(eager, tmp_path / "eager", steps=2)
    with collect_reports() as report:
        losses = _sft(model, tmp_path / "compiled", [unsloth_compile.UnslothCompileCallback(FAST)], steps=2)
    assert report.counters["lora_linear.fused"] >= SITES and report.counters["lora_linear.refused"] == 0
    torch.testing.assert_close(losses, losses_eager, rtol=1e-6, atol=1e-6)


def _fused_head_step(model, batch):
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.entropy.detach(), grads


def _patched_pair():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_qwen2()
    eager = copy.deepcopy(model)
    for m in (model, eager):
        add_fused_lm_head(m.get_base_model(), outputs=METRICS)  # what SFTTrainer does to the model
    return model, eager


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(WORDS) + 3, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _assert_same_step(model, eager):
    batch = _batch()
    loss_e, entropy_e, grads_e = _fused_head_step(eager, batch)
    loss, entropy, grads = _fused_head_step(model, batch)
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_e, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_e.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_e[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trl_triton_head_runs_outside_the_graph(trl_triton_head, caplog):
    model, eager = _patched_pair()
    with caplog.at_level(logging.INFO, logger="unsloth_compile.summary"), collect_reports() as report:
        unsloth_compile.compile(model, FAST)
        _assert_same_step(model, eager)
    assert report.counters["lora_linear.fused"] == SITES and report.counters["lora_linear.refused"] == 0
    (site,) = [s for s in report.sites if s.pattern == PATTERN]
    assert site.module == "base_model.model" and "base_model.model.model" in site.reason
    lines = [r.getMessage() for r in caplog.records if r.name == "unsloth_compile.summary"]
    assert lines[0] == ("unsloth_compile: TRL's fused LM head runs outside the compiled graph, as in eager; "
                        "compiling base_model.model.model, which holds every LoRA linear")


def test_whole_model_compiled_before_trl_patched_it_is_recompiled_without_the_head(trl_triton_head):
    """unsloth_compile.compile(model), then the trainer (which patches the forward) with the callback."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_qwen2()
    eager = copy.deepcopy(model)
    unsloth_compile.compile(model, FAST)
    for m in (model, eager):
        add_fused_lm_head(m.get_base_model(), outputs=METRICS)
    unsloth_compile.compile(model, FAST)  # what the callback does at on_train_begin
    _assert_same_step(model, eager)


def test_fused_head_found_only_where_trl_patched_the_forward():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_qwen2()
    assert find_fused_lm_head(model) is None
    add_fused_lm_head(model.get_base_model())
    head = find_fused_lm_head(model)
    assert head.patched is model.get_base_model() and head.backbone is model.get_base_model().model
    assert (head.patched_path, head.backbone_path) == ("base_model.model", "base_model.model.model")


def test_fp8_all_layers_keep_the_lm_head_that_trl_reads_dense():
    from trl.trainer.utils import add_fused_lm_head
    from unsloth_compile.fp8 import Fp8Linear

    model = tiny_qwen2()
    add_fused_lm_head(model.get_base_model(), outputs=METRICS)
    unsloth_compile.compile(model, FAST, precision="fp8", fp8_layers="all", kernels="reference")
    assert type(model.get_base_model().lm_head) is torch.nn.Linear
    assert isinstance(model.get_base_model().model.layers[0].mlp.up_proj.base_layer, Fp8Linear)
    loss, _, grads = _fused_head_step(model, _batch())
    assert torch.isfinite(loss) and len(grads) == 2 * SITES


def test_trl_bench_runs_both_variants_on_cpu(tmp_path, capsys):
    import json

    from unsloth_compile.bench import trl_run

    out = tmp_path / "trl.json"
    status = trl_run.main(["--device", "cpu", "--hidden", "64", "--layers", "1", "--words", "40", "--max-length", "24",
                           "--min-row", "4", "--rows", "12", "--steps", "1", "--warmup", "1", "--fp32",
                           "--option", "inner=aot_eager", "--json", str(out)])
    assert status == 0
    eager, compiled = json.loads(out.read_text())["results"]
    assert eager["variant"] == "eager" and compiled["variant"] == "unsloth"
    assert compiled["tokens_per_s"] > 0 and compiled["steps_per_s"] > 0
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=1e-5)
    assert "x eager" in capsys.readouterr().out
