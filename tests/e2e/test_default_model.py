"""The README's serve command: the default model, a real one, answers a real question."""

from __future__ import annotations

import openai

from tests.e2e.stack import Serve


def test_the_default_model_knows_the_capital_of_france():
    serve = Serve(None, workers=1)
    try:
        client = openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        answer = client.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.usage.completion_tokens > 0
    finally:
        assert serve.stop() == 0, serve.log
