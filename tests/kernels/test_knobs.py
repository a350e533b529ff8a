"""kernels/knobs.py: defaults from the environment, validation, `patch` for a block, and the
knobs read at launch time (no module reload needed to change a path)."""

from __future__ import annotations

import pytest

from helpers import triton_kernel_module
from unsloth_compile.kernels import knobs

gemm = triton_kernel_module("lora.lora_gemm")


def test_defaults_come_from_the_environment(monkeypatch):
    for knob in knobs.dataclasses.fields(knobs.KernelKnobs):
        monkeypatch.delenv(knob.metadata["env"], raising=False)
    assert knobs.KernelKnobs() == knobs.KernelKnobs(main_gemm="auto", thin="auto", thin_pair=True, main_loop="auto",
                                                    autotune=True, persistent=True, sparse24_gemm="auto",
                                                    sparse24_search=True, direct_launch=False)
    monkeypatch.setenv("UNSLOTH_LORA_MAIN_GEMM", "cublas")
    monkeypatch.setenv("UNSLOTH_LORA_AUTOTUNE", "0")
    monkeypatch.setenv("UNSLOTH_LORA_PERSISTENT", "yes")  # anything but "0" keeps a flag on
    monkeypatch.setenv("UNSLOTH_SPARSE24_GEMM", "cutlass")
    monkeypatch.setenv("UNSLOTH_SPARSE24_SEARCH", "0")
    from_env = knobs.KernelKnobs()
    assert (from_env.main_gemm, from_env.autotune, from_env.persistent, from_env.sparse24_gemm,
            from_env.sparse24_search) == ("cublas", False, True, "cutlass", False)
    monkeypatch.setenv("UNSLOTH_LORA_THIN", "fast")
    with pytest.raises(ValueError, match="UNSLOTH_LORA_THIN.*'auto', 'triton', 'cublas'"):
        knobs.KernelKnobs()


def test_patch_applies_for_the_block_and_restores():
    before = knobs.current()
    with knobs.patch(main_gemm="cublas", thin_pair=False) as inside:
        assert knobs.current() is inside and (inside.main_gemm, inside.thin_pair) == ("cublas", False)
        with knobs.patch(main_gemm="triton"):
            assert (knobs.current().main_gemm, knobs.current().thin_pair) == ("triton", False)
        assert knobs.current().main_gemm == "cublas"
    assert knobs.current() == before
    with pytest.raises(RuntimeError), knobs.patch(main_loop="pointer"):
        raise RuntimeError("restored on the way out")
    assert knobs.current() == before

    @knobs.patch(autotune=False)
    def untuned():
        return knobs.current().autotune

    assert untuned() is False and knobs.current() == before


@pytest.mark.parametrize("changes,message", [
    ({"main_gemm": "fast"}, "main_gemm='fast'.*UNSLOTH_LORA_MAIN_GEMM"),
    ({"autotune": 0}, "autotune=0"),
    ({"main_loop": "tma"}, "'auto', 'pointer'"),
    ({"no_such_knob": 1}, "no_such_knob; the knobs are main_gemm"),
])
def test_patch_refuses_unknown_knobs_and_values(changes, message):
    before = knobs.current()
    with pytest.raises(ValueError, match=message), knobs.patch(**changes):
        pass
    assert knobs.current() == before


def test_gemm_configs_follow_the_knobs_at_launch():
    """autotune / persistent choose among autotuners built for each configuration list (the
    lists themselves unchanged), read when a plan is made, not when the module was imported."""
    persistent = [c.kwargs["PERSISTENT"] for c in gemm._tma_tuned(True, True).configs]
    assert len(persistent) == len(gemm._TILES) + len(gemm._PERSISTENT_TILES)
    assert sum(persistent) == len(gemm._PERSISTENT_TILES)
    assert not any(c.kwargs["PERSISTENT"] for c in gemm._tma_tuned(True, False).configs)
    assert len(gemm._tma_tuned(False, False).configs) == len(gemm._pointer_tuned(False).configs) == 1
    assert len(gemm._pointer_tuned(True).configs) == len(gemm._TILES)
    with knobs.patch(main_loop="auto", autotune=True, persistent=True):
        assert gemm.knob_key() == ("auto", True, True)
    with knobs.patch(main_loop="pointer", autotune=True, persistent=False):
        assert gemm.knob_key() == ("pointer", True, False)
    with knobs.patch(autotune=False):
        assert gemm.knob_key()[1:] == (False, False)  # no persistent configuration untuned
