"""The user-facing sampling parameters, with vLLM's defaults.

This is the one hand-written twin of a pagoda.v1 message: users of the offline
``LLM`` build it in Python, and the gateway validates every request through it.
It converts to and from ``common_pb2.SamplingParams`` at the boundary, so every
service sees the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from pagoda.v1 import common_pb2

_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1


@dataclass
class SamplingParams:
    """How to generate tokens for a prompt. Invalid values raise ``ValueError``."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    # False: token ids only, no text (vLLM's ``detokenize``); no stop strings then.
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        _check_int("n", self.n, 1, 1024)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        if not (0.0 < self.top_p <= 1.0) or not math.isfinite(self.top_p):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0, _UINT32_MAX >> 1, hint="0 or -1 disables it")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise ValueError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), _INT64_MAX)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must hold non-empty strings")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched on the text: they need detokenize=True")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t, 0, _UINT32_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, _UINT32_MAX)
        _check_int("min_tokens", self.min_tokens, 0, _UINT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias token id", token, 0, _UINT32_MAX)
            _check_float("logit_bias value", bias, -100.0, 100.0)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, 20)

    def to_proto(self) -> common_pb2.SamplingParams:
        """The wire form; every field is set explicitly, so defaults never drift."""
        return common_pb2.SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias,
            detokenize=self.detokenize,
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.SamplingParams) -> SamplingParams:
        """Reads the wire form; an unset optional field takes this class's default."""
        kwargs = {}
        for f in fields(cls):
            if msg.DESCRIPTOR.fields_by_name[f.name].has_presence:
                if msg.HasField(f.name):
                    kwargs[f.name] = getattr(msg, f.name)
                elif f.name in _UNSET_MEANS_NONE:
                    kwargs[f.name] = None
            else:
                kwargs[f.name] = getattr(msg, f.name)
        kwargs["n"] = kwargs["n"] or 1
        kwargs["stop"] = list(kwargs["stop"])
        kwargs["stop_token_ids"] = list(kwargs["stop_token_ids"])
        kwargs["logit_bias"] = dict(kwargs["logit_bias"])
        return cls(**kwargs)


# Optional wire fields whose absence means "none" rather than the Python default.
_UNSET_MEANS_NONE = frozenset({"seed", "max_tokens", "logprobs", "prompt_logprobs"})


def _check_int(name: str, value: object, lo: int, hi: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be in [{lo}, {hi}]{extra}, got {value}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
