"""Who may call the project's Prefect API: a secret per project, in ``.tlp/api-auth`` (0600).

Every Prefect server the project starts (``tlp server``, and the temporary one Prefect
starts inside a ``tlp run`` without a server) is protected by Prefect 3's basic auth: the
server refuses every request that lacks ``Authorization: Basic <base64 of the secret>``
with 401 (``PREFECT_SERVER_API_AUTH_STRING``; only ``GET /api/health`` and ``/api/ready``
answer anyone, and websockets need the secret in their first message), and Prefect's
clients send it (``PREFECT_API_AUTH_STRING``). The dashboard asks for it once, on its login
page, and keeps it in the browser's local storage. The temporary server is a ``uvicorn``
child of the run that inherits the run's environment, so it reads the same setting.

The secret is made on first use (``tlp:`` and 32 random bytes, URL-safe base64), written
under a temporary name in ``.tlp/`` with mode 0600 and linked into place, so concurrent
first uses agree on one secret. A secret file that another user could read (or that another
user owns) is refused, not used. To choose your own, write it into the file (mode 0600).
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from flows.locking import tlp_dir

AUTH_FILE = "api-auth"


class AuthFileError(RuntimeError):
    """The project's secret file is not private to this user, or not readable."""


def auth_file(root: str | Path) -> Path:
    """The file that holds the project's API secret."""
    return tlp_dir(root) / AUTH_FILE


def project_auth(root: str | Path) -> str:
    """The project's API secret (``PREFECT_API_AUTH_STRING``), made on first use.

    Args:
        root: the project root.

    Returns:
        The secret, as Prefect's ``auth_string`` settings take it.

    Raises:
        AuthFileError: the file is readable or writable by other users, not owned by this
            user, a link, or empty; the message says how to fix it.
    """
    path = auth_file(root)
    if not path.is_file() and not path.is_symlink():
        fd, name = tempfile.mkstemp(prefix=f".{AUTH_FILE}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"tlp:{secrets.token_urlsafe(32)}\n")
            os.link(name, path)  # atomic, and never replaces a secret made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(name)
    return _read_private(path)


def _read_private(path: Path) -> str:
    fix = f"delete it (tlp makes a new secret; restart `tlp server` then) or run chmod 600 {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise AuthFileError(f"cannot read the API secret {path} ({exc.strerror}); {fix}") from None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise AuthFileError(
                f"the API secret {path} is not private to you (owner uid {info.st_uid}, mode "
                f"{stat.filemode(info.st_mode)}): another user could run the pipeline through "
                f"the Prefect API with it. {fix[0].upper()}{fix[1:]}."
            )
        secret = handle.read().strip()
    if not secret:
        raise AuthFileError(f"the API secret {path} is empty; {fix}")
    return secret


def use_project_auth(root: str | Path) -> str:
    """Protect the servers this process starts, and authenticate its client, with the
    project's secret (in ``os.environ``, before Prefect is imported); return the secret."""
    secret = project_auth(root)
    os.environ["PREFECT_SERVER_API_AUTH_STRING"] = secret
    os.environ["PREFECT_API_AUTH_STRING"] = secret
    return secret
