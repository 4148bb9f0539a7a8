"""What the server shows about itself: metric series bounded by the loaded adapters, adapter
names that read back from vllm:lora_requests_info, the OpenAPI error statuses, and no server
paths where clients are confined (--redact-paths)."""

from __future__ import annotations

import httpx
import pytest

from loramux.server.cli import build_parser, settings_from_args
from loramux.server.settings import SettingsError
from tests.server.test_adapters import hand_2d, load, unload  # noqa: F401 (fixture)
from tests.server.test_metrics import scrape

ERROR_REF = "#/components/schemas/ErrorResponse"


def adapter_labels(server) -> set[str]:
    return {dict(labels).get("adapter") for _, labels in scrape(server)} - {None}


def test_series_exist_only_for_loaded_adapters(server, hand_2d):  # noqa: F811
    client = server.client()
    with server.http() as http:
        assert load(http, "metered", hand_2d).status_code == 200
        client.completions.create(model="metered", prompt="the model", max_tokens=2)
        assert "metered" in adapter_labels(server)
        assert unload(http, "metered").status_code == 200
        for name in ("never-loaded", "metered"):  # unknown names are 404 and leave no series
            reply = http.post("/v1/completions", json={"model": name, "prompt": "x"})
            assert reply.status_code == 404
    assert {"metered", "never-loaded"}.isdisjoint(adapter_labels(server))
    with server.http() as http:  # a reload starts the series afresh
        assert load(http, "metered", hand_2d).status_code == 200
        client.completions.create(model="metered", prompt="the model", max_tokens=2)
        samples = scrape(server)
        assert unload(http, "metered").status_code == 200
    finished = [v for (name, labels), v in samples.items()
                if name == "loramux_requests_total" and ("adapter", "metered") in labels]
    assert sum(finished) == 1


@pytest.mark.parametrize("name", ["a,b", "tab\there", "line\nbreak"])
def test_adapter_names_that_would_misread_are_400(server, hand_2d, name):  # noqa: F811
    with server.http() as http:
        reply = load(http, name, hand_2d)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body.lora_name"
    with pytest.raises(SettingsError, match="','|control"):
        settings_from_args(build_parser().parse_args(
            ["serve", "--enable-lora", "--lora-modules", f"{name}=/adapters/x"]))


def test_openapi_documents_the_error_envelope_not_422(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "422" not in str(schema) and "HTTPValidationError" not in schema["components"][
        "schemas"]
    wanted = {"/v1/completions": {"400", "401", "404", "409", "413", "503"},
              "/v1/chat/completions": {"400", "401", "404", "409", "413", "503"},
              "/v1/load_lora_adapter": {"400", "401", "403", "404", "413", "503"},
              "/v1/unload_lora_adapter": {"400", "401", "404", "413", "503"},
              "/v1/responses": {"400", "401", "404", "409", "413", "503"},
              "/tokenize": {"400", "401", "404", "413", "503"},
              "/detokenize": {"400", "401", "404", "413", "503"},
              "/v1/models": {"401", "503"}, "/health": {"503"}}
    assert set(wanted) < set(schema["paths"])
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            errors = {s: r for s, r in operation["responses"].items() if s >= "400"}
            assert set(errors) == wanted.get(path, set()) | ({"503"} if path == "/ping" else
                                                             set()), path
            for response in errors.values():
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": ERROR_REF}}}


def test_confined_servers_show_no_server_paths(server, adapter_root, demo):
    bad = adapter_root / "bad-json"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text("{")
    with server.http() as http:
        cards = http.get("/v1/models").json()["data"]
        message = load(http, "bad", bad).json()["error"]["message"]
    assert "JSON" in message and "<allowed-root>" in message
    roots = [c["root"] for c in cards]
    for secret in (str(adapter_root), str(adapter_root.resolve()), str(demo.model_dir)):
        assert secret not in message and not any(secret in r for r in roots), (secret, roots)
    assert all(not r.startswith("/") for r in roots), roots


def test_load_errors_do_not_tell_which_server_paths_exist(open_server, tmp_path):
    (tmp_path / "file").write_text("x")
    probes = [tmp_path / "file", tmp_path / "missing", tmp_path, tmp_path / "file" / "x"]
    with open_server.http() as http:
        replies = [load(http, "probe", p) for p in probes]
    assert {r.status_code for r in replies} == {404}
    assert len({r.json()["error"]["message"].replace(str(p), "P")
                for r, p in zip(replies, probes)}) == 1
