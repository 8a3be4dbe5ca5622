"""Closed-loop load on one unary method, run as its own process (`python -m bench.gateway.load`) so that its CPU
is never counted in a server's: `--concurrency` callers send pre-serialised requests (cycled) over one channel,
after a warm-up it prints `started`, then `stopped` and one JSON line of results, so the parent reads each
server's CPU exactly over the measured window."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter

import uvloop
from grpc import aio


async def _run(args: argparse.Namespace, requests: list[bytes]) -> dict[str, object]:
    metadata = tuple(tuple(pair.split("=", 1)) for pair in args.metadata)
    async with aio.insecure_channel(args.target) as channel:
        # Bytes in, bytes out: no client-side (de)serialisation.
        call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(args.method)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        state = {"measuring": False, "stop": False, "sent": 0}

        async def caller(offset: int) -> None:
            index = offset
            while not state["stop"]:
                request = requests[index % len(requests)]
                index += args.concurrency
                started = time.perf_counter()
                try:
                    await call(request, metadata=metadata, timeout=10.0)
                except aio.AioRpcError as err:
                    if state["measuring"]:
                        errors[f"{err.code().name}: {err.details()}"] += 1
                    continue
                if state["measuring"]:
                    latencies.append(time.perf_counter() - started)

        tasks = [asyncio.create_task(caller(i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup_s)
        print("started", flush=True)
        state["measuring"] = True
        began = time.perf_counter()
        await asyncio.sleep(args.duration_s)
        state["measuring"] = False
        elapsed = time.perf_counter() - began
        print("stopped", flush=True)
        state["stop"] = True
        await asyncio.gather(*tasks)
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "answered": len(latencies),
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "errors": dict(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--metadata", action="append", default=[], help="key=value, repeatable")
    args = parser.parse_args()
    requests = [base64.b64decode(line) for line in sys.stdin.read().split()]
    result = uvloop.run(_run(args, requests))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
