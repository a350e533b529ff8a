"""bench/roofline.py and bench/kernel_families.py: the work formulas against a hand count, kernel
names sorted into families, the table built from synthetic kernel events, and the files
`bench profile` writes beside its own."""

from __future__ import annotations

import json

import pytest

from unsloth_compile.bench.cards import Card, H100_SXM
from unsloth_compile.bench.flops import DecoderShapes
from unsloth_compile.bench.kernel_families import KERNEL_FAMILIES, kernel_family
from unsloth_compile.bench.roofline import render_markdown, roofline, step_work

# hidden 8, 2 query heads of 4, 1 kv head, MLP 16, 2 layers, vocab 10 (tests/bench/test_flops.py's)
SMALL = DecoderShapes(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)


def _work():
    # 2 x 6 tokens (T = 12), bf16 activations (e = 2), fp32 adapters (p = 4), r = 2 on q and down
    return step_work(SMALL, batch=2, seq=6, lora_targets=("q_proj", "down_proj"), rank=2, optimizer_bytes=700)


def test_work_by_hand_on_a_small_config():
    w = _work()
    # per layer: sum K N = 576, sum K = 64, sum N = 64 over the seven linears
    assert w["linears"].flops == 12 * 4 * 576 * 2
    assert w["linears"].bytes == 2 * 2 * (2 * 576 + 2 * 12 * 64 + 2 * 12 * 64)
    assert (w["lm_head"].flops, w["lm_head"].bytes) == (12 * 4 * 8 * 10, 2 * (2 * 80 + 2 * 12 * 8 + 2 * 12 * 10))
    # q (8 -> 8): e T (2K + N + 6r) + 3 p r (K + N) = 2*12*36 + 3*4*2*16; down (16 -> 8): 2*12*52 + 3*4*2*24
    assert w["lora"].flops == 12 * 6 * 2 * (16 + 24) * 2
    assert w["lora"].bytes == (864 + 384 + 1248 + 576) * 2
    # forward 2 T S h d_h per layer; Q, K, V read, O written (e T d_h (2h + 2h_kv)), LSE 4 T h
    assert w["attention_forward"].flops == 2 * 12 * 6 * 2 * 4 * 2
    assert w["attention_forward"].bytes == 2 * (2 * 12 * 4 * (4 + 2) + 4 * 12 * 2)
    assert w["attention_backward"].flops == 2 * w["attention_forward"].flops
    assert w["attention_backward"].bytes == 2 * (2 * 12 * 4 * (8 + 4) + 4 * 12 * 2)
    assert w["norms"].bytes == (2 * 2 + 1) * 5 * 2 * 12 * 8
    assert w["rope"].bytes == 2 * 4 * 2 * 12 * 4 * (2 + 1)
    assert w["swiglu"].bytes == 2 * 8 * 2 * 12 * 16
    assert w["cross_entropy"].bytes == 3 * 2 * 12 * 10
    assert w["embedding"].bytes == 2 * 2 * 12 * 8
    assert w["optimizer"].bytes == 700
    assert all(w[k].flops is None for k in ("norms", "rope", "swiglu", "cross_entropy", "embedding", "optimizer"))
    # no adapters for the floor; full fine-tuning adds the weight gradients (2 T K N; X, dY read, dW written)
    floor = step_work(SMALL, 2, 6, ("q_proj",), 2, 0, training="frozen")
    assert (floor["lora"].flops, floor["lora"].bytes) == (0, 0)
    full = step_work(SMALL, 2, 6, (), 0, 0, training="full")
    assert full["linears"].flops == w["linears"].flops + 2 * 12 * 576 * 2
    assert full["linears"].bytes == w["linears"].bytes + 2 * 2 * (12 * 64 + 12 * 64 + 576)
    assert full["lm_head"].flops == w["lm_head"].flops + 2 * 12 * 80


