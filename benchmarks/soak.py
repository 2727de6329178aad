"""Soak: many concurrent clients against a server on 127.0.0.1 for a bounded time, to
show that nothing leaks and every answer is well formed.

Each client loops until `--duration` or `--max-requests`: completions or chat, streamed or
not, `n` up to 4, logprobs, stop strings, random `max_tokens`; `--disconnect` of the streams
hang up after a few chunks, `--bad` of the requests are invalid (they must get a 4xx with an
OpenAI error body). Prints per-minute TTFT/TPOT p50/p99 (streams) and the server's RSS, then
a summary: requests by outcome, errors by kind, KV cache usage and running requests once
idle, RSS growth after `--warmup`. `--launch CMD` starts the server and stops it afterwards.
`--overload`, against a server with a small KV pool and `--max-num-waiting` (and long
`--prompt-words`), counts a 503 with an OpenAI error body as shed load, not an error; the
summary's preemptions show the pool overflowed.

    python benchmarks/soak.py --launch "jaxserve serve /tmp/bt/q40 --port 0" \\
        --model /tmp/bt/q40 --clients 200 --duration 600
    python benchmarks/soak.py --launch "jaxserve serve /tmp/bt/q40 --port 0 \\
        --num-gpu-blocks-override 600 --max-num-waiting 64" --model /tmp/bt/q40 \\
        --overload --prompt-words 200 400 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import re
import time
import urllib.parse

from bench_common import percentiles, print_table, write_json
from benchmark_serving import LOCAL_HOSTS, Server, wait_healthy
from soak_requests import RequestPlan, check_response, is_error_body, plan_request

CONTENT = re.compile(r'"(?:text|content)": ?"[^"]')  # a chunk that carries output text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the `model` field sent with each request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens is 1..this")
    p.add_argument("--disconnect", type=float, default=0.2, help="share of streams cut short")
    p.add_argument("--bad", type=float, default=0.05, help="share of invalid requests")
    p.add_argument("--prompt-words", type=int, nargs=2, default=(3, 40), metavar=("MIN", "MAX"),
                   help="words per prompt")
    p.add_argument("--overload", action="store_true",
                   help="a 503 with an OpenAI error body is shed load (the queue is full)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--server-pid", type=int, default=None, help="for RSS (with --launch: its)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch", default=None, help='e.g. "jaxserve serve MODEL --port 0"')
    p.add_argument("--launch-timeout", type=float, default=600.0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if urllib.parse.urlparse(args.base_url).hostname not in LOCAL_HOSTS:
        p.error("--base-url must point at 127.0.0.1 or localhost")
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1:
        p.error("--clients, --duration and --max-requests must be positive")
    if not 1 <= args.prompt_words[0] <= args.prompt_words[1]:
        p.error("--prompt-words must be 1 <= MIN <= MAX")
    return args


@dataclasses.dataclass
class Outcome:
    kind: str  # "ok", "disconnected", "rejected" (a bad request's 4xx), "shed" (--overload's
    #            503), or an error kind
    end: float  # seconds since the start
    detail: str = ""
    ttft: float | None = None  # streams: seconds to the first content chunk
    tpot: float | None = None  # streams: seconds per output token after the first


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def run_one(session, base: str, plan: RequestPlan, args, start: float) -> Outcome:
    import aiohttp

    sent = time.perf_counter()
    try:
        async with session.post(base + plan.path, data=plan.data, headers=plan.headers,
                                timeout=aiohttp.ClientTimeout(total=args.request_timeout)
                                ) as response:
            if plan.stream and response.status == 200:
                events, chunk_times = [], []
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if CONTENT.search(line):
                        chunk_times.append(time.perf_counter() - sent)
                    if plan.disconnect_after and len(events) >= plan.disconnect_after:
                        response.close()
                        return Outcome("disconnected", time.perf_counter() - start)
                kind, detail, num_tokens = check_response(plan, 200, events)
                ttft = chunk_times[0] if chunk_times else None
                tpot = ((time.perf_counter() - sent - ttft) / (num_tokens - 1)
                        if ttft is not None and num_tokens > 1 else None)
                return Outcome(kind, time.perf_counter() - start, detail, ttft, tpot)
            body = await response.read()
            if args.overload and response.status == 503 and is_error_body(body):
                return Outcome("shed", time.perf_counter() - start)
            kind, detail, _ = check_response(plan, response.status, body)
            return Outcome(kind, time.perf_counter() - start, detail)
    except asyncio.TimeoutError:
        return Outcome("timeout", time.perf_counter() - start)
    except (OSError, aiohttp.ClientError) as error:
        return Outcome("connection", time.perf_counter() - start, repr(error)[:200])


IDLE_METRICS = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


async def read_metrics(session, base: str) -> collections.defaultdict[str, float]:
    """Each `jaxserve:` sample of /metrics by name without the prefix, labels summed."""
    async with session.get(base + "/metrics") as response:
        text = await response.text()
    values: collections.defaultdict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith("jaxserve:"):
            name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("jaxserve:")
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def server_state(session, base: str, timeout: float = 60.0) -> dict[str, float]:
    """The metrics once no request runs or waits and no KV block is held (or at `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await read_metrics(session, base)
        if not any(metrics[name] for name in IDLE_METRICS) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.2)


async def soak(args) -> dict:
    import aiohttp

    server = Server(args.launch) if args.launch else None
    pid = server.proc.pid if server is not None else args.server_pid
    outcomes: list[Outcome] = []
    rss: list[tuple[float, int]] = []  # (seconds since start, bytes)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            base = await wait_healthy(session, args, server)
            before = await read_metrics(session, base)
            start, rng = time.perf_counter(), random.Random(args.seed)
            counter = iter(range(args.max_requests))

            async def client(index: int) -> None:
                client_rng = random.Random(rng.random())
                while time.perf_counter() - start < args.duration and next(counter, None) \
                        is not None:
                    plan = plan_request(client_rng, args)
                    outcomes.append(await run_one(session, base, plan, args, start))

            async def sample_rss() -> None:
                while True:
                    value = rss_bytes(pid)
                    if value is not None:
                        rss.append((time.perf_counter() - start, value))
                    await asyncio.sleep(2.0)

            sampler = asyncio.ensure_future(sample_rss())
            await asyncio.gather(*(client(i) for i in range(args.clients)))
            elapsed = time.perf_counter() - start
            final = await server_state(session, base)
            sampler.cancel()
            value = rss_bytes(pid)
            if value is not None:
                rss.append((time.perf_counter() - start, value))
    finally:
        if server is not None:
            server.stop()
    return summarize(outcomes, rss, before, final, elapsed, args)


def summarize(outcomes: list[Outcome], rss, before: dict, final: dict, elapsed: float,
              args) -> dict:
    kinds = collections.Counter(o.kind for o in outcomes)
    errors = {k: v for k, v in kinds.items()
              if k not in ("ok", "disconnected", "rejected", "shed")}
    rows = []
    for minute in range(int(elapsed // 60) + 1):
        done = [o for o in outcomes if minute * 60 <= o.end < (minute + 1) * 60]
        ttft = percentiles([o.ttft * 1e3 for o in done if o.ttft is not None])
        tpot = percentiles([o.tpot * 1e3 for o in done if o.tpot is not None])
        in_minute = [b for t, b in rss if minute * 60 <= t < (minute + 1) * 60]
        rows.append([minute + 1, len(done), sum(o.kind in errors for o in done),
                     ttft["p50"], ttft["p99"], tpot["p50"], tpot["p99"],
                     max(in_minute) / 2**20 if in_minute else float("nan")])
    print_table(["minute", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                 "TPOT p99 ms", "RSS MiB"], rows)
    warm = [b for t, b in rss if t >= min(args.warmup, elapsed / 2)]
    growth = (rss[-1][1] - warm[0]) / warm[0] if warm else float("nan")
    summary = {
        "duration_s": elapsed, "clients": args.clients, "requests": len(outcomes),
        "outcomes": dict(kinds), "errors": errors,
        "error_examples": [f"{o.kind}: {o.detail}" for o in outcomes if o.kind in errors][:10],
        "final_running": final["num_requests_running"],
        "final_waiting": final["num_requests_waiting"],
        "final_kv_cache_usage": final["kv_cache_usage_perc"],
        "preemptions": final["num_preemptions_total"] - before["num_preemptions_total"],
        "rss_mib_after_warmup": warm[0] / 2**20 if warm else None,
        "rss_mib_end": rss[-1][1] / 2**20 if rss else None, "rss_growth": growth,
        "per_minute": rows,
    }
    print_table(["metric", "value"], [[k, str(v)] for k, v in summary.items()
                                      if k not in ("per_minute", "error_examples")])
    for example in summary["error_examples"]:
        print("  ", example)
    write_json(args.output_json, summary)
    return summary


def main(argv=None) -> dict:
    return asyncio.run(soak(parse_args(argv)))


if __name__ == "__main__":
    main()
