"""One safe HTTP fetch: SSRF-checked at every hop, bounded in size, time and decompression."""

from __future__ import annotations

import asyncio
import codecs
import importlib
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl

from llmo.core.logging import get_logger
from llmo.visibility.netguard import DEFAULT_POLICY, AddressPolicy, BlockedAddress, GuardedResolver

log = get_logger(__name__)


def _optional_brotli() -> Any:
    """The brotli module when installed; without it "br" is simply not advertised."""
    try:
        return importlib.import_module("brotli")
    except ImportError:
        return None


_brotli = _optional_brotli()

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# A decoded/raw ratio above this is a bomb, once the decoded body is big enough to matter.
MAX_RATIO = 100
_RATIO_FLOOR = 1 << 20
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_:.-]+)""", re.IGNORECASE)


class _Abort(Exception):
    """Internal: stop a fetch with an error reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _charset_of(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return _known_codec(value.strip().strip("'\""))
    return None


def _known_codec(name: str) -> str | None:
    try:
        return codecs.lookup(name).name if name else None
    except LookupError:
        return None


@dataclass
class FetchResult:
    """The outcome of one fetch; `error_reason` is None on success."""

    url: str
    final_url: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = ""
    encoding: str | None = None
    redirects: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    error_reason: str | None = None
    error_message: str = ""
    not_modified: bool = False

    @property
    def ok(self) -> bool:
        """True when a usable response (2xx, or 304 for a conditional fetch) came back."""
        return self.error_reason is None and (200 <= self.status < 300 or self.not_modified)

    @property
    def text(self) -> str:
        """The body as text: the header charset, else `<meta charset>`, else a BOM, else UTF-8.

        Undecodable bytes become U+FFFD; this never raises.
        """
        encoding = self.encoding
        if encoding is None:
            match = _META_CHARSET.search(self.body[:4096])
            encoding = _known_codec(match.group(1).decode("ascii", "replace")) if match else None
        if encoding is None:
            if self.body.startswith(codecs.BOM_UTF8):
                encoding = "utf-8-sig"
            elif self.body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                encoding = "utf-16"
        try:
            return self.body.decode(encoding or "utf-8", errors="replace")
        except (LookupError, ValueError):
            return self.body.decode("utf-8", errors="replace")


class _Decoder:
    """Incremental, bounded Content-Encoding decoder (gzip, deflate, br, identity)."""

    def __init__(self, encoding: str, limit: int) -> None:
        self._kind = encoding
        self._limit = limit
        self._zlib: Any = None
        self._brotli: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(wbits=31)
        elif encoding == "deflate":
            self._zlib = None  # zlib-wrapped or raw deflate, decided on the first bytes
        elif encoding == "br":
            if _brotli is None:
                raise _Abort("NETWORK_ERROR", "brotli content-encoding is not supported here")
            self._brotli = _brotli.Decompressor()
        elif encoding not in ("", "identity"):
            raise _Abort("NETWORK_ERROR", f"unsupported content-encoding {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        """Decode `data`, producing at most `limit + 1` bytes so a bomb never inflates in memory."""
        if self._kind == "deflate" and self._zlib is None:
            # RFC 9110 says zlib-wrapped, but many servers send raw deflate: the first byte tells.
            wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(wbits=15 if wrapped else -15)
        if self._zlib is not None:
            return self._inflate(data)
        if self._brotli is not None:
            return bytes(self._brotli.process(data))
        return data

    def _inflate(self, data: bytes) -> bytes:
        out = bytearray()
        pending = data
        while pending and len(out) <= self._limit:
            try:
                out += self._zlib.decompress(pending, self._limit + 1 - len(out))
            except zlib.error as exc:
                raise _Abort("NETWORK_ERROR", f"corrupt {self._kind} body: {exc}") from exc
            if self._zlib.eof and self._kind != "deflate" and self._zlib.unused_data:
                pending = self._zlib.unused_data  # concatenated gzip members
                self._zlib = zlib.decompressobj(wbits=31)
            else:
                pending = self._zlib.unconsumed_tail
        return bytes(out)


class PageFetcher(Protocol):
    """What fetches a URL into a `FetchResult` (a `Fetcher`, or one that paces it)."""

    async def fetch(self, url: str, *, accept: tuple[str, ...] = ...) -> FetchResult: ...


class Fetcher:
    """Fetches one URL safely; see `fetch`. Use as an async context manager or call `close()`."""

    def __init__(
        self,
        *,
        user_agent: str,
        policy: AddressPolicy = DEFAULT_POLICY,
        timeout_s: float = 15.0,
        max_bytes: int = 5 * 2**20,
        max_redirects: int = 5,
        session: aiohttp.ClientSession | None = None,
        connection_limit: int = 32,
    ) -> None:
        self.user_agent = user_agent
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._session = session
        self._owns_session = session is None
        self._connection_limit = connection_limit
        self._clock: Callable[[], float] = time.monotonic

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this fetcher created (a session passed in stays open)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy), limit=self._connection_limit, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def fetch(
        self,
        url: str,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        accept: tuple[str, ...] = ("text/html", "application/xhtml+xml"),
        max_bytes: int | None = None,
        truncate: bool = False,
    ) -> FetchResult:
        """Fetch `url`, following up to `max_redirects` redirects, each hop re-validated.

        Never raises for network or HTTP problems: `error_reason` says what went wrong. `accept=()`
        accepts any media type. `max_bytes` overrides the fetcher's limit for this call; with
        `truncate=True` a body over the limit is cut at the limit instead of failing (robots.txt).
        """
        started = self._clock()
        result = FetchResult(url=url, final_url=url)
        limit = self.max_bytes if max_bytes is None else max_bytes
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._follow(result, etag, last_modified, accept, limit, truncate)
        except _Abort as exc:
            result.error_reason, result.error_message = exc.reason, exc.message
        except BlockedAddress as exc:
            result.error_reason, result.error_message = "SSRF_BLOCKED", str(exc)
        except TimeoutError:
            result.error_reason, result.error_message = (
                "FETCH_TIMEOUT",
                f"no complete response in {self.timeout_s}s",
            )
        except (aiohttp.InvalidURL, ValueError) as exc:
            result.error_reason, result.error_message = "INVALID_URL", str(exc) or "invalid URL"
        except (aiohttp.ClientError, OSError) as exc:
            blocked = _blocked_cause(exc)
            if blocked is not None:
                result.error_reason, result.error_message = "SSRF_BLOCKED", str(blocked)
            else:
                result.error_reason, result.error_message = "NETWORK_ERROR", f"{type(exc).__name__}: {exc}"
        result.elapsed_s = self._clock() - started
        if result.error_reason is not None:
            log.debug("fetch_failed", url=url, reason=result.error_reason, message=result.error_message)
        return result

    def _target(self, url: str) -> yarl.URL:
        """Validate one hop: http(s), a host, and not an IP literal or name the policy refuses."""
        try:
            parts = urlsplit(url)
            raw_host = parts.hostname or ""
        except ValueError as exc:
            raise _Abort("INVALID_URL", f"malformed URL {url!r}: {exc}") from exc
        if parts.scheme.lower() not in ("http", "https"):
            raise _Abort("INVALID_URL", f"unsupported scheme in {url!r}")
        target = yarl.URL(url)
        # Both spellings are checked: yarl normalizes some hosts (IDNA full-width digits) that urllib does not.
        for host in {raw_host, target.raw_host or "", target.host or ""}:
            if not host:
                raise _Abort("INVALID_URL", f"no host in {url!r}")
            refused = self.policy.check_host(host)
            if refused is not None:
                raise BlockedAddress(host, refused[0], refused[1])
        return target.with_fragment(None)

    def _headers(
        self, etag: str | None, last_modified: str | None, accept: tuple[str, ...]
    ) -> dict[str, str]:
        encodings = "gzip, deflate, br" if _brotli is not None else "gzip, deflate"
        headers = {
            "User-Agent": self.user_agent,
            "Accept": ", ".join((*accept, "*/*;q=0.1")) if accept else "*/*",
            "Accept-Encoding": encodings,
        }
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        return headers

    async def _follow(
        self,
        result: FetchResult,
        etag: str | None,
        last_modified: str | None,
        accept: tuple[str, ...],
        limit: int,
        truncate: bool,
    ) -> None:
        session = self._get_session()
        headers = self._headers(etag, last_modified, accept)
        current = result.url
        seen = {_loop_key(current)}
        while True:
            target = self._target(current)
            async with session.get(
                target, headers=headers, allow_redirects=False, auto_decompress=False
            ) as response:
                result.final_url = current
                result.status = response.status
                result.headers = _flat_headers(response)
                if response.status in _REDIRECTS and "location" in result.headers:
                    location = urljoin(current, result.headers["location"].strip())
                    key = _loop_key(location)
                    if key in seen:
                        raise _Abort("REDIRECT_LOOP", f"{current} redirects back to {location}")
                    if len(result.redirects) >= self.max_redirects:
                        raise _Abort("TOO_MANY_REDIRECTS", f"more than {self.max_redirects} redirects")
                    seen.add(key)
                    result.redirects.append(location)
                    current = location
                    continue
                await self._read(result, response, accept, limit, truncate)
                return

    async def _read(
        self,
        result: FetchResult,
        response: aiohttp.ClientResponse,
        accept: tuple[str, ...],
        limit: int,
        truncate: bool,
    ) -> None:
        content_type = result.headers.get("content-type", "")
        result.content_type = content_type.split(";", 1)[0].strip().lower()
        result.encoding = _charset_of(content_type)
        if response.status == 304:
            result.not_modified = True
            return
        if response.status >= 400:
            result.body = await _read_body(response, result.headers, limit, truncate=True)
            result.error_reason, result.error_message = "HTTP_ERROR", f"HTTP {response.status}"
            return
        if response.status in _REDIRECTS:
            raise _Abort("HTTP_ERROR", f"HTTP {response.status} without a Location header")
        if accept and result.content_type and result.content_type not in accept:
            raise _Abort(
                "UNSUPPORTED_CONTENT_TYPE", f"{result.content_type} is not one of {', '.join(accept)}"
            )
        result.body = await _read_body(response, result.headers, limit, truncate=truncate)


async def _read_body(
    response: aiohttp.ClientResponse, headers: dict[str, str], limit: int, *, truncate: bool
) -> bytes:
    """Read and decode the body, never holding more than `limit` raw or decoded bytes."""
    declared = headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit:
        raise _Abort("TOO_LARGE", f"Content-Length {declared} is above the {limit} byte limit")
    encoding = headers.get("content-encoding", "").strip().lower()
    decoder = _Decoder(encoding, limit)
    raw_total = 0
    body = bytearray()
    async for chunk in _chunks(response):
        raw_total += len(chunk)
        if raw_total > limit and not truncate:
            raise _Abort("TOO_LARGE", f"body is above the {limit} byte limit")
        body += decoder.feed(chunk)
        if len(body) > limit:
            if truncate:
                return bytes(body[:limit])
            if encoding not in ("", "identity"):
                raise _Abort("DECOMPRESSION_BOMB", f"decoded body is above the {limit} byte limit")
            raise _Abort("TOO_LARGE", f"body is above the {limit} byte limit")
        if not truncate and len(body) > _RATIO_FLOOR and len(body) > MAX_RATIO * raw_total:
            raise _Abort("DECOMPRESSION_BOMB", f"{len(body)} bytes decoded from {raw_total}")
        if truncate and raw_total >= limit:
            break
    return bytes(body[:limit])


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_chunked(_CHUNK):
        yield chunk


def _flat_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in response.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _loop_key(url: str) -> str:
    return url.split("#", 1)[0]


def _blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The BlockedAddress aiohttp wrapped (ClientConnectorError.os_error or the cause chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BlockedAddress):
            return current
        seen.add(id(current))
        nested = getattr(current, "os_error", None)
        if isinstance(nested, BlockedAddress):
            return nested
        current = current.__cause__ or current.__context__
    return None
