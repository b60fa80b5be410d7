"""Classes that moved keep old checkpoints resumable: a checkpoint records its run's settings,
class paths included (`method.module._target_`, `data._target_`), and a resume refuses a
changed data setting (t2ilab.resume). The toy world's datamodules moved from
t2ilab.data.toy_world to t2ilab.toy.datamodules; a checkpoint stamped before the move names the
old path and is read back under the new one (t2ilab.checkpoints.current_settings)."""

from __future__ import annotations

import pytest
import torch
from _support import CONF
from hydra.utils import get_class
from omegaconf import OmegaConf

from t2ilab.checkpoints import (
    DATA_TARGET_KEY,
    RECORD_KEY,
    RENAMED_DATAMODULES,
    current_settings,
    inspect_checkpoint,
)
from t2ilab.errors import UserError
from t2ilab.resume import settings_changes

OLD = "t2ilab.data.toy_world"


@pytest.mark.parametrize(
    ("config", "name"),
    [("toy_world", "ToyWorldDataModule"), ("toy_world_classes", "ToyWorldClassDataModule")],
)
def test_a_checkpoint_naming_a_moved_datamodule_class_still_resumes(tmp_path, config, name):
    now_target = OmegaConf.load(CONF / "data" / f"{config}.yaml")["_target_"]
    assert get_class(now_target).__name__ == name
    trained = {
        "method.name": "full",
        "method.module._target_": "t2ilab.modules.full.FullModule",
        DATA_TARGET_KEY: f"{OLD}.{name}",
        "data.size": 64,
    }
    now = {**trained, DATA_TARGET_KEY: now_target}
    # read back as recorded, the old path is a changed data setting: the resume is refused
    with pytest.raises(UserError, match=DATA_TARGET_KEY):
        settings_changes(trained, now, "last.ckpt")
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, RECORD_KEY: {"settings": trained}}, path)
    record = inspect_checkpoint(path, now)
    assert record["settings"] == now
    assert settings_changes(record["settings"], now, str(path)) == {}


def test_every_moved_datamodule_names_a_class_at_its_new_path():
    for old, new in RENAMED_DATAMODULES.items():
        assert old.startswith(OLD + ".")
        assert get_class(new).__name__ == new.rsplit(".", 1)[1] == old.rsplit(".", 1)[1]


def test_only_the_data_target_is_mapped_and_other_datamodules_stay_as_recorded():
    old = f"{OLD}.ToyWorldDataModule"
    kept = {DATA_TARGET_KEY: "t2ilab.data.dreambooth.DreamBoothDataModule", "data.note": old}
    assert current_settings(kept) == kept
    trained = {DATA_TARGET_KEY: old}
    assert current_settings(trained)[DATA_TARGET_KEY] == RENAMED_DATAMODULES[old]
    assert trained == {DATA_TARGET_KEY: old}  # the checkpoint's own record is left as it was
