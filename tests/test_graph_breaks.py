"""LoRA layers that ran outside every compiled graph: the warning names the graph break, where
it happened and the way out, and never asks whether the adapter is attached when the model
holds LoRA layers (unsloth_compile/graph_breaks.py, summary.py)."""

import inspect
import warnings

import pytest
import torch
from torch import nn

import unsloth_compile
from unsloth_compile import graph_breaks
from helpers import HandLoRA, batch_for, kernelized_checkpointed_model, peft_wrap, tiny_causal_lm

FAST = {"inner": "aot_eager"}
ADAPTER_QUESTION = "adapter attached"
# Dynamo's default, which unsloth_compile changes at import (checkpoint_tracing.py)
DYNAMO_DEFAULT = torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False)


pytestmark = pytest.mark.usefixtures("fresh_summary")


class PrintingLoRA(HandLoRA):
    def forward(self, x):
        base = self.base(x)
        print("LoRA layer running")  # PRINT-BREAK
        return base + self.lora_B(self.lora_A(x)) * 0.5


class BreakingLoRA(HandLoRA):
    def forward(self, x):
        base = self.base(x)
        torch._dynamo.graph_break()  # EXPLICIT-BREAK
        return base + self.lora_B(self.lora_A(x)) * 0.5


class Stack(nn.Module):
    def __init__(self, layer_cls, n=2):
        super().__init__()
        self.layers = nn.ModuleList(layer_cls() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _line_of(cls, marker: str) -> str:
    lines, start = inspect.getsourcelines(cls)
    offset = next(i for i, line in enumerate(lines) if marker in line)
    return f"test_graph_breaks.py:{start + offset}"


def _run_steps(model, make_input, steps=2, **options):
    """`steps` forward + backward calls of `model` compiled with the unsloth backend; the
    unsloth_compile warnings raised."""
    compiled = torch.compile(model, backend="unsloth", options={**FAST, **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            out = compiled(*make_input(step)) if callable(make_input) else compiled(**make_input)
            (out if isinstance(out, torch.Tensor) else out.loss).float().pow(2).mean().backward()
    return [str(w.message) for w in caught if "unsloth_compile" in str(w.message)]


def _rows(step):
    return (torch.randn(3, 8, generator=torch.Generator().manual_seed(step)),)


@pytest.mark.parametrize("layer_cls, marker, reason", [
    (PrintingLoRA, "PRINT-BREAK", "print"),
    (BreakingLoRA, "EXPLICIT-BREAK", "graph_break"),
])
def test_graph_break_inside_a_lora_layer_is_named_with_its_location(layer_cls, marker, reason, capsys):
    said = _run_steps(Stack(layer_cls), _rows)
    (message,) = said
    assert "2 of the model's 2 LoRA layers ran outside every compiled graph" in message, message
    assert "layers.0" in message and "layers.1" in message
    assert _line_of(layer_cls, marker) in message, message  # where
    assert reason in message.lower(), message  # what Dynamo said
    assert "Way out" in message and "TORCH_LOGS=graph_breaks" in message
    assert ADAPTER_QUESTION not in message


def test_no_warning_when_every_lora_layer_fuses():
    assert _run_steps(Stack(HandLoRA), _rows, steps=3) == []


def test_side_effect_in_a_checkpointed_region_is_named_when_dynamo_refuses_it():
    """With Dynamo's default (side effects refused in checkpointed regions) the region runs
    eagerly: the warning names the side effect's place and gives Dynamo's hint."""
    model = kernelized_checkpointed_model()
    if not hasattr(type(model.block).forward, "__wrapped__"):
        pytest.skip("this kernels version does not wrap the module's forward (no side effect)")
    with DYNAMO_DEFAULT:
        said = _run_steps(model, _rows)
    (message,) = said
    assert "2 of the model's 2 LoRA layers ran outside every compiled graph" in message, message
    assert "'HOP: Unsafe side effect' at kernels" in message and "layer.py:" in message, message
    assert "inside a checkpointed layer" in message
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint" in message  # Dynamo's hint: the way out
    assert ADAPTER_QUESTION not in message


def test_checkpointed_llama_with_the_kernels_wrapper_refused_is_named():
    """transformers with `kernels` installed wraps attention forwards in a routing side effect:
    with Dynamo's default every decoder layer runs eagerly, and the warning says where."""
    pytest.importorskip("kernels")
    from transformers.models.llama import modeling_llama

    if not hasattr(modeling_llama.LlamaAttention.forward, "__wrapped__"):
        pytest.skip("this transformers does not wrap LlamaAttention.forward with the kernels package")
    model = tiny_causal_lm("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft_wrap(model).train()
    with DYNAMO_DEFAULT:
        said = _run_steps(model, batch_for("llama"))
    (message,) = said
    assert "14 of the model's 14 LoRA layers ran outside every compiled graph" in message, message
    assert "'HOP: Unsafe side effect' at kernels" in message and "layer.py:" in message, message
    assert ADAPTER_QUESTION not in message


def test_a_model_without_lora_layers_is_still_asked_about_its_adapter():
    said = _run_steps(Stack(lambda: nn.Linear(8, 8)), _rows)
    assert len(said) == 1 and ADAPTER_QUESTION in said[0]


def test_summary_false_silences_the_warning():
    assert _run_steps(Stack(PrintingLoRA), _rows, summary=False) == []


# ----------------------------------------------------------------------------- helpers


def test_lora_layers_finds_peft_and_hand_written_layers_once():
    model = peft_wrap(tiny_causal_lm("llama"))
    layers = graph_breaks.lora_layers(model)
    assert len(layers) == 14
    assert not any(".lora_A" in path or ".base_layer" in path for path in layers)
    assert list(graph_breaks.lora_layers(Stack(HandLoRA))) == ["layers.0", "layers.1"]
    assert graph_breaks.lora_layers(nn.Linear(2, 2)) == {}


def test_break_log_reads_new_breaks_and_survives_a_dynamo_reset():
    log = graph_breaks.BreakLog()

    def fn(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(fn, backend="eager")(torch.randn(2))
    (first,) = log.take()
    assert "graph_break" in first.reason.lower() or "graph break" in first.reason.lower()
    assert first.location.endswith(f"test_graph_breaks.py:{inspect.getsourcelines(fn)[1] + 2}")
    assert log.take() == []
    torch._dynamo.reset()  # empties Dynamo's list
    torch.compile(fn, backend="eager")(torch.randn(2))
    assert len(log.take()) == 1


def test_breaks_inside_a_checkpointed_region_rank_first():
    hop = graph_breaks.GraphBreak("HOP: Unsafe side effect", "a.py:1", "", ("a.py",))
    in_lora = graph_breaks.GraphBreak("print", "b.py:2", "", (inspect.getsourcefile(PrintingLoRA),))
    other = graph_breaks.GraphBreak("logging", "c.py:3", "", ("c.py",))
    assert graph_breaks.ranked([other, in_lora, hop, other], [PrintingLoRA()]) == [hop, in_lora, other]


def test_unsloth_compile_compile_warns_too():
    model = unsloth_compile.compile(Stack(BreakingLoRA), FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            model(*_rows(step)).sum().backward()
    said = [str(w.message) for w in caught if "unsloth_compile" in str(w.message)]
    assert len(said) == 1 and _line_of(BreakingLoRA, "EXPLICIT-BREAK") in said[0]


class UnusedLoRA(nn.Module):
    """One LoRA layer the forward never calls (a vision tower on a text batch, say)."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = HandLoRA(), HandLoRA()

    def forward(self, x):
        return self.used(x)


def test_a_lora_layer_that_is_not_called_is_not_claimed_to_run_outside():
    assert _run_steps(UnusedLoRA(), _rows) == []


class DisabledLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = HandLoRA()

    @torch.compiler.disable
    def run_layer(self, x):
        return self.layer(x)

    def forward(self, x):
        return self.run_layer(x * 2).relu()


def test_lora_layers_in_code_dynamo_does_not_trace_are_named_without_the_adapter_question():
    (message,) = _run_steps(DisabledLoRA(), _rows)
    assert "1 of the model's 1 LoRA layers ran outside every compiled graph" in message, message
    assert "torch.compiler.disable" in message and _line_of(DisabledLoRA, "self.run_layer(x * 2)") in message
    assert ADAPTER_QUESTION not in message
