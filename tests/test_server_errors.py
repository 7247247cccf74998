"""labkit.server.errors, without a server: every domain error and every upstream failure
kind becomes one status and one body ``{error, message, hint}`` with a hint to act on."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from labkit import errors as domain
from labkit import upstream
from labkit.server.errors import (
    STATUS,
    HTTPError,
    from_http_exception,
    from_validation,
    http_error,
)
from labkit.server.models import ChatRequest


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


DOMAIN = [
    (domain.InvalidSessionIdError("Bad id 'x'."), 400, "invalid_session_id"),
    (domain.SessionNotFoundError("0" * 32), 404, "session_not_found"),
    (domain.SessionBusyError("Session s is busy."), 409, "session_busy"),
    (domain.ContextBudgetError("The message needs 900 tokens."), 413, "context_budget_exceeded"),
    (domain.InvalidMessageError("The message is empty."), 422, "invalid_message"),
    (domain.StoreUnavailableError("Redis is down."), 503, "store_unavailable"),
    (domain.StoreError("The store failed."), 500, "store_error"),
    (domain.ConfigurationError("Unknown provider 'x'."), 500, "configuration_error"),
    (domain.TokenizerUnavailableError("No tiktoken data."), 500, "tokenizer_unavailable"),
    (domain.LabkitError("Something else."), 500, "internal_error"),
]


@pytest.mark.parametrize(("exc", "status", "error"), DOMAIN, ids=[e for *_, e in DOMAIN])
def test_each_domain_error_has_its_status_type_message_and_a_hint(exc, status, error):
    http = http_error(exc)
    assert (http.status, http.error, http.message) == (status, error, exc.message)
    assert http.hint.strip()
    assert http.body() == {"error": error, "message": exc.message, "hint": http.hint}


def test_every_labkit_error_class_is_in_the_table_or_carries_its_own_status():
    """A new domain error added to labkit.errors without a mapping fails here."""
    tested = {type(exc) for exc, _status, _error in DOMAIN}
    for cls in _subclasses(domain.LabkitError) | {domain.LabkitError}:
        if cls.__module__ != "labkit.errors":
            continue
        assert cls in STATUS or cls is domain.UpstreamError, cls
        assert cls in tested or cls is domain.UpstreamError, cls


def test_an_error_without_a_hint_gets_the_tables_default():
    bare = domain.ConfigurationError("No key.")  # ConfigurationError has no class hint
    assert bare.hint == ""
    assert http_error(bare).hint == STATUS[domain.ConfigurationError][2]
    told = domain.ConfigurationError("No key.", hint="export ANTHROPIC_API_KEY=...")
    assert http_error(told).hint == "export ANTHROPIC_API_KEY=..."


def test_the_most_specific_class_wins():
    class ReplicaDown(domain.StoreUnavailableError):
        pass

    assert http_error(ReplicaDown("replica down")).status == 503


def _api_error(status: int, error_type: str) -> anthropic.APIStatusError:
    request = httpx.Request("POST", "http://upstream.test/v1/messages")
    body = {"type": "error", "error": {"type": error_type, "message": f"{error_type} happened"}}
    response = httpx.Response(status, json=body, request=request)
    return anthropic.APIStatusError(f"{status}", response=response, body=body)


UPSTREAM = [
    (_api_error(429, "rate_limit_error"), 429, "rate_limit"),
    (_api_error(529, "overloaded_error"), 503, "overloaded"),
    (_api_error(500, "api_error"), 502, "api_error"),
    (_api_error(400, "invalid_request_error"), 502, "invalid_request"),
    (_api_error(401, "authentication_error"), 502, "authentication"),
    (_api_error(404, "not_found_error"), 502, "model_not_found"),
    (httpx.ReadTimeout("timed out"), 504, "timeout"),
    (httpx.RemoteProtocolError("peer closed connection"), 502, "connection_error"),
]


@pytest.mark.parametrize(("sdk_exc", "status", "error"), UPSTREAM, ids=[e for *_, e in UPSTREAM])
def test_each_upstream_failure_kind_keeps_its_status_and_hint(sdk_exc, status, error):
    exc = upstream.translate(sdk_exc)
    http = http_error(exc)
    assert (http.status, http.error) == (status, error)
    assert http.message == exc.message and http.hint == exc.hint and http.hint.strip()


def test_an_upstream_error_without_a_hint_still_gets_one():
    http = http_error(domain.UpstreamError("It broke.", hint="", kind="api_error", status=502))
    assert http.hint.strip()


def test_the_response_is_the_body_with_the_status_and_extra_fields():
    resp = HTTPError(409, "session_busy", "Busy.", "Wait.").response(
        headers={"X-Session-Id": "abc"}, session_id="abc"
    )
    assert resp.status_code == 409 and resp.headers["x-session-id"] == "abc"
    assert json.loads(resp.body) == {
        "error": "session_busy",
        "message": "Busy.",
        "hint": "Wait.",
        "session_id": "abc",
    }


def _validation(body: object) -> RequestValidationError:
    try:
        ChatRequest.model_validate(body)
    except ValidationError as exc:
        errs = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        return RequestValidationError(errs)
    raise AssertionError("the body was valid")


def test_malformed_json_is_400_invalid_json():
    exc = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error"}]
    )
    http = from_validation(exc)
    assert (http.status, http.error) == (400, "invalid_json")
    assert "not valid JSON" in http.message and "message" in http.hint


def test_wrong_fields_are_422_naming_each_field():
    http = from_validation(_validation({"mesage": "typo"}))
    assert (http.status, http.error) == (422, "invalid_request")
    assert "message: Field required" in http.message and "mesage:" in http.message
    assert "/docs" in http.hint


def test_a_body_that_is_not_an_object_is_422_with_an_example_in_the_hint():
    http = from_validation(_validation(["hi"]))
    assert (http.status, http.error) == (422, "invalid_request")
    assert http.message.startswith("body:") and '{"message": "Hello"}' in http.hint


def test_starlette_errors_keep_their_status_with_a_type_and_a_hint():
    for status, error in ((404, "not_found"), (405, "method_not_allowed"), (418, "http_error")):
        http = from_http_exception(StarletteHTTPException(status, "nope"))
        assert (http.status, http.error, http.message) == (status, error, "nope")
        assert http.hint.strip()
