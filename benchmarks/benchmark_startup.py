"""Start-up: seconds from launch to the first answer, with an empty and with a warm cache.

`serve` rows launch `jaxserve serve` (the default model unless `--model`) as a user would
and time, from the launch: ready (`/v1/models` answers), the first chat completion answered
(`--max-tokens` tokens, greedy), and every program compiled (`/metrics` shows none pending;
the engine serves before that). `LLM` rows time `LLM(--llm-model)` constructed and its first
`generate` returned, in a fresh process each (which then waits, untimed, for every program
to be compiled and stored). Each kind runs over one compilation cache
directory: cold (empty), then warm (filled by the cold start) `--warm-runs` times.
`--pythonpath` runs another checkout (to measure a baseline in the same session). Prints
one table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bench_common import print_table, write_json

_LLM_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from jaxserve import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2], progress=False)
ready = time.perf_counter() - t0
llm.generate(["Hello, my name is"], SamplingParams(max_tokens=int(sys.argv[3]), temperature=0))
print(json.dumps({"ready_s": ready, "first_answer_s": time.perf_counter() - t0}), flush=True)
llm.wait_for_compilation()  # untimed: a session that lived long enough fills the cache
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="what `jaxserve serve` serves (default model)")
    p.add_argument("--llm-model", default=None, help="a checkpoint for the LLM(...) rows")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--serve-args", default="", help="extra `jaxserve serve` flags")
    p.add_argument("--pythonpath", default=None, help="run this checkout of jaxserve")
    p.add_argument("--label", default="jaxserve")
    p.add_argument("--warm-runs", type=int, default=1,
                   help="warm starts after the cold one (each from the launch)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def _env(args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if args.pythonpath:
        env["PYTHONPATH"] = os.path.abspath(args.pythonpath)
    return env


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_start(args, cache_dir: str) -> dict:
    """One `jaxserve serve` launch: seconds to ready, first answer, all compiled."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "jaxserve.entrypoints.cli", "serve",
               *([args.model] if args.model else []), "--port", str(port),
               "--compilation-cache-dir", cache_dir, *args.serve_args.split()]
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    process = subprocess.Popen(command, env=_env(args), stdout=log, stderr=subprocess.STDOUT)
    result = {}
    try:
        models = _poll(lambda: json.loads(_get(url + "/v1/models")), process, t0, args)
        result["ready_s"] = time.perf_counter() - t0
        body = json.dumps({"model": models["data"][0]["id"], "max_tokens": args.max_tokens,
                           "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi! Who are you?"}]})
        request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read())
        result["first_answer_s"] = time.perf_counter() - t0
        result["answer_tokens"] = answer["usage"]["completion_tokens"]

        def all_compiled():
            pending = [float(line.split()[-1]) for line in _get(url + "/metrics").splitlines()
                       if line.startswith("jaxserve:num_programs_pending")]
            if pending and pending[0] > 0:
                raise ValueError("still compiling")
            return True  # none pending, or a build that compiles everything before ready

        try:
            _poll(all_compiled, process, t0, args)
            result["all_compiled_s"] = time.perf_counter() - t0
        except TimeoutError:
            result["all_compiled_s"] = None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.seek(0)
        result["log_tail"] = log.read().decode(errors="replace")[-2000:]
    return result


def _poll(probe, process, t0: float, args):
    while time.perf_counter() - t0 < args.timeout:
        if process.poll() is not None:
            raise RuntimeError(f"jaxserve serve exited with {process.returncode}")
        try:
            return probe()
        except (urllib.error.URLError, ConnectionError, ValueError, KeyError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"no answer within {args.timeout} s")


def llm_start(args, cache_dir: str) -> dict:
    """One fresh process: LLM(...) constructed, then its first generate."""
    out = subprocess.run([sys.executable, "-c", _LLM_CHILD, args.llm_model, cache_dir,
                          str(args.max_tokens)], env=_env(args), capture_output=True,
                         text=True, check=True, timeout=args.timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    results, rows = {"args": vars(args)}, []
    kinds = [("serve", serve_start, args.model or "default model")]
    if args.llm_model:
        kinds.append(("LLM", llm_start, args.llm_model))
    for kind, start, model in kinds:
        with tempfile.TemporaryDirectory(prefix="jaxserve-cc-") as cache_dir:
            runs = ["cold"] + [f"warm{i + 1}" if args.warm_runs > 1 else "warm"
                               for i in range(args.warm_runs)]
            for cache in runs:
                r = start(args, cache_dir)
                results[f"{kind}_{cache}"] = r
                rows.append([args.label, kind, os.path.basename(str(model)), cache,
                             r["ready_s"], r["first_answer_s"], r.get("all_compiled_s", "-")])
    print_table(["build", "start", "model", "compilation cache", "ready s",
                 "first answer s", "all compiled s"], rows)
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
