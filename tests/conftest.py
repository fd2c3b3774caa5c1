"""Test environment: offline, Triton kernels through the interpreter when there is no GPU."""
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


def backend_params():
    """Every backend that must run here. The C++ one is required unless the build was skipped on purpose."""
    names = ["torch", "cpp", "triton"]
    params = []
    for name in names:
        marks = []
        if name == "cpp" and os.environ.get("DIFFRL_FAST_NO_CPP") == "1":
            marks.append(pytest.mark.skip(reason="built with DIFFRL_FAST_NO_CPP=1"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    name = request.param
    device = "cpu" if name == "cpp" else DEVICE
    assert name in available_backends(device), f"backend {name} is not available on {device}: {available_backends(device)}"
    return name


def device_for(backend_name: str) -> str:
    return "cpu" if backend_name == "cpp" else DEVICE
