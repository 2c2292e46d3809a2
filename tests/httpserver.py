"""A small, real HTTP server for tests: files from a folder, with misbehaviour on demand.

Usage::

    with FileServer(tmp_path / "www", drop_after_bytes=1000, drop_requests=1) as server:
        url = server.url("data.tar.gz")
        ...
        assert server.count("data.tar.gz") == 2

It binds ``127.0.0.1`` on a free port and serves each request in its own thread. Options
(all attributes may also be changed while it runs):

- ``throttle_bps``: send at most this many bytes per second (e.g. to SIGKILL a client
  mid-download);
- ``drop_after_bytes`` / ``drop_requests``: for the first ``drop_requests`` GETs, close the
  connection after that many body bytes, as a flaky network does; ``drop_reset=True`` cuts
  it with a TCP reset instead of a clean close (the client may then lose bytes it had not
  read yet, so the number of bytes it keeps is not exact);
- ``error_status`` / ``error_requests``: answer the first ``error_requests`` GETs with this
  status (e.g. 503);
- ``html``: answer with an HTML page and status 200, as a login or "not found" page does
  (``True`` for every path, or a collection of paths);
- ``ranges``: honour ``Range`` (and ``If-Range``) requests with 206 answers;
- ``conditional``: answer ``If-None-Match`` / ``If-Modified-Since`` with 304 when the file
  has not changed (the ``ETag`` is built from the file's size and mtime in nanoseconds, so
  rewriting a file changes it);
- ``basic_auth``: ``"user:password"`` that every request must carry (HTTP basic auth), or 401.

Every request is recorded in :attr:`FileServer.requests`. Every loop in here is bounded
by the size of the file being sent, and stopping the server wakes throttled senders.
"""

from __future__ import annotations

import base64
import re
import socket
import struct
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
    b"<body><p>Please sign in to download this file.</p></body></html>\n"
)
CHUNK_BYTES = 16 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str  # relative to the served folder, without the leading "/"
    range: str | None
    if_range: str | None
    status: int
    if_none_match: str | None = None
    if_modified_since: str | None = None


