"""The offline engine: ``LLM(...).generate(prompts, sampling_params)``, as in vLLM.

It wires the two cores that the services run apart — the scheduler
(``scheduler_svc.scheduler.Scheduler``) and the worker's ``ModelRunner`` — in one
process, with the text module for prompts, output text and stop strings. Every
message between them is the same ``pagoda.v1`` protobuf the services exchange, and
each step's outputs reach the requests through ``pagoda.text.request_state``, as they
do at the gateway; what stays here is the progress bar and finishing a sample that hit
a stop string at the in-process scheduler.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pagoda.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.text import Tokenizer
from pagoda.text.request_state import Failure, RequestState, apply_step
from pagoda.v1 import common_pb2, session_pb2
from scheduler_svc.config import SchedulerConfig, default_max_num_batched_tokens
from scheduler_svc.scheduler import Scheduler
from worker_svc.model_runner import ModelRunner

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """An LLM served in this process: continuous batching, paged KV cache, prefix caching."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        policy: str = "fcfs",
        seed: int | None = 0,
        attention_backend: str = "auto",
        device: str = "auto",
        compile: bool = False,
        cuda_graphs: bool = False,
        show_progress: bool = True,
    ):
        model_path = _model_path(model)
        self.model_path = model_path
        self.tokenizer = _load_tokenizer(model_path, tokenizer)
        self.runner = ModelRunner(
            model_path,
            dtype=dtype,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory,
            max_model_len=max_model_len,
            attention_backend=attention_backend,
            compile=compile,
            cuda_graphs=cuda_graphs,
            cuda_graph_max_batch=max_num_seqs,
            show_progress=show_progress,
        )
        max_len = self.runner.max_model_len
        if num_kv_blocks is None and self.runner.num_kv_blocks * block_size < max_len:
            raise ValueError(
                f"the KV cache holds {self.runner.num_kv_blocks * block_size} tokens, less than "
                f"one sequence of max_model_len {max_len}: raise kv_cache_memory or lower "
                "max_model_len"
            )
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_max_num_batched_tokens(max_num_seqs)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=max_len,
                block_size=block_size,
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                eos_token_ids=tuple(self.runner.eos_token_ids),
                vocab_size=self.runner.vocab_size,
                policy=policy,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
            )
        )
        epoch = self.scheduler.join(0, self.runner.num_kv_blocks)
        self.runner.reset(0, epoch)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    # -- generation ------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is a string, a list of token ids, or a dict with ``prompt_token_ids``
        or ``prompt`` (as in vLLM).
        """
        items = _as_list(prompts)
        params = _params_for(items, sampling_params)
        requests: list[_Request] = []
        try:
            for i, (prompt, p) in enumerate(zip(items, params, strict=True)):
                text, ids = self._tokenize_prompt(prompt)
                requests.append(self._submit(text, ids, p, priority[i] if priority else 0))
        except BaseException:
            for request in requests:  # an invalid prompt leaves nothing queued behind
                self.scheduler.abort(request.request_id)
            raise
        self._run(requests, use_tqdm)
        return [r.output() for r in requests]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Render one conversation or several with the model's chat template, then generate."""
        tokenizer = self._require_tokenizer()
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
            )
            # The template already holds the special tokens (BOS) it wants.
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # -- internals ---------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.model_path} has no tokenizer (tokenizer.json): give token ids, "
                "or pass tokenizer=..."
            )
        return self.tokenizer

    def _tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self._require_tokenizer().encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list | tuple):
            return None, [int(t) for t in prompt]
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    def _submit(
        self, text: str | None, ids: list[int], params: SamplingParams, priority: int
    ) -> _Request:
        request_id = str(next(self._ids))
        submit = session_pb2.Submit(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling=params.to_proto(),
            priority=priority,
        )
        self.scheduler.add(submit, time.monotonic())
        return _Request.start(request_id, ids, params, self.tokenizer, prompt=text)

    def _run(self, requests: list[_Request], use_tqdm: bool) -> None:
        by_id = {r.request_id: r for r in requests}
        bar = tqdm(total=len(requests), desc="Generating", unit="req", disable=not use_tqdm)
        scheduler, runner = self.scheduler, self.runner
        try:
            while scheduler.has_unfinished():
                plan = scheduler.schedule(0, time.monotonic())
                if plan is None:
                    raise RuntimeError("requests are waiting but nothing can be scheduled")
                result = runner.execute(plan)
                if result.error.kind:
                    raise RuntimeError(f"the model runner refused a step: {result.error.detail}")
                outputs = scheduler.update(result).get("")
                if outputs is not None:
                    done = self._deliver(outputs, by_id)
                    bar.update(done)
        except BaseException:
            for request in requests:
                scheduler.abort(request.request_id)
            raise
        finally:
            bar.close()

    def _deliver(self, outputs: session_pb2.StepOutputs, by_id: dict[str, _Request]) -> int:
        """Apply one step's outputs (``apply_step``, as the gateway does); returns how many
        requests completed."""
        done = 0
        for rid, report in apply_step(outputs, by_id).items():
            request = by_id[rid]
            for index in report.stopped:
                self.scheduler.finish(rid, index)
            if report.failure is not None:
                self._fail(request, report.failure)
            done += request.complete()
        return done

    def _fail(self, request: _Request, failure: Failure) -> None:
        """A sequence failed inside the engine: raise. Aborted by the scheduler: its
        siblings end too and its unfinished samples say "abort", as vLLM's do."""
        if failure.reason == "error":
            raise RuntimeError(
                f"generation failed inside the engine (request {request.request_id}, "
                f"sample {failure.index})"
            )
        self.scheduler.abort(request.request_id)
        for sample in request.samples:
            if not sample.finished:
                sample.finish("abort", None)


