"""compress_activations: compress/decompress of what LoRA ops and FFN blocks save for backward.

Ops against float64 (kernels/compress.py through torch.ops.unsloth.*), the random low-rank
estimator's unbiasedness and predicted error, the range finder's subspace against float64 and
its dA error against the best rank-k subspace's, then a tiny PEFT Llama compiled with each mode
(aot_eager, and AOTAutograd with Inductor's decompositions and Inductor's partition entry
point): forward values bitwise equal to the uncompressed graph, gradient error bounds for dA
(lora_A), dB (lora_B) and dX (the input embeddings), the sites in the report, and the bytes
autograd actually keeps for backward (a saved-tensors hook) against the report's counters.
"""

from __future__ import annotations

import collections
import functools
import math

import pytest
import torch

import unsloth_compile
from helpers import batch_for, peft_wrap, saved_for_backward, tiny_causal_lm
from unsloth_compile import Config
from unsloth_compile.kernels import compress as ref
from unsloth_compile.ops.compress import seed_projections
from unsloth_compile.report import collect_reports

ops = torch.ops.unsloth


def sqnr_db(exact: torch.Tensor, approx: torch.Tensor) -> float:
    exact, approx = exact.double(), approx.double()
    return 10 * math.log10(exact.pow(2).sum() / (exact - approx).pow(2).sum().clamp_min(1e-300))


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.double() - exact.double()).norm() / exact.double().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ----------------------------------------------------------------------------- ops


