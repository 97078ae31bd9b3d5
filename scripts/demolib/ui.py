"""What the demo shows: one line per step, spinners and bars for the long ones (on a terminal only; in a
pipe or a CI log, plain lines), and the results table."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence

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

from .coldstart import StartResult

MB = 1_000_000


class Ui:
    def __init__(self, total_steps: int) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        if not self.live:  # a log: wide enough for the table on one line per row
            self.console = Console(highlight=False, soft_wrap=True, width=110)
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


def results_table(lazy: Sequence[StartResult], full: Sequence[StartResult], title: str) -> Table:
    """damselfly (lazy) against overlayfs (full pull), medians over the runs, and their ratios."""

    def med(results: Sequence[StartResult], what: Callable[[StartResult], float]) -> float:
        return statistics.median(what(r) for r in results)

    rows = [
        ("seconds to first output", lambda r: r.first_output_s, "{:.2f} s"),
        ("registry bytes served", lambda r: r.registry_bytes / MB, "{:.1f} MB"),
        ("node CPU-seconds", lambda r: r.node_cpu_s, "{:.2f} s"),
    ]
    runs = len(lazy)
    table = Table(title=title, title_justify="left", caption_justify="left")
    table.add_column("cold start" + (f" (median of {runs})" if runs > 1 else ""))
    table.add_column("damselfly, lazy", justify="right")
    table.add_column("overlayfs, full pull", justify="right")
    table.add_column("overlayfs / damselfly", justify="right")
    for name, what, fmt in rows:
        ours, theirs = med(lazy, what), med(full, what)
        table.add_row(name, fmt.format(ours), fmt.format(theirs), _ratio(theirs, ours))
    return table
