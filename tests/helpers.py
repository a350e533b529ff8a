"""Shared test helpers: tiny random-init models, PEFT wrapping, eager-vs-compiled training."""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from unsloth_compile.report import Report, collect_reports

VOCAB = 96


def tiny_causal_lm(family: str, dtype=torch.float32, layers: int = 2) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                               sliding_window=None, **common)
        model = tf.MistralForCausalLM(cfg)
    elif family == "qwen2":  # q/k/v projections carry a bias
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":  # Conv1D projections (weight stored in x out)
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)
        model = tf.OPTForCausalLM(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64,
                            num_labels=5, vocab_size=VOCAB, num_hidden_layers=2,
                            # set up front: BERT sets it on its first call, which would recompile
                            problem_type="single_label_classification")
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype)


def peft_wrap(model: torch.nn.Module, **lora_kwargs) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", "all-linear")
    # Random A *and* B: with PEFT's zero-init B the gradient of A is zero and would hide bugs.
    lora_kwargs.setdefault("init_lora_weights", False)
    return get_peft_model(model, LoraConfig(**lora_kwargs))


def count_lora_layers(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def batch_for(family: str, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 5, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def load_example(name: str):
    """examples/<name>.py loaded as a module (examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_process_torchrun_env(monkeypatch) -> None:
    """torchrun's environment for a 1-process group on a free local port (for an example's main)."""
    from distributed_cases import _free_port

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)


def llama_batch_with_prompt(step: int) -> dict:
    """batch_for("llama", seed=step) whose first row's first 4 labels are -100: a prompt that
    is not trained on, so that losses meet ignore_index."""
    batch = batch_for("llama", seed=step)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, :4] = -100
    return batch


def loss_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().pow(2).mean()
    return output.loss


@dataclasses.dataclass
class Comparison:
    report: Report
    eager_losses: list
    compiled_losses: list
    compiled: Any = None  # what was called in place of the eager model


def compile_with_backend(model: torch.nn.Module, options: dict) -> Callable:
    return torch.compile(model, backend="unsloth", options=options)


def _assert_outputs_close(out_c, out_e, step: int, rtol: float, atol: float) -> None:
    """Every tensor of a model output (a ModelOutput or a tensor): same shape, same values."""
    pairs = [("output", out_c, out_e)] if isinstance(out_e, torch.Tensor) else \
        [(key, out_c[key], value) for key, value in out_e.items() if isinstance(value, torch.Tensor)]
    for key, value_c, value_e in pairs:
        assert value_c.shape == value_e.shape, (step, key, value_c.shape, value_e.shape)
        torch.testing.assert_close(value_c, value_e, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {key}: {m}")


def train_and_compare(model: torch.nn.Module, batch_fn: Callable[[int], dict], *, options=None, steps=3,
                      rtol=1e-4, atol=1e-5, lr=1e-3, loss_fn=loss_of, compile_fn=compile_with_backend,
                      compare_outputs=False) -> Comparison:
    """Train `model` (eager) and a deep copy (`compile_fn(copy, options)`: by default compiled with
    the unsloth backend) side by side for `steps` AdamW steps from the same RNG state; assert that
    every loss, every trainable gradient and every parameter after the steps match, and with
    `compare_outputs` every tensor the model returns. Returns the compile report."""
    options = dict(options or {"inner": "aot_eager"})
    eager = model
    compiled_model = copy.deepcopy(model)
    compiled = compile_fn(compiled_model, options)
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_c = [p for p in compiled_model.parameters() if p.requires_grad]
    names = [n for n, p in eager.named_parameters() if p.requires_grad]
    opt_e = torch.optim.AdamW(params_e, lr=lr)
    opt_c = torch.optim.AdamW(params_c, lr=lr)
    losses_e, losses_c = [], []
    with collect_reports() as report:
        for step in range(steps):
            batch = batch_fn(step)
            torch.manual_seed(1000 + step)
            out_e = eager(**batch) if isinstance(batch, dict) else eager(*batch)
            loss_e = loss_fn(out_e)
            loss_e.backward()
            torch.manual_seed(1000 + step)
            out_c = compiled(**batch) if isinstance(batch, dict) else compiled(*batch)
            loss_c = loss_fn(out_c)
            loss_c.backward()
            losses_e.append(loss_e.item())
            losses_c.append(loss_c.item())
            torch.testing.assert_close(loss_c.float(), loss_e.float(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step} loss: {m}")
            if compare_outputs:
                _assert_outputs_close(out_c, out_e, step, rtol, atol)
            for name, pe, pc in zip(names, params_e, params_c):
                assert pc.grad is not None, f"step {step}: no gradient for {name} in the compiled model"
                assert pc.grad.dtype == pe.grad.dtype, f"{name}: grad dtype {pc.grad.dtype} != {pe.grad.dtype}"
                torch.testing.assert_close(pc.grad.float(), pe.grad.float(), rtol=rtol, atol=atol,
                                           msg=lambda m, name=name: f"step {step} grad of {name}: {m}")
            opt_e.step()
            opt_c.step()
            opt_e.zero_grad()
            opt_c.zero_grad()
    for name, pe, pc in zip(names, params_e, params_c):
        torch.testing.assert_close(pc.float(), pe.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name} after {steps} steps: {m}")
    return Comparison(report, losses_e, losses_c, compiled)


def train_steps(model: torch.nn.Module, steps: int = 2, autocast: bool = False, seed_offset: int = 0,
                family: str = "llama") -> tuple[list, list]:
    """(losses, trainable gradients of each step) of `model` trained alone with AdamW on
    batch_for(family, seed=step + seed_offset), the RNG seeded per step as train_and_compare
    does: for comparing two models that cannot be deep copies of one another (a quantised model
    against its dequantised twin) with assert_same_training."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(1000 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch_for(family, seed=step + seed_offset)).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
        opt.zero_grad()
    return losses, grads


def assert_same_training(got: tuple[list, list], want: tuple[list, list], rtol: float = 1.3e-6,
                         atol: float = 1e-5) -> None:
    """Two train_steps results: every loss and every gradient close."""
    for step, (lg, lw) in enumerate(zip(got[0], want[0])):
        torch.testing.assert_close(lg, lw, rtol=rtol, atol=atol, msg=lambda m: f"step {step} loss: {m}")
    for step, (gg, gw) in enumerate(zip(got[1], want[1])):
        for i, (a, b) in enumerate(zip(gg, gw)):
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step} LoRA gradient {i}: {m}")