@pytest.mark.parametrize("fmt,min_sqnr", [("fp8", 28.0), ("int8", 33.0)])
@pytest.mark.parametrize("shape", [(1, 16), (7, 33), (3, 5, 100), (2, 1, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_roundtrip_against_float64(fmt, min_sqnr, shape, dtype):
    x64 = torch.randn(shape, dtype=torch.float64) * torch.logspace(-2, 2, shape[-2] if len(shape) > 1 else 1,
                                                                    dtype=torch.float64).unsqueeze(-1)
    x = x64.to(dtype)
    q, scale = ops.compress_rowwise(x, fmt)
    assert q.dtype == ref.ROWWISE_FORMATS[fmt] and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    y = ops.decompress_rowwise(q, scale, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.double() - x.double()).abs()
    step = scale.double()
    if fmt == "int8":  # rounding to the nearest multiple of the row's scale
        bound = step / 2 + 1e-6 * step
    else:  # e4m3: 3 mantissa bits (half an ulp = 2^-4 relative), subnormal step 2^-9 of the scale
        bound = torch.maximum(x.double().abs() * 2.0**-4, step * 2.0**-10)
    bound = bound + y.double().abs() * (2.0**-8 if dtype == torch.bfloat16 else 0)  # the final cast
    assert (err <= bound * 1.0001).all(), f"worst excess {(err - bound).max().item()}"
    for row in range(x.reshape(-1, shape[-1]).shape[0]):  # every row, whatever its magnitude
        assert sqnr_db(x.reshape(-1, shape[-1])[row], y.reshape(-1, shape[-1])[row]) >= min_sqnr - 8


def test_rowwise_rows_are_scaled_on_their_own():
    x = torch.randn(4, 40)
    x[1] *= 1e4  # an outlier token
    x[2] = 0.0
    for fmt in ("fp8", "int8"):
        q, scale = ops.compress_rowwise(x, fmt)
        q_ref, _ = ops.compress_rowwise(x[[0, 3]], fmt)
        assert torch.equal(q[[0, 3]].view(torch.uint8), q_ref.view(torch.uint8))
        y = ops.decompress_rowwise(q, scale, torch.float32)
        assert torch.equal(y[2], torch.zeros(40)) and scale[2].item() == 1.0
        assert sqnr_db(x, y) >= 28


def test_random_projection_is_unbiased_with_the_predicted_error():
    """E[P P^T] = I, so m P P^T estimates m; its squared error is (K - 1) / k ||m||^2 on
    average for +-1/sqrt(k) entries (kernels/compress.py)."""
    K, k, draws = 97, 16, 600
    m = torch.randn(3, K, dtype=torch.float64)
    x = torch.empty(5, K)
    seed_projections(1)
    sq_err, total = 0.0, torch.zeros_like(m)
    first = ops.random_projection(x, k, torch.float64)
    assert first.shape == (K, k) and torch.allclose(first.abs(), torch.full_like(first, k ** -0.5))
    for _ in range(draws):
        p = ops.random_projection(x, k, torch.float64)
        estimate = m @ p @ p.t()
        sq_err += (estimate - m).pow(2).sum().item() / m.pow(2).sum().item()
        total += estimate
    assert abs(sq_err / draws / ((K - 1) / k) - 1) < 0.15
    assert rel_err(total / draws, m) < 3 * math.sqrt((K - 1) / k / draws)
    seed_projections(1)
    assert torch.equal(ops.random_projection(x, k, torch.float64), first)  # reproducible, fresh per call
    assert not torch.equal(ops.random_projection(x, k, torch.float64), first)


def _omega_seed(seed: int) -> int:
    """The seed ops.range_projection draws right after seed_projections(seed)."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))


def _spectrum_rows(M: int, K: int, decay: float, seed: int = 0) -> torch.Tensor:
    """M x K float64 with random singular vectors and singular values i^-decay (0: flat)."""
    g = torch.Generator().manual_seed(seed)
    n = min(M, K)
    U = torch.linalg.qr(torch.randn(M, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(K, n, generator=g, dtype=torch.float64)).Q
    return (U * torch.arange(1, n + 1, dtype=torch.float64) ** -decay) @ V.t()


@pytest.mark.parametrize("lead,K,k", [((37,), 130, 128), ((3, 171), 129, 128), ((1,), 40, 8), ((2, 3), 97, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_range_projection_against_float64(lead, K, k, dtype):
    """Q = orth(X^T X Omega) in fp32 (from a bf16 x too) spans what the float64 computation
    with the same Omega spans (projectors Q Q^T compared: QR's column signs are free), with
    orthonormal columns; stored in the adapter dtype asked for."""
    x = (_spectrum_rows(math.prod(lead), K, 0.5) * 10).reshape(*lead, K).to(dtype)
    seed_projections(5)
    q = ops.range_projection(x, k, torch.float32)
    assert q.shape == (K, k) and q.dtype == torch.float32
    x64 = x.double().reshape(-1, K)
    g = torch.Generator().manual_seed(_omega_seed(5))
    omega = torch.randn(K, k, generator=g, dtype=torch.float32).double()
    q64 = torch.linalg.qr(x64.t() @ (x64 @ omega)).Q
    q = q.double()
    torch.testing.assert_close(q.t() @ q, torch.eye(k, dtype=torch.float64), rtol=0, atol=2e-6)
    # the part of X inside the span: equal to float64's to fp32 rounding
    torch.testing.assert_close(x64 @ q @ q.t(), x64 @ q64 @ q64.t(), rtol=0, atol=2e-5 * x64.abs().max().item())
    if math.prod(lead) <= k:  # Q spans every row of X: the projection is exact
        torch.testing.assert_close(x64 @ q @ q.t(), x64, rtol=0, atol=2e-5 * x64.abs().max().item())
    assert ops.range_projection(x, k, torch.bfloat16).dtype == torch.bfloat16
    # the layout the fake kernel gives (Inductor asserts it on CUDA): row-major
    assert q.is_contiguous() and ops.range_projection(x, k, torch.bfloat16).is_contiguous()
    seed_projections(5)
    assert torch.equal(ops.range_projection(x, k, torch.float32).double(), q)  # reproducible
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert ops.range_projection(mode.from_tensor(x), k, torch.bfloat16).shape == (K, k)


@pytest.mark.parametrize("M,K,k,decay,max_rel,min_cos", [
    # (measured rel / cos) exact when M <= k: Q spans X's rows
    (37, 130, 128, 0.0, 1e-5, 0.99999),
    (5, 300, 8, 0.0, 1e-5, 0.99999),
    # a decaying spectrum (singular values 1/i): within 1.5x of the best rank-k subspace (SVD)
    (1000, 384, 128, 1.0, None, 0.995),  # 0.070 (SVD 0.059) / 0.9976; random 1.74 / 0.49
    (1000, 1536, 128, 1.0, None, 0.995),  # 0.078 (SVD 0.068) / 0.9970; random 3.50 / 0.29
    (301, 200, 16, 1.0, None, 0.97),  # 0.200 (SVD 0.157) / 0.980
    (517, 131, 128, 0.0, None, 0.98),  # K just above k, flat: 0.174 (SVD 0.130) / 0.985
])
def test_range_projection_dA_error(M, K, k, decay, max_rel, min_cos):
    """dA = s (G^T Z) Q^T from Z = X Q against the exact s G^T X (float64): the range
    finder's error is the part of X outside its subspace, close to the best rank-k one's."""
    x = _spectrum_rows(M, K, decay, seed=M).float()
    t = _lora_inputs((M,), K, 11, 8, "x")
    t["x"] = x
    hidden = x @ t["lora_A"].t()
    seed_projections(M)
    Q = ops.range_projection(x, k, torch.float32)
    got = ops.lora_linear_backward_projected(
        t["grad_out"], ops.project_rows(x, Q), Q, torch.float32, t["weight"], t["lora_A"], t["lora_B"], None,
        hidden, 0.5, None, False, torch.float32)[2]
    G = t["grad_out"].double() @ t["lora_B"].double() * 0.5
    exact = G.t() @ x.double()
    rel, cos = rel_err(got, exact), cosine(got, exact)
    if max_rel is None:
        top = torch.linalg.svd(x.double(), full_matrices=False).Vh[:k].t()
        max_rel = 1.5 * rel_err((G.t() @ x.double() @ top) @ top.t(), exact)
    assert rel <= max_rel and cos >= min_cos, f"relative error {rel:.4f} (bound {max_rel:.4f}), cosine {cos:.5f}"


def _lora_inputs(lead, K, N, r, form):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, K, generator=g)
    inputs = dict(x=x, weight=torch.randn(N, K, generator=g), lora_A=torch.randn(r, K, generator=g),
                  lora_B=torch.randn(N, r, generator=g), grad_out=torch.randn(*lead, N, generator=g))
    inputs["mask"] = torch.rand(*lead, K, generator=g) > 0.3 if form == "mask" else None
    inputs["lora_x"] = torch.randn(*lead, K, generator=g) if form == "lora_x" else None
    return inputs


@pytest.mark.parametrize("projection", ["range", "random"])
@pytest.mark.parametrize("form", ["x", "mask", "lora_x"])
@pytest.mark.parametrize("lead,K,N,r,k", [((1,), 33, 7, 3, 5), ((2, 5), 40, 17, 4, 8)])
def test_projected_backward_is_the_exact_op_except_dA(form, lead, K, N, r, k, projection):
    t = _lora_inputs(lead, K, N, r, form)
    scale, p_drop = 0.75, 1 / 0.7
    adapter_in = t["lora_x"] if form == "lora_x" else t["x"] * (t["mask"] * p_drop if form == "mask" else 1)
    hidden = (adapter_in.reshape(-1, K) @ t["lora_A"].t())
    exact = ops.lora_linear_backward(t["grad_out"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["lora_x"],
                                     hidden, scale, None, False, torch.float32, "reference", t["mask"], p_drop)
    P = getattr(ops, f"{projection}_projection")(t["x"], k, torch.float32)
    z = ops.project_rows(t["lora_x"] if form == "lora_x" else t["x"], P, t["mask"], p_drop)
    got = ops.lora_linear_backward_projected(
        t["grad_out"], z, P, torch.float32, t["weight"], t["lora_A"], t["lora_B"],
        torch.float32 if form == "lora_x" else None, hidden, scale, None, False, torch.float32, t["mask"], p_drop)
    for name, a, b in zip(("dx", "d_lora_x", "dB"), (got[0], got[1], got[3]), (exact[0], exact[1], exact[3])):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    G = t["grad_out"].reshape(-1, N).double() @ t["lora_B"].double() * scale
    dA_estimate = (G.t() @ (adapter_in.reshape(-1, K).double() @ P.double())) @ P.double().t()
    torch.testing.assert_close(got[2].double(), dA_estimate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_graph_form_of_compress_is_the_op_bitwise(fmt, dtype):
    """The pass writes compress/decompress into the graphs as aten ops (so Inductor fuses
    them): on CPU they give exactly what the ops (kernels/compress.py) give."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unsloth_compile.passes.compress.compress_rewrite import emit_rowwise_compress, emit_rowwise_decompress

    x = torch.randn(3, 7, 45).to(dtype) * torch.logspace(-3, 3, 7).unsqueeze(-1).to(dtype)
    x[0, 1] = 0
    graph = torch.fx.Graph()
    placeholder = graph.placeholder("x")
    with FakeTensorMode() as mode:
        placeholder.meta["val"] = mode.from_tensor(x)
    q, scale = emit_rowwise_compress(graph, placeholder, fmt, placeholder)
    restored = emit_rowwise_decompress(graph, q, scale, dtype, placeholder)
    graph.output((q, scale, restored))
    got = torch.fx.GraphModule(torch.nn.Module(), graph)(x)
    q_ref, scale_ref = ops.compress_rowwise(x, fmt)
    assert got[0].dtype == q_ref.dtype and torch.equal(got[0].view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(got[1], scale_ref)
    assert got[2].dtype == dtype and torch.equal(got[2], ops.decompress_rowwise(q_ref, scale_ref, dtype))
    assert all(node.meta["val"].shape == value.shape for node, value in zip((q, scale, restored), got))
    # the nodes go in after Inductor's decompositions: each must be an op Inductor lowers as is
    from torch._inductor.lowering import lowerings
    assert all(n.target in lowerings for n in graph.nodes if n.op == "call_function"), \
        [n.target for n in graph.nodes if n.op == "call_function" and n.target not in lowerings]


def test_opcheck_of_the_compress_ops():
    x = torch.randn(3, 5, 24)
    for fmt in ("fp8", "int8"):
        torch.library.opcheck(ops.compress_rowwise.default, (x, fmt))
        q, s = ops.compress_rowwise(x, fmt)
        # test_schema compares inputs before and after with ops CPU lacks for float8
        checks = ("test_faketensor", "test_aot_dispatch_dynamic") if fmt == "fp8" else None
        torch.library.opcheck(ops.decompress_rowwise.default, (q, s, torch.bfloat16),
                              **({"test_utils": checks} if checks else {}))
    P = ops.random_projection(x, 8, torch.float32)
    mask = torch.rand(3, 5, 24) > 0.5
    torch.library.opcheck(ops.project_rows.default, (x, P, mask, 2.0))
    torch.library.opcheck(ops.project_rows.default, (x.bfloat16(), P, mask, 2.0, torch.bfloat16))
    z16 = ops.project_rows(x.bfloat16(), P, None, 1.0, torch.bfloat16)  # stored small, computed in P's dtype
    assert z16.dtype == torch.bfloat16
    torch.testing.assert_close(z16.float(), ops.project_rows(x.bfloat16(), P), rtol=2**-8, atol=1e-6)
    t = _lora_inputs((3, 5), 24, 9, 4, "mask")
    z = ops.project_rows(t["x"], P, t["mask"], 2.0)
    torch.library.opcheck(ops.lora_linear_backward_projected.default, (
        t["grad_out"], z, P, torch.float32, t["weight"], t["lora_A"], t["lora_B"], None,
        torch.randn(15, 4), 0.5, None, False, torch.float32, t["mask"], 2.0))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert ops.random_projection(fake, 8, torch.bfloat16).shape == (24, 8)


# ----------------------------------------------------------------------------- options


def test_bad_options_are_clear_value_errors():
    with pytest.raises(ValueError, match=r"compress_activations='fp4' is not valid; choose one of 'none', 'fp8', 'int8', 'lowrank'"):
        Config.from_options({"compress_activations": "fp4"})
    with pytest.raises(ValueError, match="inner='eager' does not run; use inner='aot_eager' or 'inductor'"):
        Config(inner="eager", compress_activations="fp8")
    with pytest.raises(ValueError, match="compress_lowrank_k=0 must be a positive integer"):
        Config(compress_lowrank_k=0)
    assert Config(compress_lowrank_k="64").compress_lowrank_k == 64  # as a command line gives it
    assert Config().compress_lowrank_projection.value == "range"
    assert Config(compress_lowrank_projection="random").compress_lowrank_projection.value == "random"
    with pytest.raises(ValueError, match=r"compress_lowrank_projection='gaussian' is not valid; choose one of "
                                         r"'range', 'random'"):
        Config.from_options({"compress_activations": "lowrank", "compress_lowrank_projection": "gaussian"})
    with pytest.raises(ValueError, match="CUDA graph replay would freeze"):
        Config(compress_activations="lowrank", cudagraphs=True)
    with pytest.raises(ValueError, match="not valid"):
        unsloth_compile.compile(torch.nn.Linear(4, 4), compress_activations="yes")


def test_none_without_recompute_never_touches_the_partition(monkeypatch):
    import unsloth_compile.compressed_compile as cc

    def fail(*args, **kwargs):
        raise AssertionError("compile_compressed called with compress_activations='none', recompute off")
    monkeypatch.setattr(cc, "compile_compressed", fail)
    model = peft_wrap(torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.SiLU(), torch.nn.Linear(48, 32)),
                      target_modules=["0", "2"])
    x = torch.randn(5, 32)
    with collect_reports() as report:
        torch.compile(model, backend="unsloth", options={"inner": "aot_eager", "recompute_ffn_products": False})(
            x).sum().backward()
    assert report.counters["lora_linear.fused"] == 2
    assert not [s for s in report.sites if s.pattern == "compress_saved"]
    # by default the partitioner runs without compressing: silu's output, the second linear's
    # input, is recomputed in backward, nothing is compressed
    torch._dynamo.reset()
    monkeypatch.undo()
    with collect_reports() as report:
        torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})(x).sum().backward()
    assert {s.decision for s in report.sites if s.pattern == "compress_saved"} == {"recomputed"}


def test_explain_lists_the_sites_of_a_gelu_mlp():
    """explain() compiles with aot_eager when compression is on. A GELU MLP with LoRA on both
    linears: the first's output (read by gelu's backward) is compressed; the second's input,
    gelu of it, is not saved but recomputed in backward from the compressed output; the
    first's input is the model's input, which the caller keeps: refused."""
    model = peft_wrap(torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)),
                      target_modules=["0", "2"])
    report = unsloth_compile.explain(model, torch.randn(2, 7, 32), options={"compress_activations": "int8"})
    sites = {(s.decision, s.details["kind"], s.module.rsplit(".", 1)[-1]): s for s in report.sites
             if s.pattern == "compress_saved"}
    assert set(sites) == {("compressed", "ffn_activation", "0"), ("recomputed", "ffn_product", "1"),
                          ("refused", "lora_input", "0")}
    assert sites[("refused", "lora_input", "0")].reason.startswith("a forward input")
    # int8 keeps 1 of 4 bytes per fp32 element plus a 4-byte scale per row; gelu's output: nothing
    assert report.counters["compress_saved.bytes_saved"] == (2 * 7 * 48 * 3 - 2 * 7 * 4) + 2 * 7 * 48 * 4


