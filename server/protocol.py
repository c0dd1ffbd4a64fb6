"""uvicorn's HTTP protocol plus the request deadlines and the header limit it lacks.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 beyond
``limit_concurrency``, but with its httptools parser (what ``uvicorn[standard]`` runs) nothing
bounds how long a client may take to send a request, nor how large its headers may grow: a
connection that opens and sends nothing, or sends its body a byte a second, stays open for as
long as the client likes, and 20 MB of headers are read into memory. :func:`guarded_protocol`
returns a subclass that adds, all on the connection:

- **header deadline**: a connection that has not sent a complete request line and headers
  ``header_timeout_s`` after it opened (or after the first byte of a later request) is closed;
- **the app starts once the body is in** (nginx's request buffering), not at the headers as in
  uvicorn: a client sending its body a byte a second costs a parser and a buffer, not a task
  running the app. A client that asks ``Expect: 100-continue`` is started at once, as before;
- **body deadline**: a request whose body is not in ``body_timeout_s`` after its headers gets
  408 and a close, answered here and counted through ``observe`` like an answer of the app (or,
  for an app already started, by marking the request, ``BODY_DEADLINE_PASSED`` in the ASGI
  scope, and waking its ``receive()``: ``server.service.read_body`` then answers 408); a client
  that leaves before its body is in is counted as 499;
- **header size**: more than ``max_header_bytes`` of request line plus headers gets 431 and a close;
- **disconnect hook**: ``scope[CLIENT_WATCH]`` is the connection's ``batching.ClientWatch``,
  told when the connection is lost, so the batcher withdraws the requests of a client that
  left. ASGI alone tells an app of a disconnect only through a pending ``receive()``, which
  takes a task per request to await (about 17 µs of CPU a request, measured); registering
  with the connection's watch allocates nothing.

A request that arrives whole in one read, as almost all do, arms no timer: a deadline is armed
only when a read leaves a request incomplete (and once when a connection opens, since uvicorn
arms nothing until its first response).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wdserve.server.batching import ClientWatch

log = logging.getLogger(__name__)

# scope key the protocol sets when a request's body missed its deadline; read_body answers 408
BODY_DEADLINE_PASSED = "wdserve.body_deadline_passed"
# scope key of the connection's ClientWatch, lost() when the connection is
CLIENT_WATCH = "wdserve.client_watch"

_IDLE, _HEADERS, _BODY = "idle", "headers", "body"


# (path, status, seconds) of a request this protocol answered or lost before the app started
Observe = Callable[[str, int, float], None]


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_header_bytes: int,
                     observe: Observe | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the given deadlines and header limit (pass as ``http=``)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
        "max_header_bytes": max_header_bytes, "observe": staticmethod(observe or (lambda *_: None))})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 20.0
    max_header_bytes = 16384
    observe: Observe = staticmethod(lambda *_: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._read_bytes = 0  # size of the read being parsed
        self._earlier_header_bytes = 0  # of earlier reads that ended inside this request's headers
        self._deadline: asyncio.TimerHandle | None = None
        self._headers_too_large = False
        self._client = ClientWatch()
        self._headers_at = 0.0
        # the request whose body is still on its way, and the app to start for it once it is in
        self._held_cycle: Any = None
        self._held_app: Any = None

    # -- the deadline: one timer at most, armed only while a request is incomplete

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase != _BODY or cycle is None or cycle.response_started:
            log.debug("%s: closing a connection %s", self._peer(),
                      "still sending a body" if self._phase == _BODY else "without a complete request")
            self.transport.close()
            return
        log.debug("%s: body not complete within %g s; answering 408", self._peer(), self.body_timeout_s)
        if self._held_cycle is not None:  # the app never saw the request: answer and count it here
            self._held_cycle = self._held_app = None
            self._answer_and_close(b"408 Request Timeout", f"the request body did not arrive within "
                                                           f"{self.body_timeout_s:g} s of its headers")
            self.observe(self.scope["path"], 408, self.loop.time() - self._headers_at)
            return
        # the app reads the body as it comes (Expect: 100-continue): mark the request, wake receive()
        cycle.scope[BODY_DEADLINE_PASSED] = self.body_timeout_s  # type: ignore[literal-required]
        cycle.keep_alive = False
        cycle.message_event.set()  # read_body sees the mark and answers 408
        self._arm(self.header_timeout_s)  # in case nothing is reading: close after all

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    def _answer_and_close(self, status: bytes, message: str) -> None:
        """An answer from the connection itself, in the app's shape (``{"error": ...}``)."""
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, len(body), body))
        self.transport.close()

    # -- uvicorn's protocol interface and parser callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)  # uvicorn arms no timer before the first response

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._held_cycle is not None:  # left while sending the body: the app never saw the request
            self._held_cycle = self._held_app = None
            log.debug("%s: client left before sending the whole body", self._peer())
            self.observe(self.scope["path"], 499, self.loop.time() - self._headers_at)
        super().connection_lost(exc)
        if self._client.waiting:
            log.debug("%s: client left with %d request(s) waiting", self._peer(), len(self._client.waiting))
            self._client.lost()

    def data_received(self, data: bytes) -> None:
        self._read_bytes = len(data)
        super().data_received(data)
        if self._phase == _IDLE or self.transport.is_closing():
            return  # the usual case: the read held whole requests
        if self._phase == _HEADERS:
            # the read ended inside the headers: httptools holds the unfinished line, so count it here
            self._earlier_header_bytes += self._read_bytes
            if self._earlier_header_bytes > self.max_header_bytes:
                self._headers_too_large = True
                self.send_400_response("request headers too large")
                return
        if self._deadline is None:
            self._arm(self.header_timeout_s if self._phase == _HEADERS else self.body_timeout_s)

    def on_message_begin(self) -> None:
        self._phase = _HEADERS
        self._earlier_header_bytes = 0
        super().on_message_begin()
        self.scope[CLIENT_WATCH] = self._client  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        if self._deadline is not None:
            self._disarm()
        self._phase = _BODY
        self._headers_at = self.loop.time()
        # the headers are at most what was read for them: counted exactly only when that is too much
        read_for_them = self._earlier_header_bytes + self._read_bytes
        if read_for_them > self.max_header_bytes and self._header_bytes() > self.max_header_bytes:
            self._headers_too_large = True
            # stops the parser before the app starts; uvicorn answers through send_400_response below
            raise ValueError("request headers too large")
        super().on_headers_complete()

    def _header_bytes(self) -> int:
        """Request line (method and version taken as 12 bytes) plus header lines, as sent."""
        return len(self.url) + 12 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # the current request, its body not in yet: hold the app until it is (on_message_complete)
        if cycle is self.cycle and self._phase == _BODY and not self.expect_100_continue:
            self._held_cycle, self._held_app = cycle, app
            return
        super()._start_asgi_task(cycle, app)

    def _start_held(self) -> None:
        cycle, app = self._held_cycle, self._held_app
        self._held_cycle = self._held_app = None
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        # uvicorn's on_body, except that the app is woken only to drain a full buffer (a body a byte
        # a second would wake it every second); on_message_complete, the deadline and a lost
        # connection wake it too. A held app starts then, or reading would stay paused.
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            if self._held_cycle is cycle:
                self._start_held()
            self.flow.pause_reading()
            cycle.message_event.set()

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._disarm()
        self._phase = _IDLE
        super().on_message_complete()
        if self._held_cycle is not None:
            self._start_held()

    def send_400_response(self, msg: str) -> None:
        if not self._headers_too_large:
            super().send_400_response(msg)
            return
        limit = self.max_header_bytes
        self._answer_and_close(b"431 Request Header Fields Too Large",
                               f"request line and headers are larger than the limit of {limit} bytes")
        self.observe(self.scope.get("path", "") if self.scope else "", 431, 0.0)
