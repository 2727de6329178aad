"""Online serving: an aiohttp load generator for any OpenAI-compatible server on 127.0.0.1.

Random prompts (token ids, or their text) go to `--endpoint` streamed, arriving as a Poisson
process at `--request-rate` (inf: all at once) and/or capped by `--max-concurrency`. Prints
one table (request/s, output tok/s, TTFT/TPOT/ITL/E2E p50/p90/p99, goodput); `--launch CMD`
starts the server (jaxserve's `--port 0` is read from its ready line), waits for /health,
and stops it afterwards. `--dashboard-subscribers N` keeps N dashboard pages' event streams
(GET /dashboard/events) open during the load: the dashboard's cost is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np

from bench_common import (allowed_ids, percentiles, print_table, random_lengths,
                          random_token_ids, save_plot, write_json)

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
READY_URL = re.compile(r"https?://[^\s/:]+:(\d+)/v1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions, or /v1/chat/completions (one user message)")
    p.add_argument("--model", required=True, help="the `model` field sent with each request")
    p.add_argument("--tokenizer", default=None, help="for random prompts; default --model")
    p.add_argument("--prompt-kind", choices=["ids", "text"], default="ids",
                   help="send token-id lists, or the decoded text of the random ids")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s of a Poisson process; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs in ms, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=1800.0, help="seconds for the run")
    p.add_argument("--launch", default=None, help="server command to start, e.g. "
                   "\"jaxserve serve MODEL --port 0\"; stopped afterwards")
    p.add_argument("--launch-timeout", type=float, default=600.0)
    p.add_argument("--dashboard-subscribers", type=int, default=0,
                   help="event streams of the dashboard kept open during the load")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="PNG of the TTFT and E2E latency CDFs")
    args = p.parse_args(argv)
    host = urllib.parse.urlparse(args.base_url).hostname
    if host not in LOCAL_HOSTS:
        p.error(f"--base-url must point at 127.0.0.1 or localhost, got {host!r}")
    if args.endpoint.endswith("chat/completions") and args.prompt_kind != "text":
        p.error("a chat endpoint needs --prompt-kind text")
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        p.error("--num-prompts and --max-concurrency must be >= 1")
    args.slos = {}
    for item in args.goodput:
        key, _, ms = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not ms:
            p.error(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        args.slos[key] = float(ms)
    return args


def sample_prompts(args) -> list[tuple[object, int, int]]:
    """(prompt, input_len, output_len) per request: token ids or their decoded text."""
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.model)  # an HF directory or a GGUF
    rng = np.random.default_rng(args.seed)
    allowed = allowed_ids(tokenizer)
    in_lens = random_lengths(rng, args.input_len, args.random_range_ratio, args.num_prompts)
    out_lens = random_lengths(rng, args.output_len, args.random_range_ratio, args.num_prompts)
    prompts = []
    for n, m in zip(in_lens, out_lens):
        ids = random_token_ids(rng, allowed, n)
        prompt = ids if args.prompt_kind == "ids" else tokenizer.decode(ids)
        prompts.append((prompt, int(n), int(m)))
    return prompts


class Server:
    """A server process started from `--launch`; its stderr/stdout are echoed and scanned
    for the jaxserve ready line, which carries the port actually bound."""

    def __init__(self, command: str):
        self.port: int | None = None
        self.proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            sys.stderr.write(f"[server] {line}")
            match = READY_URL.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_healthy(session, args, server: Server | None) -> str:
    """The base URL once GET /health answers 200 (with --launch: the bound port)."""
    parsed = urllib.parse.urlparse(args.base_url)
    deadline = time.monotonic() + args.launch_timeout
    while time.monotonic() < deadline:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"the launched server exited with code {server.proc.returncode}")
        port = parsed.port or 80
        if server is not None and server.port:
            port = server.port
        if server is None or server.port or port != 0:
            base = f"{parsed.scheme}://{parsed.hostname}:{port}"
            try:
                async with session.get(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        return base
            except (OSError, asyncio.TimeoutError):
                pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no healthy server after {args.launch_timeout:.0f} s")


async def send(session, url: str, args, prompt, output_len: int) -> dict:
    """One streamed request; times of the first and of every later non-empty chunk."""
    body = {"model": args.model, "max_tokens": output_len, "stream": True, "temperature": 0.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    result = {"ok": False, "output_tokens": 0, "chunk_times": [], "error": ""}
    start = time.perf_counter()
    usage_tokens = None
    try:
        async with session.post(url, json=body, timeout=args.request_timeout) as response:
            if response.status != 200:
                result["error"] = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                choices = data.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("delta", {})
                                .get("content")):
                    result["chunk_times"].append(time.perf_counter() - start)
        result["ok"] = bool(result["chunk_times"])
    except (OSError, asyncio.TimeoutError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["e2el"] = time.perf_counter() - start
    result["output_tokens"] = usage_tokens or len(result["chunk_times"])
    return result


async def run_load(args, prompts) -> tuple[list[dict], float]:
    import aiohttp

    server = Server(args.launch) if args.launch else None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            base = await wait_healthy(session, args, server)
            url = base + args.endpoint
            rng = np.random.default_rng(args.seed + 1)
            limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

            async def one(prompt, output_len):
                async with limit:
                    return await send(session, url, args, prompt, output_len)

            events = [0] * args.dashboard_subscribers  # events each stream received
            watchers = [asyncio.ensure_future(watch(session, base, events, i))
                        for i in range(args.dashboard_subscribers)]
            tasks, start = [], time.perf_counter()
            for prompt, _, output_len in prompts:
                tasks.append(asyncio.ensure_future(one(prompt, output_len)))
                if args.request_rate != float("inf"):
                    await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
            done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
            for task in pending:
                task.cancel()
            elapsed = time.perf_counter() - start
            for watcher in watchers:
                watcher.cancel()
            args.dashboard_events = events
            return [t.result() if t in done else {"ok": False, "error": "max-duration"}
                    for t in tasks], elapsed
    finally:
        if server is not None:
            server.stop()


async def watch(session, base: str, events: list[int], index: int) -> None:
    """Reads the dashboard's event stream like an open page, counting its events."""
    async with session.get(base + "/dashboard/events") as response:
        response.raise_for_status()
        async for line in response.content:
            events[index] += line.startswith(b"data: ")


