"""The UI's endpoint backend against the real `corral serve` (what `corral ui --endpoint` uses)."""

from __future__ import annotations

import pytest

from corral.errors import CorralError
from corral.sampling_params import SamplingParams
from corral.server.launch import ServerProcess
from corral.ui.app import model_line
from corral.ui.backends import EndpointBackend

pytestmark = pytest.mark.slow

KEY = "sk-ui-test"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "default", "--api-key", KEY]) as srv:
        yield srv


async def test_endpoint_backend_chats_with_corral_serve(server):
    backend = EndpointBackend(server.url, api_key=KEY)
    assert model_line(backend.info()).startswith("**default** · 8,192-token context · via ")
    msgs = [{"role": "system", "content": "Your name is Zorblax."},
            {"role": "user", "content": "What is your name?"}]
    deltas = [d async for d in backend.stream_chat(msgs, SamplingParams(temperature=0,
                                                                        max_tokens=12))]
    assert len(deltas) >= 3 and "Zorblax" in "".join(deltas)


async def test_wrong_key_is_a_readable_error(server):
    backend = EndpointBackend(server.url, api_key="wrong", model="default")
    with pytest.raises(CorralError, match=f"^{server.url} answered 401: "):
        [d async for d in backend.stream_chat([{"role": "user", "content": "hi"}],
                                              SamplingParams(max_tokens=2))]
