"""LLM: the offline batch API, vLLM-compatible.

`LLM(model_dir, **options)` builds the configs from `EngineArgs(model_dir, **options)`
(validated once), loads weights and tokenizer, compiles every bucket, and `generate()` runs
prompts to completion with continuous batching, returning `RequestOutput`s in input order.
Prompts are strings or `{"prompt_token_ids": [...]}` dicts; `chat()` goes through the
tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxserve.engine.engine_args import EngineArgs
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

PromptType = str | dict


class LLM:
    def __init__(self, model: str, *, progress: bool = True, **kwargs):
        """`kwargs`: any `EngineArgs` option (`max_num_seqs=64`, ...); an unknown one is a
        TypeError naming it, a bad value a ValueError naming it. `progress`: bars for the
        weights' loading and the compilation."""
        config = EngineArgs(model, **kwargs).create_engine_config()
        self.llm_engine = LLMEngine(config, progress=progress)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # -- generation ----------------------------------------------------------------------
    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must have 'prompt_token_ids'")
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be str or dict, got {type(prompt).__name__}")
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
        return prompt, tokenizer.encode(prompt)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts")
        engine = self.llm_engine
        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                text, ids = self._prompt_ids(prompt)
                request_ids.append(engine.add_request(None, ids, params, prompt=text))
        except BaseException:  # one bad prompt: none of the batch runs
            engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update()
            except BaseException:
                engine.abort_request([r for r in request_ids if r not in finished])
                raise
        for request_id, error in engine.pop_failed_requests().items():  # dropped alone
            raise RuntimeError(f"request {request_id} failed: {error!r}") from error
        return [finished[r] for r in request_ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the chat template."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def get_metrics(self) -> dict[str, float]:
        return self.llm_engine.get_stats()

    def wait_for_compilation(self, timeout: float | None = None) -> bool:
        """Blocks until every program is compiled (`background_compilation` compiles the
        larger buckets while the engine already serves) or `timeout` seconds passed;
        returns whether all are."""
        return self.llm_engine.wait_for_compilation(timeout)
