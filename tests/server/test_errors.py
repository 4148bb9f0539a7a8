"""Error paths a healthy engine rarely takes, against a FakeEngine in-process."""

from __future__ import annotations

import asyncio
import json

import pytest
import transformers
from fastapi.testclient import TestClient

from loramux.engine.errors import EngineOverloaded, EngineStopped
from loramux.server.app import create_app
from loramux.server.errors import ClientDisconnected
from loramux.server.generation import until_disconnect
from loramux.server.settings import Settings
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
    settings = Settings(model="fake-dir", served_model_names=("fake",), api_keys=("k",))
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


@pytest.mark.parametrize("logprob", [float("-inf"), float("nan"), -1e30])
def test_non_finite_logprobs_are_floored_as_in_vllm(http, engine, logprob):
    engine.logprob = logprob
    chat = {**BODY, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": 1}
    answers = [http.post("/v1/completions", json={**BODY, "logprobs": 1}),
               http.post("/v1/chat/completions", json=chat)]
    streams = [http.post("/v1/completions", json={**BODY, "logprobs": 1, "stream": True}),
               http.post("/v1/chat/completions", json={**chat, "stream": True})]
    assert [r.status_code for r in answers + streams] == [200] * 4
    text, chat_reply = (r.json()["choices"][0]["logprobs"] for r in answers)
    assert text["token_logprobs"] == [-9999.0] * 3
    assert list(text["top_logprobs"][0].values()) == [-9999.0]
    assert [t["logprob"] for t in chat_reply["content"]] == [-9999.0] * 3
    assert chat_reply["content"][0]["top_logprobs"][0]["logprob"] == -9999.0
    text_frames, chat_frames = ([json.loads(line[6:]) for line in r.text.splitlines()
                                 if line.startswith("data: {")] for r in streams)
    text_lps = [f["choices"][0]["logprobs"]["token_logprobs"] for f in text_frames]
    chat_lps = [t["logprob"] for f in chat_frames if f["choices"][0]["logprobs"]
                for t in f["choices"][0]["logprobs"]["content"]]
    assert text_lps == [[-9999.0]] * 3 and chat_lps == [-9999.0] * 3


def test_a_503_logs_one_line_without_a_traceback(http, engine, caplog):
    engine.fail_before = EngineOverloaded("queue full")
    with caplog.at_level("WARNING", logger="server"):
        assert http.post("/v1/completions", json=BODY).status_code == 503
    records = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert "\n" not in records[0].getMessage()
