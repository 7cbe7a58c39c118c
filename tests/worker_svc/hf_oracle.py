"""Hugging Face transformers as the correctness oracle for pagoda's model code.

pagoda's greedy tokens must equal ``model.generate(do_sample=False)`` run in fp32 on one prompt
at a time, token for token. The one allowance is a near-tie: at the first position where the two
sequences differ, both tokens must be HF's top two with a logit gap below
``max(1e-3, 1e-4 * |logit|)``, because batch-dependent rounding may legitimately flip such a
pair; the rest of that sequence is then not compared (it was conditioned on a different token).

The models are tiny random-weight models, one per architecture variant pagoda supports, saved
with ``save_pretrained`` exactly as a hub checkpoint would be, so pagoda loads them through its
real loading code. Their weights are drawn with a much larger scale than transformers' default
init: at the default scale the residual stream is dominated by the current token's embedding and
a tied model repeats one token forever, which would let whole classes of bugs (positions,
attention, the KV cache) go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# ---------------------------------------------------------------------------------------------
# Shared sizes and special tokens
# ---------------------------------------------------------------------------------------------

VOCAB_SIZE = 384
"""Every variant uses this vocabulary so one tokenizer serves them all: 3 special tokens, the 256
byte-level symbols and 125 merges."""

MAX_POSITIONS = 512
"""Room for prompts of a few hundred tokens plus the generated ones."""

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_ORDINARY_ID = 3
"""Random prompts draw from ``[FIRST_ORDINARY_ID, vocab_size)`` so they never contain a special
token that a tokenizer or a stop rule might treat differently."""


@dataclass(frozen=True)
class InitScales:
    """How large the redrawn weights are (transformers would draw everything with std 0.02).

    At 0.02 a tied Llama repeats one token, and at 0.1 it still cycles through a handful, so
    most bugs (positions, attention, the KV cache) would go unseen. These scales
    make continuations use most of their positions for distinct tokens while the logits stay
    within a few tens (no overflow, no saturated softmax), and sliding windows and rope scaling
    visibly change the output. Every draw is ``N(0, scale)`` except norm gains, drawn around 1 so
    that a mixed-up or missing norm weight changes the output too.
    """

    matrix: float = 0.3
    embedding: float = 0.3
    """Token and learned position embeddings (and so a tied head)."""
    bias: float = 0.1
    """Nonzero on purpose: a model that drops Qwen2's q/k/v biases or OPT's must differ. Kept
    below the matrices because in post-LN OPT the raw embeddings enter layer 0 unnormalized, and
    larger biases there add one vector to every position that drowns the token signal."""
    norm_gain: float = 0.1
    center_mlp_out: tuple[str, int] | None = None
    """(parameter-name suffix, input dimension) of the MLP output projection to center.

    A ReLU or GELU has a positive mean, so with random output weights every position's MLP output
    shares one large vector; in GPT-2 and OPT that drives all positions toward the same few
    tokens. Making each output row sum to zero removes the shared part. SwiGLU (Llama, Mistral,
    Qwen) multiplies by a zero-mean projection and needs nothing."""


ABS_TIE_TOLERANCE = 1e-3
REL_TIE_TOLERANCE = 1e-4

RECIPE_VERSION = 1
"""Bumped whenever a variant or the init changes, so models built into a persistent folder by an
older recipe are rebuilt rather than silently reused."""

# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

_SPECIAL_IDS: dict[str, Any] = {
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

_LLAMA_BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
    **_SPECIAL_IDS,
}

# Llama 3 scaling is keyed to the *original* context length. With head_dim 16 and theta 50000 the
# rotary wavelengths are about 6, 24, 94, 364, ... positions; an original length of 64 puts the
# first below the high-frequency cut (16, kept), the second between the cuts (smoothed) and the
# rest above the low-frequency cut (64, divided by 8), so the scaling matters within 100 tokens.
LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

LINEAR_ROPE: dict[str, Any] = {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0}

SLIDING_WINDOW = 16
"""Shorter than most test prompts and than any prompt plus 32 new tokens, so the window cuts
off real context.

HF's window counts the query itself: query ``i`` sees keys ``j`` with ``i - 16 < j <= i``."""


@dataclass(frozen=True)
class Variant:
    """One architecture variant: how to make its config and what its config.json must say."""

    name: str
    config_class: type[PreTrainedConfig]
    config: Mapping[str, Any]
    seed: int
    description: str
    on_disk: Mapping[str, Any] = field(default_factory=dict)
    """Entries config.json must hold, exactly (checked by the oracle's own tests)."""
    absent: tuple[str, ...] = ()
    """Top-level config.json keys that must not be there."""
    legacy_rope: bool = False
    """Rewrite ``rope_parameters`` as top-level ``rope_theta`` / ``rope_scaling`` after saving,
    the layout of checkpoints written before transformers 5 (e.g. Llama 3.1's)."""
    init: InitScales = InitScales()

    def make_config(self) -> PreTrainedConfig:
        return self.config_class(**self.config)


