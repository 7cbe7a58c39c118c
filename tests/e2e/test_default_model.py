"""The README's serve command: the default model, a real one, answers a real question.

``scripts/serve.sh`` ends in ``.venv/bin/pagoda serve`` from the repository folder; a
user may start that command from any other folder too. Both must serve: the children
that ``pagoda serve`` starts import the installed pagoda wherever they run, and from the
repository no folder there may shadow a package the worker imports (tests/test_install.py).
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.stack import REPO, Serve


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_the_default_model_knows_the_capital_of_france(where, tmp_path):
    serve = Serve(None, workers=1, console_script=True,
                  cwd=REPO if where == "repository" else tmp_path)  # fmt: skip
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
