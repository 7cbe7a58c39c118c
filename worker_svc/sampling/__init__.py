"""One batched sampler for a whole step: every sampling row of the step in one pass.

The model runner calls ``Sampler(logits, rows)`` once per step with one row of logits per
sequence that samples, and gets one token (and, where asked, its logprobs) per row. Each
row brings its own parameters; the work is done on the whole batch with a handful of
tensor operations whatever the mix, because a Python loop of tensor ops per row would
cost more than the model on a small CPU.

The order of operations, the exact definitions and the measured costs are in
docs/sampling.md. The points that shape this code:

* Randomness is counter-based (:func:`counter_uniforms`): one uniform number per row,
  a pure function of (seed, sample index, position), so a token does not depend on the
  other rows of the batch, and a sequence resumed after preemption or on another
  machine draws the same numbers. The token is an inverse-CDF draw of that number over
  the row's filtered distribution.
* Nothing sorts a whole row unless it must: greedy rows take a blocked argmax, rows
  without top-k/top-p draw through per-block masses, and top-k/top-p rows look only at a
  few candidate blocks (a full sort of 64 x 49k logits costs over 100 ms on a CPU).
* Candidates are ordered by a strict total order (higher logit first, then lower token
  id), so top-k keeps exactly k tokens and a row's result never depends on how many
  candidates the batch happened to gather.

The parts, one file each: ``randomness`` (the counter-based uniforms), ``tensors``
(reused buffers, lists to tensors), ``ranking`` (blocked argmax, the candidates' total
order), ``masses`` (probabilities as exp2 masses, the blocked inverse-CDF draw),
``plan`` (what a row brings and what is derived from its parameters), ``processing``
(bias, min_tokens, penalties), ``draws`` (temperature, min-p, top-k and top-p draws),
``logprobs`` (of sampled and of prompt tokens) and ``sampler`` (the step).
"""

from worker_svc.sampling.logprobs import prompt_logprobs
from worker_svc.sampling.plan import GREEDY_TEMPERATURE, SamplingRow
from worker_svc.sampling.randomness import counter_uniforms
from worker_svc.sampling.sampler import Sampler, SamplerOutput

__all__ = [
    "GREEDY_TEMPERATURE",
    "Sampler",
    "SamplerOutput",
    "SamplingRow",
    "counter_uniforms",
    "prompt_logprobs",
]
