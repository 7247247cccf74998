"""Property test of the chat API's request handling: schemathesis generates requests
from the server's own ``/openapi.json`` (valid and invalid bodies, ids, headers) and
no answer may be a 5xx.

Hypothesis runs under the "repro" profile of conftest.py (derandomized, no example
database): every run sends the same requests, so a failure here is a defect to fix,
not bad luck. Bodies are what a client can put on the wire: JSON text (finite numbers
only, as a JSON encoder writes them) or arbitrary, often malformed, bytes.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from labkit.server import ChatServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[None, "fuzz-server-key-0123456789"], ids=["open", "key"])
def fuzz_server(request, chat_sim, tmp_path_factory):
    """The server under fuzz, without and with a server key (then every request sends it)."""
    db = tmp_path_factory.mktemp("fuzz") / "chat.db"
    with ChatServer(
        store_url=f"sqlite:///{db}", provider="local", base_url=chat_sim.base_url, max_retries=0,
        max_message_chars=2000, server_key=request.param,
    ) as server:  # fmt: skip
        server.auth = {"Authorization": f"Bearer {request.param}"} if request.param else {}
        yield server


def test_no_generated_request_gets_a_5xx(fuzz_server):
    """Every operation of the schema, valid and invalid inputs (schemathesis's pytest
    plugin does not load under pytest 9, so the strategies are driven here)."""
    schema = schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json", headers=fuzz_server.auth
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    seen: dict[int, int] = {}

    for operation in operations:
        strategy = operation.as_strategy(
            generation_mode=GenerationMode.POSITIVE
        ) | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(max_examples=40)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=30, headers=fuzz_server.auth)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                case.method,
                case.formatted_path,
                case.body,
                response.text,
            )
            if response.status_code >= 400:
                body = response.json()
                assert body["error"] and body["message"], body  # errors say what is wrong

        check()
    print("status codes seen:", seen)
    assert any(code >= 400 for code in seen) and any(code < 300 for code in seen), seen


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
WELL_FORMED = st.one_of(
    JSON,
    st.fixed_dictionaries({"message": JSON}),
    st.fixed_dictionaries({"message": st.text(max_size=2100)}, optional={"system_prompt": JSON}),
).map(lambda value: json.dumps(value).encode())
MALFORMED = st.one_of(
    st.binary(max_size=64),  # not JSON, often not UTF-8
    WELL_FORMED.flatmap(
        lambda raw: st.integers(0, max(len(raw) - 1, 0)).map(lambda n: raw[:n])
    ),  # cut short
    st.sampled_from(
        [b'{"message": NaN}', b'{"message": Infinity}', b'{"message": "hi"}{}', b"\xef\xbb\xbf{}"]
    ),
)
BODIES = st.one_of(WELL_FORMED, MALFORMED)


def test_arbitrary_bodies_on_a_real_session_never_5xx_and_store_only_whole_turns(fuzz_server):
    import httpx

    with httpx.Client(base_url=fuzz_server.url, timeout=30, headers=fuzz_server.auth) as http:
        sid = http.post("/chat/new", json={"message": "hello"}).json()["session_id"]

        @given(
            body=BODIES, path=st.sampled_from([f"/chat/{sid}", f"/chat/stream/{sid}", "/chat/new"])
        )
        @settings(max_examples=150)
        def check(body: bytes, path: str) -> None:
            before = http.get(f"/sessions/{sid}/history").json()
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, body, r.text)
            after = http.get(f"/sessions/{sid}/history").json()
            roles = [m["role"] for m in after["messages"]]
            assert roles == ["user", "assistant"] * after["turn_count"]
            if r.status_code >= 400 and path != "/chat/new":
                assert after == before  # a refused request stores nothing

        check()
