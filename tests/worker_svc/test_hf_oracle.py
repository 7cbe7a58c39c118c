"""The HF oracle checks itself: each variant really has the property it exists to test, its
references are worth comparing against, and the comparison accepts exactly what it should."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer

from tests.worker_svc.hf_oracle import (
    BOS_ID,
    EOS_ID,
    LLAMA3_ROPE,
    MAX_POSITIONS,
    PAD_ID,
    SLIDING_WINDOW,
    VARIANTS,
    VOCAB_SIZE,
    Reference,
    assert_matches_reference,
    assert_not_degenerate,
    build_model,
    build_tokenizer,
    derive_model,
    hf_greedy,
    load_hf_model,
    random_prompts,
    read_config,
    shared_prefix_prompts,
    tie_tolerance,
)

NEW_TOKENS = 32
# All but the shortest are longer than the sliding window; the longest plus NEW_TOKENS reaches
# positions where both rope scalings have bent the rotation a lot.
PROMPT_LENGTHS = (5, 37, 100)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("hf_oracle_models")
    return lambda name: build_model(name, root)


def prompts_for(name: str) -> list[list[int]]:
    return random_prompts(VOCAB_SIZE, PROMPT_LENGTHS, seed=VARIANTS[name].seed)


def references(model_dir: Callable[[str], Path], name: str) -> list[Reference]:
    return hf_greedy(model_dir(name), prompts_for(name), NEW_TOKENS)


def non_tie_positions(ref: Reference) -> list[int]:
    return [i for i in range(len(ref.tokens)) if ref.gap(i) >= 10 * ref.tie_tolerance(i)]


# ---------------------------------------------------------------------------------------------
# What is on disk
# ---------------------------------------------------------------------------------------------

# Substrings of weight names that must (or must not) be in model.safetensors.
WEIGHTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("lm_head.weight",), ("bias",)),
    "llama_tied": ((), ("lm_head.weight",)),
    "llama_mqa": (("lm_head.weight",), ()),
    "llama3_rope": (("lm_head.weight",), ()),
    "llama_linear_rope": (("lm_head.weight",), ()),
    "llama_legacy_rope": (("lm_head.weight",), ()),
    "mistral_sliding": (("lm_head.weight",), ()),
    "qwen2": (
        ("q_proj.bias", "k_proj.bias", "v_proj.bias", "lm_head.weight"),
        ("o_proj.bias", "q_norm"),
    ),
    "qwen3": (("q_norm.weight", "k_norm.weight"), ("lm_head.weight", "q_proj.bias")),
    "gpt2": (("wpe.weight", "c_attn.bias"), ("lm_head.weight",)),
    "opt": (("model.decoder.final_layer_norm.weight",), ("project_in", "lm_head.weight")),
    "opt_350m_style": (
        ("project_in.weight", "project_out.weight"),
        ("model.decoder.final_layer_norm", "lm_head.weight"),
    ),
}


def test_every_variant_has_weight_expectations() -> None:
    assert set(WEIGHTS) == set(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_on_disk(model_dir: Callable[[str], Path], name: str) -> None:
    variant = VARIANTS[name]
    cfg = read_config(model_dir(name))
    for key, value in variant.on_disk.items():
        assert cfg.get(key) == value, f"{name}: config.json has {key}={cfg.get(key)!r}"
    for key in variant.absent:
        assert key not in cfg, f"{name}: config.json should not have {key}"
    assert cfg["vocab_size"] == VOCAB_SIZE
    assert cfg["dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    positions = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    assert positions == MAX_POSITIONS


@pytest.mark.parametrize("name", list(VARIANTS))
def test_weights_on_disk(model_dir: Callable[[str], Path], name: str) -> None:
    with safe_open(model_dir(name) / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float32}
    required, forbidden = WEIGHTS[name]
    for part in required:
        assert any(part in k for k in keys), f"{name}: no weight named like {part}"
    for part in forbidden:
        assert not any(part in k for k in keys), f"{name}: unexpected weight named like {part}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_reads_the_intended_config(
    model_dir: Callable[[str], Path], name: str
) -> None:
    config = AutoConfig.from_pretrained(model_dir(name))
    model = load_hf_model(model_dir(name))
    # The generation config must not stop at EOS: pagoda's comparisons run with ignore_eos.
    assert model.generation_config.eos_token_id is None
    raw = VARIANTS[name].config
    if "rope_parameters" in raw:
        assert config.rope_parameters == raw["rope_parameters"]
    if name == "mistral_sliding":
        assert config.sliding_window == SLIDING_WINDOW
    if name == "opt_350m_style":
        assert model.model.decoder.final_layer_norm is None
        assert model.model.decoder.project_in.weight.shape == (64, 32)
    tied = config.tie_word_embeddings
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tied


def test_tokenizer(model_dir: Callable[[str], Path]) -> None:
    path = model_dir("llama")
    built = build_tokenizer()
    assert len(built) == VOCAB_SIZE
    loaded = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "A sliding window limits attention to the most recent tokens. Ünïcödé ✓"
    ids = loaded(text)["input_ids"]
    assert ids[0] == BOS_ID
    assert raw.encode(text).ids == ids
    assert max(ids) < VOCAB_SIZE
    assert len(ids) < len(text.encode()), "merges should compress the text"
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_references_are_worth_comparing(model_dir: Callable[[str], Path], name: str) -> None:
    refs = references(model_dir, name)
    assert [len(r.prompt) for r in refs] == list(PROMPT_LENGTHS)
    assert all(len(r.tokens) == NEW_TOKENS for r in refs)
    assert_not_degenerate(refs)
    for ref in refs:
        assert all(top[0] == tok for top, tok in zip(ref.top2_ids, ref.tokens, strict=True))
        assert all(first >= second for first, second in ref.top2_logits)
    # Cached: the same objects come back.
    assert hf_greedy(model_dir(name), prompts_for(name), NEW_TOKENS) == refs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_agrees_with_a_full_forward(model_dir: Callable[[str], Path], name: str) -> None:
    """generate() decodes through the KV cache (for Mistral, one that drops tokens outside the
    window); one uncached forward over prompt + continuation must pick the same tokens."""
    ref = references(model_dir, name)[-1]
    model = load_hf_model(model_dir(name))
    ids = torch.tensor([list(ref.prompt) + list(ref.tokens[:-1])])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(ref.prompt) - 1 :]
    assert_matches_reference(logits.argmax(-1).tolist(), ref, label=f"{name} uncached")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sdpa_agrees_with_eager(model_dir: Callable[[str], Path], name: str) -> None:
    prompt = prompts_for(name)[-1:]
    eager = hf_greedy(model_dir(name), prompt, NEW_TOKENS)[0]
    sdpa = hf_greedy(model_dir(name), prompt, NEW_TOKENS, attn_implementation="sdpa")[0]
    assert_matches_reference(sdpa.tokens, eager, label=f"{name} sdpa")


# ---------------------------------------------------------------------------------------------
# The comparison on real references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_comparison_on_real_references(model_dir: Callable[[str], Path], name: str) -> None:
    for ref in references(model_dir, name):
        assert assert_matches_reference(list(ref.tokens), ref) is None

        i = non_tie_positions(ref)[len(non_tie_positions(ref)) // 2]
        runner_up = ref.top2_ids[i][1]
        flipped = list(ref.tokens[:i]) + [runner_up] + list(ref.tokens[i + 1 :])
        with pytest.raises(AssertionError, match=rf"position {i} of {NEW_TOKENS}.*not below"):
            assert_matches_reference(flipped, ref, label=name)

        outsider = next(t for t in range(VOCAB_SIZE) if t not in ref.top2_ids[i])
        wrong = list(ref.tokens[:i]) + [outsider] + list(ref.tokens[i + 1 :])
        with pytest.raises(AssertionError, match="not among HF's top two"):
            assert_matches_reference(wrong, ref, label=name)

        # The same flip is accepted once that position is made a near-tie, and nothing after
        # it is compared any more.
        first = ref.top2_logits[i][0]
        tied = dataclasses.replace(
            ref,
            top2_logits=ref.top2_logits[:i]
            + ((first, first - 0.5 * tie_tolerance(first, first)),)
            + ref.top2_logits[i + 1 :],
        )
        garbage_after = list(ref.tokens[:i]) + [runner_up] + [outsider] * (NEW_TOKENS - i - 1)
        assert assert_matches_reference(garbage_after, tied) == i

        with pytest.raises(AssertionError, match="tokens against HF's"):
            assert_matches_reference(list(ref.tokens[:-1]), ref)


# ---------------------------------------------------------------------------------------------
# The comparison on hand-made references
# ---------------------------------------------------------------------------------------------


def make_ref(logits: list[tuple[float, float]], **kw: Any) -> Reference:
    tokens = tuple(10 + i for i in range(len(logits)))
    return Reference(
        prompt=(3, 4, 5),
        tokens=tokens,
        top2_ids=tuple((t, t + 100) for t in tokens),
        top2_logits=tuple(logits),
        **kw,
    )


def test_near_tie_rule_absolute_and_relative() -> None:
    ref = make_ref([(3.0, 1.0), (3.0, 2.9995), (5.0, 4.0), (20.0015, 20.0), (2.0, 1.998)])
    assert assert_matches_reference([10, 11, 12, 13, 14], ref) is None
    # Gap 5e-4 < 1e-3: the runner-up is accepted, and later tokens are not compared.
    assert assert_matches_reference([10, 111, 0, 0, 0], ref) == 1
    # Gap 1.5e-3 at logit 20: above 1e-3 but below 1e-4 * 20.
    assert assert_matches_reference([10, 11, 12, 113, 0], ref) == 3
    # Gap 2e-3 at logit 2: no tie.
    with pytest.raises(AssertionError, match="position 4 of 5"):
        assert_matches_reference([10, 11, 12, 13, 114], ref)
    # A clear winner: the runner-up is wrong.
    with pytest.raises(AssertionError, match=r"position 0 of 5: ours 110"):
        assert_matches_reference([110, 11, 12, 13, 14], ref)
    # At a near-tie, a token outside the top two is still wrong.
    with pytest.raises(AssertionError, match="not among HF's top two"):
        assert_matches_reference([10, 7, 12, 13, 14], ref)


def test_gap_exactly_at_the_tolerance_is_not_a_tie() -> None:
    ref = make_ref([(0.5, 0.5 - 2.0**-10)])  # exactly representable, just under 1e-3
    assert assert_matches_reference([110], ref) == 0
    ref = make_ref([(0.0, -1e-3)])
    with pytest.raises(AssertionError):
        assert_matches_reference([110], ref)


def test_failure_message_names_the_model_and_both_tokens() -> None:
    ref = make_ref([(3.0, 1.0), (4.25, 2.5)], model="llama")
    with pytest.raises(AssertionError) as err:
        assert_matches_reference([10, 111], ref, label="llama batch of 8")
    message = str(err.value)
    assert "llama batch of 8" in message
    assert "position 1 of 2" in message
    assert "ours 111" in message
    assert "11 (logit 4.250000)" in message
    assert "111 (logit 2.500000)" in message


def test_length_mismatch_fails() -> None:
    ref = make_ref([(3.0, 1.0), (3.0, 1.0)])
    with pytest.raises(AssertionError, match="3 tokens against HF's 2"):
        assert_matches_reference([10, 11, 12], ref)


def test_degenerate_references_are_rejected() -> None:
    def ref_with(tokens: list[int], prompt: tuple[int, ...] = (3,)) -> Reference:
        return Reference(
            prompt=prompt,
            tokens=tuple(tokens),
            top2_ids=tuple((t, t + 1) for t in tokens),
            top2_logits=tuple((1.0, 0.0) for _ in tokens),
            model="m",
        )

    varied = ref_with(list(range(30)))
    assert_not_degenerate([varied, ref_with(list(range(1, 31)))])
    with pytest.raises(AssertionError, match="9 distinct tokens in 30"):
        assert_not_degenerate([varied, ref_with([t % 9 for t in range(30)])])
    assert_not_degenerate([ref_with([t % 10 for t in range(30)])])
    with pytest.raises(AssertionError, match="same continuation"):
        assert_not_degenerate([varied, ref_with(list(range(30)), prompt=(4,))])


# ---------------------------------------------------------------------------------------------
# Each variant tests what it is named for
# ---------------------------------------------------------------------------------------------


def test_sliding_window_changes_the_output(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Without the window the same weights must continue differently, and only where the window
    cuts context off: with a 5-token prompt, generated token k is predicted at position 4 + k,
    which sees every earlier position while 4 + k < SLIDING_WINDOW."""
    path = model_dir("mistral_sliding")
    windowed = references(model_dir, "mistral_sliding")

    def no_window(cfg: dict[str, Any]) -> None:
        cfg["sliding_window"] = None

    full = hf_greedy(
        derive_model(path, tmp_path / "full", no_window), prompts_for("mistral_sliding"), NEW_TOKENS
    )
    for w, f in zip(windowed, full, strict=True):
        assert w.tokens != f.tokens, f"window changed nothing for a {len(w.prompt)}-token prompt"
    unaffected = SLIDING_WINDOW - len(windowed[0].prompt) + 1
    assert windowed[0].tokens[:unaffected] == full[0].tokens[:unaffected]


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear_rope"])
def test_rope_scaling_changes_the_output(
    model_dir: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    scaled = references(model_dir, name)

    def unscaled(cfg: dict[str, Any]) -> None:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}

    plain = hf_greedy(
        derive_model(model_dir(name), tmp_path / "plain", unscaled), prompts_for(name), NEW_TOKENS
    )
    for s, p in zip(scaled, plain, strict=True):
        assert s.tokens != p.tokens, f"{name}: scaling changed nothing for {len(s.prompt)} tokens"


