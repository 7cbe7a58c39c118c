"""Logprobs of sampled tokens and of prompt tokens, from the raw logits: the model's own
distribution, before bias, penalties, temperature and filters (docs/sampling.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.v1 import common_pb2
from worker_svc.sampling.masses import LOG2E, row_maxima
from worker_svc.sampling.ranking import top_candidates
from worker_svc.sampling.tensors import Workspace

# Prompt positions whose logprobs are computed at once (bounds the float32 copy).
_PROMPT_CHUNK = 256


def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    num_top: list[int],
    work: Workspace | None = None,
) -> list[common_pb2.TokenLogprobs]:
    """Logprobs of ``token_ids`` (one per row) and each row's ``num_top`` best tokens.

    From the log-softmax of the logits given (the raw ones, in the sampler). The rank is
    1 + the number of tokens with a strictly higher logit; the top tokens are in the
    candidates' total order (ties: lower id first).
    """
    work = work or Workspace()
    z = work.float32("z", logits)
    scratch = work.like("scratch", z)
    chosen = z.gather(1, token_ids[:, None])
    # Counted as sum(sign(z - chosen where > 0, else 0)): a boolean compare and its sum
    # cost 3x more. The threshold also turns -inf - -inf = NaN into 0.
    torch.sub(z, chosen, out=scratch)
    ranks = F.threshold_(scratch, 0.0, 0.0).sign_().sum(-1).long() + 1
    top = row_maxima(z)
    torch.sub(z, top, out=scratch)
    lse = top.squeeze(1) + torch.log(scratch.mul_(LOG2E).exp2_().sum(-1))
    logprob = chosen.squeeze(1) - lse
    most = max(num_top)
    if most > 0:
        values, ids = top_candidates(z, most)
        top_ids, top_lps = ids.tolist(), (values - lse[:, None]).tolist()
    out = []
    for i, (tok, lp, rank) in enumerate(
        zip(token_ids.tolist(), logprob.tolist(), ranks.tolist(), strict=True)
    ):
        entry = common_pb2.TokenLogprobs(token_id=tok, logprob=lp, rank=rank)
        if num_top[i]:
            entry.top_token_ids.extend(top_ids[i][: num_top[i]])
            entry.top_logprobs.extend(top_lps[i][: num_top[i]])
        out.append(entry)
    return out


@torch.no_grad()
def prompt_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    num_top: int,
    *,
    vocab_size: int | None = None,
) -> list[common_pb2.TokenLogprobs]:
    """Logprobs of prompt tokens: ``target_ids[i]`` under ``logits[i]`` (position i + 1).

    One entry per row with its rank and the ``num_top`` most likely tokens, from the raw
    logits' log-softmax (as sampled tokens' logprobs). Columns at or past ``vocab_size``
    (a padded LM head) are ignored. Rows are done in chunks so a long prompt never needs
    a float32 copy of all its logits at once.
    """
    if logits.dim() != 2 or target_ids.dim() != 1 or target_ids.shape[0] != logits.shape[0]:
        raise ValueError("prompt_logprobs needs logits [P, V] and target_ids [P]")
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    target_ids = target_ids.to(device=logits.device, dtype=torch.int64)
    out: list[common_pb2.TokenLogprobs] = []
    work = Workspace()
    for start in range(0, logits.shape[0], _PROMPT_CHUNK):
        stop = min(start + _PROMPT_CHUNK, logits.shape[0])
        chunk, targets = logits[start:stop], target_ids[start:stop]
        out.extend(token_logprobs(chunk, targets, [num_top] * (stop - start), work))
    return out
