"""Schemathesis over the served OpenAPI schema: for every route, generated requests (valid and
not) never get a 5xx, and every answer has a documented status, content type and body shape.

The server is the demo with a short context (--max-model-len 64), so generated max_tokens stay
cheap; each route gets a bounded number of examples (SCHEMATHESIS_EXAMPLES, default 20), so the
run stays within about two minutes on two cores. A longer run:
`SCHEMATHESIS_EXAMPLES=500 .venv/bin/python -m pytest -q tests/reliability/test_schemathesis.py`.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.conftest import API_KEY

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "20"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
ROUTES = [("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"), ("GET", "/ping"),
          ("POST", "/ping"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("POST", "/tokenize"),
          ("POST", "/detokenize"), ("POST", "/v1/load_lora_adapter"),
          ("POST", "/v1/unload_lora_adapter")]


@pytest.fixture(scope="module")
def api_schema(serving):
    with serving("schemathesis", "--max-model-len", "64", "--max-num-seqs", "8",
                 "--num-kv-blocks", "64", "--max-loras", "2") as srv:
        yield srv, schemathesis.openapi.from_url(f"{srv.url}/openapi.json")


def test_every_route_is_fuzzed(api_schema):
    _, schema = api_schema
    served = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert served == set(ROUTES)


@pytest.mark.parametrize("method,path", ROUTES)
def test_no_answer_is_5xx_or_off_schema(api_schema, method, path):
    srv, schema = api_schema
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=CHECKS,
                               timeout=60)

    fuzz()