@pytest.mark.parametrize("name, family", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64", "attention backward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x128", "attention forward"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention forward"),
    ("void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits>", "attention backward"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention backward"),
    ("triton_tem_fused_flex_attention_0", "attention forward"),
    ("triton_tem_fused_flex_attention_backward_1", "attention backward"),
    ("triton_per_fused__safe_softmax_add_exp_4", "attention, phase not in the name"),
    # Inductor's elementwise work around an attention kernel that ran outside it is not attention
    ("triton_poi_fused__scaled_dot_product_flash_attention_backward_add_transpose_view_4",
     "elementwise, not told apart"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("_rows_thin_pair_kernel", "LoRA thin products"),
    ("_thin_t_times_rows_kernel", "LoRA thin products"),
    ("_lora_gemm_tma_kernel", "GEMMs: frozen linears and LM head"),
    ("_fp8_lora_gemm_kernel", "GEMMs: frozen linears and LM head"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMMs: frozen linears and LM head"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMMs: frozen linears and LM head"),
    ("triton_tem_fused_mm_2", "GEMMs: frozen linears and LM head"),
    ("triton_red_fused__log_softmax__to_copy_nll_loss_forward_3", "cross-entropy"),
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     "cross-entropy"),
    ("_forward_kernel", "cross-entropy"),
    ("triton_red_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_0", "norms"),
    ("triton_red_fused_add_div_expand_mul_pow_sum_view_1", "norms"),  # RMSNorm's backward
    ("triton_poi_fused__to_copy_add_cat_cos_mul_neg_sin_slice_unsqueeze_1", "RoPE"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::neg_kernel_cuda(at::TensorIteratorBase&)>",
     "RoPE"),
    ("triton_poi_fused_add_mul_silu_silu_backward_view_2", "SwiGLU"),
    ("triton_poi_fused__to_copy_0", "casts and copies"),
    ("triton_poi_fused__to_copy_clone_transpose_3", "casts and copies"),
    ("_quantize_rows_kernel", "casts and copies"),
    ("Memcpy DtoD (Device -> Device)", "casts and copies"),
    ("void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>",
     "casts and copies"),
    # an add and a mul beside the views: arithmetic, not a copy; eager's mul: whose, the name does not say
    ("triton_poi_fused__unsafe_view_add_clone_mul_transpose_5", "elementwise, not told apart"),
    ("void at::native::vectorized_elementwise_kernel<4, AUnaryFunctor<float, float, float, MulFunctor<float>>>",
     "elementwise, not told apart"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<X>", "embedding"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_family_by_name(name, family):
    assert kernel_family(name).name == family


def test_table_from_synthetic_events():
    toy = Card("toy", bf16_tflops=1e-6, bandwidth_tbs=1e-6)  # 1e6 FLOP/s, 1e6 B/s: milliseconds by hand
    events = [("nvjet_gemm", 100_000.0), ("nvjet_gemm", 100_000.0),  # 2 steps: 100 ms/step of GEMMs
              ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 2_000.0),  # 1 ms/step of norms
              ("triton_poi_fused__to_copy_0", 6_000.0), ("weird", 2_000.0)]
    table = roofline(events, steps=2, work=_work(), card=toy, idle_ms=7.5)
    rows = {r["family"]: r for r in table["rows"]}
    assert [r["family"] for r in table["rows"]] == [f.name for f in KERNEL_FAMILIES] + ["other", "GPU idle"]
    gemm = rows["GEMMs: frozen linears and LM head"]
    # FLOPs 12 * 4 * 576 * 2 + 12 * 320 = 59,136 -> 59.136 ms at 1e6 FLOP/s; bytes 16,896 + 1,184 -> 18.08 ms
    assert (gemm["kernels_per_step"], gemm["ms_per_step"]) == (1, 100.0)
    assert gemm["roofline_ms"] == pytest.approx(59.136) and gemm["bound"] == "compute"
    assert gemm["x_roofline"] == pytest.approx(100 / 59.136) and gemm["gap_ms"] == pytest.approx(100 - 59.136)
    assert gemm["achieved_tflops"] == pytest.approx(59_136 / 0.1 / 1e12)
    norms = rows["norms"]  # 4,800 bytes -> 4.8 ms at 1e6 B/s: 1 ms is faster than the formula's traffic
    assert (norms["roofline_ms"], norms["bound"], norms["gflop"]) == (pytest.approx(4.8), "memory", None)
    assert norms["achieved_gbs"] == pytest.approx(4_800 / 1e-3 / 1e9)
    casts = rows["casts and copies"]  # no formula: a time and nothing to measure it against
    assert (casts["ms_per_step"], casts["roofline_ms"], casts["x_roofline"]) == (3.0, None, None)
    assert rows["other"]["ms_per_step"] == 1.0 and rows["other"]["top_kernels"] == ["weird"]
    assert rows["SwiGLU"]["ms_per_step"] == 0.0 and rows["SwiGLU"]["x_roofline"] is None  # no kernel seen
    assert rows["GPU idle"]["ms_per_step"] == 7.5
    assert table["gpu_ms"] == 105.0
    assert sum(r["share"] for r in table["rows"][:-1]) == pytest.approx(1.0)
    assert table["roofline_ms"] == pytest.approx(sum(r["roofline_ms"] for r in table["rows"] if r.get("roofline_ms")))
    # an unknown card: times and formulas, no roofline; no events (a CPU run): formulas only
    unknown = {r["family"]: r for r in roofline(events, 2, _work(), None, 7.5)["rows"]}
    assert unknown["norms"]["ms_per_step"] == 1.0 and unknown["norms"]["roofline_ms"] is None
    cpu = roofline([], 2, _work(), H100_SXM)
    assert all(r["ms_per_step"] is None for r in cpu["rows"]) and cpu["gpu_ms"] is None
    assert {r["family"]: r["gbytes"] for r in cpu["rows"]}["norms"] == pytest.approx(4_800 / 1e9)
    # the page: one row per family and idle, with the card's peak named
    data = {"preset": "small", "env": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "date": "-",
                                       "versions": dict.fromkeys(("torch", "transformers", "peft", "triton",
                                                                  "unsloth_compile", "python"), "-")},
            "steps": 2, "warmup": 1, "batch": 2, "seq": 6, "dtype": "bf16", "card": toy.to_json(),
            "results": [{"variant": {"name": "v"}, "status": "ok", "wall_ms": 120.0, "roofline": table}]}
    text = render_markdown(data)
    assert "| GEMMs: frozen linears and LM head | 1 | 100.00 |" in text and "| GPU idle | - | 7.50 |" in text


