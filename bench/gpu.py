"""One command for a GPU window: install what a bare GPU machine lacks, then, within a time budget
(8 minutes by default), run in order

  1. the GPU-relevant tests (tests/shm_jax/, tests/test_train.py, tests/test_agents.py,
     tests/test_run.py), and beside them a same-seed determinism check: two identical short
     trainings, whose metrics.csv (but its wall-clock column) and params.msgpack must be
     byte-identical;
  2. the Pallas kernel sweep (`bench/memory.py --pallas-sweep`, with a csv);
  3. `bench/memory.py` at (T, B, H) = (1024, 8, 128) and (1024, 512, 32): the reads, the SHM
     layer's "auto" (the Pallas kernel) and "pallas_pipelined", and every registered memory;
  4. `bench/train.py paper`: the paper's POPGym config end to end, and where an update's time goes.

    python bench/gpu.py                 # on the GPU machine: results/gpu-<device>/
    python bench/gpu.py --quick         # tiny sizes on a CPU, into a temporary directory
    python bench/gpu.py --make-wheels   # here, before the window: the wheels it installs, in .whl/

Each stage is a subprocess whose output goes straight to its file in the results directory
(`results/gpu-<device slug>/`, e.g. results/gpu-h200/), so a stage cut at its time limit keeps
what it printed; README.md there records the device, the versions, and each stage's command,
status and wall time. A stage's limit is its share of the budget plus whatever the earlier
stages left unused.

Installing: a bare GPU machine has jax, flax, optax and orbax but not gymnax, tyro, tensorboardX,
chex (nor perhaps pytest or matplotlib). Every module of `REQUIREMENTS` that does not import is
installed with `pip install --no-deps` (each dependency is listed, so pip never touches jax):
from the wheels in `.whl/` when that folder exists (`pip install --no-index --find-links .whl`),
else from PyPI. Make the folder on a machine with internet access, for the GPU machine's Python:

    python bench/gpu.py --make-wheels --python-version 3.12
    # = pip download --no-deps --only-binary=:all: --python-version 3.12 \\
    #     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \\
    #     --platform manylinux_2_28_x86_64 -d .whl gymnax==1.0.1 gymnasium six tyro ...

.whl/ is git-ignored; hand it to the machine with the working tree (the device tool's `carry`).
This file imports only the standard library, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
BUDGET_S = 480
# (module that must import, what pip installs when it does not). Dependencies are listed too:
# everything is installed with --no-deps, so jax and flax stay as the machine has them.
REQUIREMENTS = [
    ("gymnax", "gymnax==1.0.1"),
    ("gymnasium", "gymnasium"),  # gymnax's spaces import it
    ("cloudpickle", "cloudpickle"),
    ("farama_notifications", "farama-notifications"),
    ("six", "six"),  # gymnax imports six without declaring it
    ("tyro", "tyro<2"),
    ("docstring_parser", "docstring-parser"),
    ("typeguard", "typeguard"),
    ("tensorboardX", "tensorboardX"),
    ("chex", "chex"),
    ("toolz", "toolz"),
    ("tqdm", "tqdm"),
    ("matplotlib", "matplotlib"),  # run.py's returns.png
    ("contourpy", "contourpy"),
    ("cycler", "cycler"),
    ("fontTools", "fonttools"),
    ("kiwisolver", "kiwisolver"),
    ("PIL", "pillow"),
    ("pyparsing", "pyparsing"),
    ("dateutil", "python-dateutil"),
    ("packaging", "packaging"),
    ("pytest", "pytest"),
    ("xdist", "pytest-xdist"),
    ("execnet", "execnet"),
    ("iniconfig", "iniconfig"),
    ("pluggy", "pluggy"),
    ("pygments", "pygments"),
]
GPU_TESTS = ["tests/shm_jax", "tests/test_train.py", "tests/test_agents.py", "tests/test_run.py"]


def slug(device_kind: str, backend: str) -> str:
    """A short directory name for a device: 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' ->
    'h100'; the backend's name for a CPU."""
    if backend == "cpu":
        return "cpu"
    words = re.sub(r"[^a-z0-9]+", " ", device_kind.lower().replace("nvidia", "")).split()
    return words[0] if words else backend


