#!/usr/bin/env python3
"""``make demo``: a converted image starts lazily with damselfly, next to the same image on overlayfs.

    demo.py [--work-dir DIR] [--image-cache DIR] [--small] [--runs N] [--target-mb MB]

Needs root (containerd, mounts, loop devices). Steps, each announced:

1. start a loopback ``docker-registry`` (free port, own storage), a private containerd (own root,
   state, sockets, config; proxy plugin ``damselfly`` = the demo's own `damselfly serve`) and that
   `damselfly serve` (own config, root, socket, device-daemon state): nothing of a containerd or
   damselfly already on the machine is used or touched;
2. build the sample image with ``scripts/build_debian_image.py`` (Debian bookworm minbase + python3 +
   a generated payload: >= ``--target-mb`` MB uncompressed; ``--small`` / ``DEMO_SMALL=1``: busybox and
   a 16 MB payload), cached in ``--image-cache``, and push it to the registry byte for byte;
3. ``damselfly convert`` it to the ``:damselfly`` tag (converted layers cached in the work dir);
4. cold start, lazily: ``damselfly rpull`` + ``ctr run --snapshotter damselfly IMAGE ID python3 -c
   'print("hello")'`` (busybox: ``sh -c 'echo hello'``);
5. cold start, full pull: ``ctr image pull`` + ``ctr run`` of the original image on containerd's
   overlayfs; (4 and 5 alternate in order with ``--runs N``; each starts cold: page cache dropped,
   the image's content and snapshots removed from containerd, damselfly's root and device cache
   emptied)
6. print the table: seconds from pull start to the container's first output line, bytes the registry
   served, node CPU-seconds (`demolib.coldstart`), and ratios.

Then, and also on Ctrl-C (SIGINT, SIGTERM) or a failure (which names the step and the log to read),
everything it started is stopped and removed: processes by pid, mounts and loop devices by path, the
cgroup, the run directory. What stays in the work directory: ``cache/`` (converted layers), ``logs/``
and ``result.json``; built images stay in ``--image-cache``.

Work directory (default ``bench/work/demo``; ``DEMO_WORK_DIR``)::

    run/            removed at the end: registry/, containerd/, serve/ (sockets, roots, state)
    cache/convert/  damselfly convert --cache-dir (kept)
    logs/           registry, containerd, serve, devd (device daemon), convert, runs (kept)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from build_debian_image import DEFAULT_CACHE, BuiltImage, ImageSpec, build_image
from demolib import procs
from demolib.coldstart import Bench, StartResult, cold_start
from demolib.containerd import Containerd
from demolib.registry import Registry, layer_bytes, push_layout
from demolib.serve import Serve, damselfly_argv
from demolib.ui import MB, Ui, results_table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / "bench" / "work" / "demo"
NAMESPACE = "damselfly-demo"
SNAPSHOTTER = "damselfly"
STEPS = (
    "start the registry, containerd and damselfly serve",
    "build the sample image and push it",
    "convert it with damselfly convert",
    "cold start, lazily: damselfly rpull + ctr run --snapshotter damselfly",
    "cold start, full pull: ctr image pull + ctr run (overlayfs)",
    "results",
)
#: Where to look when a step fails (below logs/), besides what the message names.
STEP_LOGS = (
    ("registry.log", "containerd.log", "serve.log"),
    (),
    ("convert.log",),
    ("runs.log", "serve.log", "devd.log"),
    ("runs.log", "containerd.log"),
    (),
)
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with its NUL)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (a KeyboardInterrupt, so no ``except Exception`` swallows it)."""


class StepError(Exception):
    def __init__(self, step: int, cause: BaseException) -> None:
        super().__init__(f"step {step}: {cause}")
        self.step = step
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class Options:
    work: Path
    image_cache: Path
    small: bool
    runs: int
    target_mb: int


