"""2:4 pruning and the sparse ops on CPU: masks valid in both orientations and optimal per
tile, energy against the row-only mask, determinism, Wanda's scores, refusals, the
Sparse24Linear module, and the ops' outputs and every gradient against float64 (the CPU path
is the dense masked weight). Compiled training is in test_sparsity_training.py."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from torch import nn

from unsloth_compile import Config, sparsity
from unsloth_compile.kernels import sparse24
from unsloth_compile.sparsity.mask import (kept_energy, row_mask, sparsity_problem, tile_patterns,
                                           transposable_mask)


def _groups_ok(mask: torch.Tensor, exactly: bool) -> bool:
    counts = mask.reshape(mask.shape[0], -1, 4).sum(-1)
    return bool((counts == 2).all()) if exactly else bool((counts <= 2).all())


def test_the_90_tile_patterns():
    patterns = tile_patterns().reshape(-1, 4, 4)
    assert patterns.shape[0] == 90
    assert (patterns.sum(1) == 2).all() and (patterns.sum(2) == 2).all()
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == 90


@pytest.mark.parametrize("shape", [(4, 4), (64, 128), (132, 68), (4, 256), (256, 8)])
def test_transposable_mask_is_2to4_in_both_orientations(shape):
    w = torch.randn(shape)
    mask = transposable_mask(w.abs())
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert _groups_ok(mask, exactly=True), "W: a group of 4 along K does not keep exactly 2"
    assert _groups_ok(mask.t().contiguous(), exactly=True), "W^T: a group of 4 along N does not keep exactly 2"
    pruned = w * mask
    assert sparsity_problem(pruned) is None and sparsity_problem(pruned.t().contiguous()) is None


def test_transposable_mask_picks_the_best_pattern_of_each_tile():
    """Brute force over the 90 patterns, tile by tile."""
    score = torch.rand(8, 12)
    mask = transposable_mask(score)
    patterns = tile_patterns().reshape(-1, 4, 4).bool()
    for i, j in itertools.product(range(0, 8, 4), range(0, 12, 4)):
        tile = score[i:i + 4, j:j + 4]
        best = max((tile * p).sum().item() for p in patterns)
        assert (tile * mask[i:i + 4, j:j + 4]).sum().item() == pytest.approx(best, rel=1e-6)


def test_transposable_mask_keeps_at_most_the_row_masks_energy():
    torch.manual_seed(1)
    w = torch.randn(256, 320)
    e_tile = kept_energy(w, transposable_mask(w.abs()))
    e_row = kept_energy(w, row_mask(w.abs()))
    assert _groups_ok(row_mask(w.abs()), exactly=True)
    assert e_tile <= e_row + 1e-12
    # Gaussian weights: the row mask keeps ~0.87 of the energy, the 4 x 4 tiles ~0.82
    assert 0.78 < e_tile and e_tile / e_row > 0.9, (e_tile, e_row)


def test_sparsity_problem_names_the_orientation():
    dense = torch.randn(8, 8)
    assert "W row 0" in sparsity_problem(dense)
    rows_only = torch.zeros(8, 8)
    rows_only[:, [0, 1, 4, 5]] = 1.0  # 2 per group along K, 4 per group along N
    assert "W^T row 0 has 4 nonzeros" in sparsity_problem(rows_only)
    assert "4 x 4 tiles" in sparsity_problem(torch.randn(6, 8))


# ----------------------------------------------------------------------------- prune


def _mlp(width=64, hidden=128, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)).to(dtype)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))


def _bases(model):
    return {path: layer.base_layer for path, layer in sparsity.lora_base_layers(model)}


def test_prune_is_deterministic_and_converts():
    a, b = _mlp(), _mlp()
    ra, rb = sparsity.prune(a), sparsity.prune(b)
    assert ra.energy == rb.energy and len(ra.converted) == 2 and not ra.refused
    for (pa, la), (pb, lb) in zip(_bases(a).items(), _bases(b).items()):
        assert isinstance(la, sparsity.Sparse24Linear) and la.layout == "dense"
        assert torch.equal(la.weight, lb.weight)
        assert sparsity_problem(la.weight) is None
    again = sparsity.prune(a)
    assert not again.energy and all("already" in r for r in again.refused.values())


def test_prune_reports_and_logs_the_kept_energy(caplog):
    model = _mlp()
    before = {p: m.weight.detach().clone() for p, m in _bases(model).items()}
    with caplog.at_level(logging.INFO, logger="unsloth_compile.sparsity"):
        report = sparsity.prune(model)
    for path, layer in _bases(model).items():
        path = f"{path}.base_layer"
        w0 = before[path.removesuffix(".base_layer")]
        assert report.energy[path] == pytest.approx(kept_energy(w0, layer.weight != 0))
        assert 0.7 < report.energy[path] < 1.0
        assert f"{path} pruned 2:4 (magnitude), kept-weight energy {report.energy[path]:.4f}" in caplog.text
    assert "kept energy" in str(report)


def test_wanda_scores_by_input_feature_norms():
    model = _mlp()
    torch.manual_seed(2)
    batches = [torch.randn(5, 64) * torch.linspace(0.1, 10.0, 64) for _ in range(3)]
    w0 = _bases(model)["base_model.model.0"].weight.detach().clone()
    norms = torch.cat(batches).double().pow(2).sum(0).sqrt()
    report = sparsity.prune(copy.deepcopy(model), "wanda", calibration=batches)
    pruned = sparsity.prune(model, "wanda", calibration=batches)
    assert report.energy == pruned.energy  # deterministic with the same calibration
    want = w0 * transposable_mask(w0.abs() * norms.float())
    torch.testing.assert_close(_bases(model)["base_model.model.0"].weight, want, rtol=0, atol=0)
    magnitude = _mlp()
    sparsity.prune(magnitude)
    assert not torch.equal(_bases(magnitude)["base_model.model.0"].weight, want)  # the norms changed the mask


def test_prune_refusals():
    from helpers import peft_wrap, tiny_causal_lm

    model = peft_wrap(tiny_causal_lm("llama"))  # intermediate 96, k/v 32 x 64: not multiples of 64
    report = sparsity.prune(model, convert=False)
    assert len(report.energy) == 4 and not report.converted  # q_proj and o_proj of 2 layers
    refused = {p.split(".")[-2]: r for p, r in report.refused.items()}
    assert set(refused) == {"k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert "multiples of 64" in refused["k_proj"]
    for path, layer in sparsity.lora_base_layers(model):
        assert type(layer.base_layer) is nn.Linear  # convert=False keeps the modules, zeros written
        pruned = f"{path}.base_layer" in report.energy
        assert (sparsity_problem(layer.base_layer.weight) is None) == pruned
    trainable = _mlp()
    _bases(trainable)["base_model.model.0"].weight.requires_grad_(True)
    assert "trainable" in next(iter(sparsity.prune(trainable).refused.values()))
    with pytest.raises(ValueError, match="calibration"):
        sparsity.prune(_mlp(), "wanda")
    with pytest.raises(ValueError, match="magnitude, wanda"):
        sparsity.prune(_mlp(), "random")
    with pytest.raises(ValueError, match="never reached"):
        sparsity.prune(_mlp(), "wanda", calibration=[])


def test_convert_validates_an_already_pruned_model():
    pruned = _mlp()
    sparsity.prune(pruned, convert=False)
    report = sparsity.convert(pruned)
    assert len(report.converted) == 2 and not report.refused
    report = sparsity.convert(_mlp())  # dense weights
    assert not report.converted and all("not 2:4" in r for r in report.refused.values())
    with pytest.raises(ValueError, match="not 2:4"):
        sparsity.Sparse24Linear.from_dense(nn.Linear(64, 64).requires_grad_(False))


# ----------------------------------------------------------------------------- Sparse24Linear


def _pruned_linear(k=64, n=128, bias=True, dtype=torch.float32):
    linear = nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    if bias:
        linear.bias.requires_grad_(True)
    with torch.no_grad():
        linear.weight.mul_(transposable_mask(linear.weight.abs()))
    return linear


def test_sparse24_linear_module_equals_the_masked_linear_with_gradients():
    dense = _pruned_linear()
    module = sparsity.Sparse24Linear.from_dense(dense)
    assert list(module.state_dict()) == ["weight", "bias"] and not module.weight.requires_grad
    x = torch.randn(3, 7, 64, requires_grad=True)
    out = module(x)
    x64 = x.detach().double().requires_grad_()
    b64 = module.bias.detach().double().requires_grad_()
    want = x64 @ module.weight.double().t() + b64
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(out)
    out.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.bias.grad.double(), b64.grad, rtol=1e-6, atol=1e-6)
    back = module.to_dense()
    assert type(back) is nn.Linear and torch.equal(back.weight, module.weight) and back.bias is module.bias
    with pytest.raises(ValueError, match="not 2:4"):
        module.load_state_dict({"weight": torch.randn(128, 64), "bias": torch.zeros(128)})


def test_sparse24_linear_from_a_conv1d_and_revert():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(128, 64).requires_grad_(False)  # weight (in, out)
    with torch.no_grad():
        conv.weight.mul_(transposable_mask(conv.weight.t().abs()).t())
    module = sparsity.Sparse24Linear.from_dense(conv)
    x = torch.randn(5, 64)
    torch.testing.assert_close(module(x), conv(x), rtol=1e-6, atol=1e-6)
    holder = nn.Sequential(module)
    assert sparsity.revert(holder) == 1 and type(holder[0]).__name__ == "Conv1D"
    torch.testing.assert_close(holder[0](x), conv(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the LoRA op


def _lora_operands(M, K, N, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=dtype)
    w = w * transposable_mask(w.abs())
    x = torch.randn(*M, K, generator=g, dtype=dtype)
    A = torch.randn(r, K, generator=g) * 0.3
    B = torch.randn(N, r, generator=g) * 0.3
    bias = torch.randn(N, generator=g, dtype=dtype)
    B_bias = torch.randn(N, generator=g)
    residual = torch.randn(*M, N, generator=g, dtype=dtype)
    return w, x, A, B, bias, B_bias, residual


def _check_against_float64(w, operands, lora_x_form: str, scale: float, op_call):
    """`op_call(x, A, B, bias, B_bias, residual, lora_x, dropout_args)` -> (out, hidden) of
    lora_linear_sparse24 on leaf copies of `operands`: its output and every gradient (x, A, B,
    bias, B's bias, residual, the dropped input) against float64 with the effective `scale`.
    Returns (out, hidden)."""
    x, A, B, bias, B_bias, residual = operands
    leaves = [t.clone().requires_grad_() for t in operands]
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    lora_x = (x * 1.5).requires_grad_() if lora_x_form == "tensor" else None
    extra = (mask, 1 / 0.7) if lora_x_form == "mask" else ()
    out, hidden = op_call(*leaves, lora_x, extra)
    d = [t.detach().double().requires_grad_() for t in operands]
    dx, dA, dB, dbias, dBb, dres = d
    adapter_in = dx if lora_x is None else lora_x.detach().double().requires_grad_()
    if lora_x_form == "mask":
        adapter_in = dx * mask / 0.7
    want = dx @ w.double().t() + dbias + scale * ((adapter_in @ dA.t()) @ dB.t() + dBb) + dres
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, leaves + ([lora_x] if lora_x is not None else []), dy)
    wanted = torch.autograd.grad(want, d + ([adapter_in] if lora_x is not None else []), dy.double())
    for name, g, e in zip(("x", "A", "B", "bias", "B_bias", "residual", "lora_x"), got, wanted):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
    return out, hidden


@pytest.mark.parametrize("M", [(1,), (7,), (2, 5), (0, 3)])
@pytest.mark.parametrize("lora_x_form", ["x", "tensor", "mask"])
def test_lora_linear_sparse24_matches_float64(M, lora_x_form):
    """Output and every gradient (x, A, B, bias, B's bias, residual, the dropped input)."""
    K, N, r, scale = 64, 128, 5, 1.7
    w, *operands = _lora_operands(M, K, N, r)

    def op_call(x, A, B, bias, B_bias, residual, lora_x, extra):
        return torch.ops.unsloth.lora_linear_sparse24(x, w, [], "dense", bias, A, B, B_bias, lora_x, residual,
                                                      scale, None, torch.float32, "auto", *extra)

    _, hidden = _check_against_float64(w, operands, lora_x_form, scale, op_call)
    assert hidden.shape == (operands[0].numel() // K, r)


def test_lora_linear_sparse24_equals_the_dense_op_on_cpu():
    w, x, A, B, bias, B_bias, residual = _lora_operands((9,), 64, 64, 3)
    args = (bias, A, B, B_bias, None, residual, 2.0, None, torch.float32, "auto")
    sparse_out = torch.ops.unsloth.lora_linear_sparse24(x, w, [], "dense", *args)
    dense_out = torch.ops.unsloth.lora_linear(x, w, bias, A, B, B_bias, None, residual, 2.0, None, False,
                                              torch.float32, "auto")
    for s, d in zip(sparse_out, dense_out):
        assert torch.equal(s, d)


def test_opcheck_of_the_sparse_ops():
    w, x, A, B, bias, B_bias, residual = _lora_operands((3, 5), 64, 64, 4)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.unsloth.sparse24_linear.default, (x, w, [], "dense", bias, "auto"))
    torch.library.opcheck(torch.ops.unsloth.lora_linear_sparse24.default,
                          (x, w, [], "dense", bias, A.requires_grad_(), B.requires_grad_(), B_bias, None, residual,
                           1.5, None, torch.float32, "auto"))


def test_shape_and_dtype_rules():
    assert sparse24.shape_problem(4096, 14336) is None and sparse24.shape_problem(512, 2048) is None
    assert "multiples of 64" in sparse24.shape_problem(96, 64)
    assert sparse24.dtype_problem(torch.bfloat16, on_cuda=True) is None
    assert "float32" in sparse24.dtype_problem(torch.float32, on_cuda=True)
    assert sparse24.dtype_problem(torch.float32, on_cuda=False) is None
    assert "float64" in sparse24.dtype_problem(torch.float64, on_cuda=False)
    assert sparse24.layout_problem(torch.device("cpu")) == ("dense", None)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0)])