def summarize(results, prompts, elapsed, args) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["chunk_times"][0] * 1e3 for r in ok]
    tpot = [(r["e2el"] - r["chunk_times"][0]) * 1e3 / (r["output_tokens"] - 1)
            for r in ok if r["output_tokens"] > 1]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
    e2el = [r["e2el"] * 1e3 for r in ok]
    good = 0
    for r in ok:
        values = {"ttft": r["chunk_times"][0] * 1e3, "e2el": r["e2el"] * 1e3,
                  "tpot": ((r["e2el"] - r["chunk_times"][0]) * 1e3 / (r["output_tokens"] - 1)
                           if r["output_tokens"] > 1 else 0.0)}
        good += all(values[k] <= ms for k, ms in args.slos.items())
    output_tokens = sum(r["output_tokens"] for r in ok)
    errors = [r.get("error", "") for r in results if not r["ok"]]
    return {
        "completed": len(ok), "failed": len(errors), "errors": errors[:5],
        "duration_s": elapsed,
        "total_input_tokens": sum(n for (_, n, _), r in zip(prompts, results) if r["ok"]),
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / elapsed,
        "output_throughput": output_tokens / elapsed,
        "goodput": good / elapsed if args.slos else None, "slos_ms": args.slos,
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(itl), "e2el_ms": percentiles(e2el),
        "per_request": [{"ttft_ms": t, "e2el_ms": e} for t, e in zip(ttft, e2el)],
        "dashboard_events": getattr(args, "dashboard_events", []),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    prompts = sample_prompts(args)
    results, elapsed = asyncio.run(run_load(args, prompts))
    summary = summarize(results, prompts, elapsed, args)
    summary["args"] = {k: v for k, v in vars(args).items() if k != "slos"}
    rows = [[name, summary[key]["p50"], summary[key]["p90"], summary[key]["p99"]]
            for name, key in (("TTFT ms", "ttft_ms"), ("TPOT ms", "tpot_ms"),
                              ("ITL ms", "itl_ms"), ("E2E ms", "e2el_ms"))]
    rows += [["requests/s", summary["request_throughput"], "", ""],
             ["output tok/s", summary["output_throughput"], "", ""],
             ["completed/failed", f"{summary['completed']}/{summary['failed']}", "", ""]]
    if args.slos:
        rows.append([f"goodput req/s {args.goodput}", summary["goodput"], "", ""])
    print_table(["metric", "p50", "p90", "p99"], rows)
    for error in summary["errors"]:
        print(f"failed request: {error}", file=sys.stderr)
    write_json(args.output_json, summary)

    def draw(ax):
        for key, label in (("ttft_ms", "TTFT"), ("e2el_ms", "end-to-end")):
            values = np.sort([r[key] for r in summary["per_request"]])
            ax.plot(values, np.arange(1, len(values) + 1) / max(1, len(values)), label=label)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{args.model}: {args.num_prompts} requests, rate {args.request_rate}")
        ax.legend()

    save_plot(args.plot, draw)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 1)
