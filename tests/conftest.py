"""Shared fixtures; helpers live in _support.py."""

from __future__ import annotations

import pytest
from _support import compose_cfg
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, config_name: str = "train"):
        # The run folder beside the test's data, as a user's would be (never around it).
        return compose_cfg(list(overrides), tmp_path / "run", config_name)

    yield _make
    GlobalHydra.instance().clear()
