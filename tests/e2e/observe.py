"""What an operator sees of a node, for the end-to-end tests: ``damselfly status --json`` (the real
command, in a process of its own) and a scrape of a ``/metrics`` endpoint over HTTP."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from scripts.demolib.serve import damselfly_argv

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def status(config: Path, root: Path) -> dict[str, Any]:
    """``damselfly status --json --config CONFIG --root ROOT``."""
    r = subprocess.run(
        [*damselfly_argv(), "status", "--json", "--config", str(config), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def scrape(address: str) -> Samples:
    """Every sample of ``http://ADDRESS/metrics``: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels} among {sorted({n for n, _ in samples})}"
    return samples[key]


def blob(data: dict[str, Any], digest: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [b for b in data["blobs"] if b["digest"] == digest]
    assert found, f"status shows no blob {digest}: {data['blobs']}"
    return found[0]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)
