"""Loading a finished (or interrupted) run back: its config and its policy at the latest checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config_utils import ConfigError, load_config
from ..models import load_model
from .checkpoint import latest_checkpoint
from .config import Config


def load_run(run_dir: str | Path, device="cpu"):
    """(model, config) of run folder ``run_dir``: the model built as training built it, with the trainable
    weights of the run's latest checkpoint loaded."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); give the folder `diffrl-fast train` wrote")
    try:
        cfg = load_config(Config, cfg_path)
    except ConfigError as exc:
        raise ValueError(f"{cfg_path} is not a valid run config: {exc}") from None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest)")
    model = load_model(cfg.model.path, device=device, sampler=cfg.model.sampler)
    if hasattr(model, "guidance"):
        model.guidance = cfg.model.embedded_guidance
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
