"""HTTP downloads into a cache folder: retried, verified, renamed into place only when complete.

:func:`download` streams a URL with ``requests`` into a temporary file next to its final
name in the cache (``.tlp/downloads``), with a progress bar, and renames it only once it is
complete, is not an HTML page and matches the expected sha256. A killed download leaves
only that temporary file, which the next download of the same file deletes: nothing is
ever resumed from, or trusted in, a partial file.

Retries. urllib3's ``Retry`` retries what a later attempt may fix, with exponential
back-off: a connection that times out or drops before the answer, and HTTP 408, 429 and
5xx. A body cut off midway (after the answer began, where urllib3 no longer retries) is
retried here, from the start, as often. When the retries run out the error is a
:class:`~tasks.common.TransientError` (exit code 75: worth running again later).

Failing fast. What no retry can fix fails at once, naming the host and the cause: a host
name that does not resolve, a connection refused by a literal IP address (nothing listens
there), a TLS error, and any other HTTP 4xx.

Credentials. A URL holding a user name, a password or a secret query parameter is refused
(:mod:`tasks.urls`): it would be logged and recorded. ``requests`` reads ``~/.netrc`` (or
``$NETRC``) for the host's login instead, and so does DVC when it checks the URL.

The cache. A cached file whose sha256 is pinned is reused as it is. An unpinned one is
revalidated with a conditional request (``If-None-Match`` / ``If-Modified-Since``, from the
``<name>.json`` kept beside it): 304 reuses it, 200 replaces it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    SSLError,
)
from urllib3.util import Retry

from tasks.archive import looks_like_html
from tasks.common import (
    StageError,
    TransientError,
    atomic_path,
    log,
    progress,
    read_json,
    sha256_file,
    write_json,
)
from tasks.urls import SecretInURLError, check_url

CHUNK_BYTES = 64 * 1024
BACKOFF_MAX_S = 8.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "tlp-fetch/0.2 (+https://dvc.org)"


@dataclass(frozen=True)
class Download:
    """A complete, verified file in the download cache.

    Attributes:
        path: the cached file.
        sha256: its sha256.
    """

    path: Path
    sha256: str


class _CutOff(Exception):
    """The body of an answer stopped before its end; the download starts over."""


def cache_name(url: str, sha256: str | None = None) -> str:
    """The download cache's file name for ``url``: its hash, the expected hash, its name."""
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    base = PurePosixPath(urlsplit(url).path).name or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:]
    return f"{url_hash}-{sha256.lower()[:16]}-{base}" if sha256 else f"{url_hash}-{base}"


def _hopeless(error: BaseException | None, host: str | None) -> str | None:
    """Why no retry can fix ``error`` (``"could not resolve host X"``), or ``None``.

    Args:
        error: the urllib3 error of one attempt.
        host: the host it was connecting to.
    """
    if isinstance(error, NameResolutionError):
        return f"could not resolve host {host}"
    if isinstance(error, SSLError):
        return f"TLS error with {host}"
    if isinstance(error, NewConnectionError) and isinstance(
        error.__cause__, ConnectionRefusedError
    ):
        try:
            ipaddress.ip_address((host or "").strip("[]"))
        except ValueError:
            return None  # a name may point elsewhere on the next try
        return f"connection to {host} refused (nothing listens there)"
    return None


class _Retry(Retry):
    """urllib3's ``Retry``, except that errors :func:`_hopeless` names are raised at once."""

    def increment(self, method=None, url=None, response=None, error=None, **kwargs):
        _pool = kwargs.get("_pool")
        if _hopeless(error, getattr(_pool, "host", None)):
            raise MaxRetryError(_pool, url or "", error) from error
        return super().increment(method, url, response, error, **kwargs)


def download(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 3,
    backoff_s: float = 0.5,
    what: str = "a file",
    hint: str = "fetch.source",
    mismatch_hint: str = "If the file changed upstream on purpose, set fetch.sha256 to the new "
    "hash in params.yaml; otherwise correct fetch.source.",
) -> Download:
    """Download ``url`` into the cache (or reuse a cached copy), verified.

    Args:
        url: an http(s) URL.
        cache_dir: the download cache folder.
        sha256: the expected sha256 (hex), if known.
        timeout_s: connect and read timeout, in seconds.
        retries: how many times to retry after a transient failure.
        backoff_s: the back-off factor: pauses of about 2x, 4x ... this, up to 8 s.
        what: what the file should be, for error messages (``"a .tar.gz archive"``).
        hint: the setting to check when the URL is wrong, for error messages.
        mismatch_hint: what to do when the sha256 does not match, for error messages.

    Returns:
        The cached file and its sha256.

    Raises:
        StageError: a failure no retry can fix (unknown host, refused connection, TLS,
            HTTP 4xx), an HTML page, or a wrong sha256 (nothing is kept); a URL that does
            not parse or holds credentials (take them from ~/.netrc, which requests reads).
        TransientError: the download kept failing after ``retries`` retries.
    """
    try:
        check_url(url)
    except SecretInURLError as exc:  # the message must not repeat the URL, nor the hint
        raise StageError(f"the URL of {what} {exc}") from None
    except ValueError as exc:
        raise StageError(f"{hint} {exc}") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    expected = sha256.lower() if sha256 else None
    final = cache_dir / cache_name(url, expected)
    target = _Target(url, final, expected, what, hint, mismatch_hint)
    cached = _cached(target)
    if cached is not None and target.expected is not None:
        log.info("using the cached download %s", target.final)
        return cached
    policy = _Retry(
        total=retries,
        backoff_factor=backoff_s,
        backoff_max=BACKOFF_MAX_S,
        status_forcelist=RETRY_STATUSES,
        raise_on_status=False,  # the last answer is reported below, with its status
        respect_retry_after_header=False,  # a huge Retry-After must not stall a run
    )
    with requests.Session() as session:
        session.headers["User-Agent"] = USER_AGENT
        session.mount("http://", HTTPAdapter(max_retries=policy))
        session.mount("https://", HTTPAdapter(max_retries=policy))
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(backoff_s * 2**attempt, BACKOFF_MAX_S))
            try:
                digest = _get(session, target, timeout_s, _conditional_headers(target, cached))
            except _CutOff as exc:
                log.warning("download of %s cut off (attempt %d of %d): %s", url, attempt + 1, retries + 1, exc)  # fmt: skip
                reason: object = exc
                continue
            except requests.RequestException as exc:
                reason = exc.args[0] if exc.args else exc
                reason = getattr(reason, "reason", reason)  # MaxRetryError: the last error
                why = _hopeless(reason, urlsplit(url).hostname)  # type: ignore[arg-type]
                if why:
                    message = f"{why}: {reason}. Check {hint} ({url}) and the network."
                    raise StageError(message) from None
                break
            if digest is None:  # 304: conditional requests are only sent for a cached copy
                log.info("%s has not changed (HTTP 304); using the cached download", url)
                return cached
            return Download(target.final, digest)
    raise TransientError(
        f"could not download {url} after {retries + 1} attempts: {reason}. Check the network "
        f"and {hint}; raise fetch.retries or fetch.timeout_s for a slow or flaky link."
    )


