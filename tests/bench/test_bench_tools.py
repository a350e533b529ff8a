"""The bench's measuring tools on CPU at tiny shapes: `bench compress-bytes`, `saved-tensors`,
`lowrank-error`, `prune-proxy`; and `bench sparse24` (CUDA only) up to its arguments and its
table."""

from __future__ import annotations

import re

import pytest
import torch

from unsloth_compile.bench import compress_bytes, prune_proxy, sparse24
from unsloth_compile.bench.__main__ import main

pytestmark = pytest.mark.slow


def _md_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows]


def test_compress_bytes_drop_matches_the_report(tmp_path):
    out = tmp_path / "bytes.md"
    assert main(["compress-bytes", "--out", str(out), "--modes", "eager,none,fp8,int8", "--dropouts", "0.1",
                 "--hidden-size", "64", "--layers", "1", "--seq", "32", "--batch", "1", "--rank", "4"]) == 0
    text = out.read_text()
    assert "`python -m unsloth_compile.bench compress-bytes --out" in text
    rows = {r[1]: r for r in _md_rows(text)[1:5]}
    assert list(rows) == ["eager", "none", "fp8", "int8"]
    for mode in ("fp8", "int8"):
        saved, ratio, drop, reported = rows[mode][2:6]
        assert float(ratio) < 1.0 and float(drop) > 0 and drop == reported
        assert rows[mode][7] == rows["none"][7]  # the forward, hence the loss, is unchanged
    assert float(rows["eager"][2]) > float(rows["none"][2])  # PEFT eager keeps the fp32 dropped input


def test_compress_bytes_measure_counts_each_storage_once():
    config = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1024)
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
    none, fp8 = (compress_bytes.measure(compress_bytes.build(config, 4, 0.0), mode, 0.0, ids, 8)
                 for mode in ("none", "fp8"))
    assert none["saved"] - fp8["saved"] == compress_bytes.report_drop(fp8["counters"]) > 0
    for row in (none, fp8):
        assert sum(row["dtypes"].values()) == row["saved"]
    assert fp8["dtypes"]["float8_e4m3fn"] > 0 and "float8_e4m3fn" not in none["dtypes"]


def test_compress_bytes_refuses_bad_arguments(tmp_path):
    for bad in (["--modes", "eager,fp4"], ["--modes", "fp8"], ["--hidden-size", "100"]):
        with pytest.raises(SystemExit):
            main(["compress-bytes", "--out", str(tmp_path / "x.md"), *bad])
    assert not (tmp_path / "x.md").exists()


def test_saved_tensors_tiny_preset(capsys):
    assert main(["saved-tensors", "--preset", "tiny", "--device", "cpu", "--inner", "aot_eager",
                 "--variant", "eager=eager", "--variant", "ours=unsloth", "--top", "3"]) == 0
    text = capsys.readouterr().out
    totals = {m.group(1): float(m.group(2).replace(",", ""))
              for m in re.finditer(r"== (\w+): .*\nsaved for backward \(parameters left out\): ([\d,.]+) MiB", text)}
    assert set(totals) == {"eager", "ours"} and all(v > 0 for v in totals.values())
    assert text.count("| dtype | shape | count | MiB | share |") == 2


def test_saved_tensors_needs_a_variant():
    with pytest.raises(SystemExit):
        main(["saved-tensors", "--preset", "tiny"])


def test_lowrank_error_range_beats_random(tmp_path):
    out = tmp_path / "err.md"
    assert main(["lowrank-error", "--steps", "1", "--k", "16", "--draws", "1", "--max-train", "64",
                 "--out", str(out)]) == 0
    rows = _md_rows(out.read_text())[1:]
    assert {r[1] for r in rows} == {"384", "1536"}  # step 0 has no gradient through A yet (B = 0): step 1
    for row in rows:
        rel = {m: float(cell.split(" / ")[0]) for m, cell in zip(("random", "haar", "range", "range-2", "svd"), row[3:])}
        # random projections are unbiased but far off; the range finder is close to the best subspace
        assert rel["svd"] <= rel["range-2"] + 1e-6 and rel["range"] < rel["random"] / 2, row


def test_lowrank_error_refuses_bad_steps(tmp_path):
    with pytest.raises(SystemExit):
        main(["lowrank-error", "--steps", "a,b", "--out", str(tmp_path / "x.md")])


def test_prune_proxy_magnitude(capsys):
    assert main(["prune-proxy", "--calibration", "1", "--held-out", "1", "--max-train", "64", "magnitude",
                 "wanda-ls,layers=attention.self.query"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "held-out hidden error" in line]
    assert len(lines) == 2
    errors = [float(re.search(r"held-out hidden error ([\d.]+)", line).group(1)) for line in lines]
    assert all(0 < e < 2 for e in errors)
    assert "6 bases" in lines[1]  # the query projection of each of MiniLM's 6 layers


def test_prune_proxy_parses_configurations():
    method, kwargs, select = prune_proxy.parse_configuration("sparsegpt-ls,sequential=model,padding=ignore")
    assert method == "sparsegpt" and select is None
    assert kwargs == {"reconstruct": True, "ignore_padding": True, "sequential": True, "target": "model"}
    with pytest.raises(SystemExit):
        main(["prune-proxy", "wanda,colour=blue"])


def test_sparse24_arguments_and_table():
    for bad in (["--layouts", "dense"], ["--layers", "llama-9b.mlp"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            sparse24.parse_args(bad)
    args = sparse24.parse_args(["--layouts", "cutlass", "--tokens", "64"])
    assert args.layouts == "cutlass" and args.tokens == 64
    env = {"device": "GPU X", "date": "2026-01-01", "versions": {"torch": "2.13", "triton": "3.6"},
           "argv": ["--layouts", "cutlass"]}
    rows = [{"layer": "llama-1b.mlp.up", "variant": "base", "gpu_ms": 1.0, "ms": 1.1, "time_vs_dense": 1.0},
            {"layer": "llama-1b.mlp.up", "variant": "ours-2:4-cutlass", "gpu_ms": 0.8, "ms": 0.9,
             "time_vs_dense": 0.8, "time_vs_dense_lora": 0.7, "rel_err_vs_reference": {"dx": 1e-3}},
            {"layer": "llama-1b.mlp.up", "variant": "base-2:4-cutlass", "error": "RuntimeError: no kernel"}]
    text = sparse24.render(rows, env)
    assert "GPU X, 2026-01-01; torch 2.13, triton 3.6" in text
    assert "`python -m unsloth_compile.bench sparse24 --layouts cutlass`" in text
    body = _md_rows(text)[1:]
    assert body[1][1:] == ["ours-2:4-cutlass", "0.800", "0.900", "0.80", "0.70", "dx 1.0e-03"]
    assert body[2][-1] == "RuntimeError: no kernel"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_sparse24_needs_cuda(capsys):
    assert main(["sparse24"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().out
