"""Multi-host through `jaxserve generate --distributed-coordinator`: two processes of two
CPU devices each run one TP = 4 engine over both and answer as one process with TP = 1.

Cross-process collectives go through gloo; each process runs the same prompts, and the
first prints (slow: three engine starts in subprocesses; the default run has the multi-host
serve test, tests/parallel/test_multihost_serve.py, over the same distributed set-up). Flags
that only make sense together are checked before any device starts.
"""

import pytest

from jaxserve.parallel.distributed import initialize_distributed

PROMPTS = ["--prompt", "Hello", "--prompt", "Paged attention is"]
FLAGS = ["--max-tokens", "6", "--max-num-seqs", "8", "--max-num-batched-tokens", "16",
         "--max-model-len", "128", "--temperature", "0"]


def _answers(stdout: str) -> list[str]:
    """The printed answers, without what gloo itself writes to stdout: "[Gloo] Rank N is
    connected to M peer ranks. ..." lines, which C++ may write in pieces (a piece can
    start mid-line, so any line holding part of that message is dropped)."""
    return [line for line in stdout.splitlines()
            if "[Gloo]" not in line and "peer ranks" not in line]


@pytest.mark.slow
def test_two_processes_with_tp4_answer_like_one_process(engine_checkpoint, start_jaxserve,
                                                       free_port):
    model = str(engine_checkpoint("qwen2"))
    single = start_jaxserve(["generate", model, *PROMPTS, *FLAGS], devices=1)
    expected, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    coordinator = f"localhost:{free_port()}"
    workers = [start_jaxserve(["generate", model, *PROMPTS, *FLAGS, "-tp", "4",
                       "--distributed-coordinator", coordinator, "--num-processes", "2",
                       "--process-id", str(i)], devices=2) for i in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, results):
        assert worker.returncode == 0, err
    answers = [_answers(out) for out, _ in results]
    assert answers[0] == expected.splitlines() and len(answers[0]) >= 2
    assert answers[1] == []  # only the first process prints


@pytest.mark.parametrize("args, message", [
    ((None, 2, 0), "need --distributed-coordinator"),
    (("localhost:1", None, 0), "needs --num-processes"),
    (("localhost:1", 2, 2), "must be in"),
])
def test_partial_distributed_flags_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        initialize_distributed(*args)
