"""The one error a request can be refused with: an HTTP status, a gRPC status and a message naming the field
or limit. It is a `grpc_interceptor` GrpcException, so KServe's gRPC interceptor answers it with its status
as it stands; the REST app answers it as JSON `{"error": ...}` with its HTTP status and headers."""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException

GRPC = {
    400: StatusCode.INVALID_ARGUMENT,
    404: StatusCode.NOT_FOUND,
    413: StatusCode.INVALID_ARGUMENT,
    422: StatusCode.INVALID_ARGUMENT,
    429: StatusCode.RESOURCE_EXHAUSTED,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
}


class Rejected(GrpcException):
    """A request refused with `http_status` (and its gRPC counterpart), `details` saying why."""

    def __init__(self, http_status: int, details: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(details=details, status_code=GRPC.get(http_status, StatusCode.INVALID_ARGUMENT))
        self.http_status, self.reason, self.headers = http_status, reason, headers or {}

    def __str__(self) -> str:
        return str(self.details)