def train_taking_over_four_bit_bases(model: torch.nn.Module, options: dict, source: str, codes: list[int],
                                     log_line: str, caplog, sites: int) -> tuple[list, list]:
    """`unsloth_compile.compile(model, **options)` on a PEFT model whose LoRA bases another library
    stores in 4 bits (`source`: "bitsandbytes", "torchao"), then train_steps' result. Checks that
    every base became an Nf4Linear of that source over the same code storage (`codes`: the
    storages' data pointers before the compile), that the conversion report says `log_line`, and
    that all `sites` LoRA sites fused over their 4-bit bases, none refused."""
    import logging

    import unsloth_compile
    from unsloth_compile import nf4
    from unsloth_compile.dense_linear import lora_base_layers

    with collect_reports() as report, caplog.at_level(logging.INFO, logger="unsloth_compile"):
        unsloth_compile.compile(model, **options)  # no precision given: the bases are 4-bit already
        got = train_steps(model)
    bases = [layer.base_layer for _, layer in lora_base_layers(model)]
    assert all(isinstance(b, nf4.Nf4Linear) and b.source == source for b in bases)
    assert [b.packed.untyped_storage().data_ptr() for b in bases] == codes  # shared, not quantised again
    assert log_line in caplog.text
    assert report.counters["lora_linear.fused"] == sites and report.counters["nf4_linear.fused"] == sites, str(report)
    assert report.counters["lora_linear.refused"] == 0, str(report)
    return got


