"""Two CPU processes with 4 devices each (gloo collectives) train on one 8-device mesh, through
launch/local_processes.sh, and match a single process with 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mqt_jax.sharding import initialize_distributed

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "local_processes.sh"
ARGS = ["--gin_file", "tiny.gin", "--gin_param", "TrainConfig.steps = 4",
        "--gin_param", "TrainConfig.seq_len = 64", "--gin_param", "MeshConfig.fsdp = 4",
        "--gin_param", "MeshConfig.data = 2"]
# The venv's mqt-jax first on PATH; the suite's device count must not leak in, its quick
# compilation flag does (the launcher adds each process's device count).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "--xla_backend_optimization_level=0",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows]), np.array([r["grad_norm"] for r in rows])


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "mqt_jax.cli", "train", *ARGS, "--workdir", str(tmp_path / "one")],
        env={**ENV, "XLA_FLAGS": ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"},
        capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        ["bash", str(LAUNCHER), "2", "4", *ARGS, "--workdir", str(tmp_path / "two")],
        env={**ENV, "WORKDIR_LOGS": str(tmp_path / "logs")}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    log1 = (tmp_path / "logs" / "process_1.log").read_text()
    assert "Traceback" not in log1 and "done:" not in log1  # only process 0 reports
    assert not (tmp_path / "two" / "stage1").exists()
    loss_1, norm_1 = losses(tmp_path / "one")
    loss_2, norm_2 = losses(tmp_path / "two")
    assert len(loss_1) == 4 and loss_1[-1] < loss_1[0]
    np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5)
    np.testing.assert_allclose(norm_2, norm_1, rtol=1e-4)
    # every process took part in the checkpoint: the final one is complete and readable
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()


def test_launcher_dry_run_prints_one_command_per_process():
    out = subprocess.run(["bash", str(LAUNCHER), "--dry_run", "3", "2", "--workdir", "w"],
                         capture_output=True, text=True, env={**ENV, "PORT": "1234"})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 3
    for i, line in enumerate(lines):
        assert f"--process_id {i}" in line and "--num_processes 3" in line
        assert "--coordinator_address 127.0.0.1:1234" in line
        assert "xla_force_host_platform_device_count=2" in line
        assert "xla_backend_optimization_level=0" in line  # the caller's XLA_FLAGS are kept


def test_explicit_setup_needs_all_three_values():
    with pytest.raises(ValueError, match="--coordinator_address and --process_id"):
        initialize_distributed(num_processes=2)
