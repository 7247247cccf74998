"""Property test of the chat API's request handling: schemathesis generates requests
from the server's own ``/openapi.json`` (valid and invalid bodies, ids, headers) and
no answer may be a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

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


def test_no_generated_request_gets_a_5xx(fuzz_server):
    """Every operation of the schema, valid and invalid inputs (schemathesis's pytest
    plugin does not load under pytest 9, so the strategies are driven here)."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    seen: dict[int, int] = {}

    for operation in operations:

        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
            generation_mode=GenerationMode.NEGATIVE
        )

        @given(case=strategy)
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert body["error"] and body["message"], body  # errors say what is wrong

        check()
    print("status codes seen:", seen)
    assert any(code >= 400 for code in seen) and any(code < 300 for code in seen), seen


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({"message": JSON}),
    st.fixed_dictionaries({"message": st.text(max_size=2100)}, optional={"system_prompt": JSON}),
)


def test_arbitrary_bodies_on_a_real_session_never_5xx_and_store_only_whole_turns(fuzz_server):
    import httpx

    with httpx.Client(base_url=fuzz_server.url, timeout=30) as http:
        sid = http.post("/chat/new", json={"message": "hello"}).json()["session_id"]

        @given(body=BODIES, path=st.sampled_from([f"/chat/{sid}", f"/chat/stream/{sid}", "/chat/new"]))
        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(body, path):
            before = http.get(f"/sessions/{sid}/history").json()
            r = http.post(path, json=body)
            assert r.status_code < 500, (path, body, r.text)
            after = http.get(f"/sessions/{sid}/history").json()
            roles = [m["role"] for m in after["messages"]]
            assert roles == ["user", "assistant"] * after["turn_count"]
            if r.status_code >= 400 and path != "/chat/new":
                assert after == before  # a refused request stores nothing

        check()