class LoraLayer(torch.nn.Module):
    """A PEFT-style LoRA linear (a frozen `base_layer` with a bias, adapters `lora_A`, `lora_B`,
    scale 0.5), B random so that A gets a gradient: what a base conversion (fp8, NF4) selects."""

    def __init__(self, k: int, n: int, r: int):
        super().__init__()
        self.base_layer = torch.nn.Linear(k, n).requires_grad_(False)
        self.lora_A = torch.nn.Linear(k, r, bias=False)
        self.lora_B = torch.nn.Linear(r, n, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * 0.5


class LoraMLP(torch.nn.Module):
    """LoraLayers of widths sizes[0] -> sizes[1] -> ... with a ReLU after each: a width a base
    format cannot take leaves that layer dense."""

    def __init__(self, sizes: tuple[int, ...], r: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(LoraLayer(k, n, r) for k, n in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def assert_compiled_matches_eager_under_bf16_autocast(model: LoraMLP, x: torch.Tensor, options: dict) -> Report:
    """`model` eager and a deep copy compiled with the unsloth backend, both under CPU bf16
    autocast: bf16 outputs equal, the gradients of every lora_A close (bf16's rounding).
    Returns the compile report."""
    compiled_model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), collect_reports() as report:
        want = model(x)
        got = torch.compile(compiled_model, backend="unsloth", options=options)(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.float().square().sum(), [layer.lora_A.weight for layer in m.layers])
             for out, m in ((got, compiled_model), (want, model))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    return report


def triton_kernel_module(name: str):
    """unsloth_compile.kernels.<name>, its Triton kernels runnable here: without CUDA under the
    interpreter, which conftest.py turns on before anything imports Triton. Skips the calling
    test module without Triton."""
    import pytest

    pytest.importorskip("triton")
    module = importlib.import_module(f"unsloth_compile.kernels.{name}")
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", \
        "without CUDA the kernels must be decorated under TRITON_INTERPRET=1 (tests/conftest.py)"
    return module


def dynamo_graphs(model, *args, **kwargs) -> list:
    """Dynamo's graphs of `model(*args, **kwargs)`, as a backend receives them (run unchanged)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(*args, **kwargs)
    return graphs


def saved_tensors(fn: Callable) -> tuple[Any, list]:
    """(fn()'s result, every tensor autograd saved for backward while it ran, in order)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def storage_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage once (views and repeats share one)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def saved_for_backward(fn: Callable, kept: Optional[list] = None):
    """(bytes, Counter of dtypes) of what autograd keeps for backward while `fn()` runs, each
    storage once; `kept`, when given, gets (dtype, shape) of every saved tensor, in order."""
    _, saved = saved_tensors(fn)
    if kept is not None:
        kept.extend((t.dtype, tuple(t.shape)) for t in saved)
    return storage_bytes(saved), collections.Counter(t.dtype for t in saved)


def correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Never-zero float64 inputs whose features are correlated (a random mixing plus an offset),
    as a layer's activations are: what gives a least-squares refit something to exploit."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(tokens, k, generator=g) @ mixing + 0.5).double()


def lora_base_inputs(model: torch.nn.Module, batches) -> dict:
    """What each LoRA base layer of `model` sees on `batches` (one positional input each),
    concatenated, float64, by path."""
    from unsloth_compile import sparsity

    seen, handles = {}, []
    for path, layer in sparsity.lora_base_layers(model):
        handles.append(layer.base_layer.register_forward_pre_hook(
            lambda _m, args, path=path: seen.setdefault(path, []).append(args[0].detach().double())))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return {path: torch.cat(xs) for path, xs in seen.items()}


class HandLoRA(torch.nn.Module):
    """A hand-written LoRA linear: frozen base, lora_A and lora_B adapters, scale 0.5."""

    def __init__(self, k=8, r=2):
        super().__init__()
        self.base = torch.nn.Linear(k, k).requires_grad_(False)
        self.lora_A = torch.nn.Linear(k, r, bias=False)
        self.lora_B = torch.nn.Linear(r, k, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 0.5


class TwoLoRAsWithGraphBreak(torch.nn.Module):
    """Two LoRA linears that Dynamo compiles as two graphs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = HandLoRA(), HandLoRA()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def kernelized_checkpointed_model() -> torch.nn.Module:
    """Two LoRA layers in a checkpointed block whose forward the `kernels` package wraps as
    transformers wraps its attention classes (`use_kernelized_func`): the wrapper sets and
    resets a module-level routing variable around each call, a Python side effect inside the
    checkpointed region. Skips the calling test without the `kernels` package."""
    import pytest
    from torch.utils.checkpoint import checkpoint

    kernels = pytest.importorskip("kernels")
    if not hasattr(kernels, "use_kernelized_func"):  # a checkout on sys.path: its kernels/ folder, not the package
        pytest.skip("the kernels package is not installed")

    @kernels.use_kernel_forward_from_hub("UnslothCompileTestHalve")
    def halve(x):
        return x * 0.5

    @kernels.use_kernelized_func(halve)
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = HandLoRA(), HandLoRA()

        def forward(self, x):
            return halve(self.second(torch.relu(self.first(x))))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return checkpoint(self.block, x * 2, use_reentrant=False).relu()

    return Model()


def count_reference_lora_calls(monkeypatch) -> dict:
    """Runtime calls of the LoRA op's CPU implementation (kernels/reference.py), forward and
    backward: {"forward": n, "backward": n}, counted while the test runs."""
    from unsloth_compile.kernels import reference

    calls = {"forward": 0, "backward": 0}
    for which in calls:
        real = getattr(reference, f"lora_linear_{which}")

        def counting(*args, _real=real, _which=which, **kwargs):
            calls[_which] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(reference, f"lora_linear_{which}", counting)
    return calls
