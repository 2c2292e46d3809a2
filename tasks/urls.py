"""What a URL in the pipeline may hold: valid syntax, and no credentials.

A URL is written where anyone can read it: the logs, ``data/raw/source.json``, ``dvc.lock``
(DVC tracks ``fetch.source`` as a dependency), Prefect's database (a run's parameters) and
the download cache's records. A user name and password (``https://user:secret@host/...``) or
a secret query parameter (``?token=...``, ``api_key``, ``X-Amz-Signature``, ``sig``...)
would end up in all of them, so such URLs are refused, and the error never repeats the
URL. Credentials belong in ``~/.netrc`` (or the file ``$NETRC`` names), which both
``requests`` (the download) and DVC (checking the URL for changes) read.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# A query parameter name that carries a secret: the whole name or its last part.
_SECRET_NAME = re.compile(
    r"(^|[_.-])(access[_-]?)?(token|key|apikey|secret|passw(or)?d|pwd|auth|sig|signature|"
    r"credential|session)$",
    re.IGNORECASE,
)
NETRC_HINT = (
    "Put them in ~/.netrc instead (a line `machine HOST login USER password SECRET`, file "
    "mode 600; or the file $NETRC names), which both the download and DVC read"
)


class SecretInURLError(ValueError):
    """A URL holds credentials; the message names where, never the URL itself."""


def check_url(url: str) -> None:
    """Refuse a URL that does not parse or that holds credentials.

    The messages start with what is wrong (``"is not a valid URL ..."``): callers put the
    setting's name in front.

    Raises:
        ValueError: the URL does not parse (a bracket or a port out of place).
        SecretInURLError: the URL holds a user name, a password or a secret query
            parameter.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port raises on a bad one)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}); check its brackets and port") from None
    if parts.username is not None or parts.password is not None:
        where = "a user name and password (user:secret@)"
    else:
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        secret = [name for name in names if _SECRET_NAME.search(name)]
        if not secret:
            return
        where = f"the query parameter {secret[0]!r}"
    raise SecretInURLError(
        f"must not hold credentials, and this URL holds {where}: it would be written to the "
        f"logs, data/raw/source.json, dvc.lock and Prefect's database. {NETRC_HINT}"
    )
