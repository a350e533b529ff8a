"""`python -m unsloth_compile.bench lowrank-error`: the error of
`compress_activations="lowrank"`'s dA on MiniLM's real LoRA inputs: each projection against the
exact s G^T X, for X and G = s dY B captured from eager PEFT training (the accuracy bench's
model, data, batches and optimizer settings; CPU).

    python -m unsloth_compile.bench lowrank-error --steps 10,50,150 --k 128 --draws 3   # writes docs/bench/compress-lowrank-error.md

Per LoRA input at a few training steps, for k columns: relative error ||dA~ - dA|| / ||dA|| and
cosine, averaged over the inputs with the same number of columns K (384: query, key, value,
attention output and FFN up; 1536: the FFN's down) and over `--draws` draws of the projection.
Projections: "random" and "range" (torch.ops.unsloth.*, what the backend runs), and for
comparison an orthonormal (Haar) random projection scaled by sqrt(K / k) (unbiased), a range
finder with a second power iteration, and the best rank-k subspace (X's top-k right singular
vectors, float64). Inputs with no more rows than k (the pooler's 32) are left out: the pass
refuses them.
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import time
from typing import Optional

import torch

from ..ops.compress import seed_projections
from . import tasks

METHODS = ("random", "haar", "range", "range-2", "svd")


def capture(steps: list[int], seed: int = 0, max_train: Optional[int] = None) -> dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """{step: [(module, X (M, K), G (M, r))]}: every LoRA A's input and the gradient of its output."""
    data = tasks.load_sections(tasks.load_tokenizer())
    if max_train is not None:
        data.train = data.train.head(max_train)
    model = tasks.build_lora_classifier(len(data.label_names), seed, torch.device("cpu"), torch.float32)
    inputs, captured = {}, []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
            module.register_full_backward_hook(lambda m, gi, go, name=name: captured.append(
                (name, inputs[name].reshape(-1, inputs[name].shape[-1]), go[0].detach().reshape(-1, go[0].shape[-1]))))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order = tasks.batch_order(len(data.train), max(steps) + 1, 32, seed)
    out = {}
    model.train()
    for step in range(max(steps) + 1):
        idx = order[step]
        captured.clear()
        model(input_ids=data.train.input_ids[idx], attention_mask=data.train.attention_mask[idx],
              labels=data.train.labels[idx]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in steps:
            out[step] = list(captured)
    return out


def estimate(method: str, x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    K = x.shape[1]
    if method in ("random", "range"):
        p = getattr(torch.ops.unsloth, f"{method}_projection")(x, k, torch.float32)
    elif method == "haar":
        p = torch.linalg.qr(torch.randn(K, k)).Q * math.sqrt(K / k)
    elif method == "range-2":
        b = x.t() @ (x @ torch.randn(K, k))
        p = torch.linalg.qr(x.t() @ (x @ torch.linalg.qr(b).Q)).Q
    else:
        p = torch.linalg.svd(x.double(), full_matrices=False).Vh[:k].t()
        return (g.double().t() @ (x.double() @ p)) @ p.t()
    return (g.t() @ (x @ p)) @ p.t()


def measure(captures, k: int, draws: int) -> dict:
    errors = collections.defaultdict(list)  # (step, K, method) -> [(rel, cos)]
    seed_projections(0)
    torch.manual_seed(0)
    for step, sites in captures.items():
        for name, x, g in sites:
            if x.shape[0] <= k:
                continue
            exact = g.double().t() @ x.double()
            for method in METHODS:
                for _ in range(1 if method == "svd" else draws):
                    got = estimate(method, x, g, k).double()
                    rel = ((got - exact).norm() / exact.norm()).item()
                    cos = torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0).item()
                    errors[(step, x.shape[1], method)].append((rel, cos))
    return {key: (sum(r for r, _ in v) / len(v), sum(c for _, c in v) / len(v), len(v)) for key, v in errors.items()}


def render(results: dict, steps: list[int], args: argparse.Namespace, argv: list[str], seconds: float) -> str:
    command = " ".join(["python -m unsloth_compile.bench lowrank-error", *argv])
    lines = [f"# lowrank's dA error on MiniLM-L6's LoRA inputs (k = {args.k})", "",
             f"`{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}, CPU, torch {torch.__version__}, "
             f"{seconds:.0f} s). X and G captured from eager PEFT training (seed 0, the accuracy "
             "bench's batches, 32 x 32 tokens: M = 1024 rows); mean over the LoRA inputs with K columns and "
             f"{args.draws} draws of each random projection. relative error = ||dA~ - dA|| / ||dA||.", "",
             "| step | K | inputs | " + " | ".join(f"{m} rel / cos" for m in METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for step in steps:
        for K in sorted({key[1] for key in results if key[0] == step}):
            cells = [f"{results[(step, K, m)][0]:.3f} / {results[(step, K, m)][1]:.4f}" for m in METHODS]
            count = results[(step, K, "svd")][2]
            lines.append(f"| {step} | {K} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "random, haar: unbiased (E[P P^T] = I), error about sqrt(K / k). range: "
              "Q = orth(X^T X Omega) (the default), range-2: one more power iteration, svd: the best "
              "rank-k subspace of X; these three are biased (they drop X outside the subspace)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench lowrank-error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,50,150", help="training steps to capture at (comma list)")
    parser.add_argument("--k", type=int, default=128, help="projection columns (compress_lowrank_k)")
    parser.add_argument("--draws", type=int, default=3, help="draws of each random projection")
    parser.add_argument("--max-train", type=int, default=None, help="first N training rows only (quick runs)")
    parser.add_argument("--out", default="docs/bench/compress-lowrank-error.md", help="markdown file to write")
    args = parser.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        parser.error(f"--steps: a comma list of step numbers, got {args.steps!r}")
    if steps[0] < 0 or args.k < 1 or args.draws < 1:
        parser.error(f"--steps must be >= 0, --k and --draws >= 1 (got {args.steps}, {args.k}, {args.draws})")
    import unsloth_compile  # noqa: F401  registers torch.ops.unsloth.*

    start = time.time()
    results = measure(capture(steps, max_train=args.max_train), args.k, args.draws)
    text = render(results, steps, args, argv, time.time() - start)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0