def test_cutlass_layout_only_on_capability_8(monkeypatch, capability):
    """torch's CUTLASS 2:4 GEMM raises on anything but capability 8.x (seen on an H200): asked for
    on another GPU, the layout is refused with the reason instead of failing at the first GEMM."""
    from unsloth_compile.kernels import knobs

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", lambda *a: None, raising=False)
    monkeypatch.setattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS", object, raising=False)
    with knobs.patch(sparse24_gemm="cutlass"):
        layout, reason = sparse24.layout_problem(torch.device("cuda"))
    if capability[0] == 8:
        assert (layout, reason) == ("cutlass", None)
    else:
        assert layout is None and "capability 8.x only" in reason and "cuSPARSELt" in reason


def test_config_sparsity_option():
    assert Config.from_options({"sparsity": "2:4"}).sparsity.value == "2:4"
    with pytest.raises(ValueError, match="'none', '2:4'"):
        Config.from_options({"sparsity": "4:8"})
    with pytest.raises(ValueError, match="sparsity='2:4' with precision='fp8' is not supported"):
        Config.from_options({"sparsity": "2:4", "precision": "fp8"})


@pytest.mark.parametrize("lora_x_form", ["x", "tensor", "mask"])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_the_sparse_layout_composition_on_cpu(monkeypatch, lora_x_form, tensor_scale):
    """The CUDA layouts' composition (sparse product, then the low-rank term accumulated onto
    it) with a dense stand-in for the sparse GEMM: "compressed" = [W, W^T] dense, so the
    composition's outputs and every gradient are checked against float64 here too."""
    monkeypatch.setattr(sparse24, "_sparse_rows_times", lambda dense2d, sparse, layout, r: dense2d @ sparse[0].t())
    K, N, r, scale = 64, 128, 5, 1.3
    w, *operands = _lora_operands((3, 7), K, N, r)
    compressed = [w, w.t().contiguous()]
    scale_tensor = torch.tensor(0.5) if tensor_scale else None

    def op_call(x, A, B, bias, B_bias, residual, lora_x, extra):
        return torch.ops.unsloth.lora_linear_sparse24(x, w, compressed, "cusparselt", bias, A, B, B_bias, lora_x,
                                                      residual, scale, scale_tensor, torch.float32, "auto", *extra)

    _check_against_float64(w, operands, lora_x_form, scale * (0.5 if tensor_scale else 1.0), op_call)


