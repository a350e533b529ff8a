"""bench/flops.py and bench/cards.py: the LoRA FLOP count against a hand count and against the
GEMMs PEFT actually runs, the card peaks by device name, the MFU fields and column of `bench e2e`."""

from __future__ import annotations

import json

import pytest
import torch

from unsloth_compile.bench.cards import H100_SXM, H200, card_for
from unsloth_compile.bench.flops import DecoderShapes, e2e_mfu, flops_per_token, mfu, training_of

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# hidden 8, 2 query heads of 4 (q: 8 -> 8), 1 kv head (k, v: 8 -> 4), MLP 8 -> 16 -> 8, 2 layers, vocab 10
SMALL = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=10)


def test_count_by_hand_on_a_small_config():
    shapes = DecoderShapes.from_config(SMALL)
    assert (shapes.head_dim, shapes.kv_heads) == (4, 1)
    count = flops_per_token(shapes, seq=6, lora_targets=("q_proj", "down_proj"), rank=2)
    # sum of K N over a layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate 8*16 + up 8*16 + down 16*8 = 576;
    # forward + input gradient 4 K N, 2 layers
    assert count.linears == 4 * 576 * 2 == 4608
    assert count.lm_head == 4 * 8 * 10 == 320
    # q (8 + 8) and down (16 + 8): 6 r (K + N) per layer
    assert count.lora == 6 * 2 * (16 + 24) * 2 == 960
    # 6 S h d_h per layer: forward 2 x 2 x (S / 2) x 2 x 4, backward twice that
    assert count.attention == 6 * 6 * 2 * 4 * 2 == 576
    assert count.weight_gradients == 0
    assert count.total == 4608 + 320 + 960 + 576
    # full fine-tuning: no adapters, every weight gradient (2 K N, the head's 2 d V)
    full = flops_per_token(shapes, seq=6, lora_targets=ALL, rank=2, training="full")
    assert (full.lora, full.weight_gradients) == (0, 2 * 576 * 2 + 2 * 8 * 10)
    # the floor: the frozen model's forward and input gradients only
    floor = flops_per_token(shapes, seq=6, lora_targets=ALL, rank=2, training="frozen")
    assert (floor.lora, floor.weight_gradients, floor.total) == (0, 0, 4608 + 320 + 576)
    assert [training_of(k) for k in ("full", "floor", "eager", "unsloth", "inductor")] == [
        "full", "frozen", "lora", "lora", "lora"]
    with pytest.raises(ValueError, match="not linears"):
        flops_per_token(shapes, seq=6, lora_targets=("query",), rank=2)
    with pytest.raises(ValueError, match="training="):
        flops_per_token(shapes, seq=6, training="qlora")


def test_llama_8b_count():
    """The worked number of docs/benchmarks.md#how-mfu-is-counted."""
    from unsloth_compile.bench.e2e import PRESETS

    preset = PRESETS["llama-8b"]
    count = flops_per_token(DecoderShapes.from_config(preset.config), preset.seq, preset.lora_targets, preset.rank)
    assert count.linears == 4 * 218_103_808 * 32  # 27.92 GFLOP
    assert count.lm_head == 4 * 4096 * 128_256  # 2.10
    assert count.lora == 6 * 16 * 81_920 * 32  # 0.25
    assert count.attention == 6 * 4096 * 4096 * 32  # 3.22
    assert round(count.total / 1e9, 2) == 33.49


