"""The GPU validation suite: one command of at most 9 minutes on a fresh H100/H200 machine, everything prepared here.

    diffrl-fast bench gpu --prepare          # here, with registry access: download the wheels the GPU machine lacks
    diffrl-fast bench gpu --dry-run          # here: check the wheels and print the plan (CI runs this)
    diffrl-fast bench gpu --out DIR          # there: install the wheels, run every step, write DIR

The GPU machine (Python 3.12, torch 2.11+cu130, triton 3.6, transformers, peft, accelerate, pytest,
hypothesis, tensorboard, matplotlib, scikit-learn, no network) lacks diffusers and trl: ``--prepare``
downloads them (and what they need that it lacks) as Python 3.12 manylinux wheels into ``.whl/`` (git-ignored,
carried with the working tree, 64 MiB together at most). On the GPU the suite installs them without
dependencies into a private folder, skips the C++ extension (``DIFFRL_FAST_NO_CPP=1``), and runs these steps
in order, each with its own time budget, writing as it goes, so a timeout still leaves results:

    environment  nvidia-smi, versions, the git commit                                  -> environment.txt
    tests        the ops, diffusion and reference-objective tests on CUDA: the Triton
                 backend for real, rollout/recompute parity on CUDA                    -> tests.txt
    ops          ``bench ops`` on CUDA: eager, torch.compile and triton, with the
                 device's copy bandwidth measured in the same run                      -> ops_gpu.json
    e2e          ``bench e2e`` at SD 1.5 size (random weights, 64x64 latents), fp32 and
                 bf16 rows, diffrl_fast against trl 0.23.1                             -> e2e_gpu.json
    memory       an SDXL-size UNet step, LoRA and full fine-tuning with checkpointing,
                 measured against the counted estimate of docs/scaling.md              -> memory_gpu.json

plus suite.log (what ran, for how long, how it ended) and summary.md (the figures and the targets): at most 8
files, no folders, each far below 16 MiB. Commit them as benchmarks/results/*_gpu.* with the device named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
TOTAL_BUDGET_S = 540
MAX_TRANSFER_MIB = 64

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
    name: str
    budget_s: int
    what: str
    argv: list = field(default_factory=list)  # the command, {out} = the suite's scratch folder for the step
    outputs: dict = field(default_factory=dict)  # scratch file -> name in the output folder


def steps(py: str) -> list[Step]:
    return [
        Step("environment", 20, "nvidia-smi, versions, commit", [], {"environment.txt": "environment.txt"}),
        Step("tests", 170, "ops, diffusion and reference-objective tests on CUDA (triton backend, parity)",
             [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops", "tests/diffusion",
              "tests/algos/test_reference_objectives.py"], {"stdout.txt": "tests.txt"}),
        Step("ops", 80, "bench ops on CUDA: eager, torch.compile, triton; copy bandwidth",
             [py, "benchmarks/bench_ops.py", "--device", "cuda", "--out", "{out}"], {"ops_cuda.json": "ops_gpu.json"}),
        Step("e2e", 190, "bench e2e at SD 1.5 size, fp32 and bf16 rows, trl 0.23.1 vs diffrl_fast",
             [py, "-m", "benchmarks.gpu.e2e_rows", "--out", "{out}"], {"e2e_gpu.json": "e2e_gpu.json"}),
        Step("memory", 70, "SDXL-size UNet step, LoRA and full fine-tuning with checkpointing vs the counted estimate",
             [py, "benchmarks/gpu/memory_sdxl.py", "--out", "{out}/memory_gpu.json", "--rows", "8"],
             {"memory_gpu.json": "memory_gpu.json"}),
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
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    files = [ROOT / f for f in out.stdout.decode().split("\0") if f] if out.returncode == 0 else []
    size = sum(f.stat().st_size for f in files if f.is_file())
    size += sum(w.stat().st_size for w in wheel_files().values())
    return size / 2**20


def prepare() -> int:
    WHEELS.mkdir(exist_ok=True)
    for name, version in WHEEL_PINS.items():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(WHEELS), f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"pip could not download {name}=={version}:\n{res.stderr[-2000:]}", file=sys.stderr)
            return 2
    problems = check_wheels()
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"wheels in {WHEELS}: {', '.join(w.name for w in wheel_files().values())}; working tree + wheels {transfer_mib():.1f} MiB "
          f"(limit {MAX_TRANSFER_MIB})")
    return 2 if problems else 0


# ---------------------------------------------------------------------------------------------- plan

def dry_run() -> int:
    """Check what can be checked without a GPU and print the plan; exit 2 on a problem in the plan itself."""
    problems = []
    plan = steps(sys.executable)
    total = sum(s.budget_s for s in plan)
    if total > TOTAL_BUDGET_S:
        problems.append(f"the steps' budgets add up to {total} s, over {TOTAL_BUDGET_S} s")
    outputs = [o for s in plan for o in s.outputs.values()] + ["suite.log", "summary.md"]
    if len(outputs) > 8 or len(set(outputs)) != len(outputs):
        problems.append(f"output files {outputs}: at most 8 distinct files come back")
    for s in plan:
        for arg in s.argv:
            if arg.endswith(".py") and not (ROOT / arg).is_file():
                problems.append(f"step {s.name}: {arg} does not exist")
            if arg.startswith("tests/") and not (ROOT / arg).exists():
                problems.append(f"step {s.name}: {arg} does not exist")
        if s.argv[1:3] == ["-m", "benchmarks.gpu.e2e_rows"] and not (ROOT / "benchmarks" / "gpu" / "e2e_rows.py").is_file():
            problems.append("step e2e: benchmarks/gpu/e2e_rows.py does not exist")
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
    print(f"working tree + wheels: {size:.1f} MiB of {MAX_TRANSFER_MIB}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 2 if problems else 0


# ---------------------------------------------------------------------------------------------- the run

def environment(path: Path) -> None:
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {platform.python_version()}", f"platform: {platform.platform()}"]
    for cmd in (["nvidia-smi"], ["git", "rev-parse", "HEAD"], ["git", "status", "--short"]):
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
            lines += [f"$ {' '.join(cmd)}", res.stdout.strip() or res.stderr.strip()]
        except (OSError, subprocess.TimeoutExpired) as exc:
            lines += [f"$ {' '.join(cmd)}", f"failed: {exc}"]
    code = ("import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
            "'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__);"
            "print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)\n"
            "for m in ('diffusers', 'trl'):\n"
            "    try:\n        mod = __import__(m); print(m, mod.__version__)\n"
            "    except Exception as e:\n        print(m, 'unavailable:', e)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines += [res.stdout.strip(), res.stderr.strip()[-2000:]]
    path.write_text("\n".join(lines) + "\n")


def install_wheels(site: Path, log) -> dict:
    found = wheel_files()
    if not found:
        log("no wheels in .whl/: diffusers and trl must already be installed")
        return {}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(site), *map(str, found.values())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log(f"installed {len(found)} wheels into {site}: exit {res.returncode} {res.stderr.strip()[-500:]}")
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}


def summarize(out: Path, results: list[dict]) -> None:
    """summary.md: every step's outcome and the GPU targets of issue 15 with the measured figures."""
    lines = ["# GPU suite", "", f"commit {results[0].get('commit', '?') if results else '?'}", "",
             "| step | status | seconds | budget |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']} |")
    try:
        from benchmarks.gpu.report import targets

        lines += ["", *targets(out)]
    except Exception as exc:  # the report must not hide the raw files
        lines += ["", f"(targets not computed: {type(exc).__name__}: {exc})"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def run(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "suite.log"
    start = time.monotonic()

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f} s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    scratch = Path(tempfile.mkdtemp(prefix="diffrl_gpu_"))
    env = {**os.environ, "DIFFRL_FAST_NO_CPP": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "DIFFRL_FAST_CACHE": str(scratch / "tiny_cache"), **install_wheels(scratch / "site", log)}
    env.pop("TRITON_INTERPRET", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = []
    for s in steps(sys.executable):
        left = TOTAL_BUDGET_S - (time.monotonic() - start)
        if left < 10:
            results.append({"step": s.name, "status": "not run (out of time)", "seconds": 0, "budget_s": s.budget_s, "commit": commit})
            log(f"{s.name}: not run, {left:.0f} s left")
            continue
        budget = min(s.budget_s, left)
        step_dir = scratch / s.name
        step_dir.mkdir()
        t0 = time.monotonic()
        log(f"{s.name}: start ({s.what}), budget {budget:.0f} s")
        status = "ok"
        if s.name == "environment":
            environment(step_dir / "environment.txt")
        else:
            argv = [a.replace("{out}", str(step_dir)) for a in s.argv]
            with open(step_dir / "stdout.txt", "w") as f:
                try:
                    res = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget)
                    status = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
                except subprocess.TimeoutExpired:
                    status = f"timed out after {budget:.0f} s"
        for src, dst in s.outputs.items():
            if (step_dir / src).is_file():
                shutil.copy(step_dir / src, out / dst)
        if s.name != "tests" and "ok" != status and (step_dir / "stdout.txt").is_file():
            tail = (step_dir / "stdout.txt").read_text()[-3000:]
            log(f"{s.name}: output tail:\n{tail}")
        secs = time.monotonic() - t0
        results.append({"step": s.name, "status": status, "seconds": secs, "budget_s": s.budget_s, "commit": commit})
        log(f"{s.name}: {status} in {secs:.0f} s")
    summarize(out, results)
    (out / "suite.log").open("a").write(json.dumps({"results": results}) + "\n")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench gpu", description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prepare", action="store_true", help="download the wheels the GPU machine lacks into .whl/")
    group.add_argument("--dry-run", action="store_true", help="check the wheels and print the plan (no GPU needed)")
    group.add_argument("--out", type=Path, help="run the suite and write its files here (on the GPU machine)")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.dry_run:
        return dry_run()
    return run(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
