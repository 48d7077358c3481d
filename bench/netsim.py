#!/usr/bin/env python3
"""A long fat network in a process: a TCP relay with one-way delay, a per-connection
in-flight limit and a shared bandwidth cap (tc netem is not available here).

    netsim.py --listen 127.0.0.1:0 --upstream 127.0.0.1:9847 --delay-ms 50 \
              --window 256k --rate 40m

Each direction of each connection is a delay line: bytes read at time t are written
at t + delay. At most `window` bytes per direction are in flight, like one TCP flow
whose window is the bottleneck, so a single connection carries at most
window / delay bytes per second — the reason parallel streams help on long links.
All connections share one token bucket of `rate` bytes per second.

Prints `listening HOST:PORT` on stdout once ready.
"""
import argparse
import asyncio
import collections
import time


def size(text):
    text = text.strip().lower().rstrip("b").rstrip("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("kmg")) * mult)


class Bucket:
    """Shared token bucket; `rate` 0 means unlimited."""

    def __init__(self, rate):
        self.rate = rate
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        if not self.rate:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.rate / 10, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= min(n, self.rate / 10):
                    self.tokens -= n
                    return
                await asyncio.sleep((min(n, self.rate / 10) - self.tokens) / self.rate)


async def delay_line(reader, writer, delay, window, bucket):
    queue = collections.deque()
    state = {"inflight": 0, "eof": False}
    changed = asyncio.Condition()

    async def receive():
        while True:
            data = await reader.read(64 * 1024)
            async with changed:
                if not data:
                    state["eof"] = True
                    changed.notify_all()
                    return
                await changed.wait_for(lambda: state["inflight"] < window)
                state["inflight"] += len(data)
                queue.append((time.monotonic() + delay, data))
                changed.notify_all()

    async def send():
        while True:
            async with changed:
                await changed.wait_for(lambda: queue or state["eof"])
                if not queue:
                    break
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
            async with changed:
                state["inflight"] -= len(data)
                changed.notify_all()
        writer.close()

    try:
        await asyncio.gather(receive(), send())
    except (ConnectionError, OSError):
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--window", default="256k", help="bytes in flight per direction per connection")
    ap.add_argument("--rate", default="0", help="shared bandwidth cap, bytes/s (0: none)")
    args = ap.parse_args()
    delay, window, bucket = args.delay_ms / 1000, size(args.window), Bucket(size(args.rate))
    up_host, up_port = args.upstream.rsplit(":", 1)

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            delay_line(client_r, server_w, delay, window, bucket),
            delay_line(server_r, client_w, delay, window, Bucket(0)),
        )

    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    addr = server.sockets[0].getsockname()
    print(f"listening {addr[0]}:{addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
