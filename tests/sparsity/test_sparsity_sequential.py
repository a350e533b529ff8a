"""SparseGPT-style mask selection (prune(..., method="sparsegpt"), sparsity/obs.py) and
sequential calibration (prune(..., sequential=True), sparsity/sequential.py), on CPU: the OBS
sweep against a float64 reference that inverts H on the free columns at every step, the mask
2:4 in both orientations, determinism, an output error no worse than wanda-ls's (sweep alone
and through prune), the sequential statistics against inputs collected by hand from the
partly pruned model, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import correlated_inputs, lora_base_inputs
from unsloth_compile import sparsity
from unsloth_compile.sparsity.mask import sparsity_problem, transposable_mask
from unsloth_compile.sparsity.obs import obs_prune
from unsloth_compile.sparsity.reconstruct import (damping, dense_refit, reconstruct, relative_error_to,
                                                  relative_output_error)


def _reference_obs(w0: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep by its definition: at column j, R = {j, ..., K-1} and Hinv = (H_RR + lam I)^-1
    inverted afresh; each 4-column group's tile pattern by kept w^2 / Hinv_cc (c's own R); a
    pruned w_ij moves the row's free entries by -w_ij Hinv[j, R] / Hinv[j, j]."""
    n, k = w0.shape
    h = gram + damping(gram) * torch.eye(k, dtype=torch.float64)
    w, mask = w0.double().clone(), torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        if j % 4 == 0:
            d = torch.stack([torch.linalg.inv(h[c:, c:])[0, 0] for c in range(j, j + 4)])
            mask[:, j:j + 4] = transposable_mask(w[:, j:j + 4] ** 2 / d)
        hinv = torch.linalg.inv(h[j:, j:])
        for i in range(n):
            if not mask[i, j]:
                w[i, j:] -= w[i, j] / hinv[0, 0] * hinv[0, :]
                w[i, j] = 0.0
    return mask, w


@pytest.mark.parametrize("n, k, tokens, block", [(8, 12, 40, 8), (12, 20, 7, 4), (16, 136, 300, 128), (4, 4, 1, 4)])
def test_obs_sweep_matches_the_float64_definition(n, k, tokens, block):
    """Awkward shapes, fewer tokens than features, blocks that do not divide K."""
    g = torch.Generator().manual_seed(n * 100 + k)
    w = torch.randn(n, k, generator=g)
    x = correlated_inputs(tokens, k, seed=k)
    mask, pruned = obs_prune(w, x.t() @ x, block=block)
    want_mask, want = _reference_obs(w, x.t() @ x)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(pruned, want, rtol=1e-9, atol=1e-10)
    assert torch.equal(pruned != 0, mask)
    assert sparsity_problem(pruned) is None and sparsity_problem(pruned.t().contiguous()) is None


def test_obs_sweep_beats_wanda_on_the_output_error():
    """On a layer of realistic proportions (correlated inputs, 4x more tokens than features) the
    OBS mask, with or without the final least-squares refit, leaves a smaller calibration output
    error than Wanda's mask refit by least squares (wanda-ls)."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(7))
    x = correlated_inputs(1024, 256, seed=8)
    gram = x.t() @ x
    wanda_mask = transposable_mask(w.abs() * gram.diagonal().sqrt().float())
    wanda_ls = relative_output_error(reconstruct(w, wanda_mask, gram), w, gram)
    mask, swept = obs_prune(w, gram)
    obs, obs_ls = relative_output_error(swept, w, gram), relative_output_error(reconstruct(w, mask, gram), w, gram)
    assert obs_ls <= obs and obs_ls < 0.95 * wanda_ls, (wanda_ls, obs, obs_ls)


def test_obs_sweep_is_deterministic_and_checks_shapes():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(30, 16, seed=2)
    a, b = obs_prune(w, x.t() @ x), obs_prune(w.clone(), (x.t() @ x).clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="multiples of 4"):
        obs_prune(torch.randn(6, 16), x.t() @ x)
    with pytest.raises(ValueError, match="block=6"):
        obs_prune(w, x.t() @ x, block=6)


def test_refit_to_another_target_matches_lstsq():
    """dense_refit + reconstruct fit X~ w to Y (not X~ w0) on the kept set: against a stacked
    float64 lstsq; relative_error_to against the error computed from X~ and Y directly."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 24, generator=g).double()
    x = correlated_inputs(60, 24, seed=4)
    x_pruned = x + 0.1 * torch.randn(60, 24, generator=g).double()
    y = x @ w0.t()
    gram, cross = x_pruned.t() @ x_pruned, x_pruned.t() @ y
    mask = transposable_mask(w0.abs())
    fitted = reconstruct(dense_refit(w0, gram, cross), mask, gram)
    lam = damping(gram)
    for i in range(8):
        kept = mask[i].nonzero().squeeze(1)
        a = torch.cat([x_pruned[:, kept], lam ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
        b = torch.cat([y[:, i], lam ** 0.5 * w0[i, kept]])
        want = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution.squeeze(1)
        torch.testing.assert_close(fitted[i, kept], want, rtol=1e-7, atol=1e-9)
    direct = float((x_pruned @ fitted.t() - y).norm() / y.norm())
    assert relative_error_to(fitted, gram, cross, float(y.pow(2).sum())) == pytest.approx(direct, rel=1e-8)


# ----------------------------------------------------------------------------- through prune


def _mlp():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                           init_lora_weights=False))


