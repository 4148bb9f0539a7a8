"""Error paths a healthy engine rarely takes, against a FakeEngine in-process."""

from __future__ import annotations

import asyncio
import json

import pytest
import transformers
from fastapi.testclient import TestClient

from engine.errors import EngineOverloaded, EngineStopped
from server.app import create_app
from server.errors import ClientDisconnected
from server.generation import until_disconnect
from server.settings import Settings
from tests.server.fake_engine import FakeEngine

BODY = {"model": "fake", "prompt": "the model", "max_tokens": 3}


@pytest.fixture(scope="module")
def tokenizer(demo):
    return transformers.AutoTokenizer.from_pretrained(demo.model_dir)


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def http(engine):
    settings = Settings(model="fake-dir", served_model_names=("fake",), api_key="k")
    with TestClient(create_app(engine, settings), raise_server_exceptions=False,
                    headers={"Authorization": "Bearer k"}) as client:
        yield client


def test_the_app_runs_the_engine_loop_while_it_serves(engine, http):
    assert engine.started
    reply = http.post("/v1/completions", json=BODY)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == " x x x"


@pytest.mark.parametrize("error", [EngineOverloaded("queue full"), EngineStopped("stopped")])
def test_overload_and_stopped_engine_are_503(http, engine, error):
    engine.fail_before = error
    reply = http.post("/v1/completions", json=BODY)
    assert reply.status_code == 503
    assert reply.json()["error"] == {"message": str(error), "type": "ServiceUnavailableError",
                                     "param": None, "code": 503}


def test_a_bug_is_500_and_the_server_stays_up(http, engine):
    engine.fail_before = ZeroDivisionError("bug")
    reply = http.post("/v1/chat/completions", json={**BODY, "messages": [
        {"role": "user", "content": "hi"}]})
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "InternalServerError"
    engine.fail_before = None
    assert http.post("/v1/completions", json=BODY).status_code == 200


@pytest.mark.parametrize("error, code", [(EngineStopped("engine died"), 503),
                                         (RuntimeError("bug"), 500)])
def test_failure_mid_stream_is_an_error_frame_then_done(http, engine, error, code):
    engine.fail_after = error
    reply = http.post("/v1/completions", json={**BODY, "stream": True})
    frames = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[0])["choices"][0]["text"] == " x"
    assert json.loads(frames[-2])["error"]["code"] == code
    # an engine error ended the request in the engine; after a bug the server releases it
    assert len(engine.aborted) == (code == 500)


def test_wrong_or_missing_key_is_401(http):
    assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert http.get("/v1/models", headers={"Authorization": ""}).status_code == 401
    assert http.get("/health", headers={"Authorization": ""}).status_code == 200


def test_until_disconnect_cancels_the_work_when_the_client_leaves():
    class GoneRequest:
        async def receive(self):
            return {"type": "http.disconnect"}

    async def main():
        work = asyncio.ensure_future(asyncio.sleep(30))
        with pytest.raises(ClientDisconnected):
            await until_disconnect(GoneRequest(), work)
        await asyncio.sleep(0)
        return work.cancelled()

    assert asyncio.run(main())
