#!/usr/bin/env python3
"""Off-site upload speed and memory: nbackup's bucket runner against boto3's own
multipart upload (what `aws s3 cp` does), to the same S3 API server on loopback.

    bench/offsite.py --nbackup target/release/nbackup --data DIR [--rounds 3] [--ingest DIR2]

Backs up DIR once per round through a real server whose storage has one bucket (moto's
S3 server, started here), and times the copy from the commit to `verified` in the
archive's `.offsite.json`; the server's peak RSS is sampled meanwhile. In the same round
boto3 uploads the same archive file with `upload_file` (multipart, its default 8 MiB
parts and 10 threads). Both are bound by moto (a Python server) long before the
network: read the ratio, not the MB/s. Median of the rounds.

With --ingest DIR2, each round also backs up DIR2 twice into the same storage: once
with no upload in flight, and once while DATA's archive is being uploaded — what an
upload costs a backup received meanwhile (uploads yield to ingestion:
docs/offsite.md).
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
sys.path.insert(0, HERE)
from bench import Nbackup, free_port, proc_hwm, reset_hwm  # noqa: E402


def start_moto():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("moto did not start (pip install 'moto[server]')")
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbackup", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part-size", default="16mib")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--ingest", help="a tree backed up during the upload, and alone")
    ap.add_argument("--out")
    args = ap.parse_args()
    import boto3
    from boto3.s3.transfer import TransferConfig

    work = tempfile.mkdtemp(prefix="nbackup-offsite-bench-")
    moto, port = start_moto()
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="bench")
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    bucket_yaml = (f"    buckets:\n      - name: offsite\n        provider: s3\n        bucket: bench\n"
                   f"        region: us-east-1\n        endpoint: http://127.0.0.1:{port}\n"
                   f"        part_size: {args.part_size}\n        concurrency: {args.concurrency}\n")
    nb = Nbackup(os.path.abspath(args.nbackup), work, 6, 3, storage_extra={"zs": bucket_yaml})
    entries = [("zstd", "zs", 1, "", os.path.abspath(args.data))]
    if args.ingest:
        entries.append(("ingest", "zs", 1, "", os.path.abspath(args.ingest)))
    cfg = nb.agent_config("loopback", f"127.0.0.1:{nb.port}", entries, "256mb")
    ours, theirs, alone, beside = [], [], [], []

    def wait_verified(archive):
        while True:
            try:
                with open(archive + ".offsite.json") as f:
                    if json.load(f)["buckets"]["offsite"]["state"] == "verified":
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)

    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            if args.ingest:
                m = nb.backup(cfg, "ingest")
                alone.append(m)
                wait_verified(nb.archive_of("zs", "ingest"))
            nb.backup(cfg, "zstd")
            archive = nb.archive_of("zs", "zstd")
            size = os.path.getsize(archive)
            reset_hwm(nb.server.pid)
            t0 = time.monotonic()
            if args.ingest:
                beside.append(nb.backup(cfg, "ingest"))
            wait_verified(archive)
            # The commit answered before this loop began; the copy started at the commit.
            ours.append({"wall": time.monotonic() - t0, "bytes": size, "server_rss": proc_hwm(nb.server.pid)})
            t0 = time.monotonic()
            s3.upload_file(archive, "bench", f"boto3/{r}", Config=TransferConfig())
            theirs.append({"wall": time.monotonic() - t0, "bytes": size})
            if args.ingest:
                # Its own copy, queued behind the big one, is done before the next round.
                wait_verified(nb.archive_of("zs", "ingest"))
    finally:
        nb.stop()
        moto.terminate()
        moto.wait()
    med = lambda runs: statistics.median(x["wall"] for x in runs)  # noqa: E731
    size = ours[0]["bytes"]
    res = {"archive_bytes": size, "rounds": args.rounds, "part_size": args.part_size,
           "concurrency": args.concurrency,
           "nbackup": {"wall_s": med(ours), "mb_per_s": size / 1e6 / med(ours),
                       "server_peak_rss": statistics.median(x["server_rss"] for x in ours), "runs": ours},
           "boto3_upload_file": {"wall_s": med(theirs), "mb_per_s": size / 1e6 / med(theirs), "runs": theirs}}
    if args.ingest:
        res["ingest"] = {"alone_wall_s": med(alone), "during_upload_wall_s": med(beside),
                         "source_bytes": alone[0]["source"], "alone": alone, "during_upload": beside}
    print(f"archive {size / 1e6:.0f} MB; median of {args.rounds}")
    print(f"  nbackup bucket runner   {res['nbackup']['mb_per_s']:7.1f} MB/s   server peak RSS "
          f"{res['nbackup']['server_peak_rss'] / 2**20:.0f} MiB")
    print(f"  boto3 upload_file       {res['boto3_upload_file']['mb_per_s']:7.1f} MB/s")
    print(f"  ratio {res['nbackup']['mb_per_s'] / res['boto3_upload_file']['mb_per_s']:.2f}x")
    if args.ingest:
        i = res["ingest"]
        print(f"  a backup of {i['source_bytes'] / 1e6:.0f} MB: {i['alone_wall_s']:.2f} s alone, "
              f"{i['during_upload_wall_s']:.2f} s during the upload ({i['during_upload_wall_s'] / i['alone_wall_s']:.2f}x)")
    path = args.out or os.path.join(HERE, "results", time.strftime("%Y%m%dT%H%M%S") + "-offsite.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
