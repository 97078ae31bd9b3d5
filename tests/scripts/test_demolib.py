"""What the demo's second node adds to scripts/demolib, without a containerd: `Serve`'s config with more
tables is a config `damselfly serve` accepts (the peer network's keys included), `LayerSources` reads a
device daemon's status, and the results table gets the second node's column and the layer-source rows.
The demo itself (tests/scripts/test_demo.py) runs them for real.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from scripts.demolib import coldstart
from scripts.demolib.coldreport import (
    COLUMNS,
    WORKLOADS,
    Run,
    prefetch_summary,
    publish,
    run_from_json,
    targets,
)
from scripts.demolib.coldstart import LayerSources, StartResult
from scripts.demolib.containerd import toml_value
from scripts.demolib.serve import Serve
from scripts.demolib.ui import fmt_bytes, results_table
from snapshotter import config as damselfly_config


def _serve(tmp_path: Path, tables: dict[str, dict[str, object]]) -> Serve:
    return Serve(tmp_path / "serve", tmp_path / "serve" / "s.sock", tmp_path / "serve.log", tables=tables)


def test_serve_config_with_remote_and_p2p_tables_is_what_damselfly_reads(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    members = ["198.18.7.1:40000", "198.18.7.10:7001"]
    serve = _serve(
        tmp_path,
        {
            "remote": {"plain_http": True},
            "p2p": {
                "enabled": True,
                "listen": members[0],
                "peers": members,
                "seeds": members[:1],
                "secret_file": str(secret),
                "health_interval": 1.0,
            },
        },
    )
    cfg = damselfly_config.parse(serve.config(), "serve.toml")
    assert cfg.snapshotter.address == str(serve.socket)
    assert cfg.device.state_dir == str(serve.state)
    assert cfg.remote.plain_http is True
    assert cfg.p2p.enabled and cfg.p2p.node_id == members[0]
    assert cfg.p2p.peers == members and cfg.p2p.seeds == members[:1]
    assert cfg.p2p.secret_file == str(secret) and cfg.p2p.health_interval == 1.0


def test_serve_config_without_tables_keeps_damselfly_defaults(tmp_path: Path) -> None:
    cfg = damselfly_config.parse(_serve(tmp_path, {}).config(), "serve.toml")
    assert cfg.remote.plain_http is False and cfg.p2p.enabled is False


@pytest.mark.parametrize("table", ["snapshotter", "device"])
def test_serve_refuses_a_table_it_writes_itself(tmp_path: Path, table: str) -> None:
    with pytest.raises(ValueError, match=table):
        _serve(tmp_path, {table: {"root": "/elsewhere"}}).config()


def test_toml_floats_stay_floats() -> None:
    assert toml_value(1.0) == "1.0" and toml_value(30) == "30" and toml_value([0.5, "a"]) == '[0.5, "a"]'


def test_layer_sources_of_a_device_daemon_status() -> None:
    status = {
        "blobs": {},
        "p2p": {"enabled": True, "fetched_bytes": {"peer": 2_500_000, "registry": 0}, "upload_bytes": 7},
    }
    assert LayerSources.of(status) == LayerSources(registry_bytes=0, peer_bytes=2_500_000, uploaded_bytes=7)
    # without the peer network: fetched bytes only, no upload count
    alone = {"p2p": {"enabled": False, "fetched_bytes": {"peer": 0, "registry": 5}}}
    assert LayerSources.of(alone) == LayerSources(registry_bytes=5, peer_bytes=0, uploaded_bytes=0)


def _result(label: str, seconds: float, registry_bytes: int, cpu: float) -> StartResult:
    return StartResult(
        label=label,
        first_output_s=seconds,
        pull_s=seconds / 2,
        total_s=seconds + 1,
        registry_bytes=registry_bytes,
        registry_requests=3,
        node_cpu_s=cpu,
        registry_bytes_at_output=registry_bytes,
        node_cpu_s_at_output=cpu,
        output="hello\n",
    )


def _render(table: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200, highlight=False).print(table)
    return out.getvalue()


def test_results_table_with_a_second_node() -> None:
    lazy = [_result("lazy", 4.0, 6_000_000, 2.0)]
    full = [_result("full", 8.0, 12_000_000, 1.0)]
    second = [_result("second", 3.0, 3_100, 2.5)]
    text = _render(
        results_table(
            lazy,
            full,
            "title",
            second,
            [LayerSources(6_000_000, 0, 0)],
            [LayerSources(0, 6_100_000, 0)],
        )
    )
    header = next(line for line in text.splitlines() if "cold start" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "cold start",
        "damselfly, lazy",
        "2nd node, lazy",
        "overlayfs, full pull",
        "overlayfs / damselfly",
    ]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["seconds to first output"] == ["4.00 s", "3.00 s", "8.00 s", "2.0x"]
    assert rows["registry bytes served"] == ["6.0 MB", "3.1 kB", "12.0 MB", "2.0x"]
    assert rows["node CPU-seconds"] == ["2.00 s", "2.50 s", "1.00 s", "0.5x"]
    assert rows["layer bytes from the registry"] == ["6.0 MB", "0.0 kB", "-", ""]
    assert rows["layer bytes from peers"] == ["0.0 kB", "6.1 MB", "-", ""]


def test_results_table_without_a_second_node_is_the_old_one() -> None:
    lazy = [_result("lazy", 4.0, 6_000_000, 2.0), _result("lazy", 6.0, 6_000_000, 2.0)]
    full = [_result("full", 8.0, 12_000_000, 1.0)] * 2
    text = _render(results_table(lazy, full, "title"))
    assert "cold start (median of 2)" in text and "2nd node" not in text and "peers" not in text
    assert "5.00 s" in text


def test_fmt_bytes_switches_to_kb_below_a_tenth_of_a_mb() -> None:
    assert fmt_bytes(3_100) == "3.1 kB" and fmt_bytes(100_000) == "0.1 MB" and fmt_bytes(0) == "0.0 kB"


# -- the cold-start benchmark's report and measurement (scripts/bench_coldstart.py) ---------------------


def _run(column: str, seconds: float, cpu: float = 1.0, registry_bytes: int = 1000, **extra: Any) -> Run:
    return Run(1000.0, "hello", column, 0, _result(column, seconds, registry_bytes, cpu), dict(extra))


def _runs() -> list[Run]:
    return [
        _run("overlayfs", 20.0, cpu=20.0, registry_bytes=565_000_000),
        _run("overlayfs-warm", 0.5, cpu=0.3),
        _run("cold", 1.8, cpu=2.0, registry_bytes=17_000_000, daemon_wait_s=0.5),
        _run("warm", 0.6, fill_s=10.0, warm_fetched=0),
        _run("prefetch", 0.7, prefetch={"state": "done", "fetched_bytes": 15_000_000, "read_units": 200,
                                        "read_units_prefetched": 180, "read_units_waited": 20}),
    ]  # fmt: skip


def test_issue_14_targets_from_the_medians() -> None:
    found = targets(_runs(), 1000.0, "hello")
    assert [t.met for t in found] == [True, False, True, True]
    assert [t.measured for t in found] == ["9%", "0.60 s vs 0.50 s (120%)", "92%", "10%"]


def test_targets_without_the_columns_they_need_are_not_judged() -> None:
    found = targets([_run("overlayfs", 20.0)], 1000.0, "hello")
    assert [t.met for t in found] == [None] * 4 and {t.measured for t in found} == {"-"}


def test_prefetch_summary_sums_the_devices_that_prefetch() -> None:
    one = {"state": "done", "fetched_bytes": 10, "read_units": 5, "read_units_prefetched": 4}
    two = {"state": "running", "fetched_bytes": 1, "read_units": 2, "read_units_prefetched": 0}
    status = {"devices": {"a": {"prefetch": one}, "b": {"prefetch": two}, "c": {"prefetch": None}}}
    got = prefetch_summary(status)
    assert got["fetched_bytes"] == 11 and got["read_units"] == 7 and got["read_units_prefetched"] == 4
    assert got["state"] == "done,running" and set(got["devices"]) == {"a", "b"}
    assert prefetch_summary({"devices": {"c": {"prefetch": None}}}) == {}
    assert prefetch_summary({"devices": {"d": {"path": "/x"}}}) == {}


def test_cold_start_report_round_trips_through_its_json(tmp_path: Path) -> None:
    runs = _runs()
    meta = {
        "date": "today", "minutes": "1.0", "code": "abc", "load_start": "0", "load_end": "0",
        "machine": "m", "command": "bench_coldstart.py --quick", "rates": [1000.0],
        "workloads": ["hello"], "columns": [r.column for r in runs], "remarks": ["a remark"],
    }  # fmt: skip
    image: dict[str, Any] = {"uncompressed_size": 1.1e9, "compressed_size": 5.6e8, "layers": [1, 2, 3]}
    raw = {
        "meta": meta,
        "image": {**image, "converted_layer_bytes": 6.6e8},
        "runs": [r.to_json() for r in runs],
    }
    publish(raw, tmp_path / "cs.md")
    text = (tmp_path / "cs.md").read_text()
    assert "| 1000 Mbit/s | hello | damselfly cold | 1.80 (1.80-1.80) | 9% | 2.00 | 10% | 17.0 | 3% |" in text
    assert (
        "| 1000 Mbit/s | hello | damselfly warm <= overlayfs warm | 0.60 s vs 0.50 s (120%) | **no** |"
        in text
    )
    assert "180/200 read units prefetched (90%), 20 waited" in text and "- a remark" in text
    for c in runs:
        assert f"**{COLUMNS[c.column].title}**" in text  # every column's definition
    assert (tmp_path / "cs.png").stat().st_size > 0
    again = json.loads((tmp_path / "cs.json").read_text())
    assert [run_from_json(d) for d in again["runs"]] == runs


def test_cold_start_runs_after_run_inside_the_measured_span(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    class Registry:
        def log_offset(self) -> int:
            return 0

        def served_since(self, offset: int) -> tuple[int, int]:
            events.append("bytes")
            return 123, 2

    class Cgroup:
        def cpu_seconds(self) -> float:
            events.append("cpu")
            return float(len(events))

    monkeypatch.setattr(coldstart, "drop_caches", lambda: None)
    bench = coldstart.Bench(dict(os.environ), Registry(), Cgroup(), tmp_path / "log")  # type: ignore[arg-type]
    result = coldstart.cold_start(
        bench, "t", ["true"], ["sh", "-c", "echo hello; echo more"], "hello", lambda: events.append("after")
    )
    assert result.output == "hello\nmore\n" and result.registry_bytes == 123 and result.registry_requests == 2
    # cpu at the start, cpu + bytes at the first line, then after_run, then the last readings
    assert events == ["cpu", "cpu", "bytes", "after", "cpu", "bytes"]
    assert WORKLOADS["hello"].expect == "hello" and WORKLOADS["imports"].expect == "imported"