class Demo:
    def __init__(self, opts: Options, ui: Ui) -> None:
        self.opts = opts
        self.ui = ui
        self.run_dir = opts.work / "run"
        self.logs = opts.work / "logs"
        self.cache = opts.work / "cache"
        tag = hashlib.sha256(str(opts.work).encode()).hexdigest()[:10]
        self.cgroup = procs.NodeCgroup(f"damselfly-demo-{tag}")
        self.registry = Registry(self.run_dir / "registry", self.logs / "registry.log")
        self.serve = Serve(
            self.run_dir / "serve",
            self.run_dir / "serve" / "snapshotter.sock",
            self.logs / "serve.log",
            self.cgroup.wrap,
        )
        self.containerd = Containerd(
            self.run_dir / "containerd",
            self.logs / "containerd.log",
            namespace=NAMESPACE,
            proxy_plugins={SNAPSHOTTER: str(self.serve.socket)},
            wrap=self.cgroup.wrap,
        )
        self.bench = Bench(self.containerd.env(), self.registry, self.cgroup, self.logs / "runs.log")
        self.children = self.bench.children
        self.step = 0
        self.serve_fresh = False

    # -- steps ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def announce(self, n: int, title: str | None = None) -> Iterator[None]:
        self.step = n
        self.ui.step(n, title or STEPS[n - 1])
        try:
            yield
        except (Interrupted, StepError):
            raise
        except Exception as e:
            raise StepError(n, e) from e

    def prepare(self) -> None:
        """Clean what an earlier demo in this work dir may have left (killed with SIGKILL, say)."""
        for d in (self.logs, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        stale = procs.sweep(self.run_dir) + self.cgroup.remove() + procs.sweep(self.cache)
        if stale:
            self.ui.warn(f"removed what an earlier run left: {'; '.join(stale)}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        for name in ("registry.log", "containerd.log", "serve.log", "devd.log", "convert.log", "runs.log"):
            (self.logs / name).unlink(missing_ok=True)
        (self.opts.work / "result.json").unlink(missing_ok=True)
        longest = self.containerd.address + ".ttrpc"
        if len(os.fsencode(longest)) > SUN_PATH_MAX:
            raise OSError(
                f"the socket path {longest} is too long for a unix socket; use a shorter --work-dir"
            )

    def start_services(self) -> None:
        self.cgroup.create()
        self.registry.start()
        self.ui.info(
            f"registry: http://{self.registry.host} (pid {self.registry.pid}), storage {self.registry.dir}"
        )
        self.serve.start()
        self.serve_fresh = True
        self.ui.info(
            f"damselfly serve: {self.serve.socket} (pid {self.serve.pid}), config {self.serve.config_path}"
        )
        self.containerd.start()
        self.ui.info(
            f"containerd: {self.containerd.address} (pid {self.containerd.pid}), namespace {NAMESPACE}"
        )
        self.ui.info(f"node cgroup (CPU accounting): {self.cgroup.top}")

    def image_spec(self) -> ImageSpec:
        if self.opts.small:
            return ImageSpec(variant="busybox", payload_mb=16)
        return ImageSpec(variant="debian", target_mb=self.opts.target_mb)

    def build_and_push(self) -> tuple[BuiltImage, str]:
        spec = self.image_spec()
        self.ui.info(f"building (or reusing) the {spec.variant} image in {self.opts.image_cache}")
        image = build_image(spec, self.opts.image_cache)
        self.ui.info(
            f"image: {image.layout_dir} ({'cached' if image.cached else f'built in {image.seconds:.0f}s'}), "
            f"{len(image.layers)} layers, {image.uncompressed_size / MB:.0f} MB uncompressed, "
            f"{image.compressed_size / MB:.0f} MB gzip"
        )
        name = "demo/busybox" if self.opts.small else "demo/python"
        ref = f"{self.registry.host}/{name}:latest"
        self.ui.info(f"pushing to {ref}, byte for byte")
        with self.ui.bar("push (hash + upload)", 2 * image.compressed_size) as advance:
            push_layout(
                self.registry.host, Path(image.layout_dir), image.manifest_digest, name, "latest", advance
            )
        return image, ref

    def convert(self, src: str) -> str:
        dst = src.rsplit(":", 1)[0] + ":damselfly"
        argv = [*damselfly_argv(), "convert", src, dst, "--cache-dir", str(self.cache / "convert")]
        log = self.logs / "convert.log"
        started = time.monotonic()
        self.ui.info(f"damselfly convert {src} {dst}  (log: {log})")
        with log.open("ab") as out, self.ui.status("converting") as update:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.children.append(proc)  # until it ends: an interrupted demo stops it with SIGINT
            while proc.poll() is None:
                update(f"{time.monotonic() - started:.0f}s  {_last_line(log)[:60]}")
                time.sleep(0.2)
            self.children.remove(proc)
        if proc.returncode != 0:
            raise OSError(
                f"damselfly convert exited with status {proc.returncode}: {_last_line(log)}; see {log} "
                f"(converted layers are reused from {self.cache / 'convert'}: delete it to start afresh)"
            )
        self.ui.info(_last_line(log))
        return dst

    def run_argv(self, ref: str, cid: str, command: list[str], snapshotter: str) -> list[str]:
        """``ctr run --rm``, in the node's cgroup; the container in its own, below the containers'."""
        cgroup = f"{self.cgroup.containers_parent}/{cid}"
        args = self.containerd.run_args(ref, cid, command, snapshotter=snapshotter, cgroup=cgroup)
        return self.containerd.wrap(self.containerd.argv(args))

    def lazy_start(self, ref: str, command: list[str], expect: str) -> StartResult:
        if not self.serve_fresh:  # a cold node: no snapshots, no device cache
            self.containerd.image_rm(ref, self.logs / "runs.log")
            self.serve.reset()
        self.serve_fresh = False
        pull = self.cgroup.wrap(
            [*damselfly_argv(), "rpull", ref, "--address", self.containerd.address, "--namespace", NAMESPACE]
        )
        run = self.run_argv(ref, "demo-lazy", command, SNAPSHOTTER)
        with self.ui.status("damselfly rpull, then ctr run, from a cold node"):
            result = cold_start(self.bench, "damselfly lazy", pull, run, expect)
        pid = self.serve.daemon_pid()
        self.ui.info(
            f"first output after {result.first_output_s:.2f}s (rpull {result.pull_s:.2f}s), "
            f"registry served {result.registry_bytes / MB:.1f} MB, node CPU {result.node_cpu_s:.2f}s; "
            f"device daemon pid {pid}"
        )
        self.containerd.image_rm(ref, self.logs / "runs.log")
        return result

    def full_start(self, ref: str, command: list[str], expect: str) -> StartResult:
        self.containerd.image_rm(ref, self.logs / "runs.log")
        pull = self.cgroup.wrap(self.containerd.argv(["image", "pull", "--plain-http", ref]))
        run = self.run_argv(ref, "demo-full", command, "overlayfs")
        with self.ui.status("ctr image pull, then ctr run, from a cold node"):
            result = cold_start(self.bench, "overlayfs full pull", pull, run, expect)
        self.ui.info(
            f"first output after {result.first_output_s:.2f}s (pull {result.pull_s:.2f}s), "
            f"registry served {result.registry_bytes / MB:.1f} MB, node CPU {result.node_cpu_s:.2f}s"
        )
        self.containerd.image_rm(ref, self.logs / "runs.log")
        return result

    def run(self) -> dict[str, object]:
        with self.announce(1):
            self.prepare()
            self.start_services()
        with self.announce(2):
            image, src = self.build_and_push()
        with self.announce(3):
            dst = self.convert(src)
        if self.opts.small:
            command, expect = ["sh", "-c", "echo hello"], "hello"
        else:
            command, expect = ["python3", "-c", 'print("hello")'], "hello"
        lazy: list[StartResult] = []
        full: list[StartResult] = []
        for i in range(self.opts.runs):
            suffix = f" (run {i + 1}/{self.opts.runs})" if self.opts.runs > 1 else ""
            order = [(4, "lazy"), (5, "full")] if i % 2 == 0 else [(5, "full"), (4, "lazy")]
            for n, kind in order:
                with self.announce(n, STEPS[n - 1] + suffix):
                    if kind == "lazy":
                        lazy.append(self.lazy_start(dst, command, expect))
                    else:
                        full.append(self.full_start(src, command, expect))
        with self.announce(6):
            converted = layer_bytes(dst)
            what = (
                "busybox + 16 MB payload"
                if self.opts.small
                else "Debian bookworm minbase + python3 + payload"
            )
            title = (
                f"{what}: {image.uncompressed_size / MB:.0f} MB uncompressed, "
                f"{image.compressed_size / MB:.0f} MB gzip, {converted / MB:.0f} MB converted (lz4)"
            )
            self.ui.console.print(results_table(lazy, full, title))
            self.ui.info(
                "registry bytes and CPU-seconds: from the pull's start until `ctr run` returned; node CPU = "
                "containerd + shims + damselfly serve + device daemon + ctr/rpull (cgroup), not the container"
            )
        return {
            "image": {
                **image.to_json(),
                "converted_layer_bytes": converted,
                "ref": src,
                "converted_ref": dst,
            },
            "command": command,
            "damselfly_lazy": [dataclasses.asdict(r) for r in lazy],
            "overlayfs_full": [dataclasses.asdict(r) for r in full],
        }

    # -- teardown ---------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Stop and remove everything this run started; return what had to be undone by force."""
        undone: list[str] = []
        for proc in list(self.children):  # convert and rpull clean up after themselves on SIGINT
            note = procs.stop_popen(proc, signal.SIGINT, 60.0)
            undone += [note] if note else []
        # containerd first, while the snapshotter it may still call is up; the device daemon last.
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            ("containerd", self.containerd.stop),
            ("damselfly serve", self.serve.stop),
            ("device daemon", self.serve.release),
            ("registry", self._stop_registry),
        ]
        for what, stop in steps:
            try:
                notes = stop()
            except Exception as e:  # keep going: everything else must still be undone
                undone.append(f"{what}: {e}")
                continue
            # what a clean stop does anyway (the chain mounts and the daemon outlive `serve` on purpose)
            undone += [n for n in notes if not n.startswith(("umount", "losetup", "device daemon"))]
        self._keep_devd_log()
        undone += self.cgroup.remove()
        undone += procs.sweep(self.run_dir) + procs.sweep(self.cache)
        # a converter's work directory, left if it was killed (it removes its own otherwise)
        for work in sorted((self.cache / "convert").glob("work-*")):
            if not procs.mounts_below(work):
                undone.append(f"converter work directory {work}")
                shutil.rmtree(work, ignore_errors=True)
        if self.run_dir.exists() and not procs.mounts_below(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return undone

    def _stop_registry(self) -> list[str]:
        note = self.registry.stop()
        return [f"registry: {note}"] if note else []

    def _keep_devd_log(self) -> None:
        devd = self.serve.state / "devd.log"
        if devd.exists():
            with (self.logs / "devd.log").open("ab") as out, devd.open("rb") as f:
                shutil.copyfileobj(f, out)

    def leftovers(self) -> list[str]:
        """What of this run is still there (should be nothing)."""
        found = [
            f"process {pid}: {' '.join(argv)[:100]}" for pid, argv in procs.processes_naming(self.run_dir)
        ]
        found += [f"mount {mp}" for mp in procs.mounts_below(self.opts.work)]
        found += [f"loop device {dev}" for dev in procs.loops_below(self.opts.work)]
        found += [f"socket {s}" for s in procs.sockets_below(self.opts.work)]
        found += [f"cgroup {d}" for d in self.cgroup.dirs()]
        found += [f"process {pid} (device daemon)" for pid in self.serve.daemon_pids if procs.alive(pid)]
        if self.run_dir.exists():
            found.append(f"directory {self.run_dir}")
        return found


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("DEMO_WORK_DIR", DEFAULT_WORK)))
    p.add_argument("--image-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--small", action="store_true", default=os.environ.get("DEMO_SMALL", "") not in ("", "0"))
    p.add_argument("--runs", type=int, default=int(os.environ.get("DEMO_RUNS", "1")))
    p.add_argument("--target-mb", type=int, default=1100, help="uncompressed size of the Debian image")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be at least 1")
    return Options(a.work_dir.resolve(), a.image_cache.resolve(), a.small, a.runs, a.target_mb)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    ui = Ui(len(STEPS))
    if os.geteuid() != 0:
        ui.error(
            "make demo needs root: it runs containerd and runc, mounts filesystems and attaches loop devices."
        )
        ui.error("Run it as root: sudo make demo")
        return 1
    opts.work.mkdir(parents=True, exist_ok=True)
    lock = (opts.work / ".lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ui.error(f"another demo is running in {opts.work}; wait for it or use --work-dir")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    demo = Demo(opts, ui)
    kind = "small: busybox" if opts.small else "Debian + python3"
    ui.console.print(f"[bold]damselfly demo[/] ({kind}), work dir {opts.work}, pid {os.getpid()}")
    status = 0
    try:
        result = demo.run()
        (opts.work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    except Interrupted as e:
        ui.error(
            f"interrupted ({e}) during step {demo.step} ({STEPS[demo.step - 1] if demo.step else 'setup'})"
        )
        status = 130
    except StepError as e:
        logs = [str(opts.work / "logs" / name) for name in STEP_LOGS[e.step - 1]]
        ui.error(f"demo failed at step {e.step} ({STEPS[e.step - 1]}): {e.cause}")
        if logs:
            ui.error(f"read: {', '.join(logs)}")
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not leave half of it behind
        ui.console.print(
            "[bold]==> cleanup[/]: stopping and removing everything the demo started "
            "(Ctrl-C is ignored until done)"
        )
        undone = demo.cleanup()
        if undone:
            ui.warn(f"had to force: {'; '.join(undone)}")
        left = demo.leftovers()
        if left:
            ui.error(f"left behind (remove by hand): {'; '.join(left)}")
            status = status or 1
        else:
            ui.info(
                f"nothing left running; kept: {opts.work / 'cache'}, {opts.work / 'logs'}, {opts.image_cache}"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
