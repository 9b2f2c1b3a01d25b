"""What every gRPC call goes through before a servicer sees it (all services: the memory
API, health, reflection):

- request bytes that do not parse as the method's message get INVALID_ARGUMENT saying so
  (grpcio's own answer would be INTERNAL "Exception deserializing request!");
- the call is counted in `memory_service.metrics` (method, tenant, status, latency, bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from memory_service import metrics


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse."""

    message: str


def _safe(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "the request message"

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as e:  # any parse failure is the caller's bytes, not a server error
            return Malformed(f"request bytes ({len(data)}) do not parse as {name}: {e}")

    return parse


class _Call:
    """One call's measurement: bytes both ways, then the status and latency at the end."""

    def __init__(self, method: str, context: grpc.ServicerContext):
        self.method, self.context = method, context
        self.start = time.perf_counter()
        self.bytes_in = self.bytes_out = 0
        metrics.TENANT.set("-")  # this thread served other calls before

    def request(self, request: object) -> object:
        if isinstance(request, Malformed):
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        self.bytes_in += request.ByteSize()
        return request

    def response(self, response: object) -> object:
        self.bytes_out += response.ByteSize()
        return response

    def requests(self, iterator: Iterator) -> Iterator:
        for request in iterator:
            yield self.request(request)

    def responses(self, iterator: Iterator) -> Iterator:
        for response in iterator:
            yield self.response(response)

    def finish(self, error: BaseException | None) -> None:
        code = self.context.code()
        if code is None:  # not set by an abort
            if error is None:
                code = grpc.StatusCode.OK
            elif isinstance(error, GeneratorExit):  # the client went away mid-stream
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        metrics.observe_call(
            self.method,
            metrics.TENANT.get(),
            code.name,
            time.perf_counter() - self.start,
            self.bytes_in,
            self.bytes_out,
        )


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary:

        def unary_unary(request, context):
            call, error = _Call(method, context), None
            try:
                return call.response(handler.unary_unary(call.request(request), context))
            except BaseException as e:
                error = e
                raise
            finally:
                call.finish(error)

        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream:

        def unary_stream(request, context):
            call, error = _Call(method, context), None
            try:
                yield from call.responses(handler.unary_stream(call.request(request), context))
            except BaseException as e:
                error = e
                raise
            finally:
                call.finish(error)

        return handler._replace(unary_stream=unary_stream)
    if handler.stream_unary:

        def stream_unary(requests, context):
            call, error = _Call(method, context), None
            try:
                return call.response(handler.stream_unary(call.requests(requests), context))
            except BaseException as e:
                error = e
                raise
            finally:
                call.finish(error)

        return handler._replace(stream_unary=stream_unary)

    def stream_stream(requests, context):
        call, error = _Call(method, context), None
        try:
            yield from call.responses(handler.stream_stream(call.requests(requests), context))
        except BaseException as e:
            error = e
            raise
        finally:
            call.finish(error)

    return handler._replace(stream_stream=stream_stream)


class FrontDoor(grpc.ServerInterceptor):
    """Safe request parsing and metrics for every method the server serves."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        handler = handler._replace(request_deserializer=_safe(handler.request_deserializer))
        return _wrap(handler, method)
