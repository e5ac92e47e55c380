"""Tests run on 8 simulated CPU devices; the flags must be set before jax is imported.

The suite is dominated by XLA compile time of many small programs; LLVM optimisation level 0
compiles them about 3x faster and changes code generation only, not what is computed.

A collective that waits 10 min is a deadlock, and XLA aborts the worker (its default, 40 s,
a device thread of a loaded 2-core machine can reach). The deadlock once seen here and in CI
(two consecutive train steps' collectives overlapping on the simulated devices) is avoided by
Trainer.step, which waits for each step on a multi-device CPU mesh.
"""

import atexit
import os
import shutil
import tempfile

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_collective_call_terminate_timeout_seconds=600",
              "--xla_cpu_collective_timeout_seconds=600"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# CPU only: libtpu (installed for the AOT test, which reaches it without a TPU backend) is
# not started in every test process and CLI subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One persistent compilation cache for the whole run: the xdist workers and the CLI
# subprocesses inherit it from the process that starts them, so the many tests that build the
# same tiny trainer (restarts, resumes, damaged checkpoints) compile it once (-30% on
# test_checkpoint + test_bad_inputs). A hit still counts as a compile for `CompileCounter`.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="mqt_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "conftest must configure 8 CPU devices before jax starts"


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


# ---- order: the long end-to-end modules first ----
# `--dist loadscope` hands each worker whole modules, by default the modules with the most
# tests first, which leaves the few-test, longest ones (the default recipe, the multi-process
# runs, the CLI) for the end, where one worker runs them while the other idles. Here the
# modules with the most `slow` (end-to-end) tests go first, a proxy for the longest, and the
# short modules fill in at the end (on 2 cores: 1,347 s -> 1,149 s, within 4% of the
# workers' summed test time over two).
def _slow_tests(module_items) -> int:
    return sum(1 for item in module_items if item.get_closest_marker("slow"))


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    by_module = {}
    for item in items:
        by_module.setdefault(item.module.__name__, []).append(item)
    order = sorted(by_module, key=lambda name: -_slow_tests(by_module[name]))  # stable
    items[:] = [item for name in order for item in by_module[name]]
