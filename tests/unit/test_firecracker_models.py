"""The Firecracker API bodies (corral/firecracker/models.py): Firecracker's field names, unknown
fields and wrong types refused with a message naming them, ids checked by Firecracker's rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corral.firecracker import models as m


def error_of(model: type, body: str) -> str:
    with pytest.raises(ValidationError) as exc:
        model.model_validate_json(body)
    return m.body_error(exc.value, model)


def test_bodies_parse_with_firecrackers_names():
    cfg = m.MachineConfiguration.model_validate_json('{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}')
    assert (cfg.vcpu_count, cfg.mem_size_mib, cfg.track_dirty_pages, cfg.huge_pages) == (
        2,
        256,
        False,
        "None",
    )
    d = m.Drive.model_validate_json(
        '{"drive_id": "rootfs", "path_on_host": "/x.img", "is_root_device": true, "is_read_only": false}'
    )
    assert d.drive_id == "rootfs" and d.io_engine == "Sync"
    load = m.SnapshotLoadParams.model_validate_json(
        '{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}, '
        '"resume_vm": true}'
    )
    assert load.mem_backend is not None and load.mem_backend.backend_type == "File" and load.resume_vm


def test_unknown_fields_are_refused_naming_them():
    msg = error_of(m.MachineConfiguration, '{"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2}')
    assert msg.startswith("An error occurred when deserializing the json body of a request: ")
    assert "unknown field `vcpus`" in msg and "`vcpu_count`" in msg
    nested = error_of(m.Drive, '{"drive_id": "a", "is_root_device": false, "rate_limiter": {"x": 1}}')
    assert "unknown field `x` in `rate_limiter`" in nested


def test_wrong_types_and_missing_fields():
    assert "`vcpu_count`" in error_of(m.MachineConfiguration, '{"vcpu_count": "2", "mem_size_mib": 128}')
    assert "`smt`" in error_of(m.MachineConfiguration, '{"vcpu_count": 2, "mem_size_mib": 128, "smt": 1}')
    assert "`mem_size_mib`" in error_of(m.MachineConfiguration, '{"vcpu_count": 2, "mem_size_mib": -1}')
    assert "missing field `kernel_image_path`" in error_of(m.BootSource, '{"boot_args": "x"}')
    assert "`state`" in error_of(m.Vm, '{"state": "Sleeping"}')
    assert "not JSON" in error_of(m.Vm, '{"state": ')
    assert "JSON object" in error_of(m.Vm, "[1, 2]")


def test_ids_follow_firecrackers_rule():
    assert m.check_id("root_fs1") == "root_fs1"
    assert m.check_id("диск") == "диск"  # Unicode letters are alphanumeric, as in Rust
    for bad in ("root-fs", "a b", "x/y", "a.b"):
        with pytest.raises(m.IdError, match="alphanumeric characters and underscores"):
            m.check_id(bad)
    with pytest.raises(m.IdError, match="cannot be empty"):
        m.check_id("")
    # in a body, the id's own message is the fault message
    assert error_of(m.Drive, '{"drive_id": "a-b", "is_root_device": false}') == m.INVALID_ID


def test_instance_ids():
    assert m.check_instance_id("vm-12a") == "vm-12a"
    with pytest.raises(m.IdError, match=r"Invalid char \(_\) at position 2"):
        m.check_instance_id("vm_1")
    with pytest.raises(m.IdError, match="Invalid len"):
        m.check_instance_id("a" * 65)


def test_full_config_uses_kebab_case_keys_both_ways():
    text = """{
        "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "vsock": {"guest_cid": 3, "uds_path": "/v.sock"}
    }"""
    cfg = m.FullVmConfiguration.model_validate_json(text)
    assert cfg.boot_source is not None and cfg.boot_source.kernel_image_path == "/k"
    out = m.dump(cfg)
    assert {"boot-source", "machine-config", "network-interfaces", "drives", "vsock"} <= out.keys()
    assert "boot_source" not in out and "balloon" not in out  # unset resources are left out
    assert "unknown field `boot_source`" in error_of(m.FullVmConfiguration, '{"boot_source": {}}')


def test_sizes_are_bounded():
    assert "`kernel_image_path`" in error_of(m.BootSource, '{"kernel_image_path": "' + "a" * 5000 + '"}')
    many = ",".join(['{"iface_id": "a", "host_dev_name": "t"}'] * 65)
    assert "network_overrides" in error_of(
        m.SnapshotLoadParams, '{"snapshot_path": "s", "network_overrides": [' + many + "]}"
    )