def _llama(**overrides: Any) -> dict[str, Any]:
    return {**_LLAMA_BASE, **overrides}


_NEW_STYLE_ROPE_ABSENT = ("rope_theta", "rope_scaling")
# GPT-2's Conv1D stores weights as (in, out), OPT's Linear as (out, in).
_OPT_INIT = InitScales(center_mlp_out=("fc2.weight", 1))

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            name="llama",
            config_class=LlamaConfig,
            config=_llama(),
            seed=11,
            description="Llama with grouped-query attention (4 query heads, 2 KV heads), untied "
            "head, rope_theta 50000 in transformers-5 rope_parameters",
            on_disk={
                "model_type": "llama",
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
            },
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="llama_tied",
            config_class=LlamaConfig,
            config=_llama(tie_word_embeddings=True),
            seed=12,
            description="Llama whose LM head is the embedding matrix (no lm_head.weight saved)",
            on_disk={"model_type": "llama", "tie_word_embeddings": True},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="llama_mqa",
            config_class=LlamaConfig,
            config=_llama(num_key_value_heads=1),
            seed=13,
            description="Llama with multi-query attention (one KV head)",
            on_disk={"model_type": "llama", "num_key_value_heads": 1, "num_attention_heads": 4},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="llama3_rope",
            config_class=LlamaConfig,
            config=_llama(rope_parameters=dict(LLAMA3_ROPE)),
            seed=14,
            description="Llama with Llama-3 rope scaling that bends the low frequencies",
            on_disk={"model_type": "llama", "rope_parameters": LLAMA3_ROPE},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="llama_linear_rope",
            config_class=LlamaConfig,
            config=_llama(rope_parameters=dict(LINEAR_ROPE)),
            seed=15,
            description="Llama with linear rope scaling (positions divided by 4)",
            on_disk={"model_type": "llama", "rope_parameters": LINEAR_ROPE},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="llama_legacy_rope",
            config_class=LlamaConfig,
            # Same config and seed as llama3_rope: only the layout of config.json differs, so HF
            # must produce the very same tokens for both.
            config=_llama(rope_parameters=dict(LLAMA3_ROPE)),
            seed=14,
            description="llama3_rope's weights with a pre-transformers-5 config.json: top-level "
            "rope_theta and rope_scaling (Llama 3.1 layout), no rope_parameters",
            on_disk={
                "model_type": "llama",
                "rope_theta": 50000.0,
                "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
            },
            absent=("rope_parameters",),
            legacy_rope=True,
        ),
        Variant(
            name="mistral_sliding",
            config_class=MistralConfig,
            config=_llama(sliding_window=SLIDING_WINDOW),
            seed=16,
            description=f"Mistral with a {SLIDING_WINDOW}-token sliding window on every layer",
            on_disk={"model_type": "mistral", "sliding_window": SLIDING_WINDOW},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="qwen2",
            config_class=Qwen2Config,
            config=_llama(),
            seed=17,
            description="Qwen2: biases on the q/k/v projections (none on o_proj)",
            on_disk={"model_type": "qwen2", "use_sliding_window": False},
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="qwen3",
            config_class=Qwen3Config,
            # head_dim * heads (128) != hidden_size (64), as in the real Qwen3 models, and a tied
            # head as in Qwen3-0.6B.
            config=_llama(head_dim=32, tie_word_embeddings=True),
            seed=18,
            description="Qwen3: per-head RMSNorm on q and k, head_dim 32 with hidden 64, tied",
            on_disk={
                "model_type": "qwen3",
                "head_dim": 32,
                "hidden_size": 64,
                "tie_word_embeddings": True,
                "use_sliding_window": False,
            },
            absent=_NEW_STYLE_ROPE_ABSENT,
        ),
        Variant(
            name="gpt2",
            config_class=GPT2Config,
            config={
                "vocab_size": VOCAB_SIZE,
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "n_positions": MAX_POSITIONS,
                "n_inner": 128,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                **_SPECIAL_IDS,
            },
            seed=19,
            init=InitScales(center_mlp_out=("mlp.c_proj.weight", 0)),
            description="GPT-2: learned positions, Conv1D (transposed) weights, tied head",
            on_disk={"model_type": "gpt2", "tie_word_embeddings": True, "n_positions": 512},
        ),
        Variant(
            name="opt",
            config_class=OPTConfig,
            config={
                "vocab_size": VOCAB_SIZE,
                "hidden_size": 64,
                "ffn_dim": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": MAX_POSITIONS,
                "word_embed_proj_dim": 64,
                "do_layer_norm_before": True,
                "dropout": 0.0,
                **_SPECIAL_IDS,
            },
            seed=20,
            init=_OPT_INIT,
            description="OPT like OPT-125m: pre-layer-norm, learned positions offset by 2, tied",
            on_disk={
                "model_type": "opt",
                "do_layer_norm_before": True,
                "word_embed_proj_dim": 64,
                "tie_word_embeddings": True,
            },
        ),
        Variant(
            name="opt_350m_style",
            config_class=OPTConfig,
            config={
                "vocab_size": VOCAB_SIZE,
                "hidden_size": 64,
                "ffn_dim": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": MAX_POSITIONS,
                "word_embed_proj_dim": 32,
                "do_layer_norm_before": False,
                "dropout": 0.0,
                **_SPECIAL_IDS,
            },
            seed=21,
            init=_OPT_INIT,
            description="OPT like OPT-350m: post-layer-norm, no final norm, embeddings of width "
            "32 projected to and from the hidden width 64 (project_in / project_out)",
            on_disk={
                "model_type": "opt",
                "do_layer_norm_before": False,
                "word_embed_proj_dim": 32,
                "hidden_size": 64,
                "tie_word_embeddings": True,
            },
        ),
    ]
}

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_CORPUS = """\
A serving system turns a queue of prompts into streams of tokens. Each request arrives with a
prompt and sampling parameters; the scheduler decides which sequences run in the next step, the
worker runs the model over them and appends one token to each. Keys and values of past tokens
live in a paged cache of fixed-size blocks, so that sequences can grow without copying and
prompts that share a prefix can share the blocks that hold it.
Greedy decoding picks the token with the largest logit at every position. Two implementations
of the same model agree on that token unless the two largest logits are nearly equal, when the
order of floating point additions may decide which one wins.
Rotary position embeddings rotate pairs of query and key features by an angle that grows with
the position; scaling the rotation stretches the context a model can attend to. A sliding window
limits attention to the most recent tokens. Layer norms and RMS norms keep activations in range;
tied embeddings reuse the input matrix as the output head.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How
vexingly quick daft zebras jump! Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024.
"""


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose vocabulary is exactly ``vocab_size``.

    Byte-level so that any text encodes, with the three special tokens first so their ids are
    fixed (pad 0, bos 1, eos 2). Like Llama's tokenizer it prepends bos when encoding. Training
    is deterministic, so every model folder gets the same tokenizer.
    """
    return _tokenizer(vocab_size)


_TOKENIZERS: dict[int, PreTrainedTokenizerFast] = {}


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    if vocab_size in _TOKENIZERS:
        return _TOKENIZERS[vocab_size]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}: the corpus is "
            "too small for that many merges"
        )
    assert tok.token_to_id(PAD_TOKEN) == PAD_ID
    assert tok.token_to_id(BOS_TOKEN) == BOS_ID
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    _TOKENIZERS[vocab_size] = wrapped
    return wrapped


# ---------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------

_STAMP = "oracle_recipe.json"


def redraw_weights(model: torch.nn.Module, scales: InitScales, seed: int) -> None:
    """Redraw every parameter as ``scales`` says, so the model's outputs vary.

    Parameters are visited in registration order with their own generator, so the same seed
    always gives the same weights; a tied head is the embedding and is drawn once.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{module_name}.{param_name}"
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if isinstance(module, torch.nn.Embedding):
                    p.copy_(noise * scales.embedding)
                elif p.dim() >= 2:
                    p.copy_(noise * scales.matrix)
                elif param_name == "bias":
                    p.copy_(noise * scales.bias)
                else:
                    p.copy_(1.0 + noise * scales.norm_gain)
                center = scales.center_mlp_out
                if center is not None and name.endswith(center[0]):
                    p.sub_(p.mean(dim=center[1], keepdim=True))