def test_profile_writes_the_roofline_beside_it(tmp_path):
    from unsloth_compile.bench.__main__ import main

    assert main(["profile", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "peft-eager", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "roofline-tiny.json").read_text())
    (result,) = data["results"]
    assert result["status"] == "ok" and data["card"] is None and result["mfu"] is None
    rows = {r["family"]: r for r in result["roofline"]["rows"]}
    assert rows["GEMMs: frozen linears and LM head"]["gflop"] > 0 and rows["norms"]["gbytes"] > 0
    assert all(r["ms_per_step"] is None for r in rows.values())  # no device kernels on CPU
    assert result["work"]["optimizer"]["bytes"] > 0  # AdamW over the adapters
    assert "| norms |" in (tmp_path / "roofline-tiny.md").read_text()
    profile = json.loads((tmp_path / "profile-tiny.json").read_text())
    assert profile["results"][0]["roofline"] == result["roofline"]


def test_profile_fuses_the_cross_entropy_as_e2e_does(tmp_path, monkeypatch):
    """A variant with fuse_cross_entropy=true profiles the model whose training forward returns no
    logits (loss_only), as bench e2e runs it, so the profile times the fused head + loss."""
    import unsloth_compile.training_outputs as training_outputs
    from unsloth_compile.bench.__main__ import main

    wrapped = []
    original = training_outputs.loss_only
    monkeypatch.setattr(training_outputs, "loss_only", lambda model: wrapped.append(model) or original(model))
    assert main(["profile", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "peft-eager", "--variant", "ce=unsloth:fuse_cross_entropy=true",
                 "--out", str(tmp_path)]) == 0
    assert len(wrapped) == 1  # the ce variant only