def _calibration():
    return [correlated_inputs(40, 64, seed=s).float() for s in range(4)]


def _bases(model):
    return {path: layer.base_layer for path, layer in sparsity.lora_base_layers(model)}


@pytest.mark.parametrize("method, refit", [("wanda", True), ("sparsegpt", False), ("sparsegpt", True),
                                                 ("wanda", False)])
@pytest.mark.parametrize("target", ["model", "layer"])
def test_sequential_prune_fits_each_layer_on_the_pruned_inputs(method, refit, target):
    """Layer l is measured on what the layers before it, already pruned, give: replaying the
    pruning by hand (inputs collected from the partly pruned model, the layer fitted to the
    dense model's or the dense layer's outputs) gives the same weights; masks 2:4 both ways."""
    dense, batches = _mlp(), _calibration()
    model = copy.deepcopy(dense)
    report = sparsity.prune(model, method, calibration=batches, reconstruct=refit, sequential=True,
                            target=target, convert=False)
    assert report.sequential == target and "sequential" in str(report)
    dense_inputs = lora_base_inputs(dense, batches)
    replay = copy.deepcopy(dense)
    for path, base in _bases(replay).items():
        x, w0 = lora_base_inputs(replay, batches)[path], base.weight.detach().double()
        gram = x.t() @ x
        y = (dense_inputs[path] if target == "model" else x) @ w0.t()
        fit = dense_refit(w0, gram, x.t() @ y)
        if method == "sparsegpt":
            mask, want = obs_prune(fit, gram)
        else:
            mask = transposable_mask(w0.abs().float() * x.pow(2).sum(0).sqrt().float())
            want = w0 * mask
        if refit:
            want = reconstruct(fit, mask, gram)
        got = _bases(model)[path].weight
        assert sparsity_problem(got) is None and sparsity_problem(got.t().contiguous()) is None
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            base.weight.copy_(got)
        if method != "wanda" or refit:
            error = relative_error_to(got, gram, x.t() @ y, float(y.pow(2).sum()))
            assert report.output_error[f"{path}.base_layer"][1] == pytest.approx(error, rel=1e-5)


def test_sequential_groups_layers_that_share_an_input():
    from unsloth_compile.sparsity.sequential import forward_groups

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    model = Fork()
    groups = forward_groups(model, {"c": model.c, "a": model.a, "b": model.b}, torch.randn(2, 8))
    assert groups == [["a", "b"], ["c"]]


def test_sequential_prune_lowers_the_final_output_error():
    """Calibrated on the pruned inputs and fitted to the dense model's outputs, the pruned MLP's
    output on held-out inputs is closer to the dense one than with every layer pruned at once."""
    dense, batches = _mlp(), _calibration()
    held = correlated_inputs(200, 64, seed=99).float()
    with torch.no_grad():
        want = dense(held)
    errors = {}
    for sequential in (False, True):
        model = copy.deepcopy(dense)
        sparsity.prune(model, "wanda", calibration=batches, reconstruct=True, sequential=sequential)
        with torch.no_grad():
            errors[sequential] = float((model(held) - want).norm() / want.norm())
    assert errors[True] < errors[False], errors


def test_sparsegpt_and_sequential_are_deterministic():
    batches = _calibration()
    a, b = _mlp(), _mlp()
    ra = sparsity.prune(a, "sparsegpt", calibration=batches, reconstruct=True, sequential=True)
    rb = sparsity.prune(b, "sparsegpt", calibration=batches, reconstruct=True, sequential=True)
    assert ra.output_error == rb.output_error and ra.energy == rb.energy
    for (path, la), lb in zip(_bases(a).items(), _bases(b).values()):
        assert torch.equal(la.weight, lb.weight), path
        assert isinstance(la, sparsity.Sparse24Linear)


