"""Least-squares reconstruction after 2:4 masking (prune(..., reconstruct=True),
sparsity/reconstruct.py), on CPU: the refit rows against an independent float64 reference (a
damped lstsq on the calibration matrix itself, not on its Gram matrix), the mask unchanged and
still 2:4 both ways, pruned entries exactly zero, a lower calibration output error than the
plain mask, the report, determinism and the refusal without calibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import correlated_inputs, lora_base_inputs
from unsloth_compile import sparsity
from unsloth_compile.sparsity.mask import sparsity_problem, transposable_mask
from unsloth_compile.sparsity.reconstruct import DAMPING, reconstruct, relative_output_error


def _reference_refit(w0: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row by row: argmin over w on the kept set S of ||X_S w - X w0||^2 + lam ||w - w0_S||^2,
    as one stacked least-squares problem [X_S; sqrt(lam) I] w = [X w0; sqrt(lam) w0_S]."""
    w0, x = w0.double(), x.double()
    lam = DAMPING * float(x.pow(2).sum(0).mean())
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        kept = mask[i].nonzero().squeeze(1)
        a = torch.cat([x[:, kept], lam ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
        b = torch.cat([x @ w0[i], lam ** 0.5 * w0[i, kept]])
        out[i, kept] = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution.squeeze(1)
    return out


@pytest.mark.parametrize("n, k, tokens", [(4, 4, 3), (12, 20, 7), (36, 68, 200), (4, 132, 50), (132, 8, 1)])
def test_refit_matches_a_float64_least_squares_reference(n, k, tokens):
    """Awkward shapes, fewer tokens than features (singular H: the damping makes it solvable)."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    x = correlated_inputs(tokens, k, seed=k)
    mask = transposable_mask(w.abs())
    refit = reconstruct(w, mask, x.t() @ x)
    assert refit.dtype == w.dtype and refit.shape == w.shape
    assert torch.equal(refit[~mask], torch.zeros_like(refit[~mask]))  # pruned entries exactly zero
    assert torch.equal(refit != 0, mask)  # and no kept entry lost
    assert sparsity_problem(refit) is None and sparsity_problem(refit.t().contiguous()) is None
    torch.testing.assert_close(refit.double(), _reference_refit(w, mask, x), rtol=1e-4, atol=1e-5)


def test_refit_lowers_the_output_error_and_the_error_is_what_x_gives():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(500, 96, seed=4)
    gram = x.t() @ x
    mask = transposable_mask(w.abs())
    masked, refit = w * mask, reconstruct(w, mask, gram)
    before, after = relative_output_error(masked, w, gram), relative_output_error(refit, w, gram)
    direct = float((x @ (masked.double() - w.double()).t()).norm() / (x @ w.double().t()).norm())
    assert before == pytest.approx(direct, rel=1e-9)
    assert after < 0.8 * before, (before, after)
    assert relative_output_error(w, w, gram) == 0.0


def test_refit_in_bf16_keeps_the_mask():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    x = correlated_inputs(40, 32, seed=6)
    mask = transposable_mask(w.abs())
    refit = reconstruct(w, mask, x.t() @ x)
    assert refit.dtype == torch.bfloat16 and torch.equal(refit[~mask].float(), torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(refit.double(), _reference_refit(w, mask, x), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- through prune


def _mlp():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))


def _calibration():
    return [correlated_inputs(30, 64, seed=s).float() for s in range(3)]


def _base_weights(model):
    return {path: layer.base_layer.weight.detach().clone() for path, layer in sparsity.lora_base_layers(model)}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_prune_with_reconstruct_keeps_the_mask_and_refits_on_the_calibration(method):
    dense, batches = _mlp(), _calibration()
    w0, inputs = _base_weights(dense), lora_base_inputs(dense, batches)
    plain_model = copy.deepcopy(dense)
    plain = sparsity.prune(plain_model, method, calibration=batches)
    refit_model = copy.deepcopy(dense)
    report = sparsity.prune(refit_model, method, calibration=batches, reconstruct=True)
    assert report.reconstructed and report.energy == plain.energy and not plain.output_error
    plain_w, refit_w = _base_weights(plain_model), _base_weights(refit_model)
    for path, w in refit_w.items():
        mask = plain_w[path] != 0
        assert torch.equal(w != 0, mask), f"{path}: the mask changed"
        assert sparsity_problem(w) is None and sparsity_problem(w.t().contiguous()) is None
        torch.testing.assert_close(w.double(), _reference_refit(w0[path], mask, inputs[path]), rtol=1e-4, atol=1e-5)
        before, after = report.output_error[f"{path}.base_layer"]
        assert before == pytest.approx(relative_output_error(plain_w[path], w0[path], inputs[path].t() @ inputs[path]))
        assert after < before, (path, before, after)
    assert "masked ->" in str(report) and "refit by least squares" in str(report)


def test_prune_with_reconstruct_is_deterministic():
    batches = _calibration()
    a, b = _mlp(), _mlp()
    ra = sparsity.prune(a, "wanda", calibration=batches, reconstruct=True)
    rb = sparsity.prune(b, "wanda", calibration=batches, reconstruct=True)
    assert ra.output_error == rb.output_error
    for (path, wa), wb in zip(_base_weights(a).items(), _base_weights(b).values()):
        assert torch.equal(wa, wb), path


def test_reconstruct_needs_calibration():
    with pytest.raises(ValueError, match="reconstruct=True refits the kept weights.*pass calibration="):
        sparsity.prune(_mlp(), "magnitude", reconstruct=True)
    with pytest.raises(ValueError, match="never reached"):
        sparsity.prune(_mlp(), "magnitude", calibration=[], reconstruct=True)


def test_reconstruct_refuses_grams_over_the_budget(monkeypatch):
    """The Gram matrices (float64 K x K per layer, all held during the one calibration pass)
    are counted before the pass: over sparsity.GRAM_BUDGET_BYTES the call is refused, naming
    the way out, and nothing is pruned."""
    model, batches = _mlp(), _calibration()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(sparsity.pruning, "GRAM_BUDGET_BYTES", 1000)
    with pytest.raises(ValueError, match="Gram matrix per layer.*select="):
        sparsity.prune(model, "wanda", calibration=batches, reconstruct=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