class _Sin(torch.nn.Module):
    """An op before the first linear, so that its input is no forward input (which the caller
    keeps, so it is never compressed)."""

    def forward(self, inp):
        return torch.sin(inp)


class _GatedMLP(torch.nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(32, 48), torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)

    def forward(self, inp):
        x = torch.sin(inp)
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class _GatedByInput(torch.nn.Module):
    """x feeds a LoRA linear and multiplies its output: backward's mul reads x exactly."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, inp):
        x = torch.sin(inp)
        return self.proj(x) * x


def test_a_lora_input_that_backward_reads_elsewhere_is_refused():
    model = peft_wrap(_GatedByInput(), target_modules=["proj"])
    report = unsloth_compile.explain(model, torch.randn(6, 32), options={"compress_activations": "fp8"})
    (site,) = [s for s in report.sites if s.pattern == "compress_saved"]
    assert site.decision == "refused" and site.details["kind"] == "lora_input"
    assert site.reason == "backward also reads it with aten.mul.Tensor, which needs it exact"


@pytest.mark.parametrize("mode", ["fp8", "lowrank"])
def test_partitioned_graphs_save_the_compressed_tensors(monkeypatch, mode):
    """The forward graph's saved outputs are the codes (not the tensor), the backward graph
    reads them as placeholders and decompresses each right before its first reader; silu's
    output, the last linear's input, is not saved but recomputed from the decompressed
    first output."""
    import unsloth_compile.passes.compress.compress_saved as cs

    graphs = []
    original = cs.compress_saved_activations

    def capture(fw, bw, num_fwd_outputs, cfg, report):
        original(fw, bw, num_fwd_outputs, cfg, report)
        graphs.append((fw, bw, num_fwd_outputs))
    monkeypatch.setattr(cs, "compress_saved_activations", capture)
    model = peft_wrap(torch.nn.Sequential(_Sin(), torch.nn.Linear(32, 48), torch.nn.SiLU(), torch.nn.Linear(48, 40)),
                      target_modules=["1", "3"])
    x = torch.randn(64, 32)  # rows enough that Z and P are smaller than x
    options = {"inner": "aot_eager", "compress_activations": mode, "compress_lowrank_k": 8}
    torch.compile(model, backend="unsloth", options=options)(x).sum().backward()
    (fw, bw, n), = graphs
    saved = list(next(iter(fw.graph.find_nodes(op="output"))).args[0])[n:]
    described = [(str(v.dtype).replace("torch.", ""), tuple(v.shape)) for v in (s.meta["val"] for s in saved)]
    placeholders = [(str(p.meta["val"].dtype).replace("torch.", ""), tuple(p.meta["val"].shape))
                    for p in bw.graph.find_nodes(op="placeholder")]
    for entry in described:
        assert entry in placeholders
    if mode == "fp8":
        # layer 1's input (its dA reads it) and output (silu reads it): codes + row scales;
        # silu's output (layer 3's input) is recomputed, neither it nor layer 1's output kept
        assert described.count(("float8_e4m3fn", (64, 32))) == 1 and described.count(("float8_e4m3fn", (64, 48))) == 1
        assert described.count(("float32", (64, 1))) == 2
        assert ("float32", (64, 48)) not in described and ("float32", (64, 32)) not in described
        # each code placeholder -> convert -> mul(scale), placed right before its first reader
        nodes = list(bw.graph.nodes)
        codes = [p for p in bw.graph.find_nodes(op="placeholder") if p.meta["val"].dtype == torch.float8_e4m3fn]
        assert len(codes) == 2
        for placeholder in codes:
            (convert,) = placeholder.users
            (restored,) = convert.users
            assert restored.target is torch.ops.aten.mul.Tensor
            first = min(restored.users, key=nodes.index)
            between = nodes[nodes.index(convert): nodes.index(first)]
            assert all(b.op == "call_function" and b.target in (torch.ops.prims.convert_element_type.default,
                                                                torch.ops.aten.mul.Tensor) for b in between)
    else:  # layer 1's input: Z (64 x 8) and P (32 x 8); the backward op is the projected one
        assert ("float32", (64, 8)) in described and ("float32", (32, 8)) in described
        assert [n.target for n in bw.graph.nodes].count(ops.lora_linear_backward_projected.default) == 1


# ----------------------------------------------------------------------------- tiny PEFT Llama


@functools.lru_cache(maxsize=None)
def llama_run(mode: str, dropout: float = 0.0, k: int = 16, repeats: int = 0, backend: str = "unsloth",
              projection: str = "range"):
    """One compiled forward + backward of a tiny PEFT Llama (fp32, random A and B) from
    fixed seeds: loss, gradients of every lora_A / lora_B and of the input embeddings, the
    report, the bytes saved for backward by a second forward, and, with `repeats`, the mean
    lora_A gradients over that many more steps (fresh projections each)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=dropout)
    model.train()
    batch = batch_for("llama")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    # "none" is the exact partition, the FFN products saved (not the default's recomputation),
    # so that the compressed runs' savings are counted against all that the graph would keep
    options = {"inner": "aot_eager", "compress_activations": mode, "compress_lowrank_k": k,
               "compress_lowrank_projection": projection, "summary": False, "recompute_ffn_products": mode != "none"}
    compiled = torch.compile(model, backend=backend, options=options if backend == "unsloth" else None)

    def forward():
        torch.manual_seed(1)
        return compiled(inputs_embeds=embeds, labels=batch["labels"]).loss
    seed_projections(7)
    with collect_reports() as report:
        loss = forward()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["dX"] = embeds.grad.clone()
    saved_bytes, dtypes = saved_for_backward(forward)
    mean_dA = None
    if repeats:
        a_params = {n: p for n, p in model.named_parameters() if "lora_A" in n}
        mean_dA = {n: torch.zeros_like(p) for n, p in a_params.items()}
        for _ in range(repeats):
            step = torch.autograd.grad(forward(), list(a_params.values()))
            for n, g in zip(a_params, step):
                mean_dA[n] += g / repeats
    torch._dynamo.reset()
    return dict(loss=loss.detach(), grads=grads, report=report, saved_bytes=saved_bytes, dtypes=dtypes,
                mean_dA=mean_dA)


