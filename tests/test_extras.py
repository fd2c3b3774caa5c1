"""A missing optional dependency gives one clear message (the package, the feature, the pip command), from the
helper, at the lazy import sites, through the CLI and from the drop-in DDIM step. A module is made missing by
putting None in sys.modules, which makes importing it fail as if it were not installed."""
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from diffrl_fast._extras import OPTIONAL_MODULES, TRAIN_MODULES, MissingExtra, install_command, require
from tests.cli_inprocess import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_require_names_package_feature_and_command(monkeypatch):
    for mod in ("sklearn", "sklearn.datasets"):  # (an earlier test may have imported the submodule already)
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(MissingExtra) as info:
        require("sklearn.datasets", "the digits data set")
    msg = str(info.value)
    assert msg.startswith("the digits data set needs scikit-learn, which is not installed")
    assert 'pip install "diffrl_fast[train]"' in msg and "\n" not in msg
    assert isinstance(info.value, ImportError) and info.value.name == "sklearn"
    assert require("yaml", "anything").safe_load("a: 1") == {"a": 1}  # an installed one is returned
    assert install_command("gpu") == 'pip install "diffrl_fast[gpu]"'


def test_require_leaves_other_import_errors_alone(monkeypatch, tmp_path):
    """An installed package that fails on a missing dependency of its own is that package's problem: its
    error is not turned into a "not installed" message."""
    (tmp_path / "fake_optional_pkg").mkdir()
    (tmp_path / "fake_optional_pkg" / "__init__.py").write_text("import fake_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(OPTIONAL_MODULES, "fake_optional_pkg", ("fake-optional-pkg", "train"))
    with pytest.raises(ModuleNotFoundError) as info:
        require("fake_optional_pkg", "x")
    assert not isinstance(info.value, MissingExtra) and info.value.name == "fake_dependency_of_it"
    with pytest.raises(KeyError):  # every module passed to require must be registered with its extra
        require("json", "x")


def test_optional_modules_match_pyproject_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = {extra: {re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower() for req in reqs}
              for extra, reqs in extras.items()}
    for module, (dist, extra) in OPTIONAL_MODULES.items():
        assert dist in listed[extra], f"{module}: {dist} is not in the {extra!r} extra of pyproject.toml"
    assert set(TRAIN_MODULES) <= set(OPTIONAL_MODULES)


def test_lazy_import_site_reports_the_extra(monkeypatch):
    from diffrl_fast.models import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtra, match=r"digits world's data set needs scikit-learn.*diffrl_fast\[train\]"):
        digits._digits_tensors.__wrapped__()  # the uncached body: the cache may hold the data already


def test_cli_reports_a_missing_extra_with_exit_code_2(monkeypatch, tmp_path):
    from diffrl_fast.models import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setattr(digits, "_digits_tensors", digits._digits_tensors.__wrapped__)
    out = run_cli("pretrain", "digits", "--quick", "--out", str(tmp_path))
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("diffrl-fast pretrain: error: ") and "\n" not in err
    assert "scikit-learn" in err and 'pip install "diffrl_fast[train]"' in err
    assert "Traceback" not in out.stderr


def test_ddim_step_without_diffusers_names_the_extra(monkeypatch):
    from diffrl_fast import ddim_step_with_logprob

    monkeypatch.setitem(sys.modules, "diffusers", None)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(MissingExtra) as info:
        ddim_step_with_logprob(object(), x, 500, x)
    msg = str(info.value)
    assert msg.startswith("ddim_step_with_logprob") and "needs diffusers" in msg
    assert 'pip install "diffrl_fast[train]"' in msg
    assert "No module named" not in msg


def test_missing_tensorboard_is_one_warning_line_not_silence(monkeypatch, tmp_path):
    from diffrl_fast.train.config import Config
    from diffrl_fast.train.outputs import RunLogger

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = Config()
    assert cfg.log.tensorboard
    lines: list[str] = []
    logger = RunLogger(tmp_path, cfg, print_fn=lines.append)
    logger.start()
    assert logger.tb is None and len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("warning: log.tensorboard=true needs tensorboard, which is not installed")
    assert 'pip install "diffrl_fast[train]"' in lines[0] and "log.tensorboard=false" in lines[0]
