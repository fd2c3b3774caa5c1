import pytest

from diffrl_fast.models.tiny import cached_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return cached_tiny_pipeline("sd", root=tmp_path_factory.mktemp("tiny"))
