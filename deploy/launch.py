"""Run `longmem serve` on a Ray head node: wait for the cluster, supervise, stop cleanly.

    python -m deploy.launch longmem serve --address auto --shards 2 --gpus-per-shard 1 ...
    python -m deploy.launch --stop        # SIGTERM the running one and wait (pre-stop hook)

Both cluster paths (`ray up` and KubeRay) start the service right after `ray start --head`,
when the GPU worker nodes are usually still booting. This wrapper therefore:

1. waits until the Ray cluster answers and has `shards * gpus-per-shard` GPUs (read from the
   serve command itself, so the number is written once), for at most `--wait-timeout` s;
2. runs the serve command as a child, forwarding SIGINT/SIGTERM to it (the service saves a
   last snapshot when it stops), and restarts it with back-off when it exits with an error
   (e.g. its placement group could not be placed yet); a clean exit ends the wrapper;
3. writes its pid to `--pid-file`, so `--stop` (a Kubernetes preStop hook, or `ray exec`)
   can stop the service before Ray itself goes down.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PID_FILE = "/tmp/longmem-serve.pid"


def log(message: str) -> None:
    print(f"[deploy.launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_serve(command: list[str]) -> argparse.Namespace:
    """Parse `longmem serve ...` with the real CLI parser (raises SystemExit when it is wrong)."""
    if len(command) < 2 or Path(command[0]).name != "longmem" or command[1] != "serve":
        raise SystemExit(f"deploy.launch runs 'longmem serve ...', got {command!r}")
    from memory_service.cli import build_parser

    return build_parser().parse_args(command[1:])


def required_gpus(serve: argparse.Namespace) -> float:
    """GPUs the shards' placement group asks for (0 when --gpus-per-shard is not given)."""
    return serve.shards * (serve.gpus_per_shard or 0.0)


def wait_for_cluster(address: str, gpus: float, timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until Ray at `address` answers and has `gpus` GPUs; SystemExit after timeout_s."""
    import ray

    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            have = ray.cluster_resources().get("GPU", 0.0)
            if have >= gpus:
                log(f"Ray cluster up with {have:g} GPUs (the shards need {gpus:g})")
                ray.shutdown()
                return
            if have != seen:
                log(f"waiting for GPUs: {have:g} of {gpus:g}")
                seen = have
        except Exception as e:  # noqa: BLE001  Ray not started yet, or going through a restart
            if seen != "no ray":
                log(f"waiting for Ray at {address!r}: {e}")
                seen = "no ray"
        if time.monotonic() > deadline:
            ray.shutdown()
            raise SystemExit(f"gave up after {timeout_s:.0f}s waiting for {gpus:g} GPUs on Ray")
        time.sleep(poll_s)


def supervise(command: list[str], max_backoff_s: float = 60.0) -> int:
    """Run `command` until it exits cleanly or we are told to stop; restart it on errors."""
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    backoff = 5.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        rc = child.wait()
        if stopping or rc == 0:
            return rc
        if time.monotonic() - started > 600:
            backoff = 5.0  # it ran a good while: not a crash loop
        log(f"{command[0]} {command[1]} exited with {rc}; restarting in {backoff:.0f}s")
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.2)
        if stopping:
            return rc
        backoff = min(2 * backoff, max_backoff_s)


def stop(pid_file: str, timeout_s: float) -> int:
    """SIGTERM the wrapper named in pid_file and wait until it is gone."""
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        log(f"no running service ({pid_file})")
        return 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            log("service stopped")
            return 0
        time.sleep(0.5)
    log(f"service (pid {pid}) still running after {timeout_s:.0f}s")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for Ray and its GPUs (default 1800)",
    )
    parser.add_argument("--pid-file", default=DEFAULT_PID_FILE)
    parser.add_argument("--stop", action="store_true", help="stop the running service")
    parser.add_argument("--stop-timeout", type=float, default=90.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="longmem serve ...")
    args = parser.parse_args(argv)
    if args.stop:
        return stop(args.pid_file, args.stop_timeout)
    serve = parse_serve(args.command)
    if serve.address:
        wait_for_cluster(serve.address, required_gpus(serve), args.wait_timeout)
    Path(args.pid_file).write_text(f"{os.getpid()}\n")
    try:
        return supervise(args.command)
    finally:
        Path(args.pid_file).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
