"""Tiny SD 1.x / SDXL / SD3 / FLUX pipelines with random weights, built offline once per session."""
import pytest

from diffrl_fast.models.pipelines import load_pipeline
from diffrl_fast.models.tiny import cached_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_pipelines")


@pytest.fixture(scope="session")
def sd_path(tiny_root):
    return cached_tiny_pipeline("sd", root=tiny_root)


@pytest.fixture(scope="session")
def sdxl_path(tiny_root):
    return cached_tiny_pipeline("sdxl", root=tiny_root)


@pytest.fixture(scope="session")
def sd3_path(tiny_root):
    return cached_tiny_pipeline("sd3", root=tiny_root)


@pytest.fixture(scope="session")
def flux_path(tiny_root):
    return cached_tiny_pipeline("flux", root=tiny_root, latent_size=8)


@pytest.fixture
def sd_model(sd_path):
    return load_pipeline(sd_path)


@pytest.fixture
def sdxl_model(sdxl_path):
    return load_pipeline(sdxl_path)


@pytest.fixture
def sd3_model(sd3_path):
    return load_pipeline(sd3_path)