def build_model(name: str, root: Path) -> Path:
    """Make variant ``name`` under ``root / name`` and return that folder.

    The folder holds what ``save_pretrained`` writes in fp32 with safetensors (config.json,
    generation_config.json, model.safetensors) plus the tokenizer files. A folder already built
    by the same recipe is reused, so a session-wide (or persistent) root builds each model once.
    """
    variant = VARIANTS[name]
    out = Path(root) / name
    stamp = {"recipe": RECIPE_VERSION, "variant": name}
    stamp_path = out / _STAMP
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    config = variant.make_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    redraw_weights(model, variant.init, variant.seed)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(config.vocab_size).save_pretrained(out)
    if variant.legacy_rope:
        _write_legacy_rope(out / "config.json")
    stamp_path.write_text(json.dumps(stamp))
    return out


def _write_legacy_rope(config_path: Path) -> None:
    """Move ``rope_parameters`` to top-level ``rope_theta`` / ``rope_scaling``.

    This is how checkpoints written before transformers 5 store rope settings; transformers 5
    still reads it (folding it back into ``rope_parameters``), and so must pagoda.
    """
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def derive_model(src: Path, dst: Path, edit_config: Callable[[dict[str, Any]], None]) -> Path:
    """Copy the model at ``src`` to ``dst`` with its config.json edited in place by
    ``edit_config``: the same weights under different settings, e.g. without a sliding window,
    to show that a setting really changes the output."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(_STAMP))
    cfg = json.loads((dst / "config.json").read_text())
    edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


def read_config(path: Path) -> dict[str, Any]:
    """config.json exactly as it is on disk."""
    return json.loads((Path(path) / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """HF's greedy continuation of one prompt and what the near-tie rule needs at each position.

    ``top2_ids[i]`` is ``(tokens[i], runner-up)`` and ``top2_logits[i]`` their raw logits (before
    any logits processor), so the generated token is first even if it shares its logit with
    another token.
    """

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    top2_ids: tuple[tuple[int, int], ...]
    top2_logits: tuple[tuple[float, float], ...]
    model: str = ""

    def gap(self, i: int) -> float:
        first, second = self.top2_logits[i]
        return first - second

    def tie_tolerance(self, i: int) -> float:
        return tie_tolerance(*self.top2_logits[i])


def tie_tolerance(first: float, second: float) -> float:
    """The largest top-2 logit gap that still counts as a near-tie."""
    return max(ABS_TIE_TOLERANCE, REL_TIE_TOLERANCE * max(abs(first), abs(second)))


def _fingerprint(path: Path) -> str:
    """Content hash of a model folder's config and weights: a model rebuilt at the same path gets
    new references, and two paths holding the same model share them."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.json")) + sorted(Path(path).glob("*.safetensors")):
        if f.name == _STAMP:
            continue
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


