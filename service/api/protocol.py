"""The HTTP/1.1 connection: uvicorn's httptools protocol with what a server facing the internet needs and
uvicorn leaves out; and uvicorn's server and worker supervisor, shut down without losing what clients sent.
`python -m service` runs `serve(...)`, uvicorn.run's equivalent with these.

- A header timeout: a request's line and headers must arrive within `header_timeout_s` of its first byte
  (or of the connection, for its first request); past it, 408 {"error"} and the connection is closed.
  uvicorn bounds only the idle time between requests (timeout_keep_alive): a client that trickles a
  header a byte at a time held its connection for ever.
- Malformed requests (a bad Content-Length, both Content-Length and chunked, NUL bytes, a broken chunk)
  get the service's JSON error shape, 400 {"error": "invalid HTTP request: ..."}, instead of uvicorn's
  text/plain; and requests pipelined before the malformed one on the same connection are answered first
  (uvicorn closed the connection at once, dropping them).
- Graceful shutdown that loses nothing the client sent: a connection mid-request (headers partly
  received) is served and then closed (Connection: close), as is one whose request arrives within
  SHUTDOWN_IDLE_GRACE_S of the shutdown; uvicorn closed both, which reset requests already sent. The
  server (`Server`, `Supervisor`, `serve`) also takes up the connections still waiting in the listen queue
  before it stops listening, and the supervisor lets go of the socket at once, so that later connections
  are refused instead of queued and reset.

What is out of reach here is inside httptools' parser (llhttp): what it accepts as malformed and the
exact reason it gives (see the README's limits section).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from typing import Any

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import multiprocess

from service.errors import error_body

log = logging.getLogger("service.protocol")

# Import string for uvicorn.Config(http=...): every worker process imports it itself.
PROTOCOL = "service.api.protocol:Protocol"
# On shutdown, an idle kept-alive connection stays open this long for a request its client may have sent
# already (in flight, or in the socket's buffer): it is served, with Connection: close.
SHUTDOWN_IDLE_GRACE_S = 0.5


class Protocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0  # set from the settings by configure() in each worker

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None
        self._receiving_headers = False
        self._receiving_body = False
        self._active: Any = None  # the request whose handler runs (uvicorn's RequestResponseCycle)
        self._pending_error: str | None = None  # a malformed request, answered after those before it
        self._shutting_down = False

    # ------------------------------------------------------------------------------ header timeout

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        message = f"request line and headers not received within {self.header_timeout_s:g} s"
        if not self._receiving_headers and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # nothing sent at all: nobody to answer
        elif self.cycle is None or self.cycle.response_complete:
            self._write_error(408, message)
        else:  # a response is on its way: finish it, then close, reading nothing more
            self.cycle.keep_alive = False
            self.flow.pause_reading()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving_headers = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._receiving_headers = False
        self._receiving_body = True
        self._disarm_header_timer()
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._receiving_body = False
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._active = cycle
        super()._start_asgi_task(cycle, app)

    # ---------------------------------------------------------------------------- malformed requests

    def data_received(self, data: bytes) -> None:
        if self._pending_error is not None:
            return  # the parser has failed: nothing after the malformed request is read
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._malformed(str(exc) or "malformed request")
        except httptools.HttpParserUpgrade:  # as uvicorn does (this server has no WebSocket routes)
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _malformed(self, reason: str) -> None:
        self._disarm_header_timer()
        message = f"invalid HTTP request: {reason}"
        log.warning("%s", message)
        if self._receiving_body and self.cycle is not None:
            # The request in whose body the error is: it is the malformed one. Its handler (if it runs) is
            # told that the client went away; if it only waits its turn in the pipeline, it never runs.
            bad = self.cycle
            for queued in list(self.pipeline):
                if queued[0] is bad:
                    self.pipeline.remove(queued)
            if self._active is bad:
                if bad.response_started:
                    self.transport.close()  # it answered already; its answer cannot be finished
                    return
                bad.disconnected = True
                bad.message_event.set()
        active = self._active
        busy = (active is not None and not active.response_complete and not active.disconnected) or bool(self.pipeline)
        if not busy:
            self._write_error(400, message)
            return
        # Requests before the malformed one are answered first; then the 400, then the connection closes.
        self._pending_error = message
        self.flow.pause_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, if any
        active = self._active
        done = active is None or active.response_complete or active.disconnected
        if self._pending_error is not None and done and not self.pipeline and not self.transport.is_closing():
            self._disarm_header_timer()
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
            self._write_error(400, self._pending_error)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's own 400s (its checks outside the parser), in the service's JSON shape."""
        self._write_error(400, msg)

    def _write_error(self, status: int, message: str) -> None:
        body = error_body(message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()

    # ------------------------------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Called by uvicorn for each connection once the server stops accepting."""
        self._shutting_down = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answered, then closed
        elif self._receiving_headers:
            pass  # its request is on its way: on_headers_complete marks it Connection: close
        else:
            # Idle: a request may be in flight to us already. Close only if none has begun meanwhile.
            self.loop.call_later(SHUTDOWN_IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.transport.is_closing() or self._receiving_headers:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def configure(header_timeout_s: float) -> None:
    """Set the protocol's limits from the settings (each worker process builds its app, and calls this)."""
    Protocol.header_timeout_s = header_timeout_s


# -------------------------------------------------------------------------------------- the server


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first accepts every connection already waiting in the listen queue
    (the kernel completed their handshakes, their requests may be on their way): they are served like the
    connections already open, then closed. uvicorn stopped listening with them queued, and they were reset
    when the last process let go of the socket."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        with contextlib.suppress(Exception):  # never in the way of the shutdown itself
            await self._accept_waiting(sockets)
        await super().shutdown(sockets)

    async def _accept_waiting(self, sockets: list[socket.socket] | None) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        listeners = [s.fileno() for s in sockets or []] or [s.fileno() for srv in self.servers for s in srv.sockets]

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        accepted = 0
        for fd in listeners:
            with socket.socket(fileno=os.dup(fd)) as listener:
                listener.setblocking(False)
                while True:
                    try:
                        connection, _ = listener.accept()
                    except OSError:  # BlockingIOError: none left waiting
                        break
                    connection.setblocking(False)
                    await loop.connect_accepted_socket(protocol, connection)
                    accepted += 1
        if accepted:
            log.info("shutdown: took up %d connection(s) waiting to be accepted", accepted)


class _Worker(multiprocess.Process):
    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


class Supervisor(multiprocess.Multiprocess):
    """uvicorn's worker supervisor: workers run Server (above), and on SIGTERM/SIGINT the supervisor lets go of
    its copy of the listening socket at once, so that once the workers have closed theirs (after taking up
    what was waiting) new connections are refused rather than queued on a socket nobody accepts from."""

    def run(self) -> None:
        # uvicorn makes its worker processes by this module-level name: ours, in this (the supervisor) process.
        multiprocess.Process = _Worker  # type: ignore[misc]
        super().run()

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()


def serve(app: Any, workers: int, **options: Any) -> None:
    """uvicorn.run's single- and multi-worker paths, with Server and Supervisor (above) and this protocol:
    `app` an ASGI app (one worker) or an import string of a factory (several, `factory=True` in options)."""
    config = uvicorn.Config(app, workers=workers, http=PROTOCOL, **options)
    if workers > 1:
        Supervisor(config, sockets=[config.bind_socket()]).run()
        return
    config.load_app()
    server = Server(config=config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
