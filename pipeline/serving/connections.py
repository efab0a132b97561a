"""A deadline on each request head. uvicorn closes a connection that idles after a response
(`timeout_keep_alive`), but one that connects and then sends nothing, or its headers a byte at
a time (slowloris), would hold a slot of `limit_concurrency` forever: here a connection gets
`head_timeout_s` from connecting, or from its last response, to deliver a complete request
line and headers, else it is closed."""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_head_timeout(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the head deadline `seconds` (uvicorn's `http=` argument)."""
    return type("HeadDeadlineH11", (_HeadDeadline,), {"head_timeout_s": seconds})


class _HeadDeadline(H11Protocol):
    head_timeout_s = 10.0
    _deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._disarm()

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
        self._deadline = self.loop.call_later(self.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()
