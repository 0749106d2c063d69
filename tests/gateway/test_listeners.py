"""The edge's local replies: OpenAI error objects on the HTTP API's paths, gRPC elsewhere."""

from __future__ import annotations

from gateway.listeners import (
    http_api_errors,
    http_connection_manager,
    local_rate_limited,
    payload_too_large,
    rate_limit_service_down,
)

LOCAL_RATE_LIMITED = {"extension_filter": {
    "name": "envoy.access_loggers.extension_filters.cel",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                 "ExpressionFilter",
        "expression": "response.code_details == 'local_rate_limited'"}}}
# Built by Envoy from the headers of the tenant's local filter (gateway/ratelimits.py).
LOCAL_MESSAGE = ("tenant '%RESP(x-genmesh-tenant)%' is over its requests_per_second limit of "
                 "%RESP(x-ratelimit-limit)% at this gateway; retry in %RESP(x-ratelimit-reset)% s")
ON_V1 = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v1/"}}}}
RETRY_AFTER_1 = [{"header": {"key": "retry-after", "value": "1"},
                  "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def edge_mappers(*, http_api_prefix: str | None) -> list[dict]:
    manager = http_connection_manager(
        "edge", routes={"route_config": {}}, is_edge=True, max_request_bytes=1024,
        stream_idle_timeout_s=300, max_request_headers_kb=60, access_log=False,
        http_api_prefix=http_api_prefix)
    return manager["local_reply_config"]["mappers"]


def openai_body(message: str, error_type: str, code: str) -> dict:
    return {"json_format": {"error": {"message": message, "type": error_type, "param": None,
                                      "code": code}},
            "content_type": "application/json"}


def test_http_api_mappers_come_first_and_the_grpc_ones_stay_as_they_were():
    grpc_only = edge_mappers(http_api_prefix=None)
    assert grpc_only == [payload_too_large(1024), local_rate_limited(),
                         rate_limit_service_down()]
    mappers = edge_mappers(http_api_prefix="/v1/")
    assert mappers == [*http_api_errors("/v1/", 1024), *grpc_only]
    # Each of the HTTP API's mappers matches only requests under its prefix.
    for mapper in mappers[:-len(grpc_only)]:
        [_, on_path] = mapper["filter"]["and_filter"]["filters"]
        assert on_path == ON_V1


def test_a_local_refusal_of_a_grpc_call_names_the_limit_in_its_message():
    # Envoy sends a gRPC call's local reply body as grpc-message; the status stays
    # RESOURCE_EXHAUSTED (the filter's rate_limited_as_resource_exhausted).
    assert local_rate_limited() == {"filter": LOCAL_RATE_LIMITED,
                                    "body_format_override": {"text_format": LOCAL_MESSAGE}}


def test_rate_limited_replies_are_openai_rate_limit_errors():
    local, over_all, *_ = http_api_errors("/v1/", 1024)
    # retry-after and x-ratelimit-* come with the refusal from the filter that refused.
    assert local == {
        "filter": {"and_filter": {"filters": [LOCAL_RATE_LIMITED, ON_V1]}},
        "body_format_override": openai_body(LOCAL_MESSAGE, "requests", "rate_limit_exceeded"),
    }
    # Any other 429 of Envoy's is the global limit's: the rate-limit service's message is
    # the reply's body.
    assert over_all == {
        "filter": {"and_filter": {"filters": [{"status_code_filter": {"comparison": {
            "op": "EQ", "value": {"default_value": 429,
                                  "runtime_key": "genmesh.http_api.rate_limited_code"}}}},
            ON_V1]}},
        "body_format_override": openai_body("%LOCAL_REPLY_BODY%", "requests",
                                            "rate_limit_exceeded"),
    }


def test_too_large_and_unavailable_replies_are_openai_errors():
    _, _, too_large, rate_limit_service, upstream = http_api_errors("/v1/", 1024)
    assert too_large["filter"]["and_filter"]["filters"][0]["status_code_filter"][
        "comparison"]["value"]["default_value"] == 413
    assert "status_code" not in too_large and "headers_to_add" not in too_large
    assert too_large["body_format_override"] == openai_body(
        "request body larger than 1024 bytes, the gateway's limit (max_request_bytes)",
        "invalid_request_error", "request_too_large")
    assert rate_limit_service == {
        "filter": {"and_filter": {"filters": [{"response_flag_filter": {"flags": ["RLSE"]}},
                                              ON_V1]}},
        "status_code": 503,  # Envoy's own is 500
        "headers_to_add": RETRY_AFTER_1,
        "body_format_override": openai_body(
            "the rate-limit service is unavailable and the gateway fails closed; retry "
            "shortly", "server_error", "service_unavailable"),
    }
    assert upstream == {
        "filter": {"and_filter": {"filters": [
            {"response_flag_filter": {"flags": ["UH", "UF", "UO", "UR", "UC"]}}, ON_V1]}},
        "status_code": 503,
        "headers_to_add": RETRY_AFTER_1,
        "body_format_override": openai_body(
            "the HTTP API service is unavailable (%LOCAL_REPLY_BODY%); retry shortly",
            "server_error", "service_unavailable"),
    }


def test_without_a_body_limit_there_is_no_413_mapper():
    codes = [m["body_format_override"]["json_format"]["error"]["code"]
             for m in http_api_errors("/v1/", None)]
    assert codes == ["rate_limit_exceeded", "rate_limit_exceeded", "service_unavailable",
                     "service_unavailable"]
