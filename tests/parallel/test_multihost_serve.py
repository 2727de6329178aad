"""Multi-host `jaxserve serve`: two processes of two CPU devices, one TP = 4 mesh over both.

Process 0 serves HTTP and broadcasts each step's SchedulerOutput; process 1 follows. The
tiny qwen2 (2 KV heads, each replicated into two of the four slots) must answer a greedy
completion from a token-id prompt (chunked over two prefill steps) as the session's
in-process engine at TP = 1 (`qwen2_llm`), compile nothing after warm-up, and SIGTERM on
process 0 must end both with status 0 (process 1 leaves when it receives STOP).
"""

import json
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from jaxserve import SamplingParams


FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "16", "--max-model-len", "128",
         "--compilation-cache-dir", "", "-tp", "4", "--served-model-name", "tiny"]
PROMPT = [(7 * i + 3) % 300 + 10 for i in range(20)]  # 20 tokens: prefill 16 + 4


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _wait_healthy(url: str, processes, deadline: float) -> None:
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            _get(url + "/health")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise TimeoutError("the multi-host server did not become healthy")


def _complete(url: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 8,
                       "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow  # two server processes start: 14 s of the default run's 5 minutes
def test_two_processes_serve_like_one_process(engine_checkpoint, qwen2_llm, start_jaxserve,
                                              free_port):
    model = str(engine_checkpoint("qwen2"))
    port, coordinator = free_port(), f"localhost:{free_port()}"
    processes = [start_jaxserve(["serve", model, *FLAGS, "--port", str(port),
                         "--distributed-coordinator", coordinator, "--num-processes", "2",
                         "--process-id", str(i)], devices=2) for i in range(2)]
    try:
        [expected] = qwen2_llm.generate([{"prompt_token_ids": PROMPT}],
                                        SamplingParams(max_tokens=8, temperature=0),
                                        use_tqdm=False)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, processes, time.monotonic() + 180)
        answer = _complete(url)
        metrics = _get(url + "/metrics")
    finally:
        processes[0].send_signal(signal.SIGTERM)
        results = []
        for process in processes:
            try:
                results.append(process.communicate(timeout=60))
            except Exception:
                process.kill()
                raise
    for process, (_, err) in zip(processes, results):
        assert process.returncode == 0, err[-3000:]
    assert answer["choices"][0]["text"] == expected.outputs[0].text
    assert answer["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids) == 8
    after_warm_up = [line for line in metrics.splitlines()
                     if "compilations_after_warm_up" in line and not line.startswith("#")]
    assert after_warm_up and all(float(line.split()[-1]) == 0 for line in after_warm_up)
    follower_steps = re.search(r"stopped serving after (\d+) steps", results[1][1])
    assert follower_steps and int(follower_steps.group(1)) >= 9  # 2 prefill + 7 decode
