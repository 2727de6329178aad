"""The `jaxserve` command: vLLM's flag names and defaults, where MODEL comes from (local
path, default model, Hugging Face cache or hub) with clear errors, and `generate`.
"""

import os
import subprocess
import sys

import pytest

from jaxserve.entrypoints import cli


def run_cli(*args, env=None, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "jaxserve.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def test_serve_flags_have_vllm_names_and_defaults():
    args = cli.build_parser().parse_args(["serve", "some/model"])
    assert (args.model, args.host, args.port) == ("some/model", "127.0.0.1", 8000)
    assert (args.max_num_seqs, args.block_size, args.gpu_memory_utilization) == (256, 16, 0.9)
    assert args.enable_prefix_caching is True and args.max_num_batched_tokens is None
    assert (args.max_logprobs, args.seed, args.tensor_parallel_size) == (20, 0, 1)
    assert args.served_model_name is None and args.api_key is None
    assert args.enable_expert_parallel is False
    assert cli.build_parser().parse_args(
        ["serve", "m", "-tp", "2", "--enable-expert-parallel"]).enable_expert_parallel is True


def test_the_dashboard_is_served_unless_disabled():
    assert cli.build_parser().parse_args(["serve", "m"]).disable_dashboard is False
    assert cli.build_parser().parse_args(
        ["serve", "m", "--disable-dashboard"]).disable_dashboard is True


def test_serve_flags_parse_sizes_lengths_and_negations():
    args = cli.build_parser().parse_args([
        "serve", "m", "--kv-cache-memory", "2GiB", "--max-model-len", "32k",
        "--no-enable-prefix-caching", "--served-model-name", "a", "b", "-tp", "1",
        "--dtype", "half"])
    assert args.kv_cache_memory_bytes == 2 * 2**30 and args.max_model_len == 32000
    assert args.enable_prefix_caching is False and args.served_model_name == ["a", "b"]
    assert cli.parse_size("512M") == 512 * 10**6 and cli.parse_size("1000") == 1000
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "m", "--kv-cache-memory", "lots"])


@pytest.mark.parametrize("flags", [["--enable-auto-tool-choice"],
                                   ["--enable-auto-tool-choice", "--tool-call-parser", "x"]])
def test_auto_tool_choice_needs_a_known_tool_call_parser(flags):
    args = cli.build_parser().parse_args(["serve", "m", *flags])
    with pytest.raises(ValueError, match="--tool-call-parser must be one of .*'hermes', "
                       "'llama3_json', 'mistral', 'pythonic'"):
        cli.serve(args)  # before any model is looked for
    args = cli.build_parser().parse_args(
        ["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser) == (True, "hermes")


def test_serve_model_is_optional_and_generate_needs_a_prompt():
    assert cli.build_parser().parse_args(["serve"]).model is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "m"])


def test_a_local_path_is_used_as_is(tmp_path):
    assert cli.resolve_model(str(tmp_path)) == str(tmp_path)


def test_no_model_means_the_default_model(monkeypatch):
    from jaxserve.entrypoints import default_model

    monkeypatch.setattr(default_model, "default_model_path", lambda: "/models/smollm2.gguf")
    assert cli.resolve_model(None) == "/models/smollm2.gguf"


def test_a_missing_local_path_is_a_clear_error_without_the_hub(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "no-such-model")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_an_uncached_repo_offline_names_hf_hub_offline(tmp_path):
    result = run_cli("generate", "some-org/some-model", "--prompt", "hi",
                     env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in result.stderr


def test_an_unreachable_hub_is_a_clear_error(tmp_path):
    result = run_cli("serve", "some-org/some-model",
                     env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "the Hugging Face Hub (http://127.0.0.1:9) could not provide it" in result.stderr


def test_a_cached_repo_resolves_offline(tmp_path):
    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    refs = tmp_path / "hub" / "models--some-org--some-model" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    code = ("from jaxserve.entrypoints.cli import resolve_model; "
            "print(resolve_model('some-org/some-model'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_a_model_that_cannot_be_loaded_is_status_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["serve", str(tmp_path)]) == 2  # in this process: no interpreter start
    err = capsys.readouterr().err
    assert "jaxserve serve: error:" in err and "model_type" in err


@pytest.mark.slow  # the same through `python -m jaxserve.entrypoints.cli` (seconds of imports)
def test_a_model_that_cannot_be_loaded_exits_2_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run_cli("serve", str(tmp_path))
    assert result.returncode == 2
    assert "jaxserve serve: error:" in result.stderr and "model_type" in result.stderr


def test_generate_prints_one_answer_per_prompt_in_this_process(engine_checkpoint, qwen2_llm,
                                                               shared_compilation_cache,
                                                               capsys):
    # qwen2_llm's checkpoint and budgets: its programs are in the session's cache
    code = cli.main(["generate", str(engine_checkpoint("qwen2")), "--prompt", "Hello",
                     "--prompt", "Paged attention", "--chat", "--max-tokens", "4",
                     "--max-num-seqs", "16", "--max-num-batched-tokens", "128",
                     "--no-background-compilation",
                     "--compilation-cache-dir", str(shared_compilation_cache)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert len(printed.out.splitlines()) >= 2
    assert "Compiling" in printed.err  # the warm-up progress bar


@pytest.mark.slow  # the same as a command (seconds of interpreter start and imports)
def test_generate_prints_one_answer_per_prompt(engine_checkpoint):
    result = run_cli("generate", str(engine_checkpoint("qwen2")), "--prompt", "Hello",
                     "--prompt", "Paged attention", "--chat", "--max-tokens", "4",
                     "--max-num-seqs", "8", "--max-num-batched-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2
    assert "Compiling" in result.stderr  # the warm-up progress bar


def test_multi_host_flags_default_to_the_usual_environment_variables(monkeypatch):
    from jaxserve.entrypoints.cli import build_parser

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    args = build_parser().parse_args(["serve", "some-model"])
    assert (args.distributed_coordinator, args.num_processes, args.process_id) == (
        "10.0.0.1:1234", 4, 2)
