"""Writing results: JSON (everything), a markdown table (what a reader needs), a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def first_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of an error, for a table cell (the whole one stays in the JSON)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failures(results: Sequence[dict]) -> list[str]:
    """`name: first line of its error` for every result whose status is not ok; `bench` exits
    non-zero when this is not empty. A row carried over from an earlier run's file
    (`baseline_from`) was not run here and is not counted."""
    lines = []
    for r in results:
        if r.get("status", "ok") == "ok" or r.get("baseline_from"):
            continue
        variant = r.get("variant")
        name = variant.get("name") if isinstance(variant, dict) else str(variant)
        if "seed" in r:
            name += f" (seed {r['seed']})"
        lines.append(f"{name}: {first_line(r.get('error') or 'failed, no error recorded')}")
    return lines


def fmt(value: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        value = round(value, 9) + 0.0  # no "-0.00"
    return f"{value:{spec}}{suffix}"


def header_lines(title: str, env: dict) -> list[str]:
    v = env["versions"]
    lines = [f"# {title}", "",
             f"- device: {env['device']}",
             f"- date: {env['date']}",
             f"- versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
             f"triton {v['triton']}, unsloth_compile {v['unsloth_compile']}, python {v['python']}"]
    if env["device_type"] != "cuda":
        lines.append(f"- CPU run ({env['threads']} threads): a functional check, not a performance claim; "
                     "performance is only ever claimed from a GPU run")
    return lines


def layer_table(title: str, command: str, env: dict, legend: str, headers: Sequence[str],
                cells: Iterable[Sequence[str]], versions_extra: str = "") -> str:
    """A per-layer CUDA benchmark's markdown (sparse24, nf4-kernel): the title with the card,
    the date and the versions, the command that reproduces it, the legend, then one table row
    per row of `cells`, written as given (already formatted)."""
    versions = env["versions"]
    lines = [f"# {title} ({env['device']}, {env['date']}; torch {versions['torch']}, "
             f"triton {versions['triton']}{versions_extra})", "",
             "`" + " ".join([command, *env["argv"]]) + "`", "",
             legend, "",
             "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def write_layer_results(out: Path, stem: str, env: dict, rows: list[dict], markdown: str) -> int:
    """`stem`.json (the environment and every row) and `stem`.md under `out`, the markdown
    printed; the exit status: 1 when a row failed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 1 if any("error" in row for row in rows) else 0


def bar_chart(path: Path, title: str, names: Sequence[str], panels: Sequence[tuple[str, Sequence[Optional[float]]]],
              failed: Sequence[bool]) -> None:
    """One horizontal bar panel per metric; a failed variant gets an empty bar labelled 'failed'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.6 * len(names) + 1.8), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        shown = [0.0 if (v is None or f) else v for v, f in zip(values, failed)]
        bars = ax.barh(range(len(names)), shown, color=["#bbbbbb" if f else "#4c72b0" for f in failed])
        for bar, v, f in zip(bars, values, failed):
            text = "failed" if f else ("-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.margins(x=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