class Window:
    """The time budget: stages run in order, each with its share plus what earlier ones left."""

    def __init__(self, budget_s: float, shares: dict[str, float], clock=time.monotonic):
        self.clock, self.shares = clock, shares
        self.deadline = clock() + budget_s

    def limit(self, stage: str) -> float:
        """Seconds stage may run: the time left but the shares of the stages after it."""
        names = list(self.shares)
        later = sum(self.shares[n] for n in names[names.index(stage) + 1 :])
        return max(0.0, self.deadline - self.clock() - later)


def run_stage(commands, limit_s: float, env: dict) -> list[tuple[int | str, float]]:
    """Run [(argv, output path)] at once, each writing stdout and stderr to its path; kill
    (by process group) what still runs after limit_s. Returns [(exit code or 'timed out', wall
    seconds)]."""
    t0 = time.monotonic()
    procs = []
    for argv, path in commands:
        with open(path, "w") as out:  # the child keeps its own descriptor
            out.write(f"$ {shlex.join(argv)}\n\n")
            out.flush()
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
    results = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, limit_s - (time.monotonic() - t0)))
            results.append((proc.returncode, time.monotonic() - t0))
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            results.append(("timed out", time.monotonic() - t0))
    return results


def missing_requirements() -> list[str]:
    """What pip must install: the REQUIREMENTS whose module does not import."""
    return [req for module, req in REQUIREMENTS if importlib.util.find_spec(module) is None]


def install(log: pathlib.Path, check_only: bool) -> str:
    """pip install --no-deps the missing requirements (from .whl/ if it exists); a status."""
    missing = missing_requirements()
    with open(log, "w") as out:
        out.write(f"missing: {' '.join(missing) or 'nothing'}\n")
        if not missing:
            return "nothing to install"
        if check_only:
            return f"not installed (--quick): {' '.join(missing)}"
        source = ["--no-index", "--find-links", str(WHEELS)] if WHEELS.is_dir() else []
        argv = [sys.executable, "-m", "pip", "install", "--no-deps", *source, *missing]
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    where = f"from {WHEELS.name}/" if source else "from PyPI"
    if done.returncode != 0:
        return f"pip failed (exit {done.returncode}, {where}); see {log.name}"
    return f"installed {where}: {' '.join(missing)}"


def environment(env: dict) -> dict:
    """Device and versions, from a subprocess (jax may have just been installed)."""
    code = (
        "import json, platform, jax, jaxlib, flax, optax\n"
        "import importlib.metadata as m\n"
        "d = jax.devices()[0]\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except Exception: return None\n"
        "print(json.dumps(dict(backend=jax.default_backend(), device=d.device_kind, "
        "devices=jax.device_count(), jax=jax.__version__, jaxlib=jaxlib.__version__, "
        "flax=flax.__version__, optax=optax.__version__, orbax=v('orbax-checkpoint'), "
        "gymnax=v('gymnax'), python=platform.python_version())))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"error: jax does not start here:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
        info["commit"] = rev.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
    except OSError:
        info["commit"] = None
    return info


def same_training(dir_a: pathlib.Path, dir_b: pathlib.Path) -> tuple[bool, list[str]]:
    """Whether two runs' metrics.csv (without the wall-clock column steps_per_s) and
    params.msgpack are byte-identical; the lines of the comparison."""

    def table(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        drop = rows[0].index("steps_per_s") if "steps_per_s" in rows[0] else None
        return [[v for i, v in enumerate(r) if i != drop] for r in rows]

    lines, same = [], True
    for name in ("metrics.csv", "params.msgpack"):
        a, b = dir_a / name, dir_b / name
        if not (a.exists() and b.exists()):
            lines.append(f"- {name}: missing ({a.exists()=}, {b.exists()=})")
            same = False
            continue
        if name == "metrics.csv":
            ta, tb = table(a), table(b)
            ok = ta == tb
            where = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), None)
            detail = f"{len(ta) - 1} rows" + ("" if ok else f"; first difference at row {where}")
            lines.append(f"- metrics.csv (steps_per_s aside): {'identical' if ok else 'DIFFER'}"
                         f" ({detail})")  # fmt: skip
        else:
            ok = a.read_bytes() == b.read_bytes()
            lines.append(f"- params.msgpack: {'identical' if ok else 'DIFFER'} "
                         f"({a.stat().st_size:,} bytes)")  # fmt: skip
        same &= ok
    return same, lines


