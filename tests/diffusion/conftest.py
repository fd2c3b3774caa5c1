"""Tiny SD 1.x / SDXL / SD3 / FLUX pipelines with random weights, built offline once per session.

Where the model fixtures load (``pipeline_device``): the rollout/recompute parity tests (``parity`` in the test's
name) run on the suite's DEVICE, so on a GPU they run on CUDA, with the Triton backend for real where they ask
for it; a test parametrised with a backend runs on that backend's device (the C++ one on CPU); every other test
loads on CPU (they compare against CPU-drawn noise and diffusers' CPU results). Without a GPU, DEVICE is the
CPU, so nothing changes there.
"""
import pytest

from diffrl_fast.models.pipelines import load_pipeline
from diffrl_fast.models.tiny import cached_tiny_pipeline
from tests.conftest import DEVICE, device_for


def pipeline_device(request) -> str:
    """The device a model fixture loads on for the requesting test (see the module docstring)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    backend = next((v for k, v in params.items() if "backend" in k and isinstance(v, str)), None)
    if backend is not None:
        return device_for(backend)
    name = getattr(request.node, "originalname", request.node.name)
    return DEVICE if "parity" in name else "cpu"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Session folder of the tiny pipelines."""
    return tmp_path_factory.mktemp("tiny_pipelines")


@pytest.fixture(scope="session")
def sd_path(tiny_root):
    """Folder of a tiny SD 1.x pipeline."""
    return cached_tiny_pipeline("sd", root=tiny_root)


@pytest.fixture(scope="session")
def sdxl_path(tiny_root):
    """Folder of a tiny SDXL pipeline."""
    return cached_tiny_pipeline("sdxl", root=tiny_root)


@pytest.fixture(scope="session")
def sd3_path(tiny_root):
    """Folder of a tiny SD3 pipeline."""
    return cached_tiny_pipeline("sd3", root=tiny_root)


@pytest.fixture(scope="session")
def flux_path(tiny_root):
    """Folder of a tiny FLUX pipeline (8x8 latents)."""
    return cached_tiny_pipeline("flux", root=tiny_root, latent_size=8)


@pytest.fixture
def sd_model(sd_path, request):
    """The tiny SD 1.x pipeline, on ``pipeline_device``."""
    return load_pipeline(sd_path, device=pipeline_device(request))


@pytest.fixture
def sdxl_model(sdxl_path, request):
    """The tiny SDXL pipeline, on ``pipeline_device``."""
    return load_pipeline(sdxl_path, device=pipeline_device(request))


@pytest.fixture
def sd3_model(sd3_path, request):
    """The tiny SD3 pipeline, on ``pipeline_device``."""
    return load_pipeline(sd3_path, device=pipeline_device(request))


@pytest.fixture(scope="session")
def wan_path(tiny_root):
    """Folder of a tiny Wan2.1 text-to-video pipeline with its shipped scheduler (UniPC, flow prediction)."""
    return cached_tiny_pipeline("wan", root=tiny_root)


@pytest.fixture(scope="session")
def wan_euler_path(tiny_root):
    """The same tiny Wan with a FlowMatchEulerDiscreteScheduler: the stock pipeline then runs our ODE."""
    return cached_tiny_pipeline("wan", root=tiny_root, scheduler="euler")


@pytest.fixture(scope="session")
def qwen_image_path(tiny_root):
    """Folder of a tiny Qwen-Image pipeline (8x8 latents: 64-pixel images)."""
    return cached_tiny_pipeline("qwen_image", root=tiny_root)


@pytest.fixture(scope="session")
def z_image_path(tiny_root):
    """Folder of a tiny Z-Image pipeline (8x8 latents: 64-pixel images)."""
    return cached_tiny_pipeline("z_image", root=tiny_root)


@pytest.fixture(scope="session")
def flux2_klein_path(tiny_root):
    """Folder of a tiny FLUX.2 [klein] pipeline (4x4 patchified latents: 64-pixel images)."""
    return cached_tiny_pipeline("flux2_klein", root=tiny_root)


@pytest.fixture(scope="session")
def flux2_dev_path(tiny_root):
    """Folder of a tiny FLUX.2 [dev] pipeline (Mistral-3 encoder, embedded guidance; 64-pixel images)."""
    return cached_tiny_pipeline("flux2_dev", root=tiny_root)
