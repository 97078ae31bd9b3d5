"""What the demo shows: one line per step, spinners and bars for the long ones (on a terminal only; in a
pipe or a CI log, plain lines), and the results table."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .coldstart import LayerSources, StartResult

MB = 1_000_000
#: Columns off a terminal: the table with the second node's column fits on one line per row.
WIDTH = 120


class Ui:
    def __init__(self, total_steps: int) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        if not self.live:  # a log: wide enough for the table on one line per row
            self.console = Console(highlight=False, soft_wrap=True, width=WIDTH)
        self.total = total_steps

    def step(self, n: int, title: str) -> None:
        self.console.print(f"[bold cyan]==> \\[{n}/{self.total}] {escape(title)}[/]")

    def info(self, text: str) -> None:
        self.console.print(f"    {escape(text)}")

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]    {escape(text)}[/]")

    def error(self, text: str) -> None:
        self.console.print(f"[bold red]{escape(text)}[/]")

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner with `text` (updatable through the yielded function); a plain line off a terminal."""
        if not self.live:
            self.info(text)
            yield lambda _: None
            return
        with self.console.status(f"    {escape(text)}") as status:
            yield lambda more: status.update(f"    {escape(text)} {escape(more)}")

    @contextlib.contextmanager
    def bar(self, text: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bytes progress bar; yields ``advance(n)``."""
        if not self.live:
            self.info(text)
            yield lambda _: None
            return
        columns = (
            TextColumn("    {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(escape(text), total=total)
            yield lambda n: progress.advance(task, n)
        self.info(text + ": done")


def _ratio(other: float, ours: float) -> str:
    return f"{other / ours:.1f}x" if ours > 0 else "-"


def fmt_bytes(n: float) -> str:
    """Bytes as MB, or kB below 0.1 MB (a second node's registry bytes are a few kB of manifests)."""
    return f"{n / MB:.1f} MB" if n >= MB / 10 else f"{n / 1000:.1f} kB"


def _med(values: Iterable[float]) -> float:
    return statistics.median(values)


def results_table(
    lazy: Sequence[StartResult],
    full: Sequence[StartResult],
    title: str,
    second: Sequence[StartResult] = (),
    lazy_sources: Sequence[LayerSources] = (),
    second_sources: Sequence[LayerSources] = (),
) -> Table:
    """damselfly (lazy) against overlayfs (full pull), medians over the runs, and their ratios; with
    `second`, a column for the second node's lazy start (no ratio: the ratios compare the two ways to
    start on the first node), and with `lazy_sources` and `second_sources` two rows for where the
    device daemons got their layer bytes (registry, peers)."""
    rows: list[tuple[str, Callable[[StartResult], float], Callable[[float], str]]] = [
        ("seconds to first output", lambda r: r.first_output_s, "{:.2f} s".format),
        ("registry bytes served", lambda r: r.registry_bytes, fmt_bytes),
        ("node CPU-seconds", lambda r: r.node_cpu_s, "{:.2f} s".format),
    ]
    runs = len(lazy)
    table = Table(title=title, title_justify="left", caption_justify="left")
    table.add_column("cold start" + (f" (median of {runs})" if runs > 1 else ""))
    table.add_column("damselfly, lazy", justify="right")
    if second:
        table.add_column("2nd node, lazy", justify="right")
    table.add_column("overlayfs, full pull", justify="right")
    table.add_column("overlayfs / damselfly", justify="right")
    for name, what, fmt in rows:
        ours, theirs = _med(what(r) for r in lazy), _med(what(r) for r in full)
        middle = [fmt(_med(what(r) for r in second))] if second else []
        table.add_row(name, fmt(ours), *middle, fmt(theirs), _ratio(theirs, ours))
    if lazy_sources or second_sources:
        source_rows: list[tuple[str, Callable[[LayerSources], float]]] = [
            ("layer bytes from the registry", lambda s: s.registry_bytes),
            ("layer bytes from peers", lambda s: s.peer_bytes),
        ]
        for name, count in source_rows:
            cells = [fmt_bytes(_med(count(s) for s in lazy_sources)) if lazy_sources else "-"]
            if second:
                cells.append(fmt_bytes(_med(count(s) for s in second_sources)) if second_sources else "-")
            table.add_row(name, *cells, "-", "")
    return table
