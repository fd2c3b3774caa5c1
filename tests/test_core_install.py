"""The light core: ``pip install diffrl_fast`` needs only torch, numpy and triton.

A fresh virtual environment (no site packages) gets the core's dependencies, and nothing else, from this
test environment through a .pth file (no download: the same files pip would install), then the package is
installed from this checkout with ``--no-deps`` and without the C++ build. In it, ``diffrl_fast.ops``
runs one op forward and backward, ``sde_step_with_logprob`` draws a step, diffusers is never imported,
and the trainer and ``ddim_step_with_logprob`` (whose scheduler is diffusers') report the missing extra
clearly.
"""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "numpy", "triton"}
BUILD = {"setuptools"}  # build-time only: the wheel is built here without network (and without the C++ part)


def _closure(names):
    """Distributions needed by ``names`` (their unconditional requirements, recursively)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _top_levels(dist_name):
    """(site-packages folder, the top-level files and folders the distribution installed there)."""
    dist = md.distribution(dist_name)
    tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
    return dist.locate_file(""), tops


@pytest.mark.slow
def test_core_installs_and_runs_without_the_train_extra(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in sorted(_closure(CORE) | BUILD):
        base, tops = _top_levels(name)
        for top in tops:
            src = Path(base) / top
            if src.exists() and not (shared / top).exists():
                (shared / top).symlink_to(src)
    for banned in ("diffusers", "transformers", "peft", "yaml", "safetensors"):
        assert not (shared / banned).exists(), f"{banned} leaked into the core environment"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "core_deps.pth").write_text(str(shared) + "\n")
    env = {**os.environ, "DIFFRL_FAST_NO_CPP": "1", "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    # pip itself runs from this environment, installing into the venv's site-packages
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", str(ROOT)], check=True, env=env, cwd=tmp_path, timeout=300)

    script = textwrap.dedent("""
        import json, sys
        import torch
        from diffrl_fast import ops, sde_step_with_logprob
        x, y, eu = (torch.randn(2, 4, 8, 8) for _ in range(3))
        eu.requires_grad_()
        lp = ops.step_logprob(x, y, eu, None, 0.9, -0.1, 1.0, 0.3)
        lp.sum().backward()

        class Sched:  # the two members sde_step_with_logprob uses from a flow-matching scheduler
            sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
            def index_for_timestep(self, t):
                return int((self.sigmas * 1000 - float(t)).abs().argmin())
        prev, logp, mean, std = sde_step_with_logprob(Sched(), eu.detach(), torch.tensor([750.0, 500.0]), x,
                                                      generator=torch.Generator().manual_seed(0))
        try:
            import diffrl_fast.train
            trainer = "imported"
        except ImportError as exc:
            trainer = str(exc)
        from diffrl_fast import ddim_step_with_logprob
        try:
            ddim_step_with_logprob(object(), x, 500, x)
            ddim = "ran"
        except ImportError as exc:
            ddim = str(exc)
        import importlib.metadata as md
        print(json.dumps({"requires": md.requires("diffrl_fast") or [], "grad": float(eu.grad.abs().sum()), "logp": logp.tolist(), "backends": ops.available_backends(),
                          "loaded": sorted(m for m in ("diffusers", "transformers", "peft", "yaml") if m in sys.modules),
                          "trainer": trainer, "ddim": ddim}))
    """)
    out = subprocess.run([py, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    core_reqs = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in got["requires"] if "extra ==" not in r}
    assert core_reqs == CORE, f"the core must need only {sorted(CORE)}, it requires {sorted(core_reqs)}"
    assert got["grad"] > 0 and len(got["logp"]) == 2
    assert got["loaded"] == [], f"the core imported {got['loaded']}"
    assert "torch" in got["backends"] and "cpp" not in got["backends"]
    assert 'pip install "diffrl_fast[train]"' in got["trainer"]
    assert got["ddim"].startswith("ddim_step_with_logprob") and "needs diffusers" in got["ddim"]
    assert 'pip install "diffrl_fast[train]"' in got["ddim"]