def test_sparse24_linear_on_a_sparse_layout_on_cpu(monkeypatch):
    """The base alone on a CUDA layout (dense stand-in for the sparse GEMM): x W^T + b and dx
    = dY W from W^T's copy; a copy in another dtype than x falls back to the dense weight."""
    monkeypatch.setattr(sparse24, "_sparse_rows_times", lambda dense2d, sparse, layout, r: dense2d @ sparse[0].t())
    w = _pruned_linear(64, 128).weight.detach()
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(128, requires_grad=True)
    compressed = [w * 2, (w * 2).t().contiguous()]  # "2 W": proves the copies are what is read
    out = torch.ops.unsloth.sparse24_linear(x, w, compressed, "cutlass", bias, "auto")
    torch.testing.assert_close(out, x @ (2 * w).t() + bias)
    dy = torch.randn_like(out)
    dx, db = torch.autograd.grad(out, [x, bias], dy)
    torch.testing.assert_close(dx, dy @ (2 * w))
    torch.testing.assert_close(db, dy.sum((0, 1)))
    reference = torch.ops.unsloth.sparse24_linear(x, w, compressed, "cutlass", bias, "reference")
    torch.testing.assert_close(reference, x @ w.t() + bias)
    mismatched = torch.ops.unsloth.sparse24_linear(x.double(), w, compressed, "cutlass", None, "auto")
    torch.testing.assert_close(mismatched, x.double() @ w.double().t())


