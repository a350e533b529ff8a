"""The arguments the per-layer CUDA benchmarks share (sparse24, nf4-kernel): the layers, M, the
rank, one comma list of what to run, and the output folder."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .kernel import LAYERS


def layer_parser(prog: str, description: str, default_layers: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with --layers, --tokens and --rank; the caller adds its own options."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(default_layers), help=f"comma list of {', '.join(LAYERS)}")
    p.add_argument("--tokens", type=int, default=8192, help="M, rows of x")
    p.add_argument("--rank", type=int, default=16)
    return p


def parse_layer_args(p: argparse.ArgumentParser, argv: Optional[list[str]],
                     comma_lists: dict[str, Sequence[str]]) -> argparse.Namespace:
    """The parsed arguments, each comma-list option (with --layers) checked against its valid
    values, and --tokens and --rank positive; else the parser's usage error."""
    args = p.parse_args(list(argv or []))
    for name, valid in {"--layers": LAYERS, **comma_lists}.items():
        unknown = [v for v in getattr(args, name.removeprefix("--")).split(",") if v not in valid]
        if unknown:
            p.error(f"{name}: unknown {unknown}; valid: {', '.join(valid)}")
    if args.tokens < 1 or args.rank < 1:
        p.error(f"--tokens and --rank must be positive (got {args.tokens}, {args.rank})")
    return args