_MODELS: dict[tuple[str, str], PreTrainedModel] = {}
_REFERENCES: dict[tuple[str, str, tuple[int, ...], int], Reference] = {}


def load_hf_model(path: Path, attn_implementation: str = "eager") -> PreTrainedModel:
    """The model at ``path`` in fp32 and eval mode, loaded once per content and implementation.

    Eager attention is the default because it is exact everywhere: the causal (and, for Mistral,
    sliding-window) mask is added to fp32 scores and softmaxed in fp32. SDPA applies the same
    masks in transformers 5 and agrees token for token; the oracle's tests check that.
    """
    key = (_fingerprint(path), attn_implementation)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn_implementation
        )
        model.eval()
        # pagoda runs these comparisons with ignore_eos: EOS may be generated but never stops the
        # sequence. generate() fills an explicit eos_token_id=None from the model's own
        # generation config, so clear it there. (min_new_tokens would not do: it masks EOS out,
        # so HF would pick the runner-up where pagoda picks EOS.)
        model.generation_config.eos_token_id = None
        _MODELS[key] = model
    return _MODELS[key]


def hf_greedy(
    path: Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    attn_implementation: str = "eager",
) -> list[Reference]:
    """HF's greedy continuations of ``prompts``, each exactly ``max_new_tokens`` long.

    Each prompt runs alone (batch of one, no padding), so the reference depends on nothing but
    the prompt. Results are cached in memory by (model content, implementation, prompt, length).
    """
    fp = _fingerprint(path)
    out: list[Reference] = []
    for prompt in prompts:
        key = (fp, attn_implementation, tuple(int(t) for t in prompt), max_new_tokens)
        ref = _REFERENCES.get(key)
        if ref is None:
            model = load_hf_model(path, attn_implementation)
            ref = generate_reference(model, key[2], max_new_tokens, label=Path(path).name)
            _REFERENCES[key] = ref
        out.append(ref)
    return out


