"""Reading reward-model weights from local files: safetensors, or torch pickles with ``weights_only=True`` only."""
from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict_file(path: Path, what: str) -> dict:
    """A state dict from ``.safetensors`` or a torch pickle loaded with ``weights_only=True`` (tensors and plain
    containers only: a file that needs arbitrary code to unpickle is refused). A ``{"state_dict": ...}`` wrapper (how
    training scripts save) is unwrapped, and a DistributedDataParallel ``module.`` prefix dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot load {what} with torch.load(weights_only=True): {_cause(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected {what} (a dict of tensors, optionally under 'state_dict')")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _cause(exc: Exception) -> str:
    """The informative part of torch.load's error: its "WeightsUnpickler error: ..." sentence, else its first line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        first = rest.split("\n\n", 1)[0].strip()
        return first.split(". Please use", 1)[0].replace("\n", " ").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