class FileServer:
    """Serve files from ``root`` over HTTP on 127.0.0.1, as a context manager.

    Args:
        root: the folder to serve.
        throttle_bps: most body bytes per second per response; ``None`` for no limit.
        drop_after_bytes: close the connection after this many body bytes ...
        drop_requests: ... for this many of the first GET requests.
        drop_reset: cut with a TCP reset (RST) rather than a clean close (FIN).
        error_status: answer with this HTTP status ...
        error_requests: ... for this many of the first GET requests.
        html: answer with an HTML page (status 200): ``True`` for all paths, or the paths.
        ranges: support ``Range`` requests (otherwise they are answered with the full file).
        etag: send an ``ETag`` header (``Last-Modified`` is always sent).
        conditional: answer conditional requests with 304 Not Modified.
        basic_auth: ``"user:password"`` every request must send (basic auth), else 401.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        throttle_bps: int | None = None,
        drop_after_bytes: int | None = None,
        drop_requests: int = 1,
        drop_reset: bool = False,
        error_status: int | None = None,
        error_requests: int = 1,
        html: bool | Collection[str] = False,
        ranges: bool = True,
        etag: bool = True,
        conditional: bool = True,
        basic_auth: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.throttle_bps = throttle_bps
        self.drop_after_bytes = drop_after_bytes
        self.drop_requests = drop_requests
        self.drop_reset = drop_reset
        self.error_status = error_status
        self.error_requests = error_requests
        self.html = html
        self.ranges = ranges
        self.etag = etag
        self.conditional = conditional
        self.basic_auth = basic_auth
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._gets = 0
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FileServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- helpers for tests -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        if self._server is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, path: str = "") -> str:
        """The URL of ``path`` (relative to the served folder)."""
        return self.base_url + path.lstrip("/")

    def count(self, path: str | None = None, method: str = "GET") -> int:
        """How many ``method`` requests were made (for ``path``, if given)."""
        with self._lock:
            return sum(
                1
                for request in self.requests
                if request.method == method and (path is None or request.path == path.lstrip("/"))
            )

    # -- used by the handler ---------------------------------------------------------------

    def _next_get(self) -> int:
        with self._lock:
            self._gets += 1
            return self._gets

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _serves_html(self, path: str) -> bool:
        if isinstance(self.html, bool):
            return self.html
        return path in self.html


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Keep test output quiet."""

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path).lstrip("/")
            number = server._next_get() if body else 0
            self._respond(
                path, number, self.headers.get("Range"), self.headers.get("If-Range"), body=body
            )

        def send_response(self, code: int, message: str | None = None) -> None:
            # Record before the client can see the answer, so tests never race the log.
            path = unquote(urlsplit(self.path).path).lstrip("/")
            request = Request(
                self.command,
                path,
                self.headers.get("Range"),
                self.headers.get("If-Range"),
                code,
                self.headers.get("If-None-Match"),
                self.headers.get("If-Modified-Since"),
            )
            server._record(request)
            super().send_response(code, message)

        def _respond(
            self,
            path: str,
            number: int,
            range_header: str | None,
            if_range: str | None,
            *,
            body: bool,
        ) -> int:
            if server.error_status is not None and 0 < number <= server.error_requests:
                return self._send_bytes(
                    server.error_status, b"simulated failure\n", "text/plain", body
                )
            expected = f"Basic {base64.b64encode((server.basic_auth or '').encode()).decode()}"
            if server.basic_auth is not None and self.headers.get("Authorization") != expected:
                return self._send_bytes(401, b"log in first\n", "text/plain", body)
            if server._serves_html(path):
                return self._send_bytes(200, HTML_PAGE, "text/html; charset=utf-8", body)
            file = (server.root / path).resolve()
            if not file.is_relative_to(server.root) or not file.is_file():
                return self._send_bytes(404, b"not found\n", "text/plain", body)
            size = file.stat().st_size
            mtime = file.stat().st_mtime_ns
            etag = f'"{size:x}-{mtime:x}"'
            last_modified = formatdate(mtime / 1e9, usegmt=True)
            if server.conditional and self._not_modified(etag, mtime):
                self.send_response(304)
                if server.etag:
                    self.send_header("ETag", etag)
                self.send_header("Last-Modified", last_modified)
                self.end_headers()
                return 304
            start, end, status = 0, size - 1, 200
            match = _RANGE.match(range_header or "") if server.ranges else None
            validator_ok = if_range is None or if_range in (
                etag if server.etag else None,
                last_modified,
            )
            if match and validator_ok:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return 416
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Last-Modified", last_modified)
            if server.etag:
                self.send_header("ETag", etag)
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                drop = server.drop_after_bytes if 0 < number <= server.drop_requests else None
                self._send_file(file, start, end - start + 1, drop)
            return status

        def _not_modified(self, etag: str, mtime_ns: int) -> bool:
            """RFC 9110 13.2.2: If-None-Match wins; else If-Modified-Since (whole seconds)."""
            if_none_match = self.headers.get("If-None-Match")
            if if_none_match is not None:
                tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
                return server.etag and ("*" in tags or etag in tags)
            if_modified_since = self.headers.get("If-Modified-Since")
            if if_modified_since is None:
                return False
            try:
                since = parsedate_to_datetime(if_modified_since).timestamp()
            except (TypeError, ValueError):
                return False
            return mtime_ns // 1_000_000_000 <= since

        def _send_bytes(self, status: int, payload: bytes, content_type: str, body: bool) -> int:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)
            return status

        def _send_file(self, file: Path, start: int, length: int, drop_after: int | None) -> None:
            sent = 0
            began = time.monotonic()
            try:
                with open(file, "rb") as handle:
                    handle.seek(start)
                    while sent < length and not server._stopping.is_set():
                        step = min(CHUNK_BYTES, length - sent)
                        if drop_after is not None:
                            step = min(step, drop_after - sent)
                            if step <= 0:
                                self._drop()
                                return
                        chunk = handle.read(step)
                        if not chunk:
                            return
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        self._throttle(sent, began)
                if drop_after is not None and sent >= drop_after:
                    self._drop()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away (e.g. it was killed)

        def _throttle(self, sent: int, began: float) -> None:
            rate = server.throttle_bps
            if rate:
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    server._stopping.wait(ahead)

        def _drop(self) -> None:
            """Cut the connection mid-body: a clean close, or a reset (RST)."""
            self.close_connection = True
            try:
                self.wfile.flush()
                if server.drop_reset:
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for "nothing listens here" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
