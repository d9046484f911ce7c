"""More transient failures by default: gRPC codes, botocore, DB-API SQLSTATEs, server signals.

The errors are the libraries' own classes, built locally (no network); the gRPC ones come from a
real call in tests/integrations/test_grpc.py as well.
"""

from __future__ import annotations

import botocore.exceptions
import grpc
import grpc.aio
import httpx
import psycopg.errors
import pytest

from buttress.patterns import _transient
from buttress.patterns._transient import FailedResponse

NOW = 1_800_000_000.0


def aio_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
def test_grpc_codes(code: grpc.StatusCode, transient: bool) -> None:
    error = aio_error(code)
    assert _transient.grpc_code(error) == code.name
    assert _transient.is_transient(error) is transient


def test_a_bare_rpc_error_without_a_code_is_not_transient() -> None:
    assert _transient.grpc_code(grpc.RpcError()) is None
    assert _transient.is_transient(grpc.RpcError()) is False


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetItem",
    )


@pytest.mark.parametrize(
    ("error", "transient", "network", "never_sent"),
    [
        (client_error("ThrottlingException", 400), True, False, False),
        (client_error("ProvisionedThroughputExceededException", 400), True, False, False),
        (client_error("SlowDown", 503), True, False, False),
        (client_error("InternalError", 500), True, False, False),
        (client_error("AccessDenied", 403), False, False, False),
        (client_error("ValidationException", 400), False, False, False),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True, True, True),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), True, True, True),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), True, True, False),
        (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), True, True, False),
        (
            botocore.exceptions.SSLError(endpoint_url="http://x", error="bad cert"),
            False,
            False,
            False,
        ),
    ],
)
def test_botocore(error: Exception, transient: bool, network: bool, never_sent: bool) -> None:
    assert _transient.is_transient(error) is transient
    assert _transient.is_network(error) is network
    assert _transient.never_sent(error) is never_sent


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.errors.SerializationFailure("s"), True),  # 40001
        (psycopg.errors.DeadlockDetected("d"), True),  # 40P01
        (psycopg.errors.lookup("08006")("connection failure"), True),
        (psycopg.errors.lookup("08001")("cannot connect"), True),
        (psycopg.errors.UniqueViolation("dup"), False),  # 23505
        (psycopg.errors.SyntaxError("typo"), False),  # 42601
        (psycopg.errors.lookup("40002")("integrity constraint"), False),
    ],
)
def test_dbapi_sqlstates(error: Exception, transient: bool) -> None:
    assert _transient.is_transient(error) is transient


def test_a_sqlstate_lookalike_outside_the_drivers_is_ignored() -> None:
    class Lookalike(Exception):
        sqlstate = "40001"

    assert _transient.is_transient(Lookalike()) is False


def test_x_should_retry_on_a_raised_http_error() -> None:
    def error(status: int, told: str) -> httpx.HTTPStatusError:
        request = httpx.Request("GET", "http://127.0.0.1/")
        response = httpx.Response(status, headers={"x-should-retry": told}, request=request)
        return httpx.HTTPStatusError("x", request=request, response=response)

    assert _transient.is_transient(error(503, "false")) is False
    assert _transient.is_transient(error(409, "true")) is True
    assert _transient.is_transient(error(503, "maybe")) is True
    assert _transient.is_transient(error(404, "TRUE ")) is True


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "20", "Retry-After": "9"}, 0.02),
        ({"retry-after-ms": "-1", "Retry-After": "9"}, 9.0),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "soon", "grpc-retry-pushback-ms": "300"}, 0.3),
        ({"grpc-retry-pushback-ms": "-1"}, None),
        ({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),
        ({}, None),
    ],
)
def test_server_delay(headers: dict[str, str], expected: float | None) -> None:
    assert _transient.server_delay(httpx.Headers(headers), NOW) == expected


def test_a_failed_response_carries_its_own_decision() -> None:
    told = FailedResponse(object(), 503, method="GET", retryable=False, delay=4.0)
    assert _transient.is_transient(told) is False
    assert _transient.retry_after(told, NOW) == 4.0
    assert _transient.is_network(told) is False
    assert _transient.is_transient(FailedResponse(object(), "UNAVAILABLE", method="/a/B")) is True
