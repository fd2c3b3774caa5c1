"""Atomic, resumable checkpoints of a run.

A checkpoint is a folder ``checkpoints/epoch_NNNN`` holding

    weights.safetensors   the trainable denoiser weights (LoRA adapters, or all weights when fully fine-tuned)
    optimizer.pt          optimiser state of the policy and the algorithm's own state (critics and their
                          optimisers), loadable with torch.load(weights_only=True)
    state.json            epoch, run identity (model, algo, parametrisation), statistics tracker, counters
    rng.pt                torch RNG states

It is written into a temporary folder, every file fsync'ed, then renamed into place, and the file
``checkpoints/latest`` (written the same way) names it: a process killed at any moment leaves the
previous checkpoint intact and loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, or from another model/algorithm)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, epoch: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], keep: int = 2, extra_dirs: Optional[dict[str, Path]] = None) -> Path:
    """Write checkpoint ``epoch`` atomically and point ``latest`` at it; keep the newest ``keep``.

    ``extra_dirs`` maps names to folders already written elsewhere (DeepSpeed's sharded state) that move
    into the checkpoint before it is published.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".tmp_epoch_{epoch:04d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"epoch": epoch, **state}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for name, folder in (extra_dirs or {}).items():
        for f in Path(folder).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.replace(folder, tmp / name)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name.encode())
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def keep_best_checkpoint(path: Path) -> Path:
    """Copy checkpoint ``path`` to ``checkpoints/best`` (the guard's best held-out reward; ``load_checkpoint`` reads it like
    any other). Copied into a temporary folder, fsync'ed, then swapped in: a kill leaves the old best or the new one."""
    path = Path(path)
    root = path.parent
    best, tmp, old = root / "best", root / f".best_tmp-{os.getpid()}", root / f".best_old-{os.getpid()}"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    shutil.copytree(path, tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return best


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of the run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("epoch_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, identity: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(weights, optimizer_state, state, rng) of checkpoint ``path``; raises CheckpointError if its run
    identity (model, algo, parametrisation) differs from ``identity``."""
    path = Path(path)
    needed = ("weights.safetensors", "optimizer.pt", "state.json", "rng.pt")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing})")
    state = json.loads((path / "state.json").read_text())
    for key, value in identity.items():
        if state.get("identity", {}).get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} was written for {key}={state.get('identity', {}).get(key)!r}, but this run has "
                f"{key}={value!r}; resume with the same config or start a new run (--overwrite or another name)"
            )
    weights = load_file(str(path / "weights.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=True)
    return weights, optimizer_state, state, rng