def test_count_matches_the_gemms_peft_runs():
    """Every mm and bmm of a PEFT tiny Llama's forward + backward (eager attention, so QK^T and PV
    are bmm over the full square), counted by torch's FlopCounterMode: the linears, head and
    adapters as the count says, less the first layer's q, k, v input gradients (their input needs
    none, and autograd skips them), and twice the causal attention count (the full square)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False)
    rank, batch, seq = 4, 2, 12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config, attn_implementation="eager"))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=list(ALL)))
    ids = torch.randint(0, 50, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    with FlopCounterMode(display=False) as rotary:  # RoPE's angles: a small product some versions run as bmm
        model.base_model.model.model.rotary_emb(torch.zeros(batch, seq, 32), torch.arange(seq)[None].expand(batch, -1))
    shapes = DecoderShapes.from_config(config)
    count = flops_per_token(shapes, seq, ALL, rank)
    k_n = shapes.projections()
    skipped = sum(2 * k_n[p][0] * k_n[p][1] + 2 * rank * k_n[p][0] for p in ("q_proj", "k_proj", "v_proj"))
    tokens = batch * seq
    measured = counter.get_total_flops() - rotary.get_total_flops()
    assert measured == (count.linears + count.lm_head + count.lora - skipped + 2 * count.attention) * tokens


@pytest.mark.parametrize("name, card", [
    ("NVIDIA H100 80GB HBM3", H100_SXM), ("NVIDIA H100 SXM5 80GB", H100_SXM), ("NVIDIA H200", H200),
    ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA A100-SXM4-80GB", None),
    ("CPU: AMD EPYC 7B13 (2 cores)", None)])
def test_card_by_device_name(name, card):
    assert card_for(name) == card


def test_mfu_fields():
    got = mfu(33.5e9, 16_200, H100_SXM)
    assert got["flops_per_token"] == 33.5e9
    assert got["achieved_tflops"] == pytest.approx(542.7)
    assert got["mfu"] == pytest.approx(542.7 / 989)
    unknown = mfu(33.5e9, 16_200, None)
    assert unknown["mfu"] is None and unknown["achieved_tflops"] == pytest.approx(542.7)
    assert unknown["mfu_note"].startswith("n/a")
    assert mfu(33.5e9, None, H200)["achieved_tflops"] is None  # a failed variant


def test_e2e_mfu_for_presets():
    from unsloth_compile.bench.e2e import PRESETS

    llama = e2e_mfu(PRESETS["llama-8b"], "unsloth", 16_200, "NVIDIA H100 80GB HBM3")
    assert llama["mfu"] == pytest.approx(16_200 * llama["flops_per_token"] / 989e12)
    assert llama["flops_breakdown"]["total"] == llama["flops_per_token"]
    assert e2e_mfu(PRESETS["tiny-bert"], "unsloth", 100, "NVIDIA H200") == {}  # not a causal LM
    varying = e2e_mfu(PRESETS["tiny"], "unsloth", 100, "NVIDIA H200", fixed_lengths=False)
    assert varying["mfu"] is None and "vary" in varying["mfu_note"]


def test_e2e_tiny_reports_mfu_na_on_cpu(tmp_path):
    from unsloth_compile.bench.__main__ import main

    assert main(["e2e", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "full-ft,peft-eager", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    by_name = {r["variant"]["name"]: r for r in data["results"]}
    lora, full = by_name["peft-eager"], by_name["full-ft"]
    assert lora["mfu"] is None and lora["mfu_note"].startswith("n/a")
    assert lora["achieved_tflops"] == pytest.approx(lora["flops_per_token"] * lora["throughput"] / 1e12)
    assert full["flops_per_token"] > lora["flops_per_token"]  # weight gradients of every linear
    lines = (tmp_path / "e2e-tiny.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| variant |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells.index("MFU") == cells.index("TFLOPS (LoRA count)") + 1
    row = [c.strip() for c in next(line for line in lines if line.startswith("| peft-eager |")).strip("|").split("|")]
    assert row[cells.index("MFU")] == "n/a"
    assert any("MFU n/a: no known bf16 peak for this device" in line for line in lines)


def test_llama_8b_preset_has_the_benchmark_shapes():
    """bench e2e's llama-8b (the shapes the count above is taken at) builds as Llama-3.1-8B's shapes,
    untied head, rope theta 500,000, r16 alpha 32 on all seven projections, 2 x 4096 tokens; bench
    dist shares its model at 2 x 2048."""
    from unsloth_compile.bench.distributed import DIST_PRESETS
    from unsloth_compile.bench.e2e import PRESETS, build_model

    preset = PRESETS["llama-8b"]
    assert (preset.batch, preset.seq, preset.rank, preset.alpha, preset.lora_targets) == (2, 4096, 16, 32, ALL)
    model = build_model(preset, torch.device("meta"), torch.bfloat16)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (4096, 14336, 32, 32, 8, 128256)
    assert config.rope_parameters["rope_theta"] == 500_000
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B's count
    assert preset.seq <= config.max_position_embeddings
    assert {(t.metric, t.op, t.threshold) for t in preset.targets} == {("throughput", ">=", 1.0),
                                                                       ("peak_mem", "<=", 1.0)}
    dist = DIST_PRESETS["llama-8b"]
    assert dist.config == preset.config and (dist.batch, dist.seq) == (2, 2048)