def test_legacy_rope_layout_reads_like_the_new_one(model_dir: Callable[[str], Path]) -> None:
    """Same weights, same rope; only the config.json layout differs. HF must agree exactly."""
    legacy_cfg = AutoConfig.from_pretrained(model_dir("llama_legacy_rope"))
    assert legacy_cfg.rope_parameters == LLAMA3_ROPE
    legacy = references(model_dir, "llama_legacy_rope")
    new = hf_greedy(model_dir("llama3_rope"), prompts_for("llama_legacy_rope"), NEW_TOKENS)
    assert [r.tokens for r in legacy] == [r.tokens for r in new]


def test_rebuilding_reuses_the_folder(model_dir: Callable[[str], Path]) -> None:
    path = model_dir("llama")
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert build_model("llama", path.parent) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_random_prompts() -> None:
    prompts = random_prompts(VOCAB_SIZE, [1, 7, 100], seed=3)
    assert [len(p) for p in prompts] == [1, 7, 100]
    assert all(3 <= t < VOCAB_SIZE for p in prompts for t in p)
    assert prompts == random_prompts(VOCAB_SIZE, [1, 7, 100], seed=3)
    assert prompts != random_prompts(VOCAB_SIZE, [1, 7, 100], seed=4)


def test_shared_prefix_prompts() -> None:
    prompts = shared_prefix_prompts(VOCAB_SIZE, prefix_len=40, suffix_lengths=[0, 1, 9], seed=5)
    assert [len(p) for p in prompts] == [40, 41, 49]
    assert prompts[1][:40] == prompts[2][:40] == prompts[0]
    assert prompts[1][40] != prompts[2][40]
    assert all(3 <= t < VOCAB_SIZE for p in prompts for t in p)
