"""Loading a finished (or interrupted) run back: its config and its policy at the latest checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config_utils import ConfigError, load_config
from ..models import load_model
from .checkpoint import latest_checkpoint
from .config import Config


def run_checkpoint(run_dir: Path, which: str = "latest") -> Path:
    """The checkpoint folder ``which`` of run folder ``run_dir``: "latest" (the newest complete one), "best" (the
    guard's best held-out reward, checkpoints/best/), or a folder name under checkpoints/ such as "epoch_0012"."""
    root = Path(run_dir) / "checkpoints"
    if which == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest)")
        return ckpt
    ckpt = root / which
    if not (ckpt / "weights.safetensors").is_file():
        have = sorted(p.name for p in root.iterdir() if (p / "weights.safetensors").is_file()) if root.is_dir() else []
        hint = (" (checkpoints/best is written by a run with a guard: guard.heldout_reward set and guard.keep_best=true)"
                if which == "best" else "")
        raise FileNotFoundError(f"{run_dir} has no checkpoint {which!r}{hint}; it has: {have or 'none'} (or use 'latest')")
    return ckpt


def load_run(run_dir: str | Path, device="cpu", checkpoint: str = "latest"):
    """(model, config) of run folder ``run_dir``: the model built as training built it, with the trainable
    weights of its checkpoint ``checkpoint`` loaded ("latest", "best" or a folder name: ``run_checkpoint``)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); give the folder `diffrl-fast train` wrote")
    try:
        cfg = load_config(Config, cfg_path)
    except ConfigError as exc:
        raise ValueError(f"{cfg_path} is not a valid run config: {exc}") from None
    ckpt = run_checkpoint(run_dir, checkpoint)
    model = load_model(cfg.model.path, device=device, sampler=cfg.model.sampler)
    if hasattr(model, "guidance") and cfg.model.embedded_guidance is not None:
        model.guidance = cfg.model.embedded_guidance
    if cfg.sample.num_frames is not None and getattr(model, "is_video", False):
        model.num_frames = cfg.sample.num_frames
    model.sigma_grid = cfg.sample.sigma_grid  # the run's sigma grid (None: the model's own)
    if cfg.model.lora:
        model.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    weights = load_file(str(ckpt / "weights.safetensors"))
    params = dict(model.denoiser.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {ckpt} does not fit model {cfg.model.path}: unknown weights {missing[:3]}")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    model.denoiser.eval()
    return model, cfg
