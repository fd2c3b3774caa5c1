"""Test environment: offline, Triton kernels through the interpreter when there is no GPU.

Tests that need the C++ extension (``diffrl_fast._C``) skip, with the reason, when it is unavailable: skipped on
purpose (``DIFFRL_FAST_NO_CPP=1``, as on the GPU suite's machine) or failed to load. One rule decides it
(``cpp_unavailable_reason``), applied at collection to every test marked ``requires_cpp`` and to every test
parametrised with the "cpp" backend (a parameter whose name contains "backend"). A failed load outside
``DIFFRL_FAST_NO_CPP=1`` is still an error once: tests/ops/test_backends.py::test_cpp_extension_loads_unless_skipped.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # must happen before triton is imported anywhere
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

from diffrl_fast.ops import available_backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Marks a test that needs the C++ backend; it skips, with the reason, where the extension is unavailable.
requires_cpp = pytest.mark.requires_cpp


def cpp_unavailable_reason() -> str | None:
    """Why the C++ backend cannot be tested here, or None when it can.

    Unavailable means skipped on purpose (``DIFFRL_FAST_NO_CPP=1``: the GPU suite sets it, the extension is not
    built there) or present but failing to load (e.g. built for another Python).
    """
    if os.environ.get("DIFFRL_FAST_NO_CPP") == "1":
        return "the C++ extension is skipped on purpose (DIFFRL_FAST_NO_CPP=1)"
    if "cpp" not in available_backends("cpu"):
        from diffrl_fast.ops import backends

        return f"the C++ extension failed to load: {backends._load_errors.get('cpp')!r}"
    return None


def _names_cpp_backend(item) -> bool:
    """Whether the test is marked ``requires_cpp`` or parametrised with the "cpp" backend."""
    if item.get_closest_marker("requires_cpp") is not None:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any("backend" in name and value == "cpp" for name, value in params.items())


def pytest_configure(config):
    """Register the ``requires_cpp`` marker."""
    config.addinivalue_line("markers", "requires_cpp: needs the C++ extension; skipped with the reason where it is unavailable")


def pytest_collection_modifyitems(config, items):
    """Skip every test that names the C++ backend when the extension is unavailable (one shared rule)."""
    needing = [item for item in items if _names_cpp_backend(item)]
    reason = cpp_unavailable_reason() if needing else None
    if reason:
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=reason))


def backend_params():
    """Every backend that must run here. The "cpp" one skips where the C++ extension is unavailable (see above)."""
    return [pytest.param(name, id=name) for name in ("torch", "cpp", "triton")]


@pytest.fixture(params=backend_params())
def backend(request):
    """The backend name under test; it must be available on its device (the C++ one is skipped when it is not)."""
    name = request.param
    device = device_for(name)
    assert name in available_backends(device), f"backend {name} is not available on {device}: {available_backends(device)}"
    return name


def device_for(backend_name: str) -> str:
    """The device a backend's tests run on: CPU for the C++ backend, DEVICE (CUDA when there is one) otherwise."""
    return "cpu" if backend_name == "cpp" else DEVICE
