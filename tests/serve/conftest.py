from __future__ import annotations

import pytest

pytest.importorskip("aiohttp", reason="serving needs aiohttp (pip install 'tilert[serve]')")
pytest.importorskip("pydantic", reason="serving needs pydantic (pip install 'tilert[serve]')")

from tests.serve.helpers import write_tokenizer  # noqa: E402
from tilert.engine.api import Engine  # noqa: E402
from tilert.serve.app import Server  # noqa: E402


@pytest.fixture(scope="session")
def server():
    """Token ids only (no tokenizer)."""
    with Engine("tiny", 3, max_seq=128, max_active=4) as eng, Server(eng, "127.0.0.1", 0) as srv:
        yield srv


@pytest.fixture(scope="session")
def text_server(tmp_path_factory):
    """With a tokenizer, its EOS and a ChatML chat template."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    with Engine("tiny", 3, max_seq=128, max_active=4, tokenizer=tok) as eng, Server(eng, "127.0.0.1", 0) as srv:
        yield srv
