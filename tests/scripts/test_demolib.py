"""What the demo's second node adds to scripts/demolib, without a containerd: `Serve`'s config with more
tables is a config `damselfly serve` accepts (the peer network's keys included), `LayerSources` reads a
device daemon's status, and the results table gets the second node's column and the layer-source rows.
The demo itself (tests/scripts/test_demo.py) runs them for real.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

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