def _grad_errors(run, exact, which):
    keys = [n for n in exact["grads"] if which in n]
    return {n: (rel_err(run["grads"][n], exact["grads"][n]), cosine(run["grads"][n], exact["grads"][n]))
            for n in keys}


def _compressed(report):
    return [s for s in report.sites if s.pattern == "compress_saved" and s.decision == "compressed"]


@pytest.mark.parametrize("mode,bounds", [
    # (max relative error, min cosine) for dA, dB, dX: measured 0.02-0.08 / >= 0.997 (fp8)
    # and 0.005-0.01 (int8) here
    ("fp8", dict(lora_A=(0.15, 0.99), lora_B=(0.12, 0.99), dX=(0.1, 0.995))),
    ("int8", dict(lora_A=(0.03, 0.9995), lora_B=(0.03, 0.9995), dX=(0.03, 0.9995))),
])
def test_rowwise_modes_on_a_tiny_peft_llama(mode, bounds):
    exact, run = llama_run("none"), llama_run(mode)
    assert torch.equal(run["loss"], exact["loss"])  # the forward is the uncompressed forward
    for which, (max_rel, min_cos) in bounds.items():
        for name, (rel, cos) in _grad_errors(run, exact, which).items():
            assert rel <= max_rel and cos >= min_cos, f"{name}: relative error {rel:.4f}, cosine {cos:.5f}"
    # What was compressed: per layer the LoRA inputs (q/k/v, gate/up) and the FFN's gate and
    # up outputs; down's input, silu(gate) * up, is recomputed from them in backward;
    # o_proj's input is a view of the attention output that SDPA's backward keeps, so it is
    # refused; nothing else (norms, attention, loss) is touched.
    sites = _compressed(run["report"])
    assert sorted((s.details["kind"], s.module.split("layers.")[1]) for s in sites) == sorted(
        [("lora_input", f"{i}.self_attn.{{k_proj,q_proj,v_proj}}") for i in range(2)]
        + [("lora_input", f"{i}.mlp.{{gate_proj,up_proj}}") for i in range(2)]
        + [("ffn_activation", f"{i}.mlp.{p}") for i in range(2) for p in ("gate_proj", "up_proj")])
    recomputed = [s for s in run["report"].sites if s.pattern == "compress_saved" and s.decision == "recomputed"]
    assert sorted(s.module.split("layers.")[1] for s in recomputed) == ["0.mlp", "1.mlp"]
    refused = [s for s in run["report"].sites if s.pattern == "compress_saved" and s.decision == "refused"]
    assert [s.module.split("layers.")[1] for s in refused] == ["0.self_attn.o_proj", "1.self_attn.o_proj"]
    assert all(s.reason.startswith("shares storage with") for s in refused)
    code = ref.ROWWISE_FORMATS[mode]
    assert all(s.details["stored"][0].startswith(str(code).replace("torch.", "")) for s in sites)
    # The graph really saves the codes: autograd's saved tensors hold them, and the bytes
    # saved for backward drop by exactly what the report counts.
    counters = run["report"].counters
    assert run["dtypes"][code] == len(sites) and exact["dtypes"][code] == 0
    assert counters["compress_saved.bytes_saved"] == exact["saved_bytes"] - run["saved_bytes"] > 0
    assert counters["compress_saved.recompute_bytes_saved"] > 0
    assert counters["compress_saved.bytes_before"] - counters["compress_saved.bytes_after"] + \
        counters["compress_saved.recompute_bytes_saved"] == counters["compress_saved.bytes_saved"]


