"""The cluster launchers in dry-run mode: the commands they would run, printed."""

import subprocess
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def dry_run(script, *args):
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry_run", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_tpu_vm_creates_copies_installs_and_runs_on_every_worker():
    lines = dry_run("tpu_vm.sh", "--create", "--spot", "--name", "pod", "--zone", "us-east5-a",
                    "--type", "v5p-64", "--", "--gin_file", "mqt_llava_7b_stage2.gin",
                    "--workdir", "gs://bucket/run")
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod --zone us-east5-a "
                               "--accelerator-type v5p-64")
    assert "--spot" in lines[0]
    assert lines[1].startswith("git ") and "archive" in lines[1]
    assert "scp /tmp/mqt_jax.tar.gz" in lines[2] and "--worker=all" in lines[2]
    assert "pip\\ install" in lines[3] and "--worker=all" in lines[3]
    assert "mqt-jax\\ train\\ --distributed" in lines[4] and "--worker=all" in lines[4]
    assert "gs://bucket/run" in lines[4]


def test_tpu_vm_without_required_options_is_an_error():
    out = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry_run", "--name", "pod"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_multislice_runs_every_slice_with_the_data_axis_across_slices():
    lines = dry_run("tpu_multislice.sh", "--name", "ms", "--zone", "z", "--type", "v5e-256",
                    "--slices", "2", "--", "--workdir", "gs://b/r")
    assert "queued-resources create ms" in lines[0] and "--node-count 2" in lines[0]
    runs = [line for line in lines if "mqt-jax\\ train\\ --distributed" in line]
    assert len(runs) == 2 and "ms-0" in runs[0] and "ms-1" in runs[1]
    assert all("MeshConfig.slices\\ =\\ 2" in r and "MeshConfig.data\\ =\\ 2" in r for r in runs)


def test_slurm_batch_script_runs_one_task_per_node():
    lines = dry_run("slurm.sh", "--nodes", "4", "--partition", "gpu", "--",
                    "--gin_file", "mqt_llava_7b_stage2.gin", "--workdir", "/scratch/w")
    script = "\n".join(lines)
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --signal=TERM@120" in script  # preemption notice: save and exit 0
    assert "srun" in script and "mqt-jax train --distributed --gin_file" in script
    assert lines[-1] == "sbatch slurm_mqt_jax.sbatch"


def test_local_cpu_dry_run():
    lines = dry_run("local_cpu.sh", "4", "--workdir", "w")
    assert lines == ["env XLA_FLAGS=--xla_force_host_platform_device_count=4 mqt-jax train "
                     "--workdir w"]
