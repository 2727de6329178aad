"""The `jaxserve` command: `serve [MODEL]` (the OpenAI server), `generate MODEL --prompt`
and `convert MODEL OUT` (an Orbax checkpoint that `serve OUT` restores onto its mesh).

Flags carry vLLM's names and defaults where they apply. MODEL is a local directory or
`.gguf` file, a Hugging Face repo id (fetched with `snapshot_download`, which honours
HF_HUB_OFFLINE), or nothing for `serve`: the default model's GGUF. Heavy imports (jax,
transformers) happen only once a model is actually loaded, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

logger = logging.getLogger("jaxserve")

# What a model repo needs: config, weights, tokenizer and chat template files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}


class ModelNotFoundError(RuntimeError):
    """MODEL is neither a local path nor a repo the hub (or its cache) could provide."""


def _default_cache_dir() -> str:
    """Where compiled programs persist between starts ($XDG_CACHE_HOME/jaxserve/jax)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxserve", "jax")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def parse_size(text: str) -> int:
    """'8GiB', '512M', '1e9' or '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 4GiB, 512M)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def parse_length(text: str) -> int:
    """'4096', '32k' or '1m' -> tokens (k = 1000, K = 1024, as vLLM reads them)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k)")
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20}[match.group(2)]
    return int(match.group(1)) * scale


def _engine_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=sorted(_DTYPES),
                   help="weights and activations; auto = float32 on CPU, bfloat16 on GPU/TPU")
    g.add_argument("--max-model-len", type=parse_length, default=None,
                   help="context length (prompt + output); default: the model's")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens per step; default min(2048, max-model-len)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="share KV blocks of common prompt prefixes")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of device memory for weights and KV cache (GPU/TPU)")
    g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory",
                   type=parse_size, default=None, help="KV cache size, e.g. 4GiB (CPU default: "
                   "a fixed budget; overrides --gpu-memory-utilization)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices to shard the model over")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: split the experts over the tensor-parallel devices "
                        "instead of each expert's MLP width")
    env = os.environ
    g.add_argument("--distributed-coordinator", metavar="HOST:PORT",
                   default=env.get("JAX_COORDINATOR_ADDRESS"),
                   help="multi-host: the jax.distributed coordinator "
                        "(default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="multi-host: processes in the job (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="multi-host: this process (default: $JAX_PROCESS_ID)")
    g.add_argument("--seed", type=int, default=0, help="seed of requests that bring none")
    g.add_argument("--max-num-waiting", type=int, default=None,
                   help="queue cap: further requests get 503 (default: no cap)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="plan each step while the previous one computes (default: on)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="chunk prompts longer than this (0 = only the step budget)")
    g.add_argument("--attention-backend", choices=["cpu", "pallas", "reference"], default=None,
                   help="default: cpu (the native kernel) on CPU, pallas on GPU/TPU; "
                        "reference is pure jnp")
    g.add_argument("--background-compilation", action=argparse.BooleanOptionalAction,
                   default=True, help="serve once the smallest buckets are compiled and "
                   "compile the rest meanwhile (default: on; off under multi-host)")
    g.add_argument("--compilation-cache-dir", default=_default_cache_dir(),
                   help="JAX persistent compilation cache, so later starts compile nothing "
                        "(default: %(default)s; '' turns it off)")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[_engine_flags()],
                                help="run the OpenAI-compatible HTTP server")
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
    serve.add_argument("--max-logprobs", type=int, default=20,
                       help="most logprobs / top_logprobs a request may ask for (<= 20)")
    serve.add_argument("--max-request-body-bytes", type=parse_size, default="10MiB",
                       help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    generate = commands.add_parser("generate", parents=[_engine_flags()],
                                   help="answer prompts offline and print the text")
    generate.add_argument("model", nargs="?", default=None, help="as for serve")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt; repeat for several")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user "
                          "message through the chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    convert = commands.add_parser("convert", help="save MODEL's params (GGUF dequantized) as "
                                  "a sharded Orbax checkpoint that serve/LLM restore directly")
    convert.add_argument("model", help="local path or HF repo id")
    convert.add_argument("out", help="directory to write")
    convert.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                         help="devices to shard the params over (serve with the same size)")
    convert.add_argument("--dtype", default="auto", choices=sorted(_DTYPES))
    convert.add_argument("--log-level", default="info",
                         choices=["debug", "info", "warning", "error"])
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
    from jaxserve.engine.engine_args import create_engine_config
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.parallel.distributed import initialize_distributed

    initialize_distributed(args.distributed_coordinator, args.num_processes, args.process_id)
    config = create_engine_config(
        model_path, dtype=_DTYPES[args.dtype], seed=args.seed, block_size=args.block_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size, attention_backend=args.attention_backend,
        compilation_cache_dir=args.compilation_cache_dir or None,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        scheduling_policy=args.scheduling_policy, max_num_waiting=args.max_num_waiting,
        enable_expert_parallel=args.enable_expert_parallel,
        async_scheduling=args.async_scheduling,
        # multi-host followers replay process 0's steps: every program must exist first
        background_compilation=(args.background_compilation
                                and args.distributed_coordinator is None))
    model_config = config.model_config
    max_len = model_config.max_model_len
    logger.info("loading %s (%s, max_model_len=%d)", model_path, model_config.dtype, max_len)
    return LLMEngine(config, progress=True)


def serve(args: argparse.Namespace) -> int:
    import asyncio

    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.entrypoints.openai.api_server import build_app, serve_http

    if not 0 <= args.max_logprobs <= 20:
        raise ValueError(f"--max-logprobs must be in [0, 20], got {args.max_logprobs}")
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
    engine = AsyncEngine(llm_engine)
    try:
        app = build_app(engine, served_model_names=names, model_root=model_path,
                        api_key=args.api_key, chat_template=chat_template,
                        trust_request_chat_template=args.trust_request_chat_template,
                        max_logprobs=args.max_logprobs,
                        max_request_body_bytes=args.max_request_body_bytes)
        asyncio.run(serve_http(app, args.host, args.port,
                               shutdown_timeout=args.shutdown_timeout))
    finally:
        # Multi-host: wait for a step in flight (its collectives), then let the others go.
        engine.shutdown(timeout=None if broadcaster else 10.0)
        if broadcaster is not None:
            broadcaster.stop()
    logger.info("jaxserve stopped")
    return 0


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
    from jaxserve.model.loading.orbax_checkpoint import convert_checkpoint

    out = convert_checkpoint(resolve_model(args.model), args.out, dtype=_DTYPES[args.dtype],
                             tensor_parallel_size=args.tensor_parallel_size)
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
