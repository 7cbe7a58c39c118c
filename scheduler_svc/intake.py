"""Intake: a Submit checked and turned into a Request and its n sequences.

Everything a step reads per token is copied here, once, from the wire message onto
plain attributes (scheduler_svc/sequence.py). A refused submit changes nothing.
"""

from __future__ import annotations

from collections.abc import Container

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2
from scheduler_svc.block_hash import extend_hashes, extra_keys
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.request_queue import RequestQueue
from scheduler_svc.sequence import UNLIMITED, Request, Sequence


class Intake:
    """Checks submits against the model and the queue's bounds, and numbers sequences."""

    def __init__(self, config: SchedulerConfig, queue: RequestQueue):
        self.config = config
        self._queue = queue
        self._next_seq_id = 1

    def request(
        self,
        submit: session_pb2.Submit,
        now: float,
        owner: str,
        known: Container[tuple[str, str]],
    ) -> Request:
        """The request of ``submit``, its sequences not queued yet. Raises ValueError on
        invalid input (``known``: the keys of the requests running), and QueueFull (a
        ValueError) when the queue cannot take its sequences now."""
        prompt, params = self._check(submit, owner, known)
        self._queue.check_room(params.n, params.n * len(prompt))
        request = Request(
            owner=owner,
            request_id=submit.request_id,
            sampling=submit.sampling,
            priority=submit.priority,
            arrival_time=now,
            seed=params.seed,
            extra_hash=extra_keys(submit.lora_id, submit.cache_salt),
            uses_prefix_cache=params.prompt_logprobs is None,
            lora_id=submit.lora_id,
            structured_output=submit.structured_output
            if submit.HasField("structured_output")
            else None,
            deadline_unix_ms=submit.deadline_unix_ms,
        )
        hashes: list[bytes] = []
        if self.config.enable_prefix_caching:
            extend_hashes(hashes, prompt, self.config.block_size, request.extra_hash)
        for index in range(params.n):
            request.sequences.append(self._sequence(request, index, prompt, params, hashes))
        request.num_unfinished = params.n
        return request

    def _check(
        self, submit: session_pb2.Submit, owner: str, known: Container[tuple[str, str]]
    ) -> tuple[list[int], SamplingParams]:
        """The prompt and sampling parameters of a valid submit; ValueError otherwise."""
        cfg = self.config
        if not submit.request_id:
            raise ValueError("request_id must not be empty")
        if (owner, submit.request_id) in known:
            raise ValueError(f"request {submit.request_id!r} is already running")
        prompt = list(submit.prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if cfg.vocab_size is not None and max(prompt) >= cfg.vocab_size:
            raise ValueError(
                f"token id {max(prompt)} is out of range: the vocabulary has {cfg.vocab_size}"
            )
        if len(prompt) > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's maximum context length "
                f"is {cfg.max_model_len}"
            )
        return prompt, SamplingParams.from_proto(submit.sampling)

    def _sequence(
        self,
        request: Request,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        hashes: list[bytes],
    ) -> Sequence:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        return Sequence(
            seq_id=seq_id,
            request=request,
            index=index,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            sort_key=self._queue.sort_key(request.priority, request.arrival_time, seq_id),
            max_tokens=UNLIMITED if params.max_tokens is None else params.max_tokens,
            min_tokens=params.min_tokens,
            ignore_eos=params.ignore_eos,
            stop_token_ids=frozenset(params.stop_token_ids),
            block_hashes=list(hashes),
        )