def plan(quick: bool, out: pathlib.Path) -> list[dict]:
    """The stages: name, share of the budget (s), [(argv, output file)], and what to write
    after them."""
    py = sys.executable
    if quick:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/shm_jax/test_kernel.py", "-k", "default_blocks"]  # fmt: skip
        train = ["--memory", "gru", "--memory-size", "8", "--num-envs", "4", "--num-steps", "8"]
        train += ["--num-epochs", "1", "--num-minibatches", "1", "--hidden", "16"]
        train += ["--total-timesteps", "64"]
        sweep = ["--size", "8,2,4", "--sweep-max", "1"]
        memory = ["--size", "8,2,4", "--parts", "read", "memories", "--memories", "gru"]
        paper = ["--quick", "gru:8:1:1"]
    else:
        workers = ["-n", str(max(2, min(8, (os.cpu_count() or 2) // 2)))]
        if importlib.util.find_spec("xdist") is None:
            workers = []
        tests = [py, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                 *workers, *GPU_TESTS]  # fmt: skip
        train = ["--memory", "shm", "--memory-size", "32", "--num-envs", "64"]
        train += ["--num-steps", "128", "--total-timesteps", str(64 * 128 * 4)]
        sweep = []  # bench/memory.py's SWEEP_SIZES
        memory = ["--size", "1024,8,128", "--size", "1024,512,32"]
        memory += ["--parts", "read", "layer", "memories", "--methods", "auto", "pallas_pipelined"]
        paper = ["shm:128:auto:3"]
    train = [py, "train.py", "--env", "RepeatPreviousEasy", "--seed", "0", "--no-progress", *train]
    runs = pathlib.Path(tempfile.mkdtemp(prefix="gpu-determinism-"))  # scratch, not results
    sweep = [py, "bench/memory.py", "--pallas-sweep", "--quick", *sweep]
    memory = [py, "bench/memory.py", "--quick", *memory]
    stage = lambda name, share, commands, after=None: dict(
        name=name, share=share, commands=commands, after=after
    )
    return [
        stage(
            "tests and determinism",
            190,
            [
                (tests, out / "tests.txt"),
                (train + ["--out", str(runs / "a"), "--overwrite"], out / "determinism_a.txt"),
                (train + ["--out", str(runs / "b"), "--overwrite"], out / "determinism_b.txt"),
            ],
            after=lambda: write_determinism(out, runs, train),
        ),
        stage(
            "kernel sweep",
            80,
            [(sweep + ["--csv", str(out / "pallas_sweep.csv")], out / "pallas_sweep.md")],
        ),
        stage("memory", 100, [(memory + ["--csv", str(out / "memory.csv")], out / "memory.md")]),
        stage(
            "train paper", 90, [([py, "bench/train.py", "paper", *paper], out / "train_paper.md")]
        ),
    ]


def write_determinism(out: pathlib.Path, runs: pathlib.Path, train: list[str]) -> str:
    same, lines = same_training(runs / "a", runs / "b")
    verdict = "identical" if same else "NOT identical"
    text = "\n".join(
        [
            "# Same seed, same run?",
            "",
            "Two identical trainings, run at once beside the tests:",
            "",
            f"    {shlex.join(['python', *train[1:]])} --out <a|b>",
            "",
            *lines,
            "",
            f"Verdict: {verdict}. (Their logs: determinism_a.txt, determinism_b.txt; the runs "
            f"are scratch, in {runs}: " + ("removed.)" if same else "kept to look at.)"),
            "",
        ]
    )
    (out / "determinism.md").write_text(text)
    if same:
        shutil.rmtree(runs, ignore_errors=True)
    return verdict


def write_readme(out: pathlib.Path, info: dict, install_status: str, done: list, args) -> None:
    when = datetime.date.today().isoformat()
    head = (
        f"# {info['device']} benchmark outputs ({when})\n\n"
        f"{info['devices']} × {info['device']} ({info['backend']}"
        + (f"; nvidia-smi: {info['nvidia_smi']}" if info.get("nvidia_smi") else "")
        + f"), jax {info['jax']}, jaxlib {info['jaxlib']}, flax {info['flax']}, optax "
        f"{info['optax']}, orbax-checkpoint {info['orbax']}, gymnax {info['gymnax']}, Python "
        f"{info['python']}, {os.cpu_count()} CPUs ({platform.machine()}), commit "
        f"{info['commit']}, `XLA_PYTHON_CLIENT_PREALLOCATE=false`. Written by `python "
        f"bench/gpu.py{' --quick' if args.quick else ''}` in a {args.budget_s:.0f} s budget; "
        f"install: {install_status}. Each file is its command's own output (first line: the "
        "command).\n\n"
    )
    rows = ["| stage | file | command | status | wall (s) |", "|---|---|---|---|---:|"]
    for stage, results in done:
        for (argv, path), (status, wall) in zip(stage["commands"], results, strict=True):
            command = shlex.join(["python" if a == sys.executable else a for a in argv])
            command = re.sub(r"\S*/gpu-determinism-[^/\s]*/", "<scratch>/", command)
            command = command.replace(str(out) + "/", "")
            state = "ok" if status == 0 else f"exit {status}" if isinstance(status, int) else status
            rows.append(f"| {stage['name']} | `{path.name}` | `{command}` | {state} | {wall:.0f} |")
        if stage.get("verdict"):
            rows.append(f"| {stage['name']} | `determinism.md` | (comparison) | "
                        f"{stage['verdict']} | |")  # fmt: skip
    (out / "README.md").write_text(head + "\n".join(rows) + "\n")


def make_wheels(python_version: str) -> None:
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", python_version, "--implementation", "cp"]
    for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"):
        argv += ["--platform", tag]
    argv += ["-d", str(WHEELS), *[req for _, req in REQUIREMENTS]]
    print(f"$ {shlex.join(argv)}", flush=True)
    sys.exit(subprocess.run(argv, check=False).returncode)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/gpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes on a CPU, to a temp dir")
    p.add_argument("--out", default=None, help="results directory (default: results/gpu-<slug>)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all stages")
    p.add_argument("--make-wheels", action="store_true", help="download the wheels into .whl/")
    p.add_argument("--python-version", default=platform.python_version(), help="--make-wheels")
    args = p.parse_args(argv)
    if args.make_wheels:
        make_wheels(args.python_version)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0; got {args.budget_s}")
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPU
    with tempfile.TemporaryDirectory() as scratch:
        install_status = install(pathlib.Path(scratch) / "install.txt", check_only=args.quick)
        install_log = (pathlib.Path(scratch) / "install.txt").read_text()
    info = environment(env)
    if args.out:
        out = pathlib.Path(args.out)
    elif args.quick:
        out = pathlib.Path(tempfile.mkdtemp(prefix="gpu-quick-"))
    else:
        out = ROOT / "results" / f"gpu-{slug(info['device'], info['backend'])}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "install.txt").write_text(install_log + f"status: {install_status}\n")
    if info["backend"] != "gpu" and not args.quick:
        print(f"warning: the backend is {info['backend']!r}, not a GPU", file=sys.stderr)
    print(f"{info['device']} ({info['backend']}), jax {info['jax']}; install: {install_status}; "
          f"-> {out}", flush=True)  # fmt: skip
    stages = plan(args.quick, out)
    window = Window(
        args.budget_s - (time.monotonic() - t0), {s["name"]: s["share"] for s in stages}
    )
    done = []
    for stage in stages:
        limit = window.limit(stage["name"])
        results = run_stage(stage["commands"], limit, env)
        if stage.get("after"):
            stage["verdict"] = stage["after"]()
        done.append((stage, results))
        states = ", ".join(str(s) for s, _ in results)
        print(f"{stage['name']}: {states} in {max(w for _, w in results):.0f} s "
              f"(limit {limit:.0f} s)", flush=True)  # fmt: skip
        write_readme(out, info, install_status, done, args)
    print(f"done in {time.monotonic() - t0:.0f} s -> {out}")
    failed = [s["name"] for s, results in done if any(status != 0 for status, _ in results)]
    if failed or any(s.get("verdict") == "NOT identical" for s, _ in done):
        sys.exit(1)


if __name__ == "__main__":
    main()
