import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# Without CUDA the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
# kernel is decorated (and when triton.language decorates its own helpers), so it is set here,
# before anything imports Triton: `import unsloth_compile` does.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import unsloth_compile  # noqa: E402,F401  registers the backend and the ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters, and a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_summary():
    """The process-wide summary ledger forgotten before and after the test."""
    from unsloth_compile import summary

    summary.reset()
    yield
    summary.reset()


# Modules whose `runs` fixture reads what worker processes trained (tests/distributed_cases.py,
# tests/parallel_cases.py). Their processes start with the session at a lower CPU priority and
# these modules run last: the workers use the cores the in-process tests leave idle (the test
# process's Python keeps about one core busy).
MULTI_PROCESS_MODULES = ("test_distributed.py", "test_parallel.py")
WORKER_NICENESS = 10


def _start_workers(module: str, out):
    if module == "test_distributed.py":
        import distributed_cases

        return distributed_cases.start(distributed_cases.WORLD, out, nice=WORKER_NICENESS)
    import parallel_cases

    return parallel_cases.start(out, nice=WORKER_NICENESS)


def _reads_worker_runs(item) -> bool:
    return item.path.name in MULTI_PROCESS_MODULES and "runs" in getattr(item, "fixturenames", ())


@pytest.fixture(scope="session", autouse=True)
def multi_process_launches(request, tmp_path_factory):
    """{module file name: its started worker processes (a Launch)} for each selected module whose
    tests read worker runs; what is still running at the end of the session is killed."""
    names = sorted({item.path.name for item in request.session.items if _reads_worker_runs(item)})
    launches = {name: _start_workers(name, tmp_path_factory.mktemp(name.removesuffix(".py"))) for name in names}
    yield launches
    for launch in launches.values():
        launch.workers.stop()


def pytest_collection_modifyitems(config, items):
    items.sort(key=_reads_worker_runs)  # stable: the multi-process modules' worker tests last
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
