"""Property test of the chat API's request handling: schemathesis generates requests
from the server's own ``/openapi.json`` (valid and invalid bodies, ids, headers) and
no answer may be a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from labkit.server import ChatServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from labkit.localapi import LocalAPIServer

    db = tmp_path_factory.mktemp("fuzz") / "chat.db"
    with LocalAPIServer(engine="sim", ttft_ms=0, itl_ms=0, reply_tokens=3, seed=1) as api, ChatServer(
        store_url=f"sqlite:///{db}", provider="local", base_url=api.base_url, max_retries=0,
        max_message_chars=2000,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def chat_api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("chat_api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["message"], body  # errors say what is wrong
