"""Bounds on each request head. uvicorn closes a connection that idles after a response
(`timeout_keep_alive`), but one that connects and then sends nothing, or its headers a byte at
a time (slowloris), would hold a slot of `limit_concurrency` forever, and httptools, its fast
parser, does not bound the headers' size. Here a connection gets `head_timeout_s` from
connecting, or from its last response, to deliver a complete request line and headers of at
most `MAX_HEAD` bytes, else it is closed."""

from __future__ import annotations

MAX_HEAD = 64 * 1024  # bytes of request line and headers (h11's own default bound is 16 KiB)


def with_head_bounds(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the head bounds, for
    uvicorn's `http=` argument."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type("BoundedHead", (_HeadBounds, base), {"head_timeout_s": seconds})


class _HeadBounds:
    """Mixed in before uvicorn's protocol class: its `cycle` is the request being answered."""

    head_timeout_s = 10.0
    _deadline = None
    _head = 0  # bytes received since the last request began, while no request is in progress

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = not self._in_request()
        super().data_received(data)
        if self._in_request():
            self._disarm()
        elif waiting:
            self._head += len(data)
            if self._head > MAX_HEAD:
                self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head = 0
        self._deadline = self.loop.call_later(self.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()
