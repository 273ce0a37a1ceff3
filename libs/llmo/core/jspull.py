"""A lean NATS connection that pulls batches from one durable JetStream consumer.

nats-py turns every delivered message into a ``Msg`` (a parsed header dict, a
queue hop and a task wake-up) and every ack into a separate publish; at tens of
thousands of messages per second that, not the consumer's own work, is the
ceiling on a small machine. This client speaks the NATS text protocol itself
for the data path only: one pull request per batch, frames parsed straight out
of the read buffer, headers parsed only when asked for, and the acks of a whole
batch written in one go. Streams, consumers and publishing stay on
:class:`llmo.core.events.EventBus`.

Semantics are JetStream's: explicit acks, redelivery after ``ack_wait``. When
the connection drops, pending pulls fail with :class:`ConnectionError` and
unacked messages come back later; callers reconnect with :meth:`connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from llmo.core.logging import get_logger

log = get_logger(__name__)

_CRLF = b"\r\n"
_MAX_CONTROL_LINE = 4096


@dataclass(slots=True)
class PulledMessage:
    """One delivered JetStream message: its subject, ack subject, raw headers and payload."""

    subject: str
    reply: str
    raw_headers: bytes
    data: bytes
    _headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = parse_headers(self.raw_headers)
        return self._headers

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def _ack_token(self, index: int) -> int:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>
        # (newer servers prefix <domain>.<account hash> and append a random token)
        tokens = self.reply.split(".")
        if len(tokens) == 9:
            return int(tokens[index])
        if len(tokens) >= 11:
            return int(tokens[index + 2])
        raise ValueError(f"not a JetStream ack subject: {self.reply!r}")

    @property
    def deliveries(self) -> int:
        return self._ack_token(4)

    def redelivered(self, ack_prefix: str) -> bool:
        """Whether this is not the first delivery; ``ack_prefix`` is ``$JS.ACK.<stream>.<consumer>.``.

        A cheap test for the common case; :attr:`deliveries` parses the whole subject.
        """
        reply = self.reply
        if not reply.startswith(ack_prefix):
            return self.deliveries > 1
        start = len(ack_prefix)
        return reply[start : reply.find(".", start)] != "1"

    @property
    def stream_sequence(self) -> int:
        return self._ack_token(5)


def parse_headers(raw: bytes) -> dict[str, str]:
    """``NATS/1.0[ status]`` then ``Name: value`` lines; names lower-cased, first value wins."""
    headers: dict[str, str] = {}
    lines = raw.decode("utf-8", "replace").split("\r\n")
    status = lines[0][8:].strip() if lines and lines[0].startswith("NATS/1.0") else ""
    if status:
        headers["status"] = status
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            headers.setdefault(name.strip().lower(), value.strip())
    return headers


@dataclass
class _Pull:
    size: int
    messages: list[PulledMessage] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class PullClient:
    """Pulls from ``<stream>/<durable>`` over its own connection to ``url``.

    ``request`` sends a pull and returns at once, so the next batch can be on its
    way while the current one is processed; ``collect`` waits for it.
    """

    def __init__(
        self, url: str, stream: str, durable: str, *, name: str = "llmo-pull", message_class: type[PulledMessage] = PulledMessage
    ) -> None:
        self.url = url
        # what a frame is parsed into: a subclass lets a consumer carry its state on the message
        # itself instead of allocating a second object per message
        self.message_class = message_class
        self.stream = stream
        self.durable = durable
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._pulls: dict[str, _Pull] = {}
        self._pongs: list[asyncio.Future[None]] = []
        self._tokens = itertools.count()
        self._inbox = ""
        self._error: Exception | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._error is None

    async def connect(self, *, timeout: float = 5.0) -> None:
        """(Re)connect, authenticate and subscribe the pull inbox."""
        await self.close()
        self._pulls.clear()  # pulls of the lost connection get nothing more
        parts = urlsplit(self.url if "://" in self.url else f"nats://{self.url}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 22), timeout)
        try:
            info_line = await asyncio.wait_for(reader.readline(), timeout)
            if not info_line.startswith(b"INFO "):
                raise ConnectionError(f"{self.url} did not greet with INFO: {info_line[:80]!r}")
            info = json.loads(info_line[5:])
            if parts.scheme == "tls" or info.get("tls_required"):
                await writer.start_tls(ssl.create_default_context(), server_hostname=host)
            options: dict[str, object] = {
                "verbose": False,
                "pedantic": False,
                "lang": "python-llmo",
                "version": "1",
                "protocol": 1,
                "headers": True,
                "no_responders": True,
                "name": self.name,
            }
            if parts.username and parts.password is not None:
                options["user"], options["pass"] = unquote(parts.username), unquote(parts.password)
            elif parts.username:
                options["auth_token"] = unquote(parts.username)
            self._inbox = f"_INBOX.{self.name}.{id(self):x}.{next(self._tokens)}"
            writer.write(b"CONNECT " + json.dumps(options).encode() + _CRLF)
            writer.write(f"SUB {self._inbox}.* 1\r\nPING\r\n".encode())
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), timeout)
            if not reply.startswith(b"PONG"):
                raise ConnectionError(f"NATS refused the connection: {reply.strip().decode(errors='replace')}")
        except BaseException:
            writer.close()
            raise
        self._reader, self._writer, self._error = reader, writer, None
        self._read_task = asyncio.create_task(self._read_loop(reader), name=f"jspull:{self.durable}")

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._read_task = None
        self._reader = self._writer = None
        self._fail(ConnectionError("pull connection closed"))

    # ------------------------------------------------------------------ pulls
    def request(self, batch: int, expires: float) -> str:
        """Ask the server for up to ``batch`` messages within ``expires`` seconds; returns a pull token."""
        writer = self._live_writer()
        token = str(next(self._tokens))
        self._pulls[token] = _Pull(batch)
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        writer.write(f"PUB {subject} {self._inbox}.{token} {len(body)}\r\n".encode() + body + _CRLF)
        return token

    async def collect(self, token: str, timeout: float) -> list[PulledMessage]:
        """Messages of a pull, once it is full, expired (server status) or after ``timeout``."""
        pull = self._pulls.get(token)
        if pull is None:
            return []
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pull.done.wait(), timeout)
        self._pulls.pop(token, None)
        if self._error is not None and not pull.messages:
            raise ConnectionError(f"pull connection lost: {self._error}")
        return pull.messages

    def abandon(self) -> list[PulledMessage]:
        """Stop every pending pull; returns what they had already received (for a nak)."""
        left = [m for pull in self._pulls.values() for m in pull.messages]
        self._pulls.clear()
        return left

    # ------------------------------------------------------------------- acks
    def ack(self, messages: Sequence[PulledMessage]) -> None:
        self._reply(messages, b"+ACK")

    def nak(self, messages: Sequence[PulledMessage], *, delay: float = 0.0) -> None:
        """Hand messages back for redelivery, after ``delay`` seconds when given."""
        self._reply(messages, b'-NAK {"delay": %d}' % int(delay * 1e9) if delay > 0 else b"-NAK")

    def in_progress(self, messages: Sequence[PulledMessage]) -> None:
        self._reply(messages, b"+WPI")

    def term(self, messages: Sequence[PulledMessage]) -> None:
        self._reply(messages, b"+TERM")

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has read everything written so far (a PING/PONG round trip)."""
        writer = self._live_writer()
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        writer.write(b"PING\r\n")
        await writer.drain()
        await asyncio.wait_for(pong, timeout)

    def _reply(self, messages: Sequence[PulledMessage], verb: bytes) -> None:
        if not messages:
            return
        writer = self._live_writer()
        tail = f" {len(verb)}\r\n".encode() + verb + _CRLF
        writer.write(b"".join(b"PUB " + m.reply.encode() + tail for m in messages))

    def _live_writer(self) -> asyncio.StreamWriter:
        if self._writer is None or self._error is not None:
            raise ConnectionError(f"pull connection to {self.url} is not open: {self._error}")
        return self._writer

    # ---------------------------------------------------------------- reading
    def _fail(self, error: Exception) -> None:
        self._error = error
        for pull in self._pulls.values():
            pull.done.set()
        for pong in self._pongs:
            if not pong.done():
                pong.set_exception(error)
        self._pongs.clear()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        try:
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buffer = self._parse(buffer + chunk if buffer else chunk)
                if len(buffer) > _MAX_CONTROL_LINE and _CRLF not in buffer[:_MAX_CONTROL_LINE]:
                    raise ConnectionError("protocol error: control line too long")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("jetstream pull connection lost", consumer=self.durable, error=repr(error))
            self._fail(error)

    def _parse(self, buf: bytes) -> bytes:
        """Handle every complete frame in ``buf``; returns the incomplete rest."""
        pos, size = 0, len(buf)
        pulls, message_class = self._pulls, self.message_class
        # messages go to the oldest pending pull; no pull is added or collected while this runs
        target: _Pull | None = next(iter(pulls.values()), None)
        while pos < size:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"HMSG" or op == b"MSG ":
                args = buf[pos + 4 : end].split()
                if op == b"HMSG":
                    header_len, total = int(args[-2]), int(args[-1])
                else:
                    header_len, total = 0, int(args[-1])
                start = end + 2
                if start + total + 2 > size:
                    break  # the payload is not all here yet
                pos = start + total + 2
                if len(args) != (5 if op == b"HMSG" else 4):
                    # no reply subject: a status for one of our requests (404 no messages, 408 expired, 409 ...)
                    self._status(args[0].decode(), buf[start : start + header_len])
                    continue
                message = message_class(args[0].decode(), args[2].decode(), buf[start : start + header_len], buf[start + header_len : start + total])
                if target is None:
                    self.nak([message])  # delivered after its pull was abandoned: hand it straight back
                    continue
                messages = target.messages
                messages.append(message)
                if len(messages) >= target.size:
                    target.done.set()
                continue
            if op == b"PING":
                if self._writer is not None:
                    self._writer.write(b"PONG\r\n")
            elif op == b"PONG":
                if self._pongs:
                    pong = self._pongs.pop(0)
                    if not pong.done():
                        pong.set_result(None)
            elif op == b"-ERR":
                log.warning("nats error on pull connection", consumer=self.durable, error=buf[pos + 5 : end].decode(errors="replace"))
            pos = end + 2
        return buf[pos:]

    def _status(self, subject: str, raw_headers: bytes) -> None:
        pull = self._pulls.get(subject.rsplit(".", 1)[-1]) if subject.startswith(self._inbox) else None
        if pull is not None and not raw_headers.startswith(b"NATS/1.0 100"):
            pull.done.set()