@pytest.mark.parametrize("projection", ["random", "range"])
def test_lowrank_on_a_tiny_peft_llama(projection):
    """dB and dX do not involve x and stay exact. dA: with "random" the unbiased estimate,
    its error per step about sqrt((K - 1) / k) and its mean over fresh projections
    converging; with "range" the part of x in its top-16 subspace, a far smaller error."""
    exact = llama_run("none", repeats=24)
    run = llama_run("lowrank", k=16, repeats=24 if projection == "random" else 0, projection=projection)
    assert torch.equal(run["loss"], exact["loss"])
    for which in ("lora_B", "dX"):
        for name, (rel, _) in _grad_errors(run, exact, which).items():
            assert rel < 1e-5, f"{name}: {rel}"
    for name, (rel, cos) in _grad_errors(run, exact, "lora_A").items():
        if "o_proj" in name or "down_proj" in name:
            # o_proj's input is refused (shares storage with the attention output); down's,
            # silu(gate) * up, is recomputed from the exact gate and up
            assert rel < 1e-5, f"{name}: {rel}"
            continue
        if projection == "range":  # measured 0.46 / 0.889 at worst (layer 0's q/k/v: random embeddings)
            assert rel < 0.6 and cos > 0.85, f"{name}: relative error {rel:.3f}, cosine {cos:.3f}"
            continue
        K = 64
        predicted = math.sqrt((K - 1) / 16)
        assert 0.4 * predicted < rel < 2.0 * predicted, f"{name}: relative error {rel:.3f}, predicted {predicted:.3f}"
        mean_rel = rel_err(run["mean_dA"][name], exact["mean_dA"][name])
        assert mean_rel < 2.5 * predicted / math.sqrt(24), f"{name}: mean of 24 steps off by {mean_rel:.3f}"
    sites = _compressed(run["report"])
    assert len(sites) == 4 and all(s.details["kind"] == "lora_input" for s in sites)
    assert all(s.details["stored"][-1] == "float32[64, 16]" for s in sites)  # P
    lowrank_refusals = [s for s in run["report"].sites if "lowrank compresses LoRA inputs only" in s.reason]
    assert len(lowrank_refusals) == 4  # the FFN's gate and up outputs, two layers
    assert run["report"].counters["compress_saved.bytes_saved"] == exact["saved_bytes"] - run["saved_bytes"] > 0


