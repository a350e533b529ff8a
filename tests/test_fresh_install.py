"""The checkout as a new user meets it: started from the repository root, whose folders are then
first on `sys.path` (`python -m pytest`, `python -m unsloth_compile.bench`, a notebook opened
there). The top-level `passes/` and `kernels/` folders must never hide an installed distribution
of the same name (transformers imports the `kernels` distribution)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.smoke


def run_in_root(code: str, extra_path: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root: '' (the root) is first on sys.path."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_repository_folders_never_hide_an_installed_distribution(tmp_path, name):
    # a stand-in distribution of the same name, installed as a regular package
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED_DISTRIBUTION = True\n")
    result = run_in_root(f"""
        import sys, {name}
        assert sys.path[0] == '', sys.path[:3]
        print({name}.__file__)
        assert getattr({name}, 'INSTALLED_DISTRIBUTION', False), {name}.__file__
        import unsloth_compile.{name}.{'pipeline' if name == 'passes' else 'reference'} as inner
        assert inner.__file__.startswith({str(ROOT)!r}), inner.__file__
        assert sys.modules[{name!r}] is {name}
        """, extra_path=site)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_subfolders_map_from_the_source_tree():
    result = run_in_root("""
        import unsloth_compile
        import unsloth_compile.kernels.lora.lora_gemm as gemm, unsloth_compile.passes.lora.lora_linear as lora
        from pathlib import Path
        root = Path(unsloth_compile.__file__).resolve().parents[1]
        assert Path(gemm.__file__).resolve() == root / 'kernels' / 'lora' / 'lora_gemm.py', gemm.__file__
        assert Path(lora.__file__).resolve() == root / 'passes' / 'lora' / 'lora_linear.py', lora.__file__
        """)
    assert result.returncode == 0, result.stdout + result.stderr


def test_peft_llama_compiles_from_the_repository_root():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = run_in_root("""
        import torch, transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import LoraConfig, get_peft_model
        from unsloth_compile.report import collect_reports
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=96)
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights=False))
        ids = torch.randint(0, 96, (2, 12))
        expected = model(input_ids=ids, labels=ids).loss
        compiled = torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})
        with collect_reports() as report:
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        assert len(report.fused) == 14, str(report)
        print("fused", len(report.fused), "transformers", transformers.__version__)
        """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused 14" in result.stdout


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("setuptools")
    result = run_in_root(f"""
        import warnings, setuptools.build_meta as build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build.prepare_metadata_for_build_wheel({str(tmp_path)!r})
        messages = [f"{{w.category.__name__}}: {{str(w.message).splitlines()[0]}}" for w in caught]
        assert not [m for m in messages if "Deprecat" in m], messages
        """)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a wheel holds: each folder of unsloth_compile/ with an
    __init__.py must be among them, or an installed copy lacks it; so must each folder of passes/
    and kernels/ (installed as unsloth_compile.passes.* and unsloth_compile.kernels.*)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "unsloth_compile").rglob("__init__.py")}
    for mapped in ("passes", "kernels"):
        folders |= {".".join(("unsloth_compile", *init.parent.relative_to(ROOT).parts))
                    for init in (ROOT / mapped).rglob("__init__.py")}
    assert folders - listed == set(), f"pyproject.toml's packages miss {sorted(folders - listed)}"
