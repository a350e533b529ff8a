"""Dynamic LoRA rank (unsloth_compile/rank/): resize math, optimizer state, policies,
guarded recompilation under the unsloth backend, the Trainer callback, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from unsloth_compile.rank import RankController, allocate_ranks, find_lora_adapters, set_rank
from unsloth_compile.report import collect_reports

OPTIONS = {"inner": "aot_eager"}


class TinyLoRA(nn.Module):
    """A hand-written LoRA linear following rank.py's protocol: lora_A (r, in) and lora_B
    (out, r) Parameters, float `scale`, `alpha`."""

    def __init__(self, d_in: int, d_out: int, r: int = 4, alpha: float = 8.0, use_rslora: bool = False):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r) * 0.1)  # non-zero: a "trained" adapter
        self.dropout = nn.Dropout(0.0)
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scale


class LinearLoRA(nn.Module):
    """The same protocol with nn.Linear adapters (`B(A(x))`), no `alpha` attribute."""

    def __init__(self, d_in: int, d_out: int, r: int = 4):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)
        self.scale = 2.0

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


class TwoLayer(nn.Module):
    def __init__(self, r: int = 4, layer=TinyLoRA):
        super().__init__()
        self.l1 = layer(64, 64, r)
        self.l2 = layer(64, 48, r)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.fixture(autouse=True)
def _dynamo_settings():
    """The controller raises Dynamo's limits: restore them (and run with specialize_float off, the
    default since torch 2.6, whatever the environment says)."""
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256, specialize_float=False):
        yield


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adam(model, lr=1e-2, **kw):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def _train(model, optimizer, steps=3, d_in=64, forward=None):
    forward = forward or model
    for _ in range(steps):
        forward(torch.randn(16, d_in)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


# ----------------------------------------------------------------------------- recompilation


@pytest.mark.parametrize("static_params", [True, False], ids=["default", "force_parameter_static_shapes=False"])
def test_one_recompile_per_new_rank_and_eager_equality(static_params):
    with torch._dynamo.config.patch(force_parameter_static_shapes=static_params):
        model = TwoLayer()
        optimizer = _adam(model)
        controller = RankController(model, optimizer, policy="manual")
        compiled = torch.compile(model, backend="unsloth", options=OPTIONS)
        x = torch.randn(8, 64)
        frames, fused, graphs = [], [], []
        with collect_reports() as report:
            for r in (4, 6, 8, 6, 4):
                controller.set_rank(r)
                assert controller.ranks == {"l1": r, "l2": r}
                out = compiled(x)
                torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)
                frames.append(counters["frames"]["ok"])
                fused.append(report.counters["lora_linear.fused"])
                graphs.append(report.graphs)
                out.square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
    assert frames == [1, 2, 3, 3, 3]  # one compile per new rank, the cache for ranks seen before
    # Every graph handed to the backend fused both LoRA linears. With specialize_float off, Dynamo
    # traces the first changed-scale frame twice (specialised, then with the scale as an input):
    # two backend calls inside one frame compile, not a second recompile.
    assert report.refused == [] and fused == [2 * g for g in graphs]
    assert graphs[2:] == [graphs[2]] * 3  # nothing compiled for ranks seen before


def test_rank_change_keeps_fusion_without_specialize_float():
    """After the scale changes, Dynamo passes it as a 0-d tensor and multiplies by item(): the
    rank-6 graph must still fuse both LoRA linears (the controller leaves specialize_float alone)."""
    model = TwoLayer()
    compiled = torch.compile(model, backend="unsloth", options=OPTIONS)
    x = torch.randn(8, 64)
    with collect_reports() as report:
        compiled(x)
        for layer in (model.l1, model.l2):  # what set_rank does
            layer.lora_A = nn.Parameter(torch.randn(6, layer.lora_A.shape[1]))
            layer.lora_B = nn.Parameter(torch.randn(layer.lora_B.shape[0], 6))
            layer.scale = layer.alpha / 6
        torch.testing.assert_close(compiled(x), model(x))
    assert counters["frames"]["ok"] == 2
    assert report.refused == [] and report.counters["lora_linear.fused"] == 2 * report.graphs


def test_peft_layers_resize_and_compile():
    model = _peft_bert(r=8)
    model.eval()
    ids = torch.randint(2, 96, (2, 12))
    before = model(input_ids=ids).logits
    controller = RankController(model, policy="manual", max_rank=12)
    names = list(controller.ranks)
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    compiled = torch.compile(model, backend="unsloth", options=OPTIONS)
    with collect_reports() as report:
        for r in (8, 10, 12, 10):
            controller.set_rank(r)
            layer = controller.adapters[0].module
            assert layer.r["default"] == r and layer.scaling["default"] == 16 / r
            assert layer.lora_A["default"].out_features == r and layer.lora_B["default"].in_features == r
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    # grows, then 12 -> 10 drops two zero singular values: the function never changed
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    assert counters["frames"]["ok"] == 3
    assert report.refused == [] and report.counters["lora_linear.fused"] == 4 * report.graphs


def _peft_bert(r: int = 8):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.BertConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64,
                        num_labels=3, vocab_size=96, num_hidden_layers=2,
                        problem_type="single_label_classification")
    model = tf.BertForSequenceClassification(cfg)
    lora = LoraConfig(r=r, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(model, lora)


# ----------------------------------------------------------------------------- resize math


@pytest.mark.parametrize("layer,use_rslora", [(TinyLoRA, False), (TinyLoRA, True), (LinearLoRA, False)])
def test_grow_preserves_function(layer, use_rslora):
    model = layer(64, 48, 4, use_rslora=True) if use_rslora else layer(64, 48, 4)
    x = torch.randn(32, 64)
    with torch.no_grad():
        before = model(x)
    (plan,) = set_rank(model, 9, modules=[model])  # 9: the policies' limit of a 64 -> 48 layer
    assert plan.kind == "grow" and (plan.old_rank, plan.new_rank) == (4, 9)
    adapter = find_lora_adapters(model)[0]
    assert adapter.A.shape == (9, 64) and adapter.B.shape == (48, 9)
    assert torch.all(adapter.B[:, 4:] == 0) and adapter.A[4:].abs().max() <= 1 / math.sqrt(64)
    expected_scale = 8 / math.sqrt(9) if use_rslora else (8 / 9 if layer is TinyLoRA else 2.0 * 4 / 9)
    assert adapter.scale == pytest.approx(expected_scale)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_shrink_keeps_top_singular_directions():
    model = TinyLoRA(64, 48, 12)
    x = torch.randn(32, 64)
    with torch.no_grad():
        before = model(x)
        delta = model.scale * model.lora_B.double() @ model.lora_A.double()
        s = torch.linalg.svdvals(delta)
    (plan,) = set_rank(model, 5, modules=[model])
    discarded = float(s[5:].square().sum().sqrt())
    assert plan.kind == "shrink" and plan.discarded == pytest.approx(discarded, rel=1e-6)
    assert model.scale == 8 / 5 and model.lora_A.shape == (5, 64) and model.lora_B.shape == (48, 5)
    with torch.no_grad():
        change = float((model(x) - before).norm())
        new_delta = model.scale * model.lora_B.double() @ model.lora_A.double()
    # ||X (dW)^T||_F <= ||X||_F ||dW||_2 <= ||X||_F * sqrt(sum of discarded sigma^2)
    assert change <= float(x.norm()) * discarded * (1 + 1e-4) + 1e-5
    # the kept part is the best rank-5 approximation (Eckart-Young): singular values s[:5]
    torch.testing.assert_close(torch.linalg.svdvals(new_delta)[:5], s[:5], rtol=1e-5, atol=1e-7)
    # sqrt(S) split evenly: the columns of B and the rows of A have equal norms
    torch.testing.assert_close(model.lora_B.norm(dim=0), model.lora_A.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_shrink_of_an_untrained_adapter_reinitialises_a():
    model = TinyLoRA(64, 48, 8)
    with torch.no_grad():
        model.lora_B.zero_()  # PEFT's init: B = 0, so B A = 0 and every singular value is zero
    set_rank(model, 4, modules=[model])
    assert torch.all(model.lora_B == 0)
    assert model.lora_A.abs().min() > 0 and model.lora_A.abs().max() <= 1 / 8  # Kaiming-uniform rows


# ----------------------------------------------------------------------------- optimizer state


def test_adam_state_grows_and_shrinks_with_the_parameters():
    model = TwoLayer()
    optimizer = _adam(model, lr=1e-2, weight_decay=0.1, amsgrad=True)
    optimizer.add_param_group({"params": [], "lr": 3e-3})  # an unrelated second group survives
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    _train(model, optimizer)
    scheduler.step()
    old_A, old_B = model.l1.lora_A, model.l1.lora_B
    old_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[old_B].items()}
    old_A_state = {k: v.clone() for k, v in optimizer.state[old_A].items()}
    index = next(i for i, p in enumerate(optimizer.param_groups[0]["params"]) if p is old_B)
    controller = RankController(model, optimizer, policy="manual", scheduler=scheduler)
    controller.set_rank(6)
    factor = (8 / 4) / (8 / 6)  # old scale / new scale: B's old columns were multiplied by it
    new_A, new_B = model.l1.lora_A, model.l1.lora_B
    assert optimizer.param_groups[0]["params"][index] is new_B
    assert all(p is not old_A and p is not old_B for g in optimizer.param_groups for p in g["params"])
    assert old_A not in optimizer.state and old_B not in optimizer.state
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and len(optimizer.param_groups) == 2
    state_B, state_A = optimizer.state[new_B], optimizer.state[new_A]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert state_B[key].shape == (64, 6) and state_A[key].shape == (6, 64)
        power = 1 if key == "exp_avg" else 2
        torch.testing.assert_close(state_B[key][:, :4], old_state[key] / factor ** power)
        torch.testing.assert_close(state_A[key][:4], old_A_state[key])
        assert torch.all(state_B[key][:, 4:] == 0) and torch.all(state_A[key][4:] == 0)
    assert float(state_B["step"]) == float(old_state["step"]) == 3
    _train(model, optimizer, steps=1)  # the optimizer steps with the migrated state
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)  # the scheduler still drives it
    # shrink: the SVD re-bases the factors, so the moments restart from zero at step 0
    controller.set_rank(4)
    state_B = optimizer.state[model.l1.lora_B]
    assert state_B["exp_avg"].shape == (64, 4) and torch.all(state_B["exp_avg"] == 0)
    assert torch.all(state_B["exp_avg_sq"] == 0) and float(state_B["step"]) == 0
    _train(model, optimizer, steps=1)
    assert float(optimizer.state[model.l1.lora_B]["step"]) == 1


def test_sgd_momentum_grows_and_resets():
    model = TwoLayer()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    _train(model, optimizer)
    old = optimizer.state[model.l2.lora_A]["momentum_buffer"].clone()
    set_rank(model, 7, optimizer=optimizer)
    buf = optimizer.state[model.l2.lora_A]["momentum_buffer"]
    assert buf.shape == (7, 64)
    torch.testing.assert_close(buf[:4], old)
    assert torch.all(buf[4:] == 0)
    set_rank(model, 5, optimizer=optimizer)
    buf = optimizer.state[model.l2.lora_B]["momentum_buffer"]
    assert buf.shape == (48, 5) and torch.all(buf == 0)
    _train(model, optimizer, steps=1)


# ----------------------------------------------------------------------------- policies


def test_loss_decay_policy_grows_on_progress_and_shrinks_on_plateau():
    model = nn.Sequential(TinyLoRA(64, 64), TinyLoRA(64, 40))  # limits 12 and 8
    controller = RankController(model, _adam(model), policy="loss-decay", window=2, threshold=0.95,
                                init_rank=4, min_rank=4, max_rank=12)
    seen = []
    # window means: 10, 5 (grow), 4 (grow), 3.9 (shrink), 2 (grow), 1 (grow), 0.5 (grow), 0.25
    for loss in (10, 10, 5, 5, 4, 4, 3.9, 3.9, 2, 2, 1, 1, 0.5, 0.5, 0.25, 0.25):
        controller.step(loss)
        if controller.steps % 2 == 0:
            seen.append(tuple(controller.ranks.values()))
    assert seen == [(4, 4), (6, 6), (8, 8), (7, 7), (9, 8), (11, 8), (12, 8), (12, 8)]
    assert {e["reason"] for e in controller.events} == {"loss-decay"}  # init_rank 4 was the rank already


def test_controller_set_rank_on_some_modules():
    model = TwoLayer()
    controller = RankController(model, _adam(model), policy="manual")
    controller.set_rank(7, modules=["l2"])
    assert controller.ranks == {"l1": 4, "l2": 7} and controller.events[-1]["reason"] == "manual"
    with pytest.raises(ValueError, match="outside"):
        controller.set_rank(0, modules=[model.l1])
    assert controller.ranks == {"l1": 4, "l2": 7}


def test_controller_starts_at_init_rank_and_bounds_the_limit():
    model = TwoLayer(r=8)
    controller = RankController(model, policy="loss-decay", init_rank=4)
    assert controller.ranks == {"l1": 4, "l2": 4}
    # ranks 4..16 capped at the layers' limits (12 and 9): 9 configurations, train and eval each
    assert len(controller._configs) == 9
    assert torch._dynamo.config.recompile_limit == 8 + 2 * 9


def test_allocate_ranks_under_budget():
    assert allocate_ranks([1, 1, 1, 1], 16, [4] * 4, [12] * 4) == [4, 4, 4, 4]
    ranks = allocate_ranks([8, 4, 2, 1], 24, [2] * 4, [10] * 4)
    assert sum(ranks) == 24 and ranks[0] == 10 and ranks == sorted(ranks, reverse=True)
    assert allocate_ranks([0, 0], 9, [1, 1], [8, 8]) in ([5, 4], [4, 5])  # no signal: even split
    assert allocate_ranks([5, 1], 100, [1, 1], [8, 3]) == [8, 3]  # budget capped by the limits


def test_importance_policy_gives_rank_to_the_sensitive_layer():
    model = TwoLayer()
    optimizer = _adam(model)
    controller = RankController(model, optimizer, policy="importance", window=3, init_rank=6,
                                min_rank=2, max_rank=9)
    assert controller.budget == 12
    for _ in range(3):
        # l1 barely matters to this loss: its sensitivity |w * grad| is ~1e-4 of l2's
        x = torch.randn(16, 64)
        h = model.l1(x)
        (model.l2(torch.relu(h).detach()).square().mean() + 1e-4 * h.square().mean()).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    assert controller.ranks == {"l1": 3, "l2": 9}  # l2 at its limit (48 / 5), l1 gets the rest
    assert sum(controller.ranks.values()) == 12


# ----------------------------------------------------------------------------- Dynamo settings


def test_warns_when_the_recompile_limit_would_fall_back_to_eager():
    model = TwoLayer()
    with torch._dynamo.config.patch(recompile_limit=2):
        with pytest.warns(UserWarning, match=r"recompile_limit=2 .*eagerly.*Fix: set torch._dynamo.config.recompile_limit"):
            RankController(model, policy="loss-decay", raise_recompile_limit=False)
    controller = RankController(model, policy="manual")
    torch._dynamo.config.recompile_limit = 3  # the user lowers it after the controller raised it
    with pytest.warns(UserWarning, match="recompile_limit=3"):
        controller.set_rank(6)
    assert torch._dynamo.config.recompile_limit == 3  # the user's setting is respected


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["rank0", "too_large", "not_lora", "no_such_name", "float_rank"])
def test_bad_input_raises_and_changes_nothing(case):
    model = TwoLayer()
    optimizer = _adam(model)
    _train(model, optimizer, steps=1)
    weights, opt_state = _state(model), copy.deepcopy(optimizer.state_dict())
    params = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    args = {"rank0": (0, None, "outside \\[1, 64\\]"), "too_large": (49, None, "l2 is outside \\[1, 48\\]"),
            "not_lora": (6, ["l1.base"], "not a LoRA layer"), "no_such_name": (6, ["l3"], "no module"),
            "float_rank": (5.5, None, "rank 5.5")}[case]
    with pytest.raises(ValueError, match=args[2]):
        set_rank(model, args[0], modules=args[1], optimizer=optimizer)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == params
    assert str(optimizer.state_dict()) == str(opt_state)
    assert model.l1.scale == model.l2.scale == 2.0


def test_manual_rank_goes_up_to_the_smaller_side_and_policies_stay_at_a_fifth():
    """The min(in, out) // 5 bound is the policies'; set_rank may take a layer to min(in, out)."""
    model = TwoLayer()  # l1 64 -> 64, l2 64 -> 48: policy limits 12 and 9
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
    set_rank(model, 48, modules=["l2"])  # the old check refused anything above 9
    set_rank(model, 64, modules=["l1"])
    assert (model.l1.lora_A.shape, model.l2.lora_B.shape) == ((64, 64), (48, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # a grow keeps the function
    with pytest.raises(ValueError, match=r"rank 49 for l2 is outside \[1, 48\] \(in_features=64, out_features=48"):
        set_rank(model, 49)
    assert model.l1.lora_A.shape[0] == 64  # validated before anything changed
    controller = RankController(model, policy="loss-decay", init_rank=4, min_rank=4, max_rank=40, window=1,
                                threshold=10.0)  # every window grows
    for _ in range(8):
        controller.step(1.0)
    assert controller.ranks == {"l1": 12, "l2": 9}
    controller.set_rank(30)  # a manual change through the controller has the manual bound
    assert controller.ranks == {"l1": 30, "l2": 30}


def test_controller_rejects_a_non_lora_model():
    with pytest.raises(ValueError, match="no LoRA layer"):
        RankController(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="is not a LoRA layer"):
        RankController(TwoLayer(), modules=["l1.base"])
    with pytest.raises(ValueError, match="not part of the model"):
        RankController(TwoLayer(), modules=[TinyLoRA(8, 8)])


# ----------------------------------------------------------------------------- Trainer


def test_trainer_callback_drives_the_controller(tmp_path):
    import transformers as tf

    from unsloth_compile.rank import RankCallback

    model = _peft_bert(r=8)  # the controller starts it at init_rank 4
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 96, (12,), generator=g), "labels": int(i % 3)} for i in range(64)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True,
                                save_strategy="no", disable_tqdm=True, lr_scheduler_type="linear")
    callback = RankCallback(policy="loss-decay", window=3, threshold=1.5, init_rank=4, min_rank=4, max_rank=10)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    result = trainer.train()
    controller = callback.controller
    assert math.isfinite(result.training_loss)
    # threshold 1.5: any window that does not lose 50% grows (rank 4 -> 6 -> 8 -> 10)
    assert controller.steps == 11 and [e["step"] for e in controller.events] == [0, 6, 9]
    assert set(controller.ranks.values()) == {8}
    optimizer = trainer.optimizer
    lora_params = {id(a.A) for a in controller.adapters} | {id(a.B) for a in controller.adapters}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert lora_params <= in_groups
    assert all(optimizer.state[a.B]["exp_avg"].shape == a.B.shape for a in controller.adapters)
