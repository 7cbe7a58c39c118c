"""Settings of the scheduling policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The token budget of one step when none is given, offline and served alike: vLLM V1's
# default for an API server. A step always has room for one token of every sequence.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def default_max_num_batched_tokens(max_num_seqs: int) -> int:
    return max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_num_seqs)


@dataclass(frozen=True)
class SchedulerConfig:
    """What the policy needs to know; the service shell fills it from flags and the model card.

    Defaults follow vLLM V1: chunked prefill and prefix caching on, 256 sequences
    and a token budget per step.
    """

    max_model_len: int
    block_size: int = 16
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = 256
    eos_token_ids: tuple[int, ...] = ()
    # When known (from the model card), prompts with larger token ids are refused.
    vocab_size: int | None = None
    policy: Literal["fcfs", "priority"] = "fcfs"
    enable_prefix_caching: bool = True
    # Seeds the generator of request seeds (None: from the OS), so tests are repeatable.
    seed: int | None = None
    # Bounds of the waiting queue (None: unbounded, as the offline engine wants): sequences
    # waiting, and their tokens; a submit past either is refused with QueueFull.
    max_waiting_requests: int | None = None
    max_waiting_tokens: int | None = None
    # Prefix affinity and load spread: how long (in the unit of ``now``, seconds in the
    # service) a request is left for a better replica with room (one caching more of its
    # prefix, or as much while running fewer sequences); 0: off.
    affinity_wait_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_model_len", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token a step"
            )
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            bound = getattr(self, name)
            if bound is not None and bound < 1:
                raise ValueError(f"{name} must be >= 1 (or None: unbounded), got {bound}")
        if self.affinity_wait_s < 0:
            raise ValueError(f"affinity_wait_s must be >= 0, got {self.affinity_wait_s}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
