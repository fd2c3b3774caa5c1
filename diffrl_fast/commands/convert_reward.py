"""``diffrl-fast convert-reward IN.pth [OUT.safetensors]``: turn a reward model's pickled state dict (the LAION aesthetic
predictor's sac+logos+ava1-l14-linearMSE.pth, ImageReward.pt, HPS_v2*_compressed.pt) into safetensors, once.

The pickle is read with ``torch.load(weights_only=True)``, which accepts tensors and plain containers only, never code;
a ``{"state_dict": ...}`` wrapper is unwrapped. It prints every tensor's name, shape and dtype, and the sha256 of both
files (compare the input's with the SHA256 its download page shows). The default output is IN with the suffix
.safetensors. Pass the output to the reward, e.g. ``reward.kwargs={clip_path: ..., mlp_path: OUT.safetensors}``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..cli import ArgumentParser, UsageError


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(src: Path, dst: Path, print_fn=print) -> dict:
    """Load ``src`` with ``torch.load(weights_only=True)`` and write its tensors to ``dst`` as safetensors; returns the
    state dict. UsageError for a missing file or one that weights_only cannot load (or that holds no tensors)."""
    from .._extras import require
    from ..rewards.weights import load_state_dict_file

    save_file = require("safetensors.torch", "diffrl-fast convert-reward").save_file
    if not src.is_file():
        raise UsageError(f"{src} not found: expected the reward model's .pth/.pt file")
    if src.suffix == ".safetensors":
        raise UsageError(f"{src} is already safetensors")
    try:
        state = load_state_dict_file(src, "a state dict")
    except ValueError as exc:
        raise UsageError(f"{exc}; only files of tensors can be converted (this refuses to run code from a pickle)") from None
    if not state:
        raise UsageError(f"{src} holds no tensors")
    seen, out = set(), {}
    for key, value in state.items():  # safetensors stores no shared or strided views: give each its own storage
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and ptr in seen:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst))
    width = max(len(k) for k in out)
    for key, value in out.items():
        print_fn(f"  {key:<{width}}  {str(tuple(value.shape)):<18} {str(value.dtype).replace('torch.', '')}")
    n = sum(v.numel() for v in out.values())
    print_fn(f"{len(out)} tensors, {n:,} values")
    print_fn(f"sha256 {sha256(src)}  {src}")
    print_fn(f"sha256 {sha256(dst)}  {dst}")
    return out


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast convert-reward", description=__doc__)
    ap.add_argument("src", help="the pickled state dict (.pth / .pt)")
    ap.add_argument("dst", nargs="?", help="the safetensors file to write (default: SRC with suffix .safetensors)")
    ap.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    args = ap.parse_args(argv)
    src = Path(args.src)
    if not src.is_file():
        raise UsageError(f"{src} not found: expected the reward model's .pth/.pt file")
    dst = Path(args.dst) if args.dst else src.with_suffix(".safetensors")
    if dst.exists() and not args.force:
        raise UsageError(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise UsageError("the output would overwrite the input")
    print(f"{src} -> {dst}")
    convert(src, dst)
    return 0
