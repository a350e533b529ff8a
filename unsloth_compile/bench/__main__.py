"""`python -m unsloth_compile.bench {e2e,accuracy,kernel} ...`

    e2e       train steps of a random-init model under each variant (full FT, PEFT eager,
              PEFT + torch.compile, PEFT + backend="unsloth"): step time, throughput, memory;
              --lengths uniform:LOW-HIGH|debian and --layouts padded,packed for real batches
    accuracy  LoRA fine-tune pretrained MiniLM-L6 on Debian package sections, several seeds:
              test macro-F1 and accuracy of PEFT eager vs backend="unsloth"
    profile   one training step per variant: GPU time by kernel family, host time, GPU idle
    kernel    one LoRA linear against its frozen base linear (unsloth_compile.bench.kernel)
    dist      N processes (one GPU each) under DDP and FSDP2 against one GPU: tokens/s per GPU,
              scaling efficiency, peak memory per GPU (unsloth_compile.bench.distributed)

Every subcommand exits with status 1 when a variant it ran failed (its row gives the first line
of the error; the JSON keeps the traceback).
"""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kernel":
        # Its own parser, owned by the kernel benchmark; imported lazily so that e2e and
        # accuracy do not depend on it (and it does not depend on transformers).
        from .kernel import main as kernel_main

        return kernel_main(argv[1:]) or 0

    from . import accuracy, distributed, e2e, output, profile

    # peft probes `model.is_gradient_checkpointing`, which transformers 5 deprecates: noise, not news
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e2e.add_arguments(sub.add_parser("e2e", help="end-to-end training throughput and memory"))
    accuracy.add_arguments(sub.add_parser("accuracy", help="real-task accuracy over seeds"))
    profile.add_arguments(sub.add_parser("profile", help="one step by kernel family, host and idle time"))
    sub.add_parser("kernel", help="LoRA linear vs frozen base linear (own options: kernel --help)")
    distributed.add_arguments(sub.add_parser("dist", help="DDP and FSDP2 on N GPUs against one GPU"))
    args = parser.parse_args(argv)
    if args.command == "e2e":
        failed = [line for data in e2e.run(args) for line in output.failures(data["results"])]
    elif args.command == "dist":
        failed = output.failures(distributed.run(args)["results"])
    elif args.command == "profile":
        failed = output.failures(profile.run(args)["results"])
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
