"""Shared helpers for the exporter tests: recordings, exposition parsing, free ports."""

import re
import socket
from typing import Dict, FrozenSet, Tuple

import pytest

from tests.unit.conftest import run_cli

SeriesKey = Tuple[str, FrozenSet[Tuple[str, str]]]
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> Dict[SeriesKey, float]:
    """Prometheus text format -> {(name, labels): value} (our own reader, independent of prometheus_client)."""
    out: Dict[SeriesKey, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, line
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(series: Dict[SeriesKey, float], name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    """One small recording per synthetic scenario: {name: path}."""
    out = {}
    for name, events in (("lost-fin", 30_000), ("syn-flood", 30_000), ("nat-churn", 30_000)):
        path = str(tmp_path_factory.mktemp("rec") / f"{name}.ctr")
        status, _, err = run_cli(["synth", name, "-o", path, "--events", str(events), "--seed", "11"])
        assert status == 0, err
        out[name] = path
    return out
