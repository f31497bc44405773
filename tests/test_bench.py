"""The benchmark scripts as a user runs them: `bench/gpu.py --quick` (every stage of a GPU window
at tiny sizes on the CPU, into a temporary directory), its helpers (device slug, time budget,
same-run comparison), and `bench/memory.py` beside a memorax without package metadata."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_gpu():
    """bench/gpu.py as a module (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_quick_mode_runs_every_stage(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("README.md", "install.txt", "tests.txt", "determinism.md", "pallas_sweep.md",
                 "pallas_sweep.csv", "memory.md", "memory.csv", "train_paper.md"):  # fmt: skip
        assert (out / name).exists(), name
    readme = (out / "README.md").read_text()
    for stage in ("tests and determinism", "kernel sweep", "memory", "train paper"):
        assert f"| {stage} |" in readme, stage
    assert "| ok |" in readme and "exit" not in readme and "timed out" not in readme
    assert "Verdict: identical" in (out / "determinism.md").read_text()
    with open(out / "pallas_sweep.csv", newline="") as f:
        sweep = list(csv.DictReader(f))
    assert sweep and sweep[0]["default"] == "1" and not sweep[0]["error"]
    assert float(sweep[0]["max_rel_diff"]) < 1e-5
    assert "Where an update's time goes" in (out / "train_paper.md").read_text()


def test_gpu_helpers():
    gpu = load_gpu()
    assert gpu.slug("NVIDIA H200", "gpu") == "h200"
    assert gpu.slug("NVIDIA H100 80GB HBM3", "gpu") == "h100"
    assert gpu.slug("cpu", "cpu") == "cpu"
    # Each stage gets its share plus what the earlier ones left; later shares stay reserved.
    now = [0.0]
    window = gpu.Window(100.0, {"a": 50.0, "b": 30.0, "c": 20.0}, clock=lambda: now[0])
    assert window.limit("a") == 50.0
    now[0] = 20.0  # a finished early: b gets its 30 and a's unused 30
    assert window.limit("b") == 60.0
    now[0] = 95.0
    assert window.limit("c") == 5.0
    # What a bare machine gets is pinned as pyproject.toml pins it.
    assert ("gymnax", "gymnax==1.0.1") in gpu.REQUIREMENTS


def test_same_training_ignores_only_the_wall_clock(tmp_path):
    gpu = load_gpu()
    for run, sps, value in (("a", "10.0", "0.5"), ("b", "99.0", "0.5"), ("c", "10.0", "0.6")):
        (tmp_path / run).mkdir()
        rows = ["update,seed,env_steps,steps_per_s,episode_return", f"1,0,64,{sps},{value}"]
        (tmp_path / run / "metrics.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / run / "params.msgpack").write_bytes(b"\x01\x02")
    assert gpu.same_training(tmp_path / "a", tmp_path / "b")[0]
    same, lines = gpu.same_training(tmp_path / "a", tmp_path / "c")
    assert not same and "DIFFER" in lines[0]
    (tmp_path / "b" / "params.msgpack").write_bytes(b"\x01\x03")
    assert not gpu.same_training(tmp_path / "a", tmp_path / "b")[0]


def test_memory_bench_survives_a_memorax_without_metadata_and_names_bad_memories(tmp_path):
    try:
        importlib.metadata.version("memorax")
        pytest.skip("a real memorax is installed: its metadata is there")
    except importlib.metadata.PackageNotFoundError:
        pass
    (tmp_path / "memorax").mkdir()
    (tmp_path / "memorax" / "__init__.py").write_text("")  # imports, but no dist-info
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = (
        "import runpy; print(runpy.run_path('bench/memory.py', run_name='b')['memorax_version']())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(True, 'unknown version')" in done.stdout
    bad = subprocess.run(
        [sys.executable, "bench/memory.py", "--memories", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown memory 'nope' in --memories" in bad.stderr
