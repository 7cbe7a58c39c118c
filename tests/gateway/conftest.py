"""Fixtures for the gateway's tests: a model card with a real tokenizer and a chat
template, the scheduler double, and a gateway process talking to it.

The tokenizer is the byte-level BPE that the model tests use
(``tests/worker_svc/hf_oracle.build_tokenizer``); it has no chat template, so a small
one is written into the card.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagoda.model_card.card import ModelCard
from pagoda.text import Tokenizer
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

MODEL_NAME = "tiny-chat"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# What sample 0 and sample 1 of every request say (then EOS).
REPLIES = (
    " The answer is 42. Done here, thank you.",
    " Another reply entirely, with no marker at all.",
)


@pytest.fixture(scope="session")
def card(tmp_path_factory: pytest.TempPathFactory) -> ModelCard:
    from tests.worker_svc.hf_oracle import EOS_ID, MAX_POSITIONS, VOCAB_SIZE, build_tokenizer

    folder = tmp_path_factory.mktemp("card")
    build_tokenizer().save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    ModelCard(
        path=folder,
        name=MODEL_NAME,
        identity="ab" * 32,
        architecture="LlamaForCausalLM",
        vocab_size=VOCAB_SIZE,
        eos_token_ids=(EOS_ID,),
        max_model_len=MAX_POSITIONS,
        tokenizer_dir=folder,
    ).write_model_json(folder)
    return ModelCard.load(folder)


@pytest.fixture(scope="session")
def tokenizer(card: ModelCard) -> Tokenizer:
    return Tokenizer.from_dir(card.tokenizer_dir)


@pytest.fixture(scope="session")
def scripts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in REPLIES]


@pytest.fixture(scope="module")
def double(card: ModelCard, scripts: list[list[int]]) -> Iterator[SchedulerDouble]:
    double = SchedulerDouble(card.to_proto(), scripts).start()
    yield double
    double.close()


@pytest.fixture(scope="module")
def gateway(card: ModelCard, double: SchedulerDouble) -> Iterator[GatewayProcess]:
    process = GatewayProcess.start(Path(card.path), double.address)
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()
