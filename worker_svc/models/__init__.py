"""The supported architectures, chosen by ``config.architectures`` in a checkpoint's config.json."""

from __future__ import annotations

from torch import nn

from pagoda_kernels.dispatch import Ops
from worker_svc.models.gpt2 import GPT2LMHeadModel
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.models.opt import OPTForCausalLM

REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def model_class(config: dict) -> type[nn.Module]:
    """The class for a config.json dict; a clear error for anything else."""
    names = config.get("architectures") or []
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name]
    raise ValueError(
        f"unsupported architecture {', '.join(names) or '(none given)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def build_model(config: dict, ops: Ops, tp: tuple[int, int] = (0, 1)) -> nn.Module:
    return model_class(config)(config, ops, tp)