def test_lowrank_with_dropout_projects_each_masked_input():
    """lora_dropout > 0: each adapter reads x * its own mask, so each gets its own Z (one P
    per x); the dropout draws are those of the uncompressed graph (the projections use a
    private generator), and the forward, dB and dX stay exact."""
    exact, run = llama_run("none", dropout=0.1), llama_run("lowrank", dropout=0.1, k=8)
    assert torch.equal(run["loss"], exact["loss"])
    for which in ("lora_B", "dX"):
        for name, (rel, _) in _grad_errors(run, exact, which).items():
            assert rel < 1e-5, f"{name}: {rel}"
    qkv = [s for s in _compressed(run["report"]) if "q_proj" in s.module]
    assert len(qkv) == 2 and all(len(s.details["stored"]) == 4 for s in qkv)  # Z_q, Z_k, Z_v, P
    assert run["dtypes"][torch.bool] == exact["dtypes"][torch.bool]  # the masks are kept for dX
    assert run["report"].counters["compress_saved.bytes_saved"] == exact["saved_bytes"] - run["saved_bytes"] > 0


@functools.lru_cache(maxsize=None)
def inductor_partition_backend(mode: str):
    """Our passes, then AOTAutograd with Inductor's decompositions and compile_fx's
    partition_fn, which hands the joint graph to config.custom_partitioner_fn (how
    inner="inductor" installs the partitioner), and no code generation (slow on CPU)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor import compile_fx as inductor

    from unsloth_compile.passes.pipeline import run_passes
    from unsloth_compile.passes.compress.compress_saved import CompressSavedPartitioner

    def backend(gm, example_inputs):
        # "none": the exact partition (FFN products saved), the reference the savings count from
        cfg = Config(inner="aot_eager", compress_activations=mode, summary=False,
                     recompute_ffn_products=mode != "none")
        gm, report = run_passes(gm, example_inputs, cfg)
        partitioner = CompressSavedPartitioner(cfg, report)
        with torch._inductor.config.patch(custom_partitioner_fn=partitioner):
            compiled = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                                    decompositions=inductor.select_decomp_table(),
                                    partition_fn=inductor.partition_fn)(gm, example_inputs)
        assert partitioner.ran
        unsloth_compile.report.publish(report, log_it=False)
        return compiled
    return backend


def test_inductor_partition_entry_point():
    """Inductor's partition path on Inductor-decomposed graphs (silu as x / (1 + exp(-x)))
    finds the same sites; the uncompressed reference goes through the same path."""
    exact = llama_run("none", backend=inductor_partition_backend("none"))
    run = llama_run("fp8", backend=inductor_partition_backend("fp8"))
    assert torch.equal(run["loss"], exact["loss"])
    for name, (rel, cos) in _grad_errors(run, exact, "").items():
        assert rel <= 0.15 and cos >= 0.99, f"{name}: {rel:.4f} {cos:.5f}"
    kinds = collections.Counter(s.details["kind"] for s in _compressed(run["report"]))
    assert kinds["ffn_activation"] == 4 and kinds["lora_input"] >= 4
    assert run["report"].counters["compress_saved.bytes_saved"] == exact["saved_bytes"] - run["saved_bytes"] > 0


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_bf16_gated_mlp_under_inductor_decompositions(mode):
    """bf16, Inductor's decompositions: silu reads convert_element_type(gate) in fp32 and the
    partitioner saves gate itself, in bf16; it is found through the cast and compressed (it
    once stayed exact on the GPU: 2 GiB of llama-1b). No M x 48 tensor is kept exact, and
    the saved bytes drop by the report's count."""
    def run(compress):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = peft_wrap(_GatedMLP(), target_modules=["gate", "up", "down"]).to(torch.bfloat16)
        x = torch.randn(64, 32, dtype=torch.bfloat16)
        compiled = torch.compile(model, backend=inductor_partition_backend(compress))
        with collect_reports() as report:
            compiled(x).float().sum().backward()
        kept = []
        saved, _ = saved_for_backward(lambda: compiled(x), kept)
        return report, saved, kept

    _, saved0, kept0 = run("none")
    report, saved, kept = run(mode)
    assert (torch.bfloat16, (64, 48)) in kept0
    code = ref.ROWWISE_FORMATS[mode]
    assert [k for k in kept if k[1] == (64, 48)] == [(code, (64, 48))] * 2, kept  # gate and up, compressed
    kinds = collections.Counter(s.details["kind"] for s in _compressed(report))
    assert kinds == {"ffn_activation": 2, "lora_input": 1}, kinds
    assert saved0 - saved == report.counters["compress_saved.bytes_saved"] > 0


