"""Errors raised by the bank and the service; the gRPC layer maps each to a status code.

The bank code raises these (never gRPC or Ray types), so it stays importable on its own.
"""


class ServiceError(Exception):
    """Base class: a request that the memory service refuses, with a message for the caller."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError, LookupError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"
