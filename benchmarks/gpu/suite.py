"""The GPU validation suite: one command of at most 9 minutes on a fresh H100/H200 machine, everything prepared here.

    python -m diffrl_fast bench gpu --prepare      # here, with registry access: download the wheels the GPU machine lacks
    python -m diffrl_fast bench gpu --dry-run      # here: check the wheels and print the plan (CI runs this)
    python3 -m diffrl_fast bench gpu --out DIR     # there, from the repository root: install the wheels, run every step

(``diffrl-fast bench gpu ...`` is the same where the package is installed; on the GPU machine it is not, so the
command runs the checkout's package from the repository root.)

The GPU machine (Python 3.12, torch 2.11+cu130, triton 3.6, transformers, peft, accelerate, pytest,
hypothesis, tensorboard, matplotlib, scikit-learn, no network) lacks diffusers and trl: ``--prepare``
downloads them (and what they need that it lacks) as Python 3.12 manylinux wheels into ``.whl/`` (git-ignored,
carried with the working tree, 64 MiB together at most: ``--prepare`` fails above that) and records the git commit
in ``.whl/commit.txt``, for a GPU copy without ``.git``. On the GPU the suite installs the wheels without
dependencies into a private folder, skips the C++ extension (``DIFFRL_FAST_NO_CPP=1``; the tests that need it skip
with that reason), and runs these steps in order, each in its own process group with its own time budget (at
the budget: SIGINT to the whole group, so pytest still prints its summary, then SIGKILL; a finished step's
leftover processes are killed too; so is the running step's group when the suite itself gets SIGTERM, SIGINT or
SIGHUP, and the summary is still written). Outputs are copied into DIR while a step runs, every few seconds, so
a timeout still leaves results:

    environment  nvidia-smi, versions, the git commit                                  -> environment_gpu.txt
    tests        the ops, diffusion and reference-objective tests on CUDA: the Triton
                 backend for real, rollout/recompute parity on CUDA; all of them run
                 (no -x; failures are listed at the end), less the sm_80/sm_90 compile
                 test (no GPU needed: CI runs it)                                      -> tests_gpu.txt
    ops          ``bench ops`` on CUDA: eager, torch.compile and triton, with the
                 device's copy bandwidth measured in the same run (written per row)    -> ops_gpu.json
    e2e          ``bench e2e`` at SD 1.5 size (random weights, 64x64 latents), fp32 and
                 bf16 rows, diffrl_fast against trl 0.23.1 (written per contender)     -> e2e_gpu.json
    memory       an SDXL-size UNet step, LoRA and full fine-tuning with checkpointing,
                 measured against the counted estimate of docs/scaling.md              -> memory_gpu.json
    rewards      ``bench reward-server --device cuda --quick``: dynamic batching against
                 one request per call on a ViT-B/16-size reward in bfloat16            -> rewardserver_gpu.json

plus suite_gpu.log (what ran, for how long, how it ended) and summary_gpu.md (the device, the commit, each step's
outcome, the targets): 8 files, no folders. The device tool's limits are enforced on DIR at the end: at most
8 files (the suite's own first, then the plan's order), each at most 16 MiB (cut in the middle, head and tail
kept), at most 2 folders deep; what is cut or dropped is noted in the log and the summary. DIR must be empty
or new. The names are those to commit: ``cp DIR/* benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
COMMIT_FILE = "commit.txt"  # in WHEELS: the commit --prepare saw (the GPU copy of the tree may have no .git)
TOTAL_BUDGET_S = 540
MAX_TRANSFER_MIB = 64
# What the device tool brings back (/work/.library/device/README.md): at most 8 files of 16 MiB, 2 folders deep.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 2
SYNC_EVERY_S = 5.0  # how often a running step's outputs are copied into the output folder
KILL_GRACE_S = 5.0  # after the SIGINT of a step that ran out of time, before SIGKILL
LOG_NAME = "suite_gpu.log"
SUMMARY_NAME = "summary_gpu.md"

# What the GPU machine lacks, pinned (the versions tested here). Dependencies it already has are not carried:
# huggingface-hub, safetensors, numpy, pillow, requests, regex, filelock, accelerate, transformers, pyarrow,
# pandas, xxhash, fsspec, tqdm, pyyaml, packaging (its image, /work/.library/device/KINDS.md).
WHEEL_PINS = {"diffusers": "0.42.1", "trl": "0.23.1", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
GPU_IMAGE_HAS = {
    "accelerate", "filelock", "fsspec", "huggingface-hub", "numpy", "packaging", "pandas", "pillow", "pyarrow", "pyyaml",
    "regex", "requests", "safetensors", "tqdm", "transformers", "xxhash", "torch", "triton", "peft", "pytest", "hypothesis",
    "tensorboard", "matplotlib", "scikit-learn", "scipy", "zipp",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


@dataclass
class Step:
    """One step of the suite: a command run in its own process group within ``budget_s`` seconds.

    ``argv``: the command; ``{out}`` stands for the step's scratch folder. ``outputs``: name in the output folder ->
    candidate files in the scratch folder, the first that exists is copied (``stdout.txt`` is the command's output).
    """

    name: str
    budget_s: float
    what: str
    argv: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)


def steps(py: str) -> list[Step]:
    """The suite's plan, run by the interpreter ``py``."""
    return [
        Step("environment", 20, "nvidia-smi, versions, commit",
             [py, "-m", "benchmarks.gpu.suite", "--environment", "{out}/environment.txt"],
             {"environment_gpu.txt": ("environment.txt",)}),
        Step("tests", 160, "ops, diffusion and reference-objective tests on CUDA (triton backend, parity); all run",
             [py, "-m", "pytest", "-q", "--tb=short", "--durations=15", "-p", "no:cacheprovider", "tests/ops", "tests/diffusion",
              "tests/algos/test_reference_objectives.py",
              # compiles for sm_80/sm_90 without a GPU, in CI already: not worth its minute here
              "--deselect", "tests/ops/test_gpu_compile.py::test_triton_kernels_compile_for_sm80_and_sm90"],
             {"tests_gpu.txt": ("stdout.txt",)}),
        # 0.5 s of timing per case (GPU medians settle in far fewer calls): 4 shapes x 4 providers x 3 modes, the
        # torch.compile warm-ups and the interleaved bandwidth check fit the 80 s
        Step("ops", 75, "bench ops on CUDA: eager, torch.compile, triton (fused, recompute); copy bandwidth",
             [py, "benchmarks/bench_ops.py", "--device", "cuda", "--min-time", "0.5", "--out", "{out}"],
             {"ops_gpu.json": ("ops_cuda.json", "ops_cuda.partial.json")}),
        Step("e2e", 180, "bench e2e at SD 1.5 size, fp32 and bf16 rows, trl 0.23.1 vs diffrl_fast",
             [py, "-m", "benchmarks.gpu.e2e_rows", "--out", "{out}"], {"e2e_gpu.json": ("e2e_gpu.json",)}),
        Step("memory", 65, "SDXL-size UNet step, LoRA and full fine-tuning with checkpointing vs the counted estimate",
             [py, "benchmarks/gpu/memory_sdxl.py", "--out", "{out}/memory_gpu.json", "--rows", "8"],
             {"memory_gpu.json": ("memory_gpu.json",)}),
        # the reward server's 3x target is for a reward with a GPU's cost per call: CLIP ViT-B/16's tower in bfloat16,
        # 16 clients of 8 images (64x64, and 512x512 binary bodies), batching against one request per call
        Step("rewards", 40, "bench reward-server on CUDA: dynamic batching against one request per call, ViT-B/16 reward",
             [py, "-m", "benchmarks.bench_reward_server", "--device", "cuda", "--quick", "--seconds", "1.5", "--stem",
              "rewardserver_gpu", "--out", "{out}"], {"rewardserver_gpu.json": ("rewardserver_gpu.json",)}),
    ]


# ---------------------------------------------------------------------------------------------- wheels

def wheel_files() -> dict[str, Path]:
    """Prepared wheels by normalised project name."""
    found = {}
    for w in sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []:
        name = w.name.split("-")[0].lower().replace("_", "-")
        if name in found:
            raise SystemExit(f"two wheels of {name} in {WHEELS}: {found[name].name} and {w.name}; keep one (pip stops otherwise)")
        found[name] = w
    return found


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist names of a wheel, without extras-only entries."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    names = []
    for line in lines:
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            spec = line.split(":", 1)[1].strip()
            names.append(spec.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower().replace("_", "-"))
    return names


def check_wheels() -> list[str]:
    """Problems with the prepared wheels (empty: ready to carry)."""
    problems = []
    found = wheel_files()
    for name, version in WHEEL_PINS.items():
        w = found.get(name)
        if w is None:
            problems.append(f"missing wheel {name}=={version} (run `diffrl-fast bench gpu --prepare`)")
        elif w.name.split("-")[1] != version:
            problems.append(f"{w.name}: expected {name}=={version}")
    for name, w in found.items():
        if name not in WHEEL_PINS:
            problems.append(f"unexpected wheel {w.name} (not in the plan; remove it)")
            continue
        missing = [r for r in requirements(w) if r not in GPU_IMAGE_HAS and r not in WHEEL_PINS and r != "importlib-metadata"]
        if missing:
            problems.append(f"{w.name} needs {missing}, which neither the GPU image nor the plan provides")
    return problems


def transfer_mib() -> float:
    """MiB the device tool would send: tracked files plus untracked, not ignored ones, plus the wheels."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    except OSError:  # no git here
        out = None
    files = [ROOT / f for f in out.stdout.decode().split("\0") if f] if out is not None and out.returncode == 0 else []
    size = sum(f.stat().st_size for f in files if f.is_file())
    size += sum(w.stat().st_size for w in wheel_files().values())
    return size / 2**20


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD of the checkout, with " (uncommitted changes)" when tracked files differ from it; None without git."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + (" (uncommitted changes)" if dirty else "")


def recorded_commit() -> str | None:
    """The commit ``--prepare`` recorded in the wheels folder, or None."""
    path = WHEELS / COMMIT_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def commit_info() -> str:
    """The commit of the tree the suite runs on: git's, else the one ``--prepare`` recorded (the GPU copy of the
    tree may come without .git), else "unknown"."""
    live = git_commit()
    if live:
        return live
    rec = recorded_commit()
    return f"{rec} (recorded by --prepare; no git here)" if rec else "unknown"


def prepare() -> int:
    """Download the pinned wheels into WHEELS, record the commit; exit 2 on a problem or over the transfer limit."""
    WHEELS.mkdir(exist_ok=True)
    for name, version in WHEEL_PINS.items():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(WHEELS), f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"pip could not download {name}=={version}:\n{res.stderr[-2000:]}", file=sys.stderr)
            return 2
    commit = git_commit()
    if commit:
        (WHEELS / COMMIT_FILE).write_text(f"{commit} prepared {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    problems = check_wheels()
    size = transfer_mib()
    if size > MAX_TRANSFER_MIB:
        problems.append(f"the working tree and the wheels come to {size:.1f} MiB, over the device tool's {MAX_TRANSFER_MIB} MiB")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"wheels in {WHEELS}: {', '.join(w.name for w in wheel_files().values())}; commit {commit or 'unknown (no git)'}; "
          f"working tree + wheels {size:.1f} MiB (limit {MAX_TRANSFER_MIB})")
    return 2 if problems else 0


# ---------------------------------------------------------------------------------------------- plan

def plan_problems(plan: list[Step]) -> list[str]:
    """What is wrong with a plan before it runs: budgets, outputs, missing scripts or modules."""
    problems = []
    total = sum(s.budget_s for s in plan)
    if total > TOTAL_BUDGET_S:
        problems.append(f"the steps' budgets add up to {total} s, over {TOTAL_BUDGET_S} s")
    outputs = [LOG_NAME, SUMMARY_NAME] + [o for s in plan for o in s.outputs]
    if len(outputs) > MAX_FILES or len(set(outputs)) != len(outputs):
        problems.append(f"output files {outputs}: at most {MAX_FILES} distinct files come back")
    for name in outputs:
        if len(Path(name).parts) - 1 > MAX_DEPTH:
            problems.append(f"output {name}: more than {MAX_DEPTH} folders deep")
    for s in plan:
        for i, arg in enumerate(s.argv):
            if arg.endswith(".py") and not (ROOT / arg).is_file():
                problems.append(f"step {s.name}: {arg} does not exist")
            if arg.startswith("tests/") and not (ROOT / arg.split("::")[0]).exists():
                problems.append(f"step {s.name}: {arg} does not exist")
            if i > 0 and s.argv[i - 1] == "-m" and arg.startswith("benchmarks."):
                module = ROOT / Path(*arg.split("."))
                if not module.with_suffix(".py").is_file() and not (module / "__init__.py").is_file():
                    problems.append(f"step {s.name}: module {arg} does not exist")
    return problems


def dry_run() -> int:
    """Check what can be checked without a GPU and print the plan; exit 2 on a problem in the plan itself."""
    plan = steps(sys.executable)
    problems = plan_problems(plan)
    total = sum(s.budget_s for s in plan)
    outputs = [LOG_NAME, SUMMARY_NAME] + [o for s in plan for o in s.outputs]
    wheel_state = check_wheels() if WHEELS.is_dir() else None
    size = transfer_mib()
    if size > MAX_TRANSFER_MIB:
        problems.append(f"the working tree and the wheels come to {size:.1f} MiB, over the device tool's {MAX_TRANSFER_MIB} MiB")
    print(__doc__.split("\n\n")[0])
    print(f"plan ({total} s of {TOTAL_BUDGET_S} s budget; outputs {', '.join(outputs)}):")
    for s in plan:
        print(f"  {s.name:<12} {s.budget_s:>4} s  {s.what}")
    if wheel_state is None:
        print(f"wheels: not prepared in {WHEELS} (run --prepare before a GPU run): {', '.join(f'{k}=={v}' for k, v in WHEEL_PINS.items())}")
    elif wheel_state:
        problems += wheel_state
    else:
        print(f"wheels: ready ({', '.join(w.name for w in wheel_files().values())})")
    live, rec = git_commit(), recorded_commit()
    print(f"commit: {live or 'no git here'}; recorded by --prepare: {rec or 'none'}")
    if live and rec and rec.split()[0] != live.split()[0]:
        print("note: the recorded commit is not HEAD; run --prepare again so that a GPU copy without .git names the right one")
    print(f"working tree + wheels: {size:.1f} MiB of {MAX_TRANSFER_MIB}")
    print("on the GPU machine, from the repository root: python3 -m diffrl_fast bench gpu --out DIR")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 2 if problems else 0


# ---------------------------------------------------------------------------------------------- the run

def environment(path: Path) -> None:
    """Write the machine's facts to ``path``, appending as it goes (a timeout keeps what came first)."""
    def add(*lines: str) -> None:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")

    path.write_text("")
    add(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {platform.python_version()}",
        f"platform: {platform.platform()}", f"commit: {commit_info()}")
    for cmd in (["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], ["nvidia-smi"], ["git", "status", "--short"]):
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
            add(f"$ {' '.join(cmd)}", res.stdout.strip() or res.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            add(f"$ {' '.join(cmd)}", f"failed: {exc}")
    from importlib import metadata

    versions = []
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "diffusers", "trl", "datasets", "pytest", "hypothesis"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} unavailable")
    add("versions: " + ", ".join(versions))
    code = ("import torch; print('cuda', torch.version.cuda, 'gpu', "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else None)")
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        add(res.stdout.strip(), res.stderr.strip()[-2000:])
    except subprocess.TimeoutExpired:
        add("torch: timed out")


def install_wheels(site: Path, log) -> dict:
    """Install the prepared wheels into ``site``; the environment variables that make the steps see them."""
    found = wheel_files()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not found:
        log("no wheels in .whl/: diffusers and trl must already be installed")
        return {"PYTHONPATH": path}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(site), *map(str, found.values())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log(f"installed {len(found)} wheels into {site}: exit {res.returncode} {res.stderr.strip()[-500:]}")
    return {"PYTHONPATH": os.pathsep.join([str(site), path])}


def copy_capped(src: Path, dst: Path) -> str | None:
    """Copy ``src`` to ``dst``, cut to MAX_FILE_BYTES (head and tail kept, a marker between); a note if cut."""
    size = src.stat().st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".copying")
    if size <= MAX_FILE_BYTES:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return None
    marker = f"\n[... {{}} bytes cut by the GPU suite: at most {MAX_FILE_BYTES} bytes per file ...]\n"
    keep = MAX_FILE_BYTES - len(marker.format(size).encode())
    while len(marker.format(size - keep).encode()) + keep < MAX_FILE_BYTES:  # the count of cut bytes has fewer digits
        keep += 1
    head, tail = keep // 2, keep - keep // 2
    with open(src, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read(head))
        g.write(marker.format(size - keep).encode())
        f.seek(size - tail)
        g.write(f.read(tail))
    os.replace(tmp, dst)
    return f"{dst.name}: {size} bytes cut to {MAX_FILE_BYTES} (head and tail kept)"


def copy_outputs(step: Step, step_dir: Path, out: Path, done: dict) -> list[str]:
    """Copy the step's outputs that changed since the last copy (``done``: dst -> (size, mtime)); notes of cuts."""
    notes = []
    for dst, sources in step.outputs.items():
        src = next((step_dir / s for s in sources if (step_dir / s).is_file()), None)
        if src is None:
            continue
        if len(Path(dst).parts) - 1 > MAX_DEPTH:
            if done.get(dst) != "refused":
                notes.append(f"{dst}: not copied, more than {MAX_DEPTH} folders deep")
                done[dst] = "refused"
            continue
        st = src.stat()
        stamp = (str(src), st.st_size, st.st_mtime_ns)
        if done.get(dst) == stamp:
            continue
        note = copy_capped(src, out / dst)
        done[dst] = stamp
        if note and note not in notes:
            notes.append(note)
    return notes


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to process group ``pgid``; nothing if it is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(step: Step, step_dir: Path, out: Path, env: dict, budget: float, log) -> tuple[str, list[str]]:
    """Run one step in a new process group (session), copying its outputs into ``out`` as it goes.

    At the budget the whole group gets SIGINT (pytest and Python scripts still write what they have), then SIGKILL
    after KILL_GRACE_S; a step that ended leaves no process behind either (its group is killed). Returns the
    status and the notes of cut or refused outputs.
    """
    argv = [a.replace("{out}", str(step_dir)) for a in step.argv]
    done: dict = {}
    notes: list[str] = []
    with open(step_dir / "stdout.txt", "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + budget
        try:
            while True:
                try:
                    rc = proc.wait(timeout=max(0.0, min(SYNC_EVERY_S, deadline - time.monotonic())))
                    status = "ok" if rc == 0 else f"failed (exit {rc})"
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        status = f"timed out after {budget:.0f} s"
                        log(f"{step.name}: out of time, SIGINT to its process group, SIGKILL after {KILL_GRACE_S:.0f} s")
                        kill_group(proc.pid, signal.SIGINT)
                        try:
                            proc.wait(timeout=KILL_GRACE_S)
                        except subprocess.TimeoutExpired:
                            pass
                        break
                    notes += [n for n in copy_outputs(step, step_dir, out, done) if n not in notes]
        finally:  # also when the suite itself is interrupted (Interrupted): no step outlives it
            kill_group(proc.pid)  # whatever the step left running (e.g. e2e's contenders) goes with it
            proc.wait()
            notes += [n for n in copy_outputs(step, step_dir, out, done) if n not in notes]
    return status, notes


class Interrupted(Exception):
    """The suite got SIGTERM, SIGINT or SIGHUP: the running step's group is killed, the summary still written."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def enforce_limits(out: Path, keep_first: list[str], reserve: tuple[str, ...] = ()) -> list[str]:
    """Make ``out`` fit what the device tool brings back; notes of what was changed.

    Files more than MAX_DEPTH folders deep are removed, files over MAX_FILE_BYTES are cut (head and tail kept), and
    beyond MAX_FILES files the last in priority are removed: ``keep_first`` in its order, then the rest by name.
    ``reserve`` names files still to be written, which count as present.
    """
    notes = []
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) - 1 > MAX_DEPTH:
            p.unlink()
            notes.append(f"{rel}: removed, more than {MAX_DEPTH} folders deep")
        elif p.stat().st_size > MAX_FILE_BYTES:
            tmp = p.with_name(p.name + ".full")
            os.replace(p, tmp)
            notes.append(copy_capped(tmp, p))
            tmp.unlink()
    rank = {name: i for i, name in enumerate(keep_first)}
    files = sorted((p for p in out.rglob("*") if p.is_file()),
                   key=lambda p: (rank.get(str(p.relative_to(out)), len(rank)), str(p.relative_to(out))))
    room = MAX_FILES - len([r for r in reserve if not (out / r).is_file()])
    for p in files[max(room, 0):]:
        p.unlink()
        notes.append(f"{p.relative_to(out)}: removed, over the limit of {MAX_FILES} files")
    for d in sorted((d for d in out.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return notes


def device_name(out: Path) -> str:
    """The GPU's name from the environment step's file (nvidia-smi), or "unknown"."""
    path = out / "environment_gpu.txt"
    if path.is_file():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ nvidia-smi --query-gpu=name") and i + 1 < len(lines) and lines[i + 1].strip() \
                    and not lines[i + 1].startswith(("failed", "$")):
                return lines[i + 1].strip()
    return "unknown"


def summarize(out: Path, results: list[dict], commit: str, notes: list[str]) -> None:
    """summary_gpu.md: the device, the commit, every step's outcome, the output notes and the GPU targets of issue 15."""
    lines = ["# GPU suite", "", f"device: {device_name(out)}", f"commit: {commit}", "",
             "| step | status | seconds | budget |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']:.0f} |")
    if notes:
        lines += ["", "Output limits:", *[f"- {n}" for n in notes]]
    try:
        from benchmarks.gpu.report import targets

        lines += ["", *targets(out)]
    except Exception as exc:  # the report must not hide the raw files
        lines += ["", f"(targets not computed: {type(exc).__name__}: {exc})"]
    (out / SUMMARY_NAME).write_text("\n".join(lines) + "\n")


def run_logged(step: Step, step_dir: Path, out: Path, env: dict, budget: float, log) -> tuple[str, list[str]]:
    """``run_step`` with its start and, for a step other than the tests that did not pass, its output's tail logged;
    a step that cannot start is a failure, not an exception."""
    step_dir.mkdir()
    log(f"{step.name}: start ({step.what}), budget {budget:.0f} s")
    try:
        status, notes = run_step(step, step_dir, out, env, budget, log)
    except Interrupted:
        raise
    except Exception as exc:  # e.g. the command cannot start: record it, go on with the next step
        status, notes = f"failed ({type(exc).__name__}: {exc})", []
    stdout = step_dir / "stdout.txt"
    if step.name != "tests" and status != "ok" and stdout.is_file():
        with open(stdout, "rb") as f:
            f.seek(max(0, stdout.stat().st_size - 3000))
            log(f"{step.name}: output tail:\n{f.read().decode(errors='replace')}")
    return status, notes


def run(out: Path, plan: list[Step] | None = None) -> int:
    """Run the plan (default: ``steps``) into ``out``, which must be empty or new; 0 when every step passed."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"{out} exists and is not an empty folder: give a new or empty one", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    start = time.monotonic()

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f} s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    plan = steps(sys.executable) if plan is None else plan
    scratch = Path(tempfile.mkdtemp(prefix="diffrl_gpu_"))
    commit = commit_info()
    log(f"commit {commit}; output {out}; scratch {scratch}")
    env = {**os.environ, "DIFFRL_FAST_NO_CPP": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "DIFFRL_FAST_CACHE": str(scratch / "tiny_cache"), **install_wheels(scratch / "site", log)}
    env.pop("TRITON_INTERPRET", None)
    results, notes, interrupted = [], [], None
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for s in plan:
            left = TOTAL_BUDGET_S - (time.monotonic() - start) - KILL_GRACE_S
            if left < 10 or interrupted:
                why = f"interrupted by {interrupted}" if interrupted else "out of time"
                results.append({"step": s.name, "status": f"not run ({why})", "seconds": 0, "budget_s": s.budget_s})
                log(f"{s.name}: not run ({why}), {left:.0f} s left")
                continue
            t0 = time.monotonic()
            try:
                status, step_notes = run_logged(s, scratch / s.name, out, env, min(s.budget_s, left), log)
            except Interrupted as exc:  # the step's group is gone; the rest is not run, the summary still written
                interrupted = str(exc)
                status, step_notes = f"interrupted by {exc}", []
            notes += step_notes
            secs = time.monotonic() - t0
            results.append({"step": s.name, "status": status, "seconds": secs, "budget_s": s.budget_s})
            log(f"{s.name}: {status} in {secs:.0f} s")
    except Interrupted as exc:  # between steps
        ran = {r["step"] for r in results}
        results += [{"step": s.name, "status": f"not run (interrupted by {exc})", "seconds": 0, "budget_s": s.budget_s}
                    for s in plan if s.name not in ran]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    outputs = [o for s in plan for o in s.outputs]
    notes += enforce_limits(out, [LOG_NAME, SUMMARY_NAME, *outputs], reserve=(SUMMARY_NAME,))
    summarize(out, results, commit, notes)
    for n in notes:
        log(f"output limits: {n}")
    log(json.dumps({"commit": commit, "results": results, "output_notes": notes}))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    """``python -m diffrl_fast bench gpu --prepare | --dry-run | --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m diffrl_fast bench gpu", description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prepare", action="store_true", help="download the wheels the GPU machine lacks into .whl/")
    group.add_argument("--dry-run", action="store_true", help="check the wheels and print the plan (no GPU needed)")
    group.add_argument("--out", type=Path, help="run the suite and write its files here (on the GPU machine; new or empty)")
    group.add_argument("--environment", type=Path, help=argparse.SUPPRESS)  # the environment step's own command
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.dry_run:
        return dry_run()
    if args.environment:
        environment(args.environment)
        return 0
    return run(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
