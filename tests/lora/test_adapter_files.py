"""Every file the reader opens is confined after resolving links; re-reads match a fingerprint."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.engine.errors import AdapterFilesChanged, AdapterLoadError, AdapterPathForbidden
from loramux.engine.lora.adapter import read_adapter
from tests.adapters import make_2d_adapter, save_as_bin
from tests.lora.helpers import tiny

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def model_config():
    return tiny("qwen3_moe")[1]


@pytest.fixture
def dirs(tmp_path):
    """root/ (allowed) holding a good adapter 'good', and outside/ holding another copy."""
    hf, _ = tiny("qwen3_moe")
    root, outside = tmp_path / "root", tmp_path / "outside"
    good = make_2d_adapter(hf, root / "good", seed=3)
    shutil.copytree(good, outside / "copy")
    return root, outside, good


def _read(path, model_config, root=None, expected=None):
    roots = () if root is None else (str(root),)
    return read_adapter("t", str(path), model_config, max_rank=16, allowed_roots=roots,
                        expected=expected)


def _adapter_linking(root, name: str, file_name: str, target) -> object:
    """root/name: a copy of root/good whose `file_name` is a symlink to `target`."""
    path = root / name
    shutil.copytree(root / "good", path)
    (path / file_name).unlink()
    (path / file_name).symlink_to(target)
    return path


@pytest.mark.parametrize("file_name", [WEIGHTS, CONFIG])
def test_a_file_linked_outside_the_roots_is_forbidden(dirs, model_config, file_name):
    root, outside, _ = dirs
    linked = _adapter_linking(root, "linked", file_name, outside / "copy" / file_name)
    with pytest.raises(AdapterPathForbidden, match=f"{file_name} resolves outside"):
        _read(linked, model_config, root)
    _read(linked, model_config)  # no roots: no confinement


def test_a_dangling_link_outside_is_forbidden_not_missing(dirs, model_config):
    root, outside, _ = dirs
    linked = _adapter_linking(root, "dangling", WEIGHTS, outside / "nothing-here")
    with pytest.raises(AdapterPathForbidden):
        _read(linked, model_config, root)


def test_links_inside_the_roots_and_bin_files_are_followed(dirs, model_config):
    root, _, good = dirs
    expected = _read(good, model_config, root)
    linked = _adapter_linking(root, "inner", WEIGHTS, good / WEIGHTS)
    assert _read(linked, model_config, root).fingerprint == expected.fingerprint
    (root / "dir-link").symlink_to(good, target_is_directory=True)
    assert _read(root / "dir-link", model_config, root).fingerprint == expected.fingerprint
    as_bin = save_as_bin(good, root / "bin")
    assert [d.name for d in _read(as_bin, model_config, root).fingerprint] == [
        CONFIG, "adapter_model.bin"]


def test_a_directory_linked_outside_is_forbidden(dirs, model_config):
    root, outside, _ = dirs
    (root / "escape").symlink_to(outside / "copy", target_is_directory=True)
    with pytest.raises(AdapterPathForbidden, match="adapter path"):
        _read(root / "escape", model_config, root)


def test_a_file_link_loop_is_refused(dirs, model_config):
    root, _, _ = dirs
    path = root / "loop"
    shutil.copytree(root / "good", path)
    (path / WEIGHTS).unlink()
    (path / "other").symlink_to(path / WEIGHTS)
    (path / WEIGHTS).symlink_to(path / "other")
    with pytest.raises(AdapterLoadError, match=f"{WEIGHTS} cannot be resolved"):
        _read(path, model_config, root)


def test_fingerprint_is_size_and_hash_of_each_file_read(dirs, model_config):
    _, _, good = dirs
    first = _read(good, model_config).fingerprint
    assert [(d.name, d.size) for d in first] == [
        (CONFIG, (good / CONFIG).stat().st_size), (WEIGHTS, (good / WEIGHTS).stat().st_size)]
    assert _read(good, model_config, expected=first).fingerprint == first  # unchanged: fine


def _replace_weights(path) -> None:
    """Same names and shapes, other values: a valid adapter, not the validated one."""
    tensors = load_file(path / WEIGHTS)
    save_file({k: torch.randn_like(v) for k, v in tensors.items()}, path / WEIGHTS)


@pytest.mark.parametrize("change, why", [
    (_replace_weights, f"{WEIGHTS} differs in size or content"),
    (lambda p: (p / CONFIG).write_text((p / CONFIG).read_text().replace('"r": 4', '"r":  4')),
     f"{CONFIG} differs in size or content"),
    (lambda p: (p / WEIGHTS).unlink(), f"{WEIGHTS} is gone"),
    (lambda p: shutil.rmtree(p), "the directory is gone"),
])
def test_a_re_read_of_changed_files_is_refused(dirs, model_config, change, why):
    root, _, good = dirs
    validated = _read(good, model_config, root).fingerprint
    change(good)
    with pytest.raises(AdapterFilesChanged, match="'t': its files changed on disk since it was "
                                                  f"loaded \\({why}\\); reload it"):
        _read(good, model_config, root, expected=validated)


def test_a_re_read_through_a_new_link_outside_is_forbidden(dirs, model_config):
    root, outside, good = dirs
    validated = _read(good, model_config, root).fingerprint
    (good / WEIGHTS).unlink()
    (good / WEIGHTS).symlink_to(outside / "copy" / WEIGHTS)
    with pytest.raises(AdapterPathForbidden):
        _read(good, model_config, root, expected=validated)


def test_a_weights_name_that_is_a_directory_is_refused(dirs, model_config):
    root, _, _ = dirs
    path = root / "weights-dir"
    shutil.copytree(root / "good", path)
    (path / WEIGHTS).unlink()
    (path / WEIGHTS).mkdir()
    with pytest.raises(AdapterLoadError, match=f"{WEIGHTS} is not a regular file"):
        _read(path, model_config, root)
