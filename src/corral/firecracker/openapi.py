"""The OpenAPI 3 document of the API, generated from the route table and the pydantic models, so
the document and the server cannot drift apart: what routes.py serves is what this describes.

Served at GET /corral/openapi.json, printed by `corral openapi`, and checked in as
docs/openapi.json (a test keeps that copy equal to this output). Firecracker's own endpoints are
tagged `firecracker`, corral's extras (under /corral/) `corral`. A request body is the model's
validation schema, a reply its serialization schema; every error is Firecracker's
`{"fault_message": ...}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from corral._version import __version__
from corral.firecracker.models import Error

if TYPE_CHECKING:
    from corral.firecracker.routes import Route

REF = "#/components/schemas/{model}"
ANY_JSON: dict[str, Any] = {"description": "any JSON value"}


def document(routes: Sequence[Route], api_version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for r in routes:
        if isinstance(r.body, type):
            wanted.append((r.body, "validation"))
        if isinstance(r.reply, type):
            wanted.append((r.reply, "serialization"))
        if r.stream is not None:
            wanted.append((r.stream, "serialization"))
    wanted = list(dict.fromkeys(wanted))  # once each, in first-use order
    keys, defs = models_json_schema(wanted, ref_template=REF)
    schemas = defs.get("$defs", {})

    def ref(model: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        if model == "json":
            return ANY_JSON
        return dict(keys[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": _operation_id(r.method, r.path),
            "tags": [r.tag],
        }
        params = [s[1:-1] for s in r.segments if s.startswith("{")]
        if params:
            op["parameters"] = [
                {
                    "name": p,
                    "in": "path",
                    "required": True,
                    "description": "alphanumerics and underscores",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_]+$"},
                }
                for p in params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.body, "validation")}},
            }
        responses: dict[str, Any] = {}
        if r.stream is not None:
            responses["200"] = {
                "description": "JSON lines, sent as they happen",
                "content": {"application/x-ndjson": {"schema": ref(r.stream, "serialization")}},
            }
        elif r.reply is not None:
            responses["200"] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref(r.reply, "serialization")}},
            }
        else:
            responses["204"] = {"description": "Done"}
        responses["400"] = {
            "description": "Refused: the fault message says why",
            "content": {"application/json": {"schema": ref(Error, "serialization")}},
        }
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "corral API",
            "version": __version__,
            "description": (
                "Firecracker's REST API (version "
                f"{api_version}) as corral serves it on a Unix socket (`corral firecracker "
                "--api-sock`, `corral run --api`), with corral's own endpoints under /corral/."
            ),
        },
        "tags": [
            {"name": "firecracker", "description": "Firecracker's endpoints, with its contract"},
            {"name": "corral", "description": "corral's own endpoints, beside Firecracker's"},
        ],
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _operation_id(method: str, path: str) -> str:
    words = [w for w in path.replace("{", "").replace("}", "").replace(".", "_").split("/") if w]
    camel = "".join(p.capitalize() for w in words for p in w.replace("-", "_").split("_"))
    return method.lower() + (camel or "Root")


__all__ = ["document"]