def test_prune_refusals_of_the_new_options(monkeypatch):
    model, batches = _mlp(), _calibration()
    with pytest.raises(ValueError, match="method='sparsegpt' weighs.*pass calibration="):
        sparsity.prune(model, "sparsegpt")
    with pytest.raises(ValueError, match="target='layer'.*pass sequential=True"):
        sparsity.prune(model, "wanda", calibration=batches, target="layer")
    with pytest.raises(ValueError, match="target='dense'; choose one of model, layer"):
        sparsity.prune(model, "wanda", calibration=batches, sequential=True, target="dense")
    with pytest.raises(ValueError, match="method='magnitude' without reconstruct=True measures nothing"):
        sparsity.prune(model, "magnitude", calibration=batches, sequential=True)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        sparsity.prune(model, "wanda", calibration=[], sequential=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the widest layer (K = 128, N = 64): H 128 KiB, with B 192 KiB
    monkeypatch.setattr(sparsity.pruning, "GRAM_BUDGET_BYTES", 150_000)
    with pytest.raises(ValueError, match="one group's float64 statistics.*target='layer'"):
        sparsity.prune(model, "sparsegpt", calibration=batches, sequential=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    sparsity.prune(model, "sparsegpt", calibration=batches, sequential=True, target="layer")  # 128 KiB: fits


class _Tokens(nn.Module):
    """An MLP over (batch, tokens, 64) that takes an attention_mask, as a language model does."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, attention_mask=None):
        return self.mlp(x)


@pytest.mark.parametrize("sequential", [False, True])
def test_ignore_padding_measures_only_the_attended_tokens(sequential):
    """With ignore_padding=True the padded positions change nothing: pruning on padded batches
    equals pruning on the real tokens alone; without it they do."""
    g = torch.Generator().manual_seed(5)
    lengths = [[7, 3, 10], [1, 10, 4]]
    padded, real = [], []
    for s, lens in enumerate(lengths):
        x = correlated_inputs(30, 64, seed=s).float().reshape(3, 10, 64)
        mask = (torch.arange(10)[None, :] < torch.tensor(lens)[:, None]).long()
        noise = 50 * torch.randn(3, 10, 64, generator=g)  # what a pad token carries: anything
        padded.append({"x": torch.where(mask[..., None].bool(), x, noise), "attention_mask": mask})
        real.append({"x": x[mask.bool()][None], "attention_mask": torch.ones(1, int(mask.sum()), dtype=torch.long)})
    results = {}
    for name, batches, ignore in (("padded", padded, True), ("real", real, False), ("included", padded, False)):
        model = _Tokens(_mlp())
        report = sparsity.prune(model, "sparsegpt", calibration=batches, reconstruct=True, sequential=sequential,
                                ignore_padding=ignore, convert=False)
        results[name] = {p: b.weight.detach().clone() for p, b in _bases(model).items()}
        assert ("padding left out" in str(report)) == ignore
    for path, w in results["padded"].items():
        torch.testing.assert_close(w, results["real"][path], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(w, results["included"][path], rtol=1e-3, atol=1e-4)


def test_ignore_padding_refusals():
    model = _Tokens(_mlp())
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="dicts with an attention_mask, or ignore_padding=False"):
        sparsity.prune(model, "wanda", calibration=[x], ignore_padding=True)
    with pytest.raises(ValueError, match=r"input is \(2, 5, 64\), which the attention_mask \(2, 4\) does not index"):
        sparsity.prune(model, "wanda", calibration=[{"x": x, "attention_mask": torch.ones(2, 4)}],
                       ignore_padding=True)
    with pytest.raises(ValueError, match=r"input is \(2, 5, 64\), which the attention_mask \(3, 5\) does not index"):
        sparsity.prune(model, "wanda", calibration=[{"x": x, "attention_mask": torch.ones(3, 5)}],
                       ignore_padding=True)
    pooled = _Tokens(_mlp())  # one row per sequence (a pooler's input): nothing to leave out
    report = sparsity.prune(pooled, "wanda", calibration=[{"x": x[:, 0], "attention_mask": torch.ones(2, 5)}],
                            ignore_padding=True)
    assert len(report.energy) == 3
    with pytest.raises(ValueError, match="method='magnitude' without reconstruct=True uses none"):
        sparsity.prune(model, "magnitude", ignore_padding=True)
