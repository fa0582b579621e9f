"""The daemon's create body: `ksm` and `exit_stats` become the config's `corral` key (corral's
extension beside Firecracker's keys), refused for a clone; the key itself is strict."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corral.daemon.models import CreateVm
from corral.firecracker.models import FullVmConfiguration

CONFIG = {"boot-source": {"kernel_image_path": "/k"}}


def test_ksm_and_exit_stats_go_into_the_configs_corral_key():
    req = CreateVm.model_validate({"config": CONFIG, "ksm": True, "exit_stats": True})
    cfg = req.vm_config()
    assert cfg is not None and cfg.corral is not None
    assert cfg.corral.ksm and cfg.corral.exit_stats
    dumped = cfg.model_dump(by_alias=True, exclude_none=True)
    assert dumped["corral"] == {"ksm": True, "exit_stats": True}
    assert FullVmConfiguration.model_validate(dumped).corral == cfg.corral  # what the VM reads back


def test_without_them_the_config_is_firecrackers_as_given():
    req = CreateVm.model_validate({"config": CONFIG})
    cfg = req.vm_config()
    assert cfg is not None and cfg.corral is None
    assert "corral" not in cfg.model_dump(by_alias=True, exclude_none=True)
    # the config's own key is kept, and the body's flags only add to it
    req = CreateVm.model_validate({"config": {**CONFIG, "corral": {"exit_stats": True}}, "ksm": True})
    assert req.vm_config().corral.model_dump() == {"ksm": True, "exit_stats": True}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [
        {"snapshot": "/snaps/a", "ksm": True},
        {"snapshot": "/snaps/a", "exit_stats": True},
        {"config": {**CONFIG, "corral": {"ksm": True, "bogus": 1}}},
        {"config": {**CONFIG, "corral": {"ksm": "yes"}}},
    ],
)
def test_bad_uses_are_refused(body):
    with pytest.raises(ValidationError):
        CreateVm.model_validate(body)
