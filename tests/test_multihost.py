"""Two CPU processes with 4 devices each (gloo collectives) train on one 8-device mesh, through
launch/local_processes.sh, then evaluate (sharded generation), and match a single process with
8 devices; a server on two processes answers as one process does."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import Server, data_url, png, write_run

import mqt_jax
from mqt_jax.config import EngineConfig
from mqt_jax.core.sharding import initialize_distributed
from mqt_jax.data.shapes import write_shapes
from mqt_jax.inference.engine import Engine, Request

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "local_processes.sh"
ARGS = ["--gin_file", "tiny.gin", "--gin_param", "TrainConfig.steps = 4",
        "--gin_param", "TrainConfig.seq_len = 80", "--gin_param", "MeshConfig.fsdp = 4",
        "--gin_param", "MeshConfig.data = 2"]
# The venv's mqt-jax first on PATH; the suite's device count must not leak in, its quick
# compilation flag does (the launcher adds each process's device count).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": "--xla_backend_optimization_level=0",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def eval_args(shapes: Path) -> list[str]:
    """The recipe's evaluation on a few shapes-VQA questions at m = 1, 4 and M."""
    bindings = {"questions": f"'{shapes}/eval/questions.jsonl'", "answers": f"'{shapes}/eval/answers.jsonl'",
                "image_root": f"'{shapes}/images'", "tokenizer_dir": f"'{shapes}/tokenizer'",
                "limit": 16, "m_values": "(1, 4)", "batch_size": 8, "max_new_tokens": 4}
    return [arg for k, v in bindings.items() for arg in ("--gin_param", f"EvalConfig.{k} = {v}")]


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows]), np.array([r["grad_norm"] for r in rows])


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    write_shapes(tmp_path / "shapes", num_train=4, num_eval=4)
    args = ARGS + eval_args(tmp_path / "shapes")
    single = subprocess.run(
        [sys.executable, "-m", "mqt_jax.cli", "train", *args, "--workdir", str(tmp_path / "one")],
        env={**ENV, "XLA_FLAGS": ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"},
        capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        ["bash", str(LAUNCHER), "2", "4", *args, "--workdir", str(tmp_path / "two")],
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
    # Both evaluated, process 0 writing: the same scores and answers at every m (after 4 steps
    # the answers are alike; the row-by-row check is test_generation_on_two_processes_...).
    one, two = (json.loads((tmp_path / w / "eval" / "shapes" / "eval.json").read_text())
                for w in ("one", "two"))
    assert [r["m"] for r in two["rows"]] == [1, 4, 64] and two["questions"] == 16
    assert [r["score"] for r in two["rows"]] == [r["score"] for r in one["rows"]]
    for m in (1, 4, 64):
        answers = [(tmp_path / w / "eval" / "shapes" / f"answers_m{m}.jsonl").read_text().splitlines()
                   for w in ("one", "two")]
        assert len(answers[0]) == 16
        assert [json.loads(a)["text"] for a in answers[1]] == [json.loads(a)["text"] for a in answers[0]]
    assert "shapes score (%) by m" in multi.stdout and "shapes score" not in log1


@pytest.mark.slow
def test_generation_on_two_processes_matches_one(tmp_path):
    """Generator with parameters and rows spread over 2 processes x 4 devices gives every row
    the tokens that 1 process x 8 devices gives it (greedy and seeded top-p sampling)."""
    worker = [sys.executable, str(ROOT / "tests" / "generate_worker.py")]
    env = lambda devices: {**ENV, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":  # noqa: E731
                           ENV["XLA_FLAGS"] + f" --xla_force_host_platform_device_count={devices}"}
    single = subprocess.run(worker + ["--out", str(tmp_path / "one.json")], env=env(8),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = free_port()  # for the coordinator
    procs = [subprocess.Popen(worker + ["--out", str(tmp_path / "two.json"), "--coordinator_address",
                                        f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                              env=env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["processes"], two["processes"], two["devices"]) == (1, 2, 8)
    assert two["ids"] == one["ids"]
    for by_m in one["ids"].values():  # rows, m values and samplings give different tokens
        assert all(len({tuple(row) for row in rows}) > 8 for rows in by_m.values())
        assert by_m["1"] != by_m["16"]
    assert one["ids"]["greedy"] != one["ids"]["sampled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serving_on_two_processes_matches_one(tmp_path):
    """`mqt-jax serve` on 2 processes x 4 devices (process 0 takes the requests and broadcasts
    each step's plan): concurrent requests mixing m, greedy and seeded sampling, give what one
    process with 8 devices gives; SIGTERM to process 0 drains, and both exit 0."""
    write_run(tmp_path / "run")
    env = {**ENV, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}
    multi = ["--coordinator_address", f"127.0.0.1:{free_port()}", "--num_processes", "2"]
    follower_log = open(tmp_path / "process_1.log", "w")
    follower = subprocess.Popen(
        [sys.executable, "-m", "mqt_jax.cli", "serve", "--workdir", str(tmp_path / "run"),
         "--default_m", "4", "--cache_len", "384", *multi, "--process_id", "1"],
        env=env, stdout=follower_log, stderr=subprocess.STDOUT)
    server = Server(tmp_path / "run", tmp_path, "--default_m", "4", *multi, "--process_id", "0",
                    env=env)
    try:
        questions = ["What shape is in the picture?", "How many triangles are there?", "Hi",
                     "Describe the image in one word. What colour?"]
        jobs = [(i, [1, 4, 16][i % 3], questions[i % 4], 3 + i % 4) for i in range(12)]
        sampled = dict(temperature=1.0, top_p=0.9, seed=5)

        def ask(job):
            i, m, question, n = job
            extra = sampled if i == 0 else {}
            return server.ask(question, data_url(png(i % 5)), max_tokens=n, extra_body={"m": m},
                              **extra).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        # one process, 8 devices: the same requests through the engine
        model = mqt_jax.load(tmp_path / "run")
        requests = [Request(model.prompt(q), model.image(png(i % 5)), m, n,
                            **(sampled if i == 0 else {})) for i, m, q, n in jobs]
        Engine(model, EngineConfig(cache_len=384)).run(requests)
        want = [model.tokenizer.decode(r.tokens).strip() for r in requests]
        assert answers == want
        assert len(set(answers)) > 6
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
        assert follower.wait(timeout=120) == 0
    finally:
        server.close()
        if follower.poll() is None:
            follower.kill()
        follower_log.close()
        print("process 1's log ends:", (tmp_path / "process_1.log").read_text()[-6000:])
    assert "Traceback" not in (tmp_path / "process_1.log").read_text()


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
