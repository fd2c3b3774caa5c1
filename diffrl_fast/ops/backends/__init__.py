"""Backend registry for the fused step ops.

Backends are data, not if-chains: each entry names an implementation, the device types it serves
when the choice is automatic, and how to load it. Every backend implements the same two primitives
(see ``torch_backend`` for their exact contract):

    step_fwd(p: StepProblem, want_ss, want_kk, want_mean) -> (ss, kk, mean)
    step_bwd(p: StepProblem, w_ss, w_kk, g_mean, need) -> (dx, dy, deu, dec)

Choosing a backend, in order of precedence:
  1. ``with diffrl_fast.ops.use_backend("cpp"): ...``    (explicit)
  2. ``DIFFRL_FAST_BACKEND=torch``                         (explicit)
  3. automatic: the first of triton, cpp, torch that serves the tensor's device type and loads.

An automatic choice that fails to load falls back to the next one with a one-time warning; an explicit
choice that cannot run on the device raises.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

from .._env import getenv

ENV_VAR = "DIFFRL_FAST_BACKEND"


def _triton_devices() -> tuple[str, ...]:
    # Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors (tests only, slow); they are never
    # picked automatically there.
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") == "1" else ("cuda",)


@dataclass(frozen=True)
class Backend:
    """One implementation of the fused primitives."""

    name: str
    module: str  # module path of the implementation, imported lazily
    auto_devices: tuple[str, ...]  # device types this backend serves when the choice is automatic
    devices: Callable[[], tuple[str, ...]]  # device types it can run on when asked for explicitly

    def load(self):
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", "diffrl_fast.ops.backends.triton_backend", ("cuda",), _triton_devices),
    "cpp": Backend("cpp", "diffrl_fast.ops.backends.cpp_backend", ("cpu",), lambda: ("cpu",)),
    "torch": Backend("torch", "diffrl_fast.ops.backends.torch_backend", ("*",), lambda: ("*",)),
}
AUTO_ORDER = ("triton", "cpp", "torch")

_local = threading.local()
_warned: set[str] = set()
_load_errors: dict[str, BaseException] = {}
_loaded: dict[str, object] = {}  # name -> module, so that a resolve per op call costs no import machinery
# device type -> the first automatic candidate, once it has loaded: the answer while it has no load error
_auto_best: dict[str, str] = {}


def _try_load(name: str):
    if name in _load_errors:
        return None
    module = _loaded.get(name)
    if module is not None:
        return module
    try:
        module = _loaded[name] = BACKENDS[name].load()
        return module
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        _load_errors[name] = exc
        return None


def _serves(devices: tuple[str, ...], device_type: str) -> bool:
    return "*" in devices or device_type in devices


def requested_backend() -> str | None:
    """The explicitly requested backend name (context manager first, then the environment), or None."""
    override = getattr(_local, "override", None)
    if override is not None:
        return override
    env = getenv(ENV_VAR)
    return (env.strip().lower() or None) if env else None


def resolve(device_type: str) -> str:
    """Name of the backend that runs the fused ops for tensors on ``device_type``.

    Raises ValueError for an unknown name and RuntimeError when an explicitly requested backend cannot
    run on this device or failed to load.
    """
    name = requested_backend()
    if name is not None and name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"unknown diffrl_fast backend {name!r} (from use_backend() or ${ENV_VAR}); "
                f"choose one of {sorted(BACKENDS)} or 'auto'"
            )
        backend = BACKENDS[name]
        if not _serves(backend.devices(), device_type):
            raise RuntimeError(
                f"backend {name!r} cannot run on {device_type} tensors (it serves {list(backend.devices())}); "
                f"unset ${ENV_VAR} or pick another backend"
            )
        if _try_load(name) is None:
            raise RuntimeError(f"backend {name!r} was requested but failed to load: {_load_errors[name]!r}")
        return name
    best = _auto_best.get(device_type)
    if best is not None and best not in _load_errors:
        return best
    fell_back = False
    for candidate in AUTO_ORDER:
        if not _serves(BACKENDS[candidate].auto_devices, device_type):
            continue
        if _try_load(candidate) is not None:
            if not fell_back:
                _auto_best[device_type] = candidate
            return candidate
        fell_back = True
        if candidate not in _warned:
            _warned.add(candidate)
            warnings.warn(
                f"diffrl_fast: the {candidate} backend is unavailable ({_load_errors[candidate]!r}); "
                f"falling back to a slower backend for {device_type} tensors. "
                + ("Reinstall without DIFFRL_FAST_NO_CPP=1 to build the C++ kernels." if candidate == "cpp" else ""),
                RuntimeWarning,
                stacklevel=3,
            )
    raise RuntimeError(f"no diffrl_fast backend serves {device_type} tensors")  # unreachable: torch serves all


def get(name: str):
    """The implementation module of backend ``name`` (must already resolve)."""
    module = _try_load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} failed to load: {_load_errors.get(name)!r}")
    return module


def available_backends(device_type: str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device_type`` here, in automatic-choice order."""
    return [n for n in AUTO_ORDER if _serves(BACKENDS[n].devices(), device_type) and _try_load(n) is not None]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force the fused ops onto backend ``name`` ("triton", "cpp", "torch" or "auto") inside the block.

    Thread-local, and takes precedence over $DIFFRL_FAST_BACKEND. ``None`` restores the default choice.
    """
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown diffrl_fast backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous
