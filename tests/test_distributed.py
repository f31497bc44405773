"""A run over several hosts (launch.py, run.py): two processes joined by `jax.distributed` on
localhost, one CPU device each, give the same metrics.csv and params as one process with two
devices, only process 0 writes the run's files, and --resume over two processes ends the same;
seeds that do not divide over the devices are refused in one line; the launch flags are parsed
at the boundary."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--env", "MemoryChain-bsuite", "--memory", "gru", "--memory-size", "8", "--hidden", "16",
        "--num-envs", "4", "--num-steps", "8", "--num-epochs", "1", "--num-minibatches", "2",
        "--total-timesteps", str(4 * 8 * 3), "--checkpoint-every", "2", "--num-seeds", "2",
        "--no-progress"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int = 1) -> subprocess.Popen:
    """`python train.py args` on the CPU backend with `devices` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def launch_pair(args: list[str]) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a 2-process run with a localhost coordinator."""
    cluster = ["--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2"]
    return [start([*args, *cluster, "--process-id", str(i)]) for i in range(2)]


def finish(process: subprocess.Popen, timeout: int = 400) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def read_rows(path) -> list[dict]:
    """metrics.csv's rows without the wall-clock column."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "steps_per_s"} for row in csv.DictReader(f)]


def outputs(directory) -> list[str]:
    """The run's files under `directory` but its checkpoints (whose file names are hashes),
    with TensorBoard's (host-named) event files as tensorboard/EVENTS."""
    paths = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.relpath(os.path.join(root, name), directory)
            paths.append("tensorboard/EVENTS" if "tfevents" in name else path)
    return sorted(p for p in paths if not p.startswith("checkpoints"))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    reference = start([*ARGS, "--out", str(one)], devices=2)
    pair = launch_pair([*ARGS, "--out", str(two)])
    (code, out, err), (code0, out0, err0), (code1, out1, err1) = map(finish, [reference, *pair])
    assert code == 0, err[-3000:]
    assert code0 == 0 and code1 == 0, (err0[-3000:], err1[-3000:])
    printed = [line for line in out1.splitlines() if not line.startswith("[Gloo]")]
    assert f"-> {two}" in out0 and not printed, (out0, out1)  # process 1 prints nothing

    rows = read_rows(two / "metrics.csv")
    assert {r["seed"] for r in rows} == {"0", "1"} and len(rows) == 2 * 3
    assert rows == read_rows(one / "metrics.csv")
    assert (two / "params.msgpack").read_bytes() == (one / "params.msgpack").read_bytes()
    # The same files (one TensorBoard event file), so process 1 wrote no rows, logs or outputs
    # of its own; checkpoints after updates 2 and 3, with each process's shards.
    assert outputs(two) == outputs(one) and outputs(two).count("tensorboard/EVENTS") == 1
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "3"]
    assert sorted(os.listdir(two / "checkpoints/3/default/array_metadatas")) == [
        "process_0",
        "process_1",
    ]

    # --resume over two processes restores each one's shards of checkpoint 2 and ends the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints/3")
    os.remove(resumed / "params.msgpack")
    for code, _, err in map(finish, launch_pair(["--resume", str(resumed)])):
        assert code == 0, err[-3000:]
    assert read_rows(resumed / "metrics.csv") == rows
    assert (resumed / "params.msgpack").read_bytes() == (two / "params.msgpack").read_bytes()


def test_seeds_that_do_not_divide_over_the_devices_are_refused(tmp_path):
    pair = launch_pair([*ARGS, "--num-seeds", "3", "--out", str(tmp_path / "run")])
    for code, _, err in map(finish, pair):
        assert code == 2, err[-3000:]
        assert "--num-seeds 3 must be a multiple of the 2 devices" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


def test_launch_flags_are_parsed_at_the_boundary():
    argv = ["--env", "X", "--coordinator-address=h:1", "--num-processes", "4", "--process-id", "3"]
    rest, kwargs = launch.split_launch_flags(argv)
    assert rest == ["--env", "X"]
    assert kwargs == dict(coordinator_address="h:1", num_processes=4, process_id=3)
    assert launch.split_launch_flags(["--distributed", "-h"]) == (["-h"], {"auto": True})
    assert launch.split_launch_flags(["--lr", "1"]) == (["--lr", "1"], {})
    bad = {
        ("--num-processes", "2"): "--coordinator-address, --process-id too",
        ("--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"): "0..1",
        ("--coordinator-address", "h:1", "--num-processes", "two", "--process-id", "0"): "integer",
        ("--process-id",): "needs a value",
    }
    for argv, needle in bad.items():
        with pytest.raises(ValueError, match=needle):
            launch.split_launch_flags(list(argv))