@dataclass(eq=False, kw_only=True)
class _Request(RequestState):
    """A request's state, with the prompt text it came with."""

    prompt: str | None
    completed: bool = False

    def complete(self) -> int:
        """1 the first time every sample has ended, else 0 (for the progress bar)."""
        if self.completed or not self.done:
            return 0
        self.completed = True
        return 1

    def output(self) -> RequestOutput:
        want_logprobs = self.params.logprobs is not None
        outputs = []
        for s in self.samples:
            logprobs = [_position(lp) for lp in s.logprobs] if want_logprobs else None
            cumulative = sum(lp.logprob for lp in s.logprobs) if want_logprobs else None
            outputs.append(
                CompletionOutput(
                    s.index,
                    s.text,
                    s.token_ids,
                    cumulative,
                    logprobs,
                    s.finish_reason,
                    s.stop_reason,
                )
            )
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *(_position(lp) for lp in self.prompt_logprobs)]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=self.completed,
            num_cached_tokens=self.num_cached_tokens,
        )


def _position(lp: common_pb2.TokenLogprobs) -> PositionLogprobs:
    """vLLM's shape: the chosen token, then the top alternatives, each with its rank."""
    out = {lp.token_id: Logprob(lp.logprob, lp.rank)}
    tops = zip(lp.top_token_ids, lp.top_logprobs, strict=True)
    for rank, (token, value) in enumerate(tops, start=1):
        out.setdefault(token, Logprob(value, rank))
    return out


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _params_for(
    items: list[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * len(items)
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(items)
    params = list(sampling_params)
    if len(params) != len(items):
        raise ValueError(f"{len(items)} prompts but {len(params)} sampling parameters")
    return params


def _model_path(model: str | Path | None) -> Path:
    if model is None:
        from pagoda.default_model import default_model_path

        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(model)!r} not found (give a local folder or .gguf file)"
        )
    return path


def _load_tokenizer(model: Path, tokenizer: str | Path | None) -> Tokenizer | None:
    """The tokenizer beside the model, or from its model card for a GGUF file."""
    if tokenizer is not None:
        return Tokenizer.from_dir(Path(tokenizer))
    if model.is_file():
        from pagoda.model_card.writer import ensure_model_card

        return Tokenizer.from_dir(ensure_model_card(model).tokenizer_dir)
    if (model / "tokenizer.json").is_file():
        return Tokenizer.from_dir(model)
    return None
