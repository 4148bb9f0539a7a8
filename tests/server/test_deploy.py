"""Dockerfile, docker-compose.yml and deploy/prometheus.yml, checked without a Docker engine."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose-spec.json")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_compose_file_follows_the_compose_spec():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert errors == []


def test_compose_reserves_a_gpu_and_offers_a_cpu_profile():
    services = compose()["services"]
    devices = services["loramux"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in services["loramux"]
    cpu = services["loramux-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["command"][:2] == ["--device", "cpu"]
    for name in ("loramux", "loramux-cpu"):
        mounts = [v.split(":")[1] for v in services[name]["volumes"]]
        assert {"/models", "/adapters"} <= set(mounts), name
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
        assert "/adapters" in services[name]["command"]  # runtime loads stay in the volume


def test_prometheus_scrapes_both_services():
    services = compose()["services"]
    mount = services["prometheus"]["volumes"][0].split(":")
    assert mount[:2] == ["./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    ports = {name: s["ports"][0].split(":")[1] for name, s in services.items()
             if name.startswith("loramux")}
    assert set(job["static_configs"][0]["targets"]) == {f"{n}:{p}" for n, p in ports.items()}


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    text = dockerfile()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["builder", "runtime"]
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "nvidia/cuda" in re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert '"loramux", "serve", "--host", "0.0.0.0"' in text


def test_dockerfile_installs_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    text = re.sub(r"\s*\\\n\s*", " ", dockerfile())  # join continuation lines
    torch_pin = re.search(r"^TORCH := (torch==\S+)$", makefile, re.M).group(1)
    assert re.search(r"^CONSTRAINTS := -c constraints\.txt$", makefile, re.M)
    # the same command; a CPU build may only add an index URL
    assert re.search(r"pip install -q -c constraints\.txt (\$\{TORCH_INDEX_URL[^}]*\} )?"
                     + re.escape(torch_pin), text)
    assert "pip install -q -c constraints.txt ." in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert f"COPY {folder} ./{folder}" in text, folder
    for name in pyproject["project"]["license-files"]:  # setuptools refuses a missing one
        assert re.search(rf"^COPY [^\n]*\b{name}\b", text, re.M), name


def test_the_wheel_lists_every_package():
    """A non-editable install (the Dockerfile's) holds only the listed packages: a folder with
    an __init__.py that the list misses is absent from the image."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(setuptools["packages"])