@dataclass(frozen=True)
class _Target:
    """What to download where, and what to say when it goes wrong."""

    url: str
    final: Path
    expected: str | None
    what: str
    hint: str
    mismatch_hint: str

    @property
    def sidecar(self) -> Path:
        """``<name>.json``: the URL, sha256 and validators (ETag, Last-Modified) of the file."""
        return self.final.with_name(self.final.name + ".json")


def _get(
    session: requests.Session, target: _Target, timeout_s: float, conditional: dict[str, str]
) -> str | None:
    """One GET into the cache; the file's sha256, or ``None`` for a 304 answer.

    The file is renamed into place only if the answer is complete, is not an HTML page and
    has the expected sha256 (when one is given).
    """
    url, hint = target.url, target.hint
    headers = {"Accept-Encoding": "identity", **conditional}
    try:
        response = session.get(url, stream=True, timeout=(timeout_s, timeout_s), headers=headers)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
        raise StageError(f"{url!r} is not a valid URL ({exc}); check {hint}") from None
    with response:
        status = response.status_code
        if status == 304 and conditional:
            return None
        if status in RETRY_STATUSES:  # urllib3's retries ran out on this status
            raise requests.RequestException(f"HTTP {status} {response.reason}")
        if status != 200:
            raise StageError(
                f"HTTP {status} {response.reason} from {urlsplit(url).hostname} for {url}; check "
                f"{hint} (the URL must be a direct, public download link)"
            )
        length = response.headers.get("Content-Length")
        digest = hashlib.sha256()
        head = b""
        with (
            atomic_path(target.final) as tmp,
            open(tmp, "wb") as handle,
            progress(
                total=int(length) if length and length.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=PurePosixPath(urlsplit(url).path).name or url,
            ) as bar,
        ):
            try:
                # raw.stream: the bytes exactly as sent (no Content-Encoding decoding); urllib3
                # raises if fewer bytes than Content-Length arrive.
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    if len(head) < 1024:
                        head += chunk[:1024]
                        _refuse_html(head, target)
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except (HTTPError, requests.RequestException) as exc:
                raise _CutOff(str(exc)) from None
            if target.expected is not None and digest.hexdigest() != target.expected:
                raise StageError(
                    f"sha256 mismatch for {url}: expected {target.expected}, got "
                    f"{digest.hexdigest()}; the download was deleted. {target.mismatch_hint}"
                )
    validators = {key: response.headers.get(key) for key in ("ETag", "Last-Modified")}
    write_json(target.sidecar, {"url": url, "sha256": digest.hexdigest(), **validators})
    return digest.hexdigest()


def _refuse_html(head: bytes, target: _Target) -> None:
    if looks_like_html(head):
        raise StageError(
            f"the server returned an HTML page, not {target.what}, for {target.url} (often a "
            "login, error or 'file moved' page served with status 200). Check "
            f"{target.hint}: it must be a direct download link."
        )


def _cached(target: _Target) -> Download | None:
    """The cached copy of the URL, or ``None`` (a copy with the wrong sha256 is deleted)."""
    if not target.final.is_file():
        return None
    digest = sha256_file(target.final)
    if target.expected is not None and digest != target.expected:
        log.warning("cached %s has sha256 %s, not %s; downloading again", target.final, digest, target.expected)  # fmt: skip
        target.final.unlink()
        return None
    return Download(target.final, digest)


def _conditional_headers(target: _Target, cached: Download | None) -> dict[str, str]:
    """``If-None-Match`` / ``If-Modified-Since`` for a cached copy whose validators are known."""
    if cached is None:
        return {}
    try:
        meta = read_json(target.sidecar)
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("sha256") != cached.sha256:
        return {}  # validators of other bytes would make a 304 lie
    headers = {"If-None-Match": meta.get("ETag"), "If-Modified-Since": meta.get("Last-Modified")}
    return {key: value for key, value in headers.items() if isinstance(value, str)}