def generate_reference(
    model: PreTrainedModel, prompt: tuple[int, ...], max_new_tokens: int, label: str
) -> Reference:
    if not prompt:
        raise ValueError("an empty prompt has no continuation to compare")
    input_ids = torch.tensor([prompt], dtype=torch.long)
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        result = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_config,
        )
    tokens = result.sequences[0, len(prompt) :].tolist()
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"{label}: HF generated {len(tokens)} tokens, wanted {max_new_tokens}")
    logits = torch.stack(result.logits)[:, 0].float()
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{label}: HF produced non-finite logits; the init scale is too large")
    top2_ids, top2_logits = [], []
    for i, tok in enumerate(tokens):
        row = logits[i].clone()
        first = row[tok].item()
        if first != row.max().item():
            raise RuntimeError(f"{label}: generated token {tok} at {i} is not the argmax")
        row[tok] = float("-inf")
        second_id = int(row.argmax())
        top2_ids.append((tok, second_id))
        top2_logits.append((first, row[second_id].item()))
    return Reference(
        prompt=prompt,
        tokens=tuple(tokens),
        top2_ids=tuple(top2_ids),
        top2_logits=tuple(top2_logits),
        model=label,
    )


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def assert_matches_reference(tokens: Sequence[int], ref: Reference, label: str = "") -> int | None:
    """Fail unless ``tokens`` equal HF's greedy tokens, up to one near-tie flip.

    Returns None for an exact match, or the position of an accepted near-tie flip (after which
    nothing was compared), so callers can count how often the allowance was used.
    """
    tokens = [int(t) for t in tokens]
    where = f"{label or ref.model or 'sequence'} (prompt of {len(ref.prompt)} tokens)"
    for i, (ours, hf) in enumerate(zip(tokens, ref.tokens, strict=False)):
        if ours == hf:
            continue
        (first_id, second_id), (first, second) = ref.top2_ids[i], ref.top2_logits[i]
        gap, tol = first - second, tie_tolerance(first, second)
        if ours == second_id and gap < tol:
            return i
        if ours != second_id:
            why = f"our token {ours} is not among HF's top two"
        else:
            why = f"gap {gap:.6g} is not below the near-tie tolerance {tol:.3g}"
        raise AssertionError(
            f"{where}: first difference at generated position {i} of {len(ref.tokens)}: "
            f"ours {ours}, HF's top two {first_id} (logit {first:.6f}) and {second_id} "
            f"(logit {second:.6f}); {why}.\n"
            f"  ours: {tokens[: i + 1]}\n"
            f"  HF:   {list(ref.tokens[: i + 1])}"
        )
    if len(tokens) != len(ref.tokens):
        raise AssertionError(
            f"{where}: {len(tokens)} tokens against HF's {len(ref.tokens)}, equal where both "
            f"have them"
        )
    return None


def assert_not_degenerate(refs: Iterable[Reference], min_distinct_fraction: float = 1 / 3) -> None:
    """Fail when references are too repetitive to catch bugs.

    A continuation with few distinct tokens (a model stuck repeating itself), or continuations
    that are the same whatever the prompt, would match many wrong implementations.
    """
    refs = list(refs)
    assert refs, "no references"
    for ref in refs:
        distinct = len(set(ref.tokens))
        assert distinct >= min_distinct_fraction * len(ref.tokens), (
            f"{ref.model}: degenerate reference for a prompt of {len(ref.prompt)} tokens: "
            f"{distinct} distinct tokens in {len(ref.tokens)}: {list(ref.tokens)}"
        )
    if len(refs) > 1:
        continuations = {ref.tokens for ref in refs}
        assert len(continuations) > 1, (
            f"{refs[0].model}: every prompt has the same continuation {list(refs[0].tokens)}"
        )


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def random_prompts(
    vocab_size: int, lengths: Iterable[int], seed: int, low: int = FIRST_ORDINARY_ID
) -> list[list[int]]:
    """One prompt of uniformly random ordinary tokens per length, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab_size) for _ in range(n)] for n in lengths]


def shared_prefix_prompts(
    vocab_size: int,
    prefix_len: int,
    suffix_lengths: Iterable[int],
    seed: int,
    low: int = FIRST_ORDINARY_ID,
) -> list[list[int]]:
    """Prompts that all start with the same ``prefix_len`` random tokens, then differ.

    For prefix caching: a suffix length of 0 gives a prompt that is exactly the prefix. The
    suffixes start with distinct tokens, so prompts with nonempty suffixes share no more than
    the prefix.
    """
    rng = random.Random(seed)
    prefix = [rng.randrange(low, vocab_size) for _ in range(prefix_len)]
    suffix_lengths = list(suffix_lengths)
    firsts = rng.sample(range(low, vocab_size), len(suffix_lengths))
    prompts = []
    for first, n in zip(firsts, suffix_lengths, strict=True):
        suffix = [first] + [rng.randrange(low, vocab_size) for _ in range(n - 1)] if n else []
        prompts.append(prefix + suffix)
    return prompts
