"""uvicorn's HTTP/1.1 protocol (h11) with the connection timeouts it lacks, so that no client can hold a socket.

uvicorn times a connection out only between requests it has answered (`timeout_keep_alive`), and the first byte
received cancels that timer: a new connection that sends nothing, or headers sent a byte a second, stay open for
ever. `TimedH11Protocol` adds:

- idle: a connection with no request under way (new, or kept alive after an answer) is closed after
  `keep_alive_timeout` seconds without a byte;
- headers: a request's headers must be complete within `header_timeout` seconds of their first byte.

The body has its own limit (`BodyGuard`, 408). Each close is counted in /metrics
(`gptrain_connections_closed_total{reason="idle"|"header_timeout"}`).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_protocol(metrics, header_timeout: float) -> type:
    """The protocol class for `uvicorn.Config(http=...)`, counting its closes in `metrics`."""

    class TimedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_idle()

        def _arm_idle(self) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
            super().data_received(data)
            self._head_check()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)  # pipelined, partial
            self._head_check()

        def _head_check(self) -> None:
            if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
                self._stop_head_timer()

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                metrics.connection_closed("header_timeout")
                self.transport.close()

        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing():
                metrics.connection_closed("idle")
            super().timeout_keep_alive_handler()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

    return TimedH11Protocol
