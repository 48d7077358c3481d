#!/usr/bin/env python3
"""Benchmark nbackup against the plain pipelines a sysadmin would otherwise use.

    bench/bench.py --nbackup target/release/nbackup [--size 1G] [--rounds 3]

On the tree from bench/make-dataset.py it backs up over loopback (real server process,
real agent process, mutual TLS) with gzip and with zstd, with one stream and with N,
and in the same run measures `tar -cf - | pigz -p N -L` and `tar -cf - | zstd -T0 -L`
into a file at the same level. Runs are interleaved (nbackup, baseline, nbackup,
baseline, ...) so that noise from a shared machine hits both alike; medians are
reported with ratios.

Restore cases: the archive each backup just committed is restored over loopback by
`nbackup restore` (fetch over mutual TLS, SHA-256 check, decompress, safe extraction)
and, in the same round, extracted from the server's disk by `tar -xf` (GNU tar with
gzip or zstd): both into an empty directory on the same filesystem, the directory
removed (untimed) after each run.

A latency case then backs up a smaller tree through bench/netsim.py (one-way delay,
per-connection window, shared bandwidth cap) with one stream and with the autoscaler.

Reported per case: MB/s of *source* data (bytes of file content / wall seconds), CPU
seconds (user+sys; agent and server separately for nbackup, tar+compressor for the
pipelines), peak RSS, archive size. Results go to stdout as a table and to a JSON file.

The tree is read once before measuring so every run sees the same (warm) page cache.

`--before EXE` also runs an earlier build (its own server, port and storage) on the
backup cases, each right after the current build's run of the same case, so that a
change is measured before and after in one run on the same noise.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def tree_bytes(root):
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def tree_files(root):
    return sum(len(files) for _, _, files in os.walk(root))


def run_measured(argv, stdout=subprocess.DEVNULL, stdin=None):
    """Runs argv, returns (wall, cpu_seconds, maxrss_bytes, exit_status)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=stdout, stdin=stdin, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{argv[0]} failed ({code}): {err}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def pipeline(tar_argv, comp_argv, out_path):
    """tar | compressor > file, both measured with wait4."""
    t0 = time.monotonic()
    with open(out_path, "wb") as out:
        tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        comp = subprocess.Popen(comp_argv, stdin=tar.stdout, stdout=out, stderr=subprocess.DEVNULL)
        tar.stdout.close()
        _, s1, ru1 = os.wait4(tar.pid, 0)
        _, s2, ru2 = os.wait4(comp.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(s2) != 0:
        sys.exit(f"{comp_argv[0]} failed")
    cpu = ru1.ru_utime + ru1.ru_stime + ru2.ru_utime + ru2.ru_stime
    rss = max(ru1.ru_maxrss, ru2.ru_maxrss) * 1024
    return wall, cpu, rss, os.path.getsize(out_path)


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid):
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) so each run is measured alone.
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Nbackup:
    def __init__(self, exe, work, gzip_level, zstd_level, storage_extra=None):
        """storage_extra: YAML lines appended to a storage's section, by storage (gz, zs)."""
        extra = storage_extra or {}
        self.exe, self.work = exe, work
        os.makedirs(work, exist_ok=True)
        pki = os.path.join(work, "pki")
        for args in (
            ["cert", "init-ca", "--out", pki],
            ["cert", "issue", "--ca", pki, "--server", "127.0.0.1", "--out", os.path.join(pki, "server")],
            ["cert", "issue", "--ca", pki, "--agent", "bench", "--out", os.path.join(pki, "bench")],
        ):
            subprocess.run([exe] + args, check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        with open(os.path.join(work, "server.yaml"), "w") as f:
            f.write(
                f'server:\n  listen: "127.0.0.1:{self.port}"\n  max_streams_per_session: 16\n'
                "tls:\n  ca_cert: pki/ca.crt\n  server_cert: pki/server.crt\n  server_key: pki/server.key\n"
                "state_dir: state\nadmin:\n  socket: server.sock\n"
                "storages:\n"
                f"  gz:\n    base_dir: storage/gz\n    max_backups: 1\n    compression: gzip\n    compression_level: {gzip_level}\n"
                + extra.get("gz", "")
                + f"  zs:\n    base_dir: storage/zs\n    max_backups: 1\n    compression: zstd\n    compression_level: {zstd_level}\n"
                + extra.get("zs", "")
            )
        self.server = subprocess.Popen(
            [exe, "server", "--config", os.path.join(work, "server.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for line in self.server.stderr:
            if b"server ready" in line:
                break
        else:
            sys.exit("server did not start")
        # Keep the server's stderr drained.
        self.drain = subprocess.Popen(["cat"], stdin=self.server.stderr, stdout=subprocess.DEVNULL)

    def agent_config(self, name, address, entries, buffer):
        """entries: list of (entry name, storage, parallels, extra yaml lines, source)."""
        body = ""
        for entry, storage, parallels, extra, source in entries:
            body += f"  - name: {entry}\n    storage: {storage}\n    parallels: {parallels}\n{extra}    sources:\n      - path: {source}\n"
        path = os.path.join(self.work, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(
                f'agent:\n  name: bench\nserver:\n  address: "{address}"\n'
                "tls:\n  ca_cert: pki/ca.crt\n  client_cert: pki/bench.crt\n  client_key: pki/bench.key\n"
                f"backups:\n{body}resume:\n  buffer_size: {buffer}\n"
            )
        return path

    def _client(self, argv, what):
        """Runs one `nbackup ... --json` client command; returns its report and the
        client's and server's CPU seconds and peak RSS while it ran."""
        pid = self.server.pid
        reset_hwm(pid)
        cpu0 = proc_cpu(pid)
        t0 = time.monotonic()
        p = subprocess.Popen([self.exe] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"nbackup {what} failed: {p.stderr.read().decode()} {out.decode()}")
        return json.loads(out), {
            "wall": wall,
            "agent_cpu": ru.ru_utime + ru.ru_stime,
            "agent_rss": ru.ru_maxrss * 1024,
            "server_cpu": proc_cpu(pid) - cpu0,
            "server_rss": proc_hwm(pid),
        }

    def backup(self, config, entry):
        report, m = self._client(["backup", "--json", "--entry", entry, "--config", config], "backup")
        return m | {"archive": report["bytes_sent"], "source": report["bytes_read"], "streams": report["streams"]}

    def restore(self, config, entry, dest):
        shutil.rmtree(dest, ignore_errors=True)
        report, m = self._client(
            ["restore", "--json", "--entry", entry, "--to", dest, "--config", config], "restore")
        if report.get("verified") is not True:
            sys.exit(f"restore not verified: {report}")
        shutil.rmtree(dest, ignore_errors=True)
        return m | {"archive": report["size"], "source": report["report"]["bytes"]}

    def archive_of(self, storage, entry):
        d = os.path.join(self.work, "storage", storage, "bench", entry)
        names = [n for n in os.listdir(d) if n.endswith((".tar.gz", ".tar.zst"))]
        return os.path.join(d, sorted(names)[-1])

    def stop(self):
        self.server.terminate()
        self.server.wait()
        self.drain.wait()


class Netsim:
    def __init__(self, upstream, delay_ms, window, rate):
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "netsim.py"), "--upstream", upstream,
             "--delay-ms", str(delay_ms), "--window", window, "--rate", rate],
            stdout=subprocess.PIPE,
        )
        line = self.p.stdout.readline().decode()
        if not line.startswith("listening "):
            sys.exit("netsim did not start")
        self.address = line.split()[1]

    def stop(self):
        self.p.terminate()
        self.p.wait()


def run_latency(args, nb, work):
    """One stream against the autoscaler through a long fat link."""
    data = os.path.join(work, "latency-data")
    if not os.path.isdir(data) or not os.listdir(data):
        subprocess.run([sys.executable, os.path.join(HERE, "make-dataset.py"), data, "--size", args.latency_size],
                       check=True, stdout=subprocess.DEVNULL)
    source_bytes = tree_bytes(data)
    sim = Netsim(f"127.0.0.1:{nb.port}", args.latency_ms, args.latency_window, args.latency_rate)
    try:
        cfg = nb.agent_config("latency", sim.address, [
            ("lat1", "zs", 1, "", data),
            ("latauto", "zs", 16, "    auto_scaler:\n      enabled: true\n      interval: 1s\n", data),
        ], args.buffer)
        runs = {"1 stream": [], "autoscaler": []}
        for r in range(args.latency_rounds):
            print(f"latency round {r + 1}/{args.latency_rounds}", flush=True)
            runs["1 stream"].append(nb.backup(cfg, "lat1"))
            runs["autoscaler"].append(nb.backup(cfg, "latauto"))
    finally:
        sim.stop()
    out = {"source_bytes": source_bytes, "delay_ms": args.latency_ms, "window": args.latency_window,
           "rate": args.latency_rate, "rounds": args.latency_rounds, "cases": {}}
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        out["cases"][name] = {"wall_s": wall, "mb_per_s": source_bytes / 1e6 / wall,
                              "streams": max(r["streams"] for r in rs), "runs": rs}
    out["ratio"] = out["cases"]["1 stream"]["wall_s"] / out["cases"]["autoscaler"]["wall_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbackup", required=True)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", help="dataset directory (created if missing)")
    ap.add_argument("--work", help="scratch directory (default: a temp dir)")
    ap.add_argument("--gzip-level", type=int, default=6)
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--parallels", default="2",
                    help="streams for the N-stream cases, a comma-separated sweep (e.g. 2,4; 1 to skip them)")
    ap.add_argument("--small-files", type=int, default=0,
                    help="also back up a tree of N files of 0-4 KiB (make-dataset.py --small-files), warm and cold")
    ap.add_argument("--small-data", help="directory of the small-files tree (created if missing)")
    ap.add_argument("--latency-rounds", type=int, default=1, help="rounds of the latency case (0 to skip it)")
    ap.add_argument("--latency-size", default="256M")
    ap.add_argument("--latency-ms", type=float, default=50, help="one-way delay")
    ap.add_argument("--latency-window", default="256k", help="in-flight bytes per connection and direction")
    ap.add_argument("--latency-rate", default="40m", help="shared bandwidth cap, bytes/s")
    ap.add_argument("--buffer", default="256mb")
    ap.add_argument("--no-restore", action="store_true", help="skip the restore cases")
    ap.add_argument("--restore-to", help="parent of the restore directories (default: the scratch directory); "
                    "/dev/shm takes the destination disk out of the measurement")
    ap.add_argument("--before", help="an earlier nbackup binary, measured on the backup cases in the same rounds")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()

    for tool in ("tar", "pigz", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install {tool})")
    work = args.work or tempfile.mkdtemp(prefix="nbackup-bench-")
    os.makedirs(work, exist_ok=True)
    data = os.path.abspath(args.data or os.path.join(work, "data"))
    if not os.path.isdir(data) or not os.listdir(data):
        print(f"generating {args.size} dataset in {data} ...", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "make-dataset.py"), data, "--size", args.size], check=True)
    source_bytes = tree_bytes(data)
    # Warm the page cache; cat, not /dev/null, so tar really reads the files.
    subprocess.run(f"tar -cf - -C / {data.lstrip('/')} | cat > /dev/null", shell=True, check=True)

    cores = os.cpu_count()
    nb = Nbackup(os.path.abspath(args.nbackup), work, args.gzip_level, args.zstd_level)
    local = f"127.0.0.1:{nb.port}"
    before = None
    if args.before:
        before = Nbackup(os.path.abspath(args.before), os.path.join(work, "before"), args.gzip_level, args.zstd_level)
    sweep = [int(x) for x in str(args.parallels).split(",") if int(x) > 1]
    n = max(sweep, default=1)
    entries = [("gzip", "gz", 1, "", data), ("zstd", "zs", 1, "", data)]
    for k in sweep:
        entries += [(f"gzip{k}", "gz", k, "", data), (f"zstd{k}", "zs", k, "", data)]
    small = None
    if args.small_files:
        small = os.path.abspath(args.small_data or os.path.join(work, "small"))
        if not os.path.isdir(small) or not os.listdir(small):
            print(f"generating {args.small_files} small files in {small} ...", flush=True)
            subprocess.run([sys.executable, os.path.join(HERE, "make-dataset.py"), small,
                            "--small-files", str(args.small_files)], check=True)
        entries.append(("small", "zs", 1, "", small))
    loop_cfg = nb.agent_config("loopback", local, entries, args.buffer)
    tar = ["tar", "-cf", "-", "-C", "/", data.lstrip("/")]
    out = os.path.join(work, "baseline.out")
    pigz_name, zstd_name = f"tar | pigz -p{cores} -{args.gzip_level}", f"tar | zstd -T0 -{args.zstd_level}"
    names = ["nbackup gzip", pigz_name, "nbackup zstd", zstd_name]
    for k in sweep:
        names += [f"nbackup gzip, {k} streams", f"nbackup zstd, {k} streams"]
    small_tar = ["tar", "-cf", "-", "-C", "/", small.lstrip("/")] if small else None
    can_drop = small is not None and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    temps = (["warm", "cold"] if can_drop else ["warm"]) if small else []
    for t in temps:
        names += [f"nbackup zstd, small files, {t}", f"{zstd_name}, small files, {t}"]
    # The current build's backup case -> the same case run by the earlier build.
    before_of = {name: f"before: {name}" for name in names if name.startswith("nbackup")} if before else {}
    names += list(before_of.values())
    restore_names = [] if args.no_restore else [
        "nbackup restore gzip", "tar -xzf (gzip)", "nbackup restore zstd", "tar --zstd -xf (zstd)"]
    names += restore_names
    cases = {name: [] for name in names}
    baseline_of = {"nbackup gzip": pigz_name, "nbackup zstd": zstd_name,
                   "nbackup restore gzip": "tar -xzf (gzip)", "nbackup restore zstd": "tar --zstd -xf (zstd)"}
    for k in sweep:
        baseline_of |= {f"nbackup gzip, {k} streams": pigz_name, f"nbackup zstd, {k} streams": zstd_name}
    for t in temps:
        baseline_of[f"nbackup zstd, small files, {t}"] = f"{zstd_name}, small files, {t}"
    baseline_of |= {b: baseline_of[n] for n, b in before_of.items()}
    before_cfg = before.agent_config("loopback", f"127.0.0.1:{before.port}", entries, args.buffer) if before else None

    def nbackup_case(name, entry):
        cases[name].append(nb.backup(loop_cfg, entry))
        if name in before_of:
            cases[before_of[name]].append(before.backup(before_cfg, entry))
    dest = os.path.join(args.restore_to or work, f"nbackup-restored-{os.getpid()}")
    latency = {}
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            nbackup_case("nbackup gzip", "gzip")
            w, c, rss, size = pipeline(tar, ["pigz", f"-p{cores}", f"-{args.gzip_level}"], out)
            cases[pigz_name].append({"wall": w, "cpu": c, "rss": rss, "archive": size})
            nbackup_case("nbackup zstd", "zstd")
            w, c, rss, size = pipeline(tar, ["zstd", "-T0", f"-{args.zstd_level}", "-q", "-c"], out)
            cases[zstd_name].append({"wall": w, "cpu": c, "rss": rss, "archive": size})
            for k in sweep:
                nbackup_case(f"nbackup gzip, {k} streams", f"gzip{k}")
                nbackup_case(f"nbackup zstd, {k} streams", f"zstd{k}")
            for t in temps:
                # Each run alone with the cache it is meant to see: dropped for "cold",
                # filled by reading the tree for "warm".
                for who in ("nbackup", "before", "tar") if before else ("nbackup", "tar"):
                    if t == "cold":
                        subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
                    else:
                        subprocess.run(f"tar -cf - -C / {small.lstrip('/')} | cat > /dev/null", shell=True, check=True)
                    if who == "nbackup":
                        cases[f"nbackup zstd, small files, {t}"].append(nb.backup(loop_cfg, "small"))
                    elif who == "before":
                        cases[f"before: nbackup zstd, small files, {t}"].append(before.backup(before_cfg, "small"))
                    else:
                        w, c, rss, size = pipeline(small_tar, ["zstd", "-T0", f"-{args.zstd_level}", "-q", "-c"], out)
                        cases[f"{zstd_name}, small files, {t}"].append({"wall": w, "cpu": c, "rss": rss, "archive": size})
            if restore_names:
                for comp, entry, flag, tar_name in (("gzip", "gzip", "-z", "tar -xzf (gzip)"),
                                                   ("zstd", "zstd", "--zstd", "tar --zstd -xf (zstd)")):
                    cases[f"nbackup restore {comp}"].append(nb.restore(loop_cfg, entry, dest))
                    archive = nb.archive_of("gz" if comp == "gzip" else "zs", entry)
                    shutil.rmtree(dest, ignore_errors=True)
                    os.makedirs(dest)
                    w, c, rss = run_measured(["tar", flag, "-x", "-f", archive, "-C", dest])
                    cases[tar_name].append({"wall": w, "cpu": c, "rss": rss, "archive": os.path.getsize(archive)})
                    shutil.rmtree(dest, ignore_errors=True)
        if args.latency_rounds > 0:
            latency = run_latency(args, nb, work)
    finally:
        nb.stop()
        if before:
            before.stop()
        if os.path.exists(out):
            os.remove(out)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    small_bytes, small_count = (tree_bytes(small), tree_files(small)) if small else (0, 0)
    results = {"source_bytes": source_bytes, "cores": cores, "rounds": args.rounds,
               "gzip_level": args.gzip_level, "zstd_level": args.zstd_level,
               "parallels": sweep or [1], "buffer": args.buffer, "cases": {}, "latency": latency,
               "small_files": {"dir": small, "files": small_count, "bytes": small_bytes} if small else None,
               "restore_to": args.restore_to or work}
    print()
    print(f"source: {source_bytes / 1e6:.0f} MB in {data}; {cores} cores; median of {args.rounds} interleaved rounds")
    hdr = f"{'case':<28}{'MB/s':>8}{'ratio':>7}{'CPU s (agent/server)':>24}{'peak RSS MiB (agent/server)':>30}{'archive MB':>12}"
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        runs = cases[name]
        wall = med(runs, "wall")
        is_small = "small files" in name
        mbs = (small_bytes if is_small else source_bytes) / 1e6 / wall
        entry = {"wall_s": wall, "mb_per_s": mbs, "archive_bytes": med(runs, "archive"), "runs": runs}
        if is_small:
            entry["files"] = small_count
            entry["files_per_s"] = small_count / wall
        if name.startswith(("nbackup", "before:")):
            ratio = med(cases[baseline_of[name]], "wall") / wall
            entry.update(agent_cpu_s=med(runs, "agent_cpu"), server_cpu_s=med(runs, "server_cpu"),
                         agent_rss=med(runs, "agent_rss"), server_rss=med(runs, "server_rss"),
                         ratio_to_baseline=ratio, baseline=baseline_of[name])
            cpu = f"{entry['agent_cpu_s']:.1f} / {entry['server_cpu_s']:.1f}"
            rss = f"{entry['agent_rss'] / 2**20:.0f} / {entry['server_rss'] / 2**20:.0f}"
            ratio_s = f"{ratio:.2f}x"
        else:
            entry.update(cpu_s=med(runs, "cpu"), rss=med(runs, "rss"))
            cpu = f"{entry['cpu_s']:.1f}"
            rss = f"{entry['rss'] / 2**20:.0f}"
            ratio_s = ""
        results["cases"][name] = entry
        print(f"{name:<28}{mbs:>8.1f}{ratio_s:>7}{cpu:>24}{rss:>30}{entry['archive_bytes'] / 1e6:>12.1f}")
    for name in names:
        if "files_per_s" in results["cases"][name]:
            print(f"  {name}: {results['cases'][name]['files_per_s']:,.0f} files/s")
    print("\nratio = nbackup throughput / its baseline pipeline's (same compression, same level); higher is better")
    if before_of:
        results["before"] = os.path.abspath(args.before)
        print(f"\nbefore ({args.before}) -> now, same rounds:")
        for name, bname in before_of.items():
            now, then = results["cases"][name], results["cases"][bname]
            print(f"  {name:<34}{then['ratio_to_baseline']:>6.2f}x -> {now['ratio_to_baseline']:.2f}x"
                  f"   CPU {then['agent_cpu_s']:.1f}/{then['server_cpu_s']:.1f} -> {now['agent_cpu_s']:.1f}/{now['server_cpu_s']:.1f}"
                  f"   RSS {then['agent_rss'] / 2**20:.0f} -> {now['agent_rss'] / 2**20:.0f} MiB")
    for comp in ("gzip", "zstd") if restore_names else ():
        r = results["cases"][f"nbackup restore {comp}"]["mb_per_s"] / results["cases"][f"nbackup {comp}"]["mb_per_s"]
        results["cases"][f"nbackup restore {comp}"]["ratio_to_backup"] = r
        print(f"restore {comp} / backup {comp} speed: {r:.2f}x")
    if latency:
        print(f"\nlatency case: {latency['source_bytes'] / 1e6:.0f} MB through netsim "
              f"({latency['delay_ms']:.0f} ms each way, {latency['window']} window per connection, {latency['rate']}/s shared cap)")
        for name in ("1 stream", "autoscaler"):
            c = latency["cases"][name]
            print(f"  {name:<12}{c['mb_per_s']:>8.1f} MB/s   peak streams {c['streams']}")
        print(f"  autoscaler / 1 stream = {latency['ratio']:.2f}x")
    path = args.out or os.path.join(HERE, "results", time.strftime("%Y%m%dT%H%M%S") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
