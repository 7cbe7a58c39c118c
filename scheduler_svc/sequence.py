"""The scheduler's state for requests and their sequences, and why a sequence stops.

A request with ``n`` samples is ``n`` sequences, each finished, aborted and
seeded on its own; they share the request's prompt, sampling parameters and seed.
Everything the step loop reads per token is a plain attribute here, copied once
from the wire message at admission.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagoda.v1 import common_pb2

# A max_tokens that never binds (the sequence stops at max_model_len instead).
UNLIMITED = 2**62

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT


class Status(enum.Enum):
    WAITING = "waiting"  # in the global queue (new, or preempted and waiting to resume)
    RUNNING = "running"  # bound to a replica, holding blocks
    FINISHED = "finished"  # done; holds nothing


@dataclass(eq=False, slots=True)
class Request:
    """One submitted prompt. Keyed by (owner, request_id): ids are namespaced by gateway session."""

    owner: str
    request_id: str
    sampling: common_pb2.SamplingParams
    priority: int
    arrival_time: float
    seed: int | None
    extra_hash: bytes  # the prefix-cache extra keys (LoRA id, cache salt)
    # Prompt logprobs need every prompt position computed, so no prefix-cache hit (as vLLM).
    uses_prefix_cache: bool = True
    lora_id: str = ""
    structured_output: common_pb2.StructuredOutput | None = None
    # Unix time in milliseconds after which the request is aborted (0: none).
    deadline_unix_ms: int = 0
    sequences: list[Sequence] = field(default_factory=list)
    num_unfinished: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.owner, self.request_id)


@dataclass(eq=False, slots=True)
class Sequence:
    """One sample of a request: its tokens and how far the model has computed them."""

    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    # Order in the waiting queue and choice of preemption victim: (priority, arrival, seq_id).
    sort_key: tuple[int, float, int]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: frozenset[int]
    block_hashes: list[bytes]
    status: Status = Status.WAITING
    replica_id: int | None = None
    # Tokens whose KV is (or will be, by the end of the scheduled step) in the cache.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission.
    num_cached_tokens: int = 0
    admitted_once: bool = False
    num_preemptions: int = 0
    # Prompt positions whose logprobs were sent: a preempted sequence computes them again.
    num_prompt_logprobs_sent: int = 0
    # Which entry of the waiting heap is this sequence's live one (older entries are stale).
    queue_entry: int = 0
    # When a replica first left it for another replica that caches more of its prefix
    # (prefix affinity), in this stay in the queue; None: never passed over.
    passed_over_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def stop_reason(seq: Sequence, token: int, eos: frozenset[int], max_model_len: int) -> int | None:
    """Why ``seq`` ends now that ``token`` is its last one: STOP on an EOS token (unless
    it ignores EOS) or one of its stop tokens, once it has ``min_tokens`` of output;
    LENGTH at ``max_tokens`` of output or ``max_model_len`` in all; None: it goes on."""
    num_tokens = len(seq.token_ids)
    num_output = num_tokens - seq.num_prompt_tokens
    if num_output >= seq.min_tokens and (
        (token in eos and not seq.ignore_eos) or token in seq.stop_token_ids
    ):
        return STOP
    if num_output >= seq.max_tokens or num_tokens >= max_model_len:
        return LENGTH
    return None
