"""`python -m unsloth_compile.bench.trl_run`: TRL's SFTTrainer, eager against the unsloth callback.

A LoRA (all linears) on a random-init Llama or Qwen2 built from a config, trained by TRL's
SFTTrainer on synthetic text rows (a word-level tokenizer built here, no hub), once eagerly and once
with `UnslothCompileCallback`, from the same seed and data. Prints steps/s and tokens/s (the
trainer's own token count: real tokens, no padding) over the timed steps, the first step's time
(compilation included), peak memory, and the first losses of each run side by side.

    python -m unsloth_compile.bench.trl_run                       # llama, hidden 1024, 8 layers, max_length 1024
    python -m unsloth_compile.bench.trl_run --layout packing --family qwen2 --json trl.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from typing import Optional

import torch

LAYOUTS = {
    "padding": {},
    "packing": {"packing": True},
    "padding_free": {"padding_free": True, "max_length": None},  # rows are kept under max_length when made
}


def word_tokenizer(words: int):
    """A word-level tokenizer over `words` made-up words ("w0", "w1", ...): pad 0, eos 1, unk 2."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_rows(rows: int, words: int, min_len: int, max_len: int, seed: int):
    """`rows` rows of made-up words, lengths uniform in [min_len, max_len] (one token per word)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g).tolist()
    texts = [" ".join(f"w{i}" for i in torch.randint(0, words, (n,), generator=g).tolist()) for n in lengths]
    return Dataset.from_dict({"text": texts})


def build_model(args, vocab: int):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    heads = max(1, args.hidden // 64)
    common = dict(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                  max_position_embeddings=max(2048, 2 * args.max_length), pad_token_id=0, eos_token_id=1)
    torch.manual_seed(args.seed)
    if args.family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    model = model.to(device=args.device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))


def _timing_callback():
    import transformers as tf

    class StepClock(tf.TrainerCallback):
        """Wall time at the end of each optimizer step, after the device has finished it."""

        def __init__(self):
            self.ends: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())

        @staticmethod
        def _now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

    return StepClock()


def run_variant(name: str, model, args, data, tokenizer, options: dict) -> dict:
    from trl import SFTConfig, SFTTrainer

    config = {"max_length": args.max_length, **LAYOUTS[args.layout]}
    sft = SFTConfig(output_dir=f"/tmp/unsloth_compile_trl_bench/{name}", max_steps=args.warmup + args.steps,
                    per_device_train_batch_size=args.batch, learning_rate=args.lr, logging_steps=1, report_to=[],
                    save_strategy="no", seed=args.seed, disable_tqdm=True, bf16=args.bf16,
                    gradient_checkpointing=args.gradient_checkpointing, use_cpu=args.device == "cpu",
                    dataloader_num_workers=0, **config)
    clock = _timing_callback()
    callbacks = [clock]
    if name == "unsloth":
        from unsloth_compile import UnslothCompileCallback

        callbacks.append(UnslothCompileCallback(options))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log and "num_tokens" in log]
    tokens = [log["num_tokens"] for log in logs]  # running total of real tokens, one entry per step
    timed = clock.ends[args.warmup:]
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1] if args.warmup else clock.ends[-1] - clock.start
    timed_tokens = tokens[-1] - (tokens[args.warmup - 1] if args.warmup else 0)
    return {
        "variant": name,
        "steps_per_s": len(timed) / seconds,
        "tokens_per_s": timed_tokens / seconds,
        "first_step_s": clock.ends[0] - clock.start,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "losses": [log["loss"] for log in logs],
    }


def _parse_options(pairs: Optional[list[str]]) -> dict:
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, help="default 4 x hidden")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--words", type=int, default=32000, help="tokenizer and model vocabulary (+3 special tokens)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--min-row", type=int, default=64, help="shortest row, in tokens (words)")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, recompiles)")
    p.add_argument("--layout", default="padding", choices=sorted(LAYOUTS))
    p.add_argument("--variants", default="eager,unsloth")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option (repeatable)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here unless given")
    p.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 instead of bf16 (CPU smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")


def run(args) -> dict:
    import datasets
    import transformers
    import trl

    words = args.words
    tokenizer = word_tokenizer(words)
    max_row = args.max_length - 1  # one token left for the eos
    data = text_rows(args.rows, words, min(args.min_row, max_row), max_row, args.seed)
    options = _parse_options(args.option)
    base = build_model(args, vocab=words + 3)
    results = []
    for name in args.variants.split(","):
        model = copy.deepcopy(base)
        try:
            results.append(run_variant(name, model, args, data, tokenizer, options))
        except Exception as error:  # a failed variant is a row, not the end of the run
            results.append({"variant": name, "error": f"{type(error).__name__}: {error}"})
        del model
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    return {"config": {k: v for k, v in vars(args).items()}, "device": device,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "datasets": datasets.__version__},
            "results": results}


def print_table(data: dict) -> None:
    cfg = data["config"]
    print(f"SFTTrainer {cfg['family']} hidden {cfg['hidden']} x {cfg['layers']} layers, max_length {cfg['max_length']}, "
          f"{cfg['layout']}, batch {cfg['batch']}, r {cfg['rank']}, {'bf16' if cfg['bf16'] else 'fp32'}, "
          f"{cfg['steps']} timed steps after {cfg['warmup']}; {data['device']}; "
          + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    print(f"{'variant':<10} {'steps/s':>8} {'tokens/s':>10} {'first step s':>13} {'peak GiB':>9}  first losses")
    eager = next((r for r in data["results"] if r["variant"] == "eager" and "error" not in r), None)
    for r in data["results"]:
        if "error" in r:
            print(f"{r['variant']:<10} failed: {r['error'].splitlines()[0]}")
            continue
        losses = " ".join(f"{x:.4f}" for x in r["losses"][:4])
        ratio = f"  ({r['tokens_per_s'] / eager['tokens_per_s']:.2f}x eager)" if eager and r is not eager else ""
        print(f"{r['variant']:<10} {r['steps_per_s']:>8.2f} {r['tokens_per_s']:>10.0f} {r['first_step_s']:>13.1f} "
              f"{r['peak_gib']:>9.2f}  {losses}{ratio}")


def main(argv: Optional[list[str]] = None) -> int:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench.trl_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    data = run(args)
    print_table(data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    failed = [r for r in data["results"] if "error" in r or not all(math.isfinite(x) for x in r["losses"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
