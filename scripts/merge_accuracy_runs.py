"""Merge the runs of several `python -m unsloth_compile.bench accuracy` outputs into one
accuracy.json / accuracy.md, summarised as one run would be (paired deltas by seed against
the PEFT eager runs among them).

    python scripts/merge_accuracy_runs.py --out docs/bench/NAME a/accuracy.json b/accuracy.json \
        --take peft-eager:1,2:docs/bench/compress-accuracy-cpu.json

For runs split over processes when the machine is shared (the runs of one variant and seed do
not depend on the other runs of a process, except a lowrank run's projections, which follow
the process's seed_projections stream). `--take NAME:SEEDS:FILE` adds only the given
variant's runs of those seeds from FILE (an earlier output, e.g. PEFT eager, which is
deterministic on CPU); `NAME=NEW:SEEDS:FILE` renames that variant's runs (a variant measured
before its default changed, say); each input is listed in the markdown. A run (variant, seed) given
twice must have the same test macro-F1, else the merge stops.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from unsloth_compile.bench import accuracy, output
from unsloth_compile.bench.variants import Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="accuracy.json files, the first gives env and args")
    parser.add_argument("--take", action="append", default=[], metavar="NAME[=NEW]:SEEDS:FILE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    merged = json.loads(Path(args.inputs[0]).read_text())
    runs, sources = {}, []

    def add(run: dict, source: str) -> None:
        key = (run["variant"]["name"], run["seed"])
        if key in runs and runs[key]["test"]["macro_f1"] != run["test"]["macro_f1"]:
            raise SystemExit(f"{key}: macro-F1 {run['test']['macro_f1']} in {source}, "
                             f"{runs[key]['test']['macro_f1']} before")
        runs.setdefault(key, dict(run, source=source))

    for path in args.inputs:
        for run in json.loads(Path(path).read_text())["runs"]:
            add(run, path)
        sources.append(f"{path}: every run")
    for spec in args.take:
        names, seeds, path = spec.split(":", 2)
        name, _, new = names.partition("=")
        wanted = {int(s) for s in seeds.split(",")}
        for run in json.loads(Path(path).read_text())["runs"]:
            if run["variant"]["name"] == name and run["seed"] in wanted:
                add(dict(run, variant=dict(run["variant"], name=new or name)), path)
        sources.append(f"{path}: {name} seeds {sorted(wanted)}" + (f", as {new}" if new else ""))
    variants = []
    for run in runs.values():
        v = run["variant"]
        if v["name"] not in [x.name for x in variants]:
            variants.append(Variant(v["name"], v["kind"], v["options"], v.get("role")))
    merged["runs"] = sorted(runs.values(), key=lambda r: (r["seed"], [x.name for x in variants].index(
        r["variant"]["name"])))
    merged["seeds"] = sorted({r["seed"] for r in merged["runs"]})
    merged["summary"] = accuracy.summarise(variants, merged["runs"])
    merged["merged_from"] = sources
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    output.write_json(out / "accuracy.json", merged)
    per_seed = ["", "| variant | seed | test macro-F1 | from |", "|---|---|---|---|"]
    per_seed += [f"| {r['variant']['name']} | {r['seed']} | {100 * r['test']['macro_f1']:.2f} | {r['source']} |"
                 for r in merged["runs"]]
    text = accuracy.render_markdown(merged) + "\nMerged from:\n" + "".join(f"- {s}\n" for s in sources)
    (out / "accuracy.md").write_text(text + "\n".join(per_seed) + "\n")
    print(text)


if __name__ == "__main__":
    main()
