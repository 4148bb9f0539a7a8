"""Adapter files over HTTP: every file confined after resolving links (403), and adapters whose
files changed on disk after loading refused on re-read (409) while other tenants go on."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.adapters import make_2d_adapter
from tests.reliability.helpers import greedy, load, replace_weights, unload

CHANGED = "its files changed on disk since it was loaded"


@pytest.fixture(scope="module")
def small_cache(serving):
    """One GPU slot and one CPU-cached adapter: using another adapter forces a re-read."""
    with serving("small-cache", "--max-loras", "1", "--max-cpu-loras", "1", "--max-num-seqs",
                 "8", "--num-kv-blocks", "128") as srv:
        yield srv


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_linked_outside_the_roots_is_403(small_cache, demo, adapter_root, file_name):
    linked = adapter_root / f"linked-{file_name}"
    shutil.copytree(demo.adapters["demo-2d"], linked)
    (linked / file_name).unlink()
    (linked / file_name).symlink_to(demo.adapters["demo-2d"] / file_name)
    with small_cache.http() as http:
        reply = load(http, "linked", linked)
        assert reply.status_code == 403, reply.text
        error = reply.json()["error"]
        assert error["type"] == "PermissionDeniedError"
        assert f"{file_name} resolves outside" in error["message"]
        assert "linked" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_changed_files_fail_that_adapter_only_until_reloaded(small_cache, hf_demo, adapter_root):
    changing = make_2d_adapter(hf_demo, adapter_root / "changing", seed=21)
    other = make_2d_adapter(hf_demo, adapter_root / "other", seed=22)
    client = small_cache.client()
    with small_cache.http() as http:
        assert load(http, "changing", changing).status_code == 200
        assert load(http, "other", other).status_code == 200
        before = {m: greedy(client, m) for m in ("changing", "other", "demo")}
        assert len(set(before.values())) == 3  # each adapter moves the answer
        assert greedy(client, "other") == before["other"]  # "changing" left slot and cache
        replace_weights(changing, seed=5)
        for stream in (False, True):
            with pytest.raises(openai.ConflictError) as info:
                client.completions.create(model="changing", prompt="x", max_tokens=2,
                                          stream=stream)
            assert "'changing'" in str(info.value) and CHANGED in str(info.value)
            assert "reload it" in str(info.value)
        assert {m: greedy(client, m) for m in ("other", "demo")} == {
            m: before[m] for m in ("other", "demo")}
        assert "changing" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert load(http, "changing", changing, load_inplace=True).status_code == 200
        reloaded = greedy(client, "changing")
        assert greedy(client, "other") == before["other"]
        assert greedy(client, "changing") == reloaded != before["changing"]  # re-read, same
        assert unload(http, "changing").status_code == unload(http, "other").status_code == 200
    assert "changed on disk since it was loaded" in small_cache.log.read_text()
