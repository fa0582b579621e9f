"""The OpenAPI document (corral/firecracker/openapi.py): a valid OpenAPI 3.1 document generated
from the route table, describing exactly the routes the server dispatches, whose schemas accept
what the server accepts and describe what it sends; docs/openapi.json is kept equal to it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from support.cli import cli_env

from corral.errors import CorralError
from corral.firecracker import models as m
from corral.firecracker.routes import ROUTES, match, openapi
from corral.firecracker.vmm import FirecrackerVmm

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_the_document_is_valid_openapi():
    validate(openapi())  # raises with the offending part


def test_the_checked_in_copy_is_the_generated_one():
    out = subprocess.run(
        [sys.executable, "-m", "corral", "openapi"], capture_output=True, text=True, env=cli_env(), check=True
    ).stdout
    assert json.loads(out) == openapi()
    assert json.loads(DOCS.read_text()) == openapi(), (
        "docs/openapi.json is stale: regenerate it with `corral openapi > docs/openapi.json`"
    )


def test_every_route_is_described_and_every_described_path_is_served():
    doc = openapi()
    described = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert described == {(r.method, r.path) for r in ROUTES}
    for method, path in described:
        concrete = path.replace("{drive_id}", "rootfs").replace("{iface_id}", "eth0")
        route, _ = match(method, concrete.strip("/").split("/") if concrete != "/" else [], concrete)
        assert (route.method, route.path) == (method, path)
    tags = {r.path: r.tag for r in ROUTES}
    assert {p for p, t in tags.items() if t == "corral"} == {p for p in tags if p.startswith("/corral/")}


def _schema_validator(ref: dict) -> OAS31Validator:
    doc = openapi()
    return OAS31Validator({**ref, "components": doc["components"]})


def test_request_schemas_agree_with_the_models():
    doc = openapi()
    drive = doc["paths"]["/drives/{drive_id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    check = _schema_validator(drive)
    good = {"drive_id": "rootfs", "is_root_device": True, "path_on_host": "/img"}
    assert check.is_valid(good) and m.Drive.model_validate(good)
    for bad in ({**good, "speed": 1}, {"drive_id": "rootfs"}, {**good, "is_root_device": "yes"}):
        assert not check.is_valid(bad), bad
        with pytest.raises(ValueError):
            m.Drive.model_validate_json(json.dumps(bad))


def test_a_reply_the_server_sends_fits_its_schema():
    doc = openapi()
    root = doc["paths"]["/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert _schema_validator(root).is_valid(m.dump(FirecrackerVmm("vm-1").instance_info()))
    assert not _schema_validator(root).is_valid({"app_name": "corral"})
    stream = doc["paths"]["/corral/migrate"]["put"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in stream
    error = doc["paths"]["/corral/stop"]["put"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert _schema_validator(error).is_valid({"fault_message": str(CorralError("x"))})
