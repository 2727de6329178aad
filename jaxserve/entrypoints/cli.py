"""The `jaxserve` command: `serve [MODEL]` (the OpenAI server), `generate MODEL --prompt`
and `convert MODEL OUT` (an Orbax checkpoint that `serve OUT` restores onto its mesh).

The engine flags are generated from `EngineArgs` (one per option, named after it); all
flags carry vLLM's names and defaults where they apply. MODEL is a local directory or
`.gguf` file, a Hugging Face repo id (fetched with `snapshot_download`, which honours
HF_HUB_OFFLINE), or nothing for `serve`: the default model's GGUF. Heavy imports (jax,
transformers) happen only once a model is actually loaded, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from jaxserve.engine.engine_args import EngineArgs, parse_size

logger = logging.getLogger("jaxserve")

# What a model repo needs: config, weights, tokenizer and chat template files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_LOG_LEVELS = ["debug", "info", "warning", "error"]


class ModelNotFoundError(RuntimeError):
    """MODEL is neither a local path nor a repo the hub (or its cache) could provide."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    """What the process needs beside the engine options: multi-host and logging."""
    g = parser.add_argument_group("process")
    env = os.environ
    g.add_argument("--distributed-coordinator", metavar="HOST:PORT",
                   default=env.get("JAX_COORDINATOR_ADDRESS"),
                   help="multi-host: the jax.distributed coordinator "
                        "(default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="multi-host: processes in the job (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="multi-host: this process (default: $JAX_PROCESS_ID)")
    g.add_argument("--log-level", default="info", choices=_LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None,
                       help="local path or HF repo id; default: the bundled SmolLM2 GGUF")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use as `model`; default: MODEL as given")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1 and (de)tokenize")
    serve.add_argument("--chat-template", default=None,
                       help="a Jinja chat template, or the path of a file holding one")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests bring their own chat_template (it runs on the "
                       "server's event loop)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='read the tool calls of tool_choice "auto" outputs (needs '
                       "--tool-call-parser)")
    serve.add_argument("--tool-call-parser", default=None,
                       help="the tool-call syntax of the model's outputs: hermes, llama3_json, "
                       "mistral or pythonic")
    serve.add_argument("--max-logprobs", type=int, default=20,
                       help="most logprobs / top_logprobs a request may ask for (<= 20)")
    serve.add_argument("--max-request-body-bytes", type=parse_size, default="10MiB",
                       help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    serve.add_argument("--disable-dashboard", action="store_true",
                       help="no live dashboard page (GET /dashboard) and no event stream")
    serve.add_argument("--step-timeout", type=float, default=300.0,
                       help="seconds after which an engine step counts as hung: the engine "
                       "is dead and the server exits with status 1")
    generate = commands.add_parser("generate", help="answer prompts offline and print the text")
    generate.add_argument("model", nargs="?", default=None, help="as for serve")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt; repeat for several")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user "
                          "message through the chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    for command in (serve, generate):
        EngineArgs.add_cli_args(command)
        _add_process_flags(command)
    convert = commands.add_parser("convert", help="save MODEL's params (GGUF dequantized) as "
                                  "a sharded Orbax checkpoint that serve/LLM restore directly")
    convert.add_argument("model", help="local path or HF repo id")
    convert.add_argument("out", help="directory to write")
    # the params are sharded over tensor-parallel-size devices: serve with the same size
    EngineArgs.add_cli_args(convert, only=("dtype", "tensor_parallel_size"))
    convert.add_argument("--log-level", default="info", choices=_LOG_LEVELS)
    return parser


def resolve_model(model: str | None) -> str:
    """A local path for MODEL: as given if it exists, the default GGUF for None, else a
    snapshot of the Hugging Face repo (ModelNotFoundError with the reason if none)."""
    if model is None:
        from jaxserve.entrypoints.default_model import default_model_path

        return default_model_path()
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return expanded
    if expanded.startswith((os.sep, ".")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model {model!r}: no such file or directory")
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return huggingface_hub.snapshot_download(model, allow_patterns=_HUB_PATTERNS)
    except Exception as error:  # noqa: BLE001 - network, auth, validation: all end here
        where = ("HF_HUB_OFFLINE is set and it is not in the local cache"
                 if constants.HF_HUB_OFFLINE else
                 f"the Hugging Face Hub ({constants.ENDPOINT}) could not provide it")
        raise ModelNotFoundError(
            f"model {model!r} is not a local path, and {where}: {type(error).__name__}: "
            f"{str(error).strip().rstrip('.')}. Pass a local directory or .gguf file, or "
            "check the network (HF_ENDPOINT, HF_TOKEN).") from error


def build_engine(model_path: str, args: argparse.Namespace):
    """An LLMEngine from the engine flags: loads weights, then compiles (progress bars)."""
    from jaxserve.core.faults import FaultInjector
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.parallel.distributed import initialize_distributed

    initialize_distributed(args.distributed_coordinator, args.num_processes, args.process_id)
    engine_args = EngineArgs.from_cli_args(model_path, args)
    if args.distributed_coordinator is not None:
        # multi-host followers replay process 0's steps: every program must exist first
        engine_args = dataclasses.replace(engine_args, background_compilation=False)
    config = engine_args.create_engine_config()
    model_config = config.model_config
    max_len = model_config.max_model_len
    logger.info("loading %s (%s, max_model_len=%d)", model_path, model_config.dtype, max_len)
    # test-only fault injection (core/faults.py), read once here
    return LLMEngine(config, progress=True, faults=FaultInjector.from_env(os.environ))


def serve(args: argparse.Namespace) -> int:
    import asyncio

    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.entrypoints.openai.api_server import build_app, serve_http
    from jaxserve.entrypoints.openai.tools import AUTO_TOOL_CALL_PARSERS

    if not 0 <= args.max_logprobs <= 20:
        raise ValueError(f"--max-logprobs must be in [0, 20], got {args.max_logprobs}")
    parser = args.tool_call_parser
    if parser not in (None, *AUTO_TOOL_CALL_PARSERS) or (args.enable_auto_tool_choice
                                                        and parser is None):
        raise ValueError(f"--tool-call-parser must be one of {list(AUTO_TOOL_CALL_PARSERS)} "
                         f"(--enable-auto-tool-choice needs it), got {parser!r}")
    chat_template = args.chat_template
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    model_path = resolve_model(args.model)
    names = args.served_model_name or [
        args.model or os.path.splitext(os.path.basename(model_path))[0]]
    llm_engine, broadcaster = build_engine(model_path, args), None
    if args.distributed_coordinator is not None:  # process 0 serves; the others follow it
        from jaxserve.parallel.step_broadcast import StepBroadcaster, follow

        broadcaster = StepBroadcaster()
        broadcaster.warm_up()
        if not broadcaster.is_source:
            follow(llm_engine.runner, broadcaster)
            return 0
        llm_engine.step_broadcaster = broadcaster
    engine = AsyncEngine(llm_engine, step_timeout=args.step_timeout)
    try:
        app = build_app(engine, served_model_names=names, model_root=model_path,
                        api_key=args.api_key, chat_template=chat_template,
                        trust_request_chat_template=args.trust_request_chat_template,
                        max_logprobs=args.max_logprobs,
                        tool_call_parser=parser if args.enable_auto_tool_choice else None,
                        reasoning_parser=args.reasoning_parser,
                        max_request_body_bytes=args.max_request_body_bytes,
                        enable_dashboard=not args.disable_dashboard)
        status = asyncio.run(serve_http(app, args.host, args.port,
                                        shutdown_timeout=args.shutdown_timeout))
    finally:
        # Multi-host: wait for a step in flight (its collectives), then let the others go.
        engine.shutdown(timeout=None if broadcaster else 10.0)
        if broadcaster is not None:
            broadcaster.stop()
    logger.info("jaxserve stopped" if status == 0 else "jaxserve stopped: the engine died")
    return status


def generate(args: argparse.Namespace) -> int:
    from jaxserve.sampling_params import SamplingParams

    engine = build_engine(resolve_model(args.model), args)
    tokenizer = engine.tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p)
    request_ids = []
    for prompt in args.prompt:
        text = prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=not args.chat)
        request_ids.append(engine.add_request(None, ids, params, prompt=text))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    if args.process_id:  # multi-host: every process holds the answers; the first prints
        return 0
    for request_id in request_ids:
        print(finished[request_id].outputs[0].text, flush=True)
    return 0


def convert(args: argparse.Namespace) -> int:
    from jaxserve.entrypoints.convert import convert_checkpoint

    options = EngineArgs.from_cli_args(resolve_model(args.model), args)
    out = convert_checkpoint(options.model, args.out, dtype=options.dtype,
                             tensor_parallel_size=options.tensor_parallel_size)
    print(out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    try:
        return {"serve": serve, "generate": generate, "convert": convert}[args.command](args)
    except (ModelNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"jaxserve {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
