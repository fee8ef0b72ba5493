"""One Prometheus exposition out of the processes' own: what a scraper of a single-process
relay would see.

Counters, histogram buckets, sums and counts and most gauges add up across processes (the
queue gauges come from one process only, so they are not doubled). A few samples do not
add: the oldest wait is the largest of the processes', a start time or a `_created`
timestamp the earliest, the file-descriptor limit the largest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_EARLIEST = ("process_start_time_seconds",)
_LARGEST = ("process_max_fds",)


def _combine(name: str, old: float, new: float) -> float:
    if name.endswith("_created") or name in _EARLIEST:
        return min(old, new)
    if name.endswith("_oldest_seconds") or name in _LARGEST:
        return max(old, new)
    return old + new


def merge_expositions(texts: Sequence[str]) -> bytes:
    """The text exposition of `texts` merged (families in first-seen order)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                old = samples.get(key)
                value = float(sample.value)
                samples[key] = value if old is None else _combine(sample.name, old, value)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