def test_reachable_from_the_package():
    import unsloth_compile

    assert unsloth_compile.sparsity.prune is sparsity.prune


def test_cusparselt_algorithm_is_searched_once_per_problem(monkeypatch, caplog):
    """kernels/sparse24.cusparselt_algorithm: torch._cslt_sparse_mm_search on a problem's first
    call, its answer reused; the default algorithm 0 with the knob off, inside a CUDA graph
    capture (not remembered), and after a failed search (warned once)."""
    from unsloth_compile.kernels import knobs, sparse24

    calls = []

    def search(sparse, dense, transpose_result=False):
        calls.append((tuple(sparse.shape), tuple(dense.shape), transpose_result))
        return 3 + len(calls)

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search, raising=False)
    monkeypatch.setattr(sparse24, "_CSLT_ALGORITHMS", {})
    bf16 = dict(dtype=torch.bfloat16)
    sparse, dense, other = torch.zeros(64, 32, **bf16), torch.zeros(64, 8, **bf16).t(), torch.zeros(64, 16, **bf16).t()
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert sparse24.cusparselt_algorithm(sparse, dense) == 0 and not calls  # in a capture: no timing
    capturing[0] = False
    assert sparse24.cusparselt_algorithm(sparse, dense) == 4
    assert sparse24.cusparselt_algorithm(sparse, dense) == 4 and len(calls) == 1  # remembered
    assert calls[0][2] is True  # searched as the op calls it: transposed result
    assert sparse24.cusparselt_algorithm(sparse, other) == 5  # another problem: its own search
    with knobs.patch(sparse24_search=False):
        assert sparse24.cusparselt_algorithm(sparse, dense) == 0
    # fp16 is never searched (its search broke the CUDA context on an H200): the default
    assert sparse24.cusparselt_algorithm(sparse.half(), dense.half()) == 0 and len(calls) == 2
    monkeypatch.setattr(sparse24, "_CSLT_ALGORITHMS", {})

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not supported\nmore")

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", failing)
    monkeypatch.setattr(sparse24, "_warned", set())
    with caplog.at_level("WARNING", logger="unsloth_compile.kernels"):
        assert sparse24.cusparselt_algorithm(sparse, dense) == 0
        assert sparse24.cusparselt_algorithm(sparse, other) == 0
    warnings = [r for r in caplog.records if "_cslt_sparse_mm_search failed" in r.getMessage()]
    assert len(warnings) == 1 and "operation not supported" in warnings[0].getMessage()
