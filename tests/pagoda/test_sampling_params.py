import math

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (
        16,
        0,
        None,
        None,
        None,
    )
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output and p.detokenize


def test_round_trip_keeps_zero_distinct_from_unset():
    p = SamplingParams(
        n=3,
        temperature=0.0,
        top_p=0.5,
        top_k=-1,
        seed=0,
        stop="END",
        stop_token_ids=[7],
        max_tokens=None,
        logit_bias={5: -100, 9: 2.5},
        logprobs=0,
        prompt_logprobs=2,
        skip_special_tokens=False,
        detokenize=True,
    )
    assert p.top_k == 0 and p.stop == ["END"] and p.greedy
    wire = common_pb2.SamplingParams.FromString(p.to_proto().SerializeToString())
    assert wire.HasField("temperature") and wire.temperature == 0.0
    assert wire.HasField("seed") and not wire.HasField("max_tokens")
    assert SamplingParams.from_proto(wire) == p


def test_unset_wire_fields_take_the_defaults():
    p = SamplingParams.from_proto(common_pb2.SamplingParams())
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0 and p.repetition_penalty == 1.0
    assert p.max_tokens is None and p.seed is None and p.logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    off = SamplingParams(detokenize=False, max_tokens=4)
    assert SamplingParams.from_proto(off.to_proto()) == off


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be in"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"], "detokenize": False}, "stop strings .* need detokenize"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {3: 101.0}}, "logit_bias value"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias token id"),
        ({"seed": 2**63}, "seed"),
        ({"n": True}, "integer"),
        ({"temperature": "hot"}, "number"),
    ],
)
def test_invalid_values_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
