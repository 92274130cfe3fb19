"""The supervisor's operator endpoints: one control socket and one /metrics for all workers.

Each worker answers queue requests for its own spool shard on a private control socket;
the public socket sends each request to every worker and merges the answers, so
`policy-relay queue` sees one queue. /metrics merges the workers' expositions the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.queue.control import ControlSocket, ControlUnavailable, Response, request

# Samples that are not additive across workers, and how they merge instead.
MERGE_MAX = {"relay_queue_oldest_message_age_seconds", "relay_upstream_up",
             "relay_events_oldest_pending_age_seconds", "relay_condition_active"}
MERGE_MIN = {
    "relay_config_last_reload_successful",
    "relay_config_last_reload_success_timestamp_seconds",
}
CHANGING_OPS = ("flush", "hold", "release", "delete")


class ShardedControl(ControlSocket):
    """The public control socket: every request goes to every worker's shard."""

    def __init__(self, path: Path, group: str | None, shards: Mapping[int, Path]) -> None:
        super().__init__(path, group)
        self.shards = shards

    def __repr__(self) -> str:
        return f"<ShardedControl {self.path} shards={len(self.shards)}>"

    async def ask_all(self, payload: dict[str, Any]) -> list[Response] | Response:
        """Every shard's answer, or the error answer of the first that failed."""
        try:
            answers = await asyncio.gather(
                *(request(path, payload) for path in self.shards.values()))
        except ControlUnavailable as exc:
            return {"ok": False, "error": f"a worker did not answer: {exc}"}
        for answer in answers:
            if not answer.get("ok") and payload.get("op") != "show":
                return answer
        return answers

    async def handle(self, request: dict[str, Any]) -> Response:
        op = request.get("op")
        if op == "limits":
            # The buckets live in the hub (local) or in Redis: any one worker shows them all.
            answers = await self.ask_all(request)
            return answers[0] if isinstance(answers, list) else answers
        answers = await self.ask_all(request)
        if not isinstance(answers, list):
            return answers
        if op == "list":
            messages = [m for a in answers for m in a["messages"]]
            messages.sort(key=lambda m: (m["arrival_time"], m["id"]))
            return {"ok": True, "messages": messages}
        if op == "show":
            for answer in answers:
                if answer.get("ok"):
                    return answer
            return answers[0]
        if op in CHANGING_OPS:
            return merge_changes(answers)
        if op == "summary":
            return merge_summaries(answers)
        if op == "metrics":
            return {"ok": True, "text": merge_metrics([a["text"] for a in answers]).decode()}
        return answers[0]


def merge_changes(answers: list[Response]) -> Response:
    """An id is done or skipped where its shard holds it, missing only if no shard does."""
    done = [i for a in answers for i in a["done"]]
    skipped = [s for a in answers for s in a["skipped"]]
    missing = [i for i in answers[0]["missing"] if all(i in a["missing"] for a in answers)]
    merged: Response = {"ok": True, "done": done, "missing": missing, "skipped": skipped}
    # A flush reports what the probes of down upstream hosts found, once per host.
    upstreams = list(dict.fromkeys(line for a in answers for line in a.get("upstreams", [])))
    if upstreams:
        merged["upstreams"] = upstreams
    return merged


def merge_summaries(answers: list[Response]) -> Response:
    first = answers[0]
    counts = {state: sum(a["counts"][state] for a in answers) for state in first["counts"]}
    routes: dict[str, list[int]] = {}
    for answer in answers:
        for route, row in answer["routes"].items():
            total = routes.setdefault(route, [0] * len(row))
            routes[route] = [x + y for x, y in zip(total, row, strict=True)]
    return {
        "ok": True,
        "total": sum(a["total"] for a in answers),
        "size": sum(a["size"] for a in answers),
        "counts": counts,
        "buckets": first["buckets"],
        "routes": dict(sorted(routes.items())),
    }


def merge_metrics(texts: list[str]) -> bytes:
    """One exposition from several: counters, histograms and queue gauges add up."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                key = (merged.name, sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                elif sample.name.endswith("_created") or family.name in MERGE_MIN:
                    values[key] = min(values[key], sample.value)
                elif family.name in MERGE_MAX:
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] += sample.value
    for (family_name, sample_name, labels), value in values.items():
        families[family_name].add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector that yields fixed metric families (the merged ones)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class MergedMetrics:
    """The exposition /metrics serves in the supervisor: refreshed from every worker."""

    def __init__(self, control: ShardedControl) -> None:
        self.control = control
        self.text = b""

    async def refresh(self) -> None:
        answer = await self.control.handle({"op": "metrics"})
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error"))
        self.text = answer["text"].encode()

    def exposition(self) -> bytes:
        return self.text
