"""Adapter affinity behind Ray Serve (CPU): how often adapters are read from the shared directory.

The same requests (seeded: `--requests` over `--adapters` adapters of the demo model, greedy,
`--clients` at once) run three ways, each on fresh servers of the same flags (2 replicas,
--max-loras 2, --max-cpu-loras 4; Ray keeps 4 adapters per replica):

  round-robin  two single-process `loramux serve` servers, requests sent to each in turn
  ray          deploy/ray/serve.yaml's application: Ray routes by the adapter in `model`
  ray-default  the same application without the multiplexed id (Ray's default routing)

Reported per run: adapter reads from the directory (first loads and re-reads after leaving the
CPU cache) per server and in all, GPU slot loads, and wall time. Every answer must equal the
round-robin run's (single-process servers); the minimum is one read per adapter.

  python benchmarks/bench_ray_affinity.py [--requests 200] [--adapters 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loramux.engine.demo import ensure_demo  # noqa: E402
from tests.adapters import make_2d_adapter  # noqa: E402
from tests.server.conftest import free_port, start_server, stop_server  # noqa: E402
from tests.tiny import load_reference  # noqa: E402

PROMPT = "the expert adapter"


def serve_args(resolver_dir: Path) -> str:
    config = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())["applications"][0]
    return config["args"]["serve_args"].replace("/tmp/loramux-adapters", str(resolver_dir))


def loads(metrics_texts: dict[str, str]) -> dict:
    """Directory reads and GPU slot loads per server, from each server's /metrics."""
    per = {}
    for server, text in metrics_texts.items():
        samples = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        per[server] = {"reads": int(samples["loramux_adapter_reads_total"]),
                       "slot_loads": int(samples["loramux_adapter_loads_total"])}
    return {"reads": sum(p["reads"] for p in per.values()),
            "slot_loads": sum(p["slot_loads"] for p in per.values()), "per_server": per}


def run(clients: list[openai.OpenAI], order: list[str], workers: int) -> tuple[list, float]:
    """Request i goes to clients[i % len(clients)]; the answers in order, and the wall time."""
    def one(i: int) -> str:
        return clients[i % len(clients)].completions.create(
            model=order[i], prompt=PROMPT, max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True}).choices[0].text
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(one, range(len(order))))
    return answers, time.monotonic() - start


def round_robin(args, resolver_dir: Path, env: dict, home: Path, order: list[str]) -> dict:
    servers = [start_server(serve_args(resolver_dir).split(), env, home / f"rr-{i}.log")
               for i in range(2)]
    try:
        clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0,
                                 timeout=300) for s in servers]
        answers, seconds = run(clients, order, args.clients)
        texts = {f"server-{i}": httpx.get(f"{s.url}/metrics").text
                 for i, s in enumerate(servers)}
    finally:
        for server in servers:
            stop_server(server)
    return {"run": "round-robin", "answers": answers, "seconds": seconds, **loads(texts)}


def ray_run(args, resolver_dir: Path, order: list[str], multiplex: bool) -> dict:
    from ray import serve

    from loramux.ray_serve.app import build_app
    config = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())["applications"][0]
    app_args = {**config["args"], "serve_args": serve_args(resolver_dir), "multiplex": multiplex}
    serve.run(build_app(app_args), name="loramux", route_prefix="/")
    try:
        client = openai.OpenAI(base_url=f"{args.ingress}/v1", api_key="none", max_retries=0,
                               timeout=300)
        answers, seconds = run([client], order, args.clients)
        texts: dict[str, list[str]] = {}
        for family in text_string_to_metric_families(httpx.get(f"{args.ingress}/metrics").text):
            for s in family.samples:
                if s.name in ("loramux_adapter_reads_total", "loramux_adapter_loads_total"):
                    texts.setdefault(s.labels["replica"], []).append(f"{s.name} {s.value}")
    finally:
        serve.delete("loramux")
    per_replica = {r: "\n".join(lines) + "\n" for r, lines in texts.items()}
    return {"run": "ray" if multiplex else "ray-default", "answers": answers,
            "seconds": seconds, **loads(per_replica)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    env = {**os.environ, "LORAMUX_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)  # Ray's workers inherit it
    demo = ensure_demo(home / "demo-v1")
    hf = load_reference(demo.model_dir)
    resolver_dir = home / "adapters"
    names = [f"tenant-{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        make_2d_adapter(hf, resolver_dir / name, r=4, seed=500 + i)
    order = random.Random(0).choices(names, k=args.requests)
    results = [round_robin(args, resolver_dir, env, home, order)]

    import ray
    from ray import serve
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args.ingress = f"http://127.0.0.1:{port}"
    try:
        results += [ray_run(args, resolver_dir, order, multiplex) for multiplex in (True, False)]
    finally:
        serve.shutdown()
        ray.shutdown()
    reference = results[0]["answers"]
    for result in results:
        wrong = sum(a != b for a, b in zip(result.pop("answers"), reference))
        print(json.dumps({**result, "wrong_answers": wrong, "requests": args.requests,
                          "adapters": args.adapters, "seconds": round(result["seconds"], 1)}))


if __name__ == "__main__":
    main()
