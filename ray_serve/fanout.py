"""What the ingress asks of every replica at once, and how their answers become one.

`/v1/models` is the union of the replicas' cards (base cards first, each adapter once);
`/metrics` is every replica's exposition with a `replica` label on each sample, one family per
name; load / unload go to every replica and succeed only when all of them did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """One replica's answer."""

    replica: str
    status: int
    body: bytes
    content_type: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def ask_all(http: httpx.AsyncClient, urls: dict[str, str], method: str, path: str,
                  headers: dict[str, str], body: bytes | None = None) -> list[Reply]:
    """The same request to every replica, concurrently; replicas that cannot be reached are
    left out (they are gone; the directory forgets them when their heartbeats stop)."""
    async def one(replica: str, url: str) -> Reply | None:
        try:
            reply = await http.request(method, url + path, headers=headers, content=body)
        except httpx.TransportError as exc:
            logger.warning("replica %s at %s is unreachable: %s", replica, url, exc)
            return None
        return Reply(replica, reply.status_code, reply.content,
                     reply.headers.get("content-type", ""))
    replies = await asyncio.gather(*(one(r, u) for r, u in sorted(urls.items())))
    return [reply for reply in replies if reply is not None]


def union_models(lists: Iterable[dict]) -> dict:
    """One ModelList from the replicas' (base model cards first, then each adapter once)."""
    cards: dict[str, dict] = {}
    for listing in lists:
        for card in listing["data"]:
            cards.setdefault(card["id"], card)
    ordered = sorted(cards.values(), key=lambda card: card.get("parent") is not None)
    return {"object": "list", "data": ordered}


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """The replicas' Prometheus expositions as one, each sample labelled replica=<id>."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(
                family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica},
                                  sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)
