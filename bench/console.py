#!/usr/bin/env python3
"""What the console costs: its own CPU while idle, and the server's cost of serving
one console during a backup (issue 9's budgets: ≤ 0.5 % and ≤ 1 % of a core, the
backup no slower with the console attached).

    bench/console.py --nbackup target/release/nbackup [--size 1G] [--rounds 3] [--idle 30]

A real server process; the real console in tmux at 160×48 against its admin
socket. Backups of the bench tree (`nbackup backup`, gzip, 2 streams) alternate
without and with the console attached in ABBA order, so noise and order effects
hit both alike; medians and the median of paired differences are reported. CPU from /proc/<pid>/stat (user+sys).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the shared harness: PKI, server process, measured backups)


class Console:
    """`nbackup console` in a tmux server of its own."""

    def __init__(self, exe, socket, name):
        self.tmux = ["tmux", "-L", f"nbackup-bench-{os.getpid()}-{name}", "-f", "/dev/null"]
        cmd = f"env TERM=xterm-256color {exe} console --socket {socket}"
        subprocess.run(self.tmux + ["new-session", "-d", "-s", "c", "-x", "160", "-y", "48", cmd], check=True)
        subprocess.run(self.tmux + ["resize-window", "-t", "c", "-x", "160", "-y", "48"], check=True)
        deadline = time.monotonic() + 20
        while "● live" not in self.screen():
            if time.monotonic() > deadline:
                sys.exit("the console did not connect:\n" + self.screen())
            time.sleep(0.1)
        out = subprocess.run(self.tmux + ["display-message", "-p", "-t", "c", "#{pane_pid}"], capture_output=True, text=True)
        self.pid = int(out.stdout.strip())

    def screen(self):
        return subprocess.run(self.tmux + ["capture-pane", "-p", "-t", "c"], capture_output=True, text=True).stdout

    def stop(self):
        subprocess.run(self.tmux + ["kill-server"], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbackup", required=True)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30, help="seconds of each idle measurement")
    ap.add_argument("--data", help="dataset directory (created if missing)")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--many", type=int, default=10, help="consoles at once for the amplified idle measurement")
    args = ap.parse_args()
    if args.out:
        args.out = os.path.abspath(args.out)
    if not shutil.which("tmux"):
        sys.exit("tmux is required (apt-get install tmux)")
    exe = os.path.abspath(args.nbackup)
    work = tempfile.mkdtemp(prefix="nbackup-console-bench-")
    data = os.path.abspath(args.data or os.path.join(work, "data"))
    if not os.path.isdir(data):
        subprocess.run([sys.executable, os.path.join(HERE, "make-dataset.py"), "--size", args.size, data], check=True)
    source_bytes = bench.tree_bytes(data)
    subprocess.run(["tar", "-cf", "/dev/null", data], check=True, stderr=subprocess.DEVNULL)  # warm the cache
    os.chdir(work)
    nb = bench.Nbackup(exe, work, 6, 3)
    socket = os.path.join(work, "server.sock")
    agent = nb.agent_config("agent", f"127.0.0.1:{nb.port}", [("tree", "gz", 2, "", data)], "256mb")
    results = {"size": source_bytes, "rounds": args.rounds}
    try:
        # Idle: the server alone, then with a console watching; the console's own cost.
        s0 = bench.proc_cpu(nb.server.pid)
        time.sleep(args.idle)
        server_idle = (bench.proc_cpu(nb.server.pid) - s0) / args.idle
        console = Console(exe, socket, "idle")
        s0, c0 = bench.proc_cpu(nb.server.pid), bench.proc_cpu(console.pid)
        time.sleep(args.idle)
        server_watched = (bench.proc_cpu(nb.server.pid) - s0) / args.idle
        console_idle = (bench.proc_cpu(console.pid) - c0) / args.idle
        console.stop()
        # One console's cost is near the clock-tick floor: watch with many at once.
        many = [Console(exe, socket, f"many{i}") for i in range(args.many)]
        s0 = bench.proc_cpu(nb.server.pid)
        time.sleep(args.idle)
        server_many = (bench.proc_cpu(nb.server.pid) - s0) / args.idle
        for c in many:
            c.stop()
        results.update(server_idle=server_idle, server_watched_idle=server_watched, console_idle=console_idle,
                       server_many_idle=server_many, many=args.many)

        runs = {"without": [], "with": []}
        for r in range(args.rounds):
            # ABBA order: the second backup of a pair costs the server more (the
            # first one's archive is rotated out and written back meanwhile), which
            # a fixed order would charge to the console.
            for mode in ("without", "with") if r % 2 == 0 else ("with", "without"):
                console = Console(exe, socket, f"{mode}{r}") if mode == "with" else None
                c0 = bench.proc_cpu(console.pid) if console else 0
                run = nb.backup(agent, "tree")
                if console:
                    run["console_cpu"] = bench.proc_cpu(console.pid) - c0
                    console.stop()
                runs[mode].append(run)
                print(f"round {r + 1} {mode:>7} console: {run['wall']:.2f} s, server {run['server_cpu']:.2f} CPU-s", flush=True)
        results["runs"] = runs
    finally:
        nb.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = lambda mode, key: statistics.median(r[key] for r in runs[mode])  # noqa: E731
    wall_without, wall_with = med("without", "wall"), med("with", "wall")
    cpu_without, cpu_with = med("without", "server_cpu"), med("with", "server_cpu")
    serving = (cpu_with - cpu_without) / wall_with
    paired = statistics.median(
        (w["server_cpu"] - wo["server_cpu"]) / w["wall"] for wo, w in zip(runs["without"], runs["with"]))
    print()
    print(f"idle: server {server_idle * 100:.2f} % of a core alone, {server_watched * 100:.2f} % watched "
          f"(serving one console {(server_watched - server_idle) * 100:.2f} %); console {console_idle * 100:.2f} %")
    print(f"idle with {args.many} consoles: server {server_many * 100:.2f} % "
          f"({(server_many - server_idle) / args.many * 100:.3f} % of a core per console)")
    print(f"backup of {source_bytes / 2**30:.2f} GiB, medians of {args.rounds}: "
          f"{wall_without:.2f} s without the console, {wall_with:.2f} s with (ratio {wall_with / wall_without:.3f})")
    print(f"server CPU {cpu_without:.2f} s without, {cpu_with:.2f} s with: serving the console "
          f"{serving * 100:.2f} % of a core during the backup (median of paired differences {paired * 100:.2f} %); "
          f"console {med('with', 'console_cpu') / wall_with * 100:.2f} %")
    results.update(wall_without=wall_without, wall_with=wall_with, server_cpu_without=cpu_without,
                   server_cpu_with=cpu_with, serving_share=serving, serving_share_paired=paired)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
