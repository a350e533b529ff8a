"""The module paths from before the feature folders still import, warn, and give the same objects.

Each old path lists the public names it had; the alias must hold each of them, as the very
object that the new module holds, and warn with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import unsloth_compile
from unsloth_compile.moved_modules import MOVED

# old path -> (its public names then, the new module that must be named in the warning)
OLD_NAMES = {
    "unsloth_compile.parallel": (
        ["LoraColwiseParallel", "LoraRowwiseParallel", "GatherSequence", "lora_tp_plan", "tensor_parallel",
         "all_reduce_gradients", "COLWISE", "ROWWISE", "SEQUENCE_NORMS"],
        "unsloth_compile.distributed.tensor_parallel"),
    "unsloth_compile.pipeline": (
        ["CausalLMStage", "split_layers", "pipeline_stage", "pipeline_schedule", "causal_lm_loss", "warm_up_stage",
         "SCHEDULES"],
        "unsloth_compile.distributed.pipeline"),
    "unsloth_compile.dtensor_sharding": (
        ["register_lora_sharding", "dtensor_check", "LAYOUTS", "site_operands"],
        "unsloth_compile.distributed.dtensor_sharding"),
    "unsloth_compile.rank_peft": (["sync_peft_config"], "unsloth_compile.rank.peft_config"),
    "unsloth_compile.sparse24_mask": (
        ["tile_patterns", "transposable_mask", "row_mask", "sparsity_problem", "kept_energy"],
        "unsloth_compile.sparsity.mask"),
    "unsloth_compile.sparse24_obs": (["BLOCK", "inverse_cholesky", "obs_prune"], "unsloth_compile.sparsity.obs"),
    "unsloth_compile.sparse24_reconstruct": (
        ["DAMPING", "damping", "damped", "kept_indices", "reconstruct", "relative_output_error", "dense_refit",
         "relative_error_to"],
        "unsloth_compile.sparsity.reconstruct"),
    "unsloth_compile.sparse24_sequential": (
        ["TARGETS", "run_batch", "padding_mask", "token_rows", "LayerStats", "eval_no_grad", "forward_groups",
         "require_reached", "group_stats", "stats_bytes"],
        "unsloth_compile.sparsity.sequential"),
    "unsloth_compile.ops_fp8": (["emulate"], "unsloth_compile.ops.base_fp8"),
    "unsloth_compile.ops_sparse": ([], "unsloth_compile.ops.base_sparse24"),
    "unsloth_compile.ops_cross_entropy": ([], "unsloth_compile.ops.cross_entropy"),
    "unsloth_compile.ops_compress": (
        ["seed_projections", "compress_rowwise", "decompress_rowwise", "random_projection", "range_projection",
         "project_rows", "lora_linear_backward_projected"],
        "unsloth_compile.ops.compress"),
    "unsloth_compile.ops_packed_attention": (
        ["sequence_starts", "block_causal_mask", "flash_supports", "packed_attention", "packed_attention_backward"],
        "unsloth_compile.ops.packed_attention"),
    "unsloth_compile.ops_attention_bias": (["padded_strides", "attention_bias"], "unsloth_compile.ops.attention_bias"),
    "unsloth_compile.passes.lora_linear": (
        ["PATTERN", "BaseLinear", "Adapter", "LoraSite", "match_base_linear", "match_adapter", "match_lora_sum",
         "check_site", "dropout_as_mask", "plan_site", "replace_site", "describe_fused", "fuse_lora_linears"],
        "unsloth_compile.passes.lora.lora_linear"),
    "unsloth_compile.passes.lora_adapter_groups": (
        ["group_by_input", "split_by_input", "summed_terms", "op_operands"],
        "unsloth_compile.passes.lora.lora_adapter_groups"),
    "unsloth_compile.passes.lora_autocast": (
        ["output_dtype", "base_compute_dtype", "adapter_dtype_mismatch", "is_autocast_site", "cast_to"],
        "unsloth_compile.passes.lora.lora_autocast"),
    "unsloth_compile.passes.lora_leftovers": (["report_leftover_lora_layers"],
                                              "unsloth_compile.passes.lora.lora_leftovers"),
    "unsloth_compile.passes.fp8_linear": (["PATTERN", "match_fp8_base", "check_fp8", "replace_base", "record"],
                                          "unsloth_compile.passes.lora.fp8_linear"),
    "unsloth_compile.passes.sparse24_linear": (
        ["PATTERN", "SPARSE", "match_sparse24_base", "check_sparse24", "replace_base", "record"],
        "unsloth_compile.passes.lora.sparse24_linear"),
    "unsloth_compile.passes.compress_rewrite": (
        ["unsloth", "call", "replace_saved_output", "replace_placeholder", "first_user", "aten",
         "emit_rowwise_compress", "emit_rowwise_decompress", "rowwise", "lowrank", "projected_dtype", "erase_if_dead"],
        "unsloth_compile.passes.compress.compress_rewrite"),
    "unsloth_compile.passes.compress_saved": (
        ["PATTERN", "MIN_COLUMNS", "aten", "SavedTensor", "projection_chain", "ffn_activation_region",
         "lora_backward_uses", "nbytes", "storage_root", "check_saved", "bw_readers", "select",
         "compress_saved_activations", "ffn_products", "partition_recomputing_ffn_products",
         "CompressSavedPartitioner", "compressing_aot_eager", "compile_compressed"],
        "unsloth_compile.passes.compress.compress_saved"),
}


def _fresh_import(old: str):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_every_alias_is_tested():
    assert set(OLD_NAMES) == set(MOVED)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_path_warns_and_reexports(old):
    names, new = OLD_NAMES[old]
    module, deprecations = _fresh_import(old)
    assert len(deprecations) == 1, [str(w.message) for w in deprecations]
    message = str(deprecations[0].message)
    assert old in message and new in message, message
    assert deprecations[0].filename == __file__  # points at the import, not at the import machinery
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{old} lost {missing}"
    homes = [importlib.import_module(home) for home in MOVED[old]]
    for name in names:
        assert any(getattr(home, name, None) is getattr(module, name) for home in homes), name


def test_from_package_import_old_name():
    sys.modules.pop("unsloth_compile.parallel", None)
    vars(unsloth_compile).pop("parallel", None)  # an earlier import set the attribute
    with pytest.warns(DeprecationWarning, match="unsloth_compile.distributed.tensor_parallel"):
        from unsloth_compile import parallel
    from unsloth_compile.distributed import tensor_parallel
    assert parallel.lora_tp_plan is tensor_parallel.lora_tp_plan


def test_unknown_paths_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("unsloth_compile.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("unsloth_compile.passes.no_such_pass")


def test_deprecation_shows_by_default_in_a_script():
    """Python shows a DeprecationWarning by default only where __main__ triggered it."""
    result = subprocess.run([sys.executable, "-c", "import unsloth_compile.pipeline"], capture_output=True,
                            text=True, cwd=unsloth_compile.__path__[0] + "/..")
    assert result.returncode == 0, result.stderr
    assert "DeprecationWarning" in result.stderr and "unsloth_compile.distributed.pipeline" in result.stderr
