"""`python -m unsloth_compile.bench SUBCOMMAND ...`

    e2e       train steps of a random-init model under each variant (full FT, PEFT eager,
              PEFT + torch.compile, PEFT + backend="unsloth"): step time, throughput, memory;
              --lengths uniform:LOW-HIGH|debian and --layouts padded,packed for real batches
    accuracy  LoRA fine-tune pretrained MiniLM-L6 on Debian package sections, several seeds:
              test macro-F1 and accuracy of PEFT eager vs backend="unsloth"
    profile   one training step per variant: GPU time by kernel family, host time, GPU idle
              and what compiling cost; e2e's --lengths, --layouts and --spellings for real batches
    kernel    one LoRA linear against its frozen base linear (unsloth_compile.bench.kernel)
    dist      N processes (one GPU each) under DDP and FSDP2 against one GPU: tokens/s per GPU,
              scaling efficiency, peak memory per GPU (unsloth_compile.bench.distributed)
    sparse24  the 2:4 sparse frozen base against the dense one at the Llama shapes (CUDA)
    nf4-kernel  the NF4 (QLoRA) LoRA linear against the bf16 one and bitsandbytes (CUDA)
    saved-tensors   what one step of a preset keeps for backward, by dtype and shape
    compress-bytes  bytes saved for backward under each compress_activations mode (CPU)
    lowrank-error   the error of compress_activations="lowrank"'s dA on MiniLM's LoRA inputs
    prune-proxy     2:4 pruning configurations judged before fine-tuning (MiniLM, CPU)

Every subcommand exits with status 1 when a variant it ran failed (its row gives the first line
of the error; the JSON keeps the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# subcommand -> (module of this package with main(argv), help line)
OWN_PARSER = {
    "kernel": ("kernel", "LoRA linear vs frozen base linear"),
    "sparse24": ("sparse24", "2:4 sparse frozen base vs dense"),
    "nf4-kernel": ("nf4_kernel", "NF4 LoRA linear vs bf16 and bitsandbytes"),
    "saved-tensors": ("saved_tensors", "what one step keeps for backward"),
    "compress-bytes": ("compress_bytes", "bytes saved for backward per compress_activations mode"),
    "lowrank-error": ("lowrank_error", "lowrank compression's dA error on real inputs"),
    "prune-proxy": ("prune_proxy", "2:4 pruning configurations before fine-tuning"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_PARSER:
        # Its own parser, owned by its module; imported lazily so that e2e and accuracy do not
        # depend on it (and the kernel benchmarks do not depend on transformers).
        module = importlib.import_module(f".{OWN_PARSER[argv[0]][0]}", __package__)
        return module.main(argv[1:]) or 0

    from . import accuracy, distributed, e2e, output, profile

    # peft probes `model.is_gradient_checkpointing`, which transformers 5 deprecates: noise, not news
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e2e.add_arguments(sub.add_parser("e2e", help="end-to-end training throughput and memory"))
    accuracy.add_arguments(sub.add_parser("accuracy", help="real-task accuracy over seeds"))
    profile.add_arguments(sub.add_parser("profile", help="one step by kernel family, host and idle time"))
    for name, (_, help_text) in OWN_PARSER.items():
        sub.add_parser(name, help=f"{help_text} (own options: {name} --help)")
    distributed.add_arguments(sub.add_parser("dist", help="DDP and FSDP2 on N GPUs against one GPU"))
    args = parser.parse_args(argv)
    if args.command == "e2e":
        failed = [line for data in e2e.run(args) for line in output.failures(data["results"])]
    elif args.command == "dist":
        failed = output.failures(distributed.run(args)["results"])
    elif args.command == "profile":
        failed = [line for data in profile.run(args) for line in output.failures(data["results"])]
    else:
        failed = output.failures(accuracy.run(args)["runs"])
    return exit_status(args.command, failed)


def exit_status(command: str, failed: list[str]) -> int:
    """1 when a variant that was asked for failed: its row says why, and a script or CI job
    running the bench must not read a table of failures as a result."""
    if not failed:
        return 0
    print(f"bench {command}: {len(failed)} variant run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
