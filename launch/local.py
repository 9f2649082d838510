"""Start N JAX processes of one job on this machine (testing multi-host code on one box).

    python launch/local.py --num_processes 2 [--devices_per_process 2] [--port 8476] \
        [--dry_run] -- python -m ldm_jax.train --config ... --workdir ...

Each process gets the coordinates through LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES /
LDM_JAX_PROCESS_ID (read by ldm_jax.parallel.distributed) and, with
--devices_per_process, that many fake CPU devices. Output lines are prefixed with the
rank. When a process fails, the launcher names its rank and exit code, gives the others
--grace_s seconds to exit on their own (they notice the dead peer through the
distributed runtime's heartbeat), then stops them; it exits with the first failure's code.
SIGTERM / SIGINT to the launcher is forwarded to every process (a preemption drill).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, args, port: int) -> dict[str, str]:
    env = {
        "LDM_JAX_COORDINATOR": f"127.0.0.1:{port}",
        "LDM_JAX_NUM_PROCESSES": str(args.num_processes),
        "LDM_JAX_PROCESS_ID": str(rank),
    }
    if args.devices_per_process:
        flags = os.environ.get("XLA_FLAGS", "")
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.devices_per_process}"
        ).strip()
    return env


def _pump(rank: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{rank}] {line}")
        out.flush()


def launch(args) -> int:
    port = args.port or free_port()
    if args.dry_run:
        for rank in range(args.num_processes):
            env = process_env(rank, args, port)
            assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"{assigns} {shlex.join(args.command)}")
        return 0
    procs = []
    for rank in range(args.num_processes):
        env = {**os.environ, **process_env(rank, args, port)}
        p = subprocess.Popen(
            args.command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=_pump, args=(rank, p.stdout, sys.stdout), daemon=True).start()
        procs.append(p)

    def forward(signum, frame):
        del frame
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed: tuple[int, int] | None = None
    deadline = None
    while any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            rc = p.poll()
            if rc not in (None, 0) and failed is None:
                failed = (rank, rc)
                print(
                    f"[launcher] rank {rank} exited with code {rc}; waiting up to "
                    f"{args.grace_s:.0f} s for the other ranks",
                    file=sys.stderr,
                    flush=True,
                )
                deadline = time.time() + args.grace_s
        if deadline is not None and time.time() > deadline:
            for rank, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launcher] stopping rank {rank}", file=sys.stderr, flush=True)
                    p.kill()
        time.sleep(0.1)
    codes = [p.wait() for p in procs]
    if failed is None:
        failed = next(((r, c) for r, c in enumerate(codes) if c != 0), None)
    if failed is not None:
        others = {r: c for r, c in enumerate(codes) if r != failed[0]}
        print(
            f"[launcher] job failed: rank {failed[0]} died first (exit code {failed[1]}); "
            f"other ranks exited with {others}",
            file=sys.stderr,
            flush=True,
        )
        return failed[1] if failed[1] > 0 else 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=0, help="fake CPU devices")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--grace_s", type=float, default=60.0)
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to run after --")
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