def test_bench_variant_runs_on_the_cpu_tiny_preset():
    from unsloth_compile.bench.e2e import PRESETS, run_variant
    from unsloth_compile.bench.variants import parse_variant

    variant = parse_variant("fp8c=unsloth:compress_activations=fp8", "aot_eager")
    assert variant.lossy
    result = run_variant(PRESETS["tiny"], variant, torch.device("cpu"), torch.float32, steps=1, warmup=1,
                         seed=0, lr=1e-3)
    counters = result["fusion"]["counters"]
    assert counters["compress_saved.compressed"] >= 8 and counters["compress_saved.bytes_saved"] > 0
    assert all(math.isfinite(x) for x in result["losses"])


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "int8", "lowrank"])
def test_compression_on_cuda_under_inductor(mode):
    """bf16 base, fp32 adapters (PEFT's default), real Inductor: the forward matches the
    uncompressed compiled forward, the gradients are within the mode's bounds, and the
    saved bytes drop by the report's count."""
    def run(compress):
        torch._dynamo.reset()
        torch.manual_seed(0)
        import transformers as tf
        cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512)
        model = peft_wrap(tf.LlamaForCausalLM(cfg).to(torch.bfloat16)).cuda()
        model.train()
        ids = torch.randint(0, 512, (2, 128), device="cuda")
        options = {"compress_activations": compress, "compress_lowrank_k": 64, "summary": False,
                   "recompute_ffn_products": compress != "none"}  # "none": the exact partition
        compiled = torch.compile(model, backend="unsloth", options=options)
        with collect_reports() as report:
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        # copies: with CUDA graphs (on by default for fp8 and int8) the gradients and the loss
        # are graph outputs, which the next replay overwrites (the second forward below)
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        loss = loss.detach().clone()
        saved, dtypes = saved_for_backward(lambda: compiled(input_ids=ids, labels=ids).loss)
        return loss, grads, report, saved, dtypes

    # caches off: a graph AOTAutograd's cache returns is not partitioned again, so its sites would
    # not be listed (a second run of this test on a warm machine failed that way)
    with torch._inductor.config.patch(force_disable_caches=True):
        loss0, grads0, _, saved0, _ = run("none")
        loss, grads, report, saved, dtypes = run(mode)
    torch.testing.assert_close(loss, loss0, rtol=1e-3, atol=1e-3)
    for name, g in grads.items():
        cos = cosine(g, grads0[name])
        if mode == "lowrank" and "lora_A" in name:
            # the default "range" projection: biased, its error the part of x outside its top-64
            # subspace (a random-init Llama's inputs have a flat spectrum: large); "random" is
            # unbiased but noisy (sqrt(K / k) relative error per step)
            assert cos > 0.1, name
        else:
            assert cos >= (0.99 if mode == "fp8" else 0.995), f"{name}: cosine {cos:.4f}"
    assert _compressed(report)
    # equal on CPU (aot_eager); Inductor may lay out a saved tensor differently: within 5%
    assert saved0 - saved == pytest.approx(report.counters["compress_saved.bytes_saved"], rel=0.05)
    if mode != "lowrank":
        assert dtypes[ref.ROWWISE_FORMATS[mode]] > 0
