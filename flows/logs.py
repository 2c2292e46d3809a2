"""What ``tlp run`` prints in the terminal: its own lines and the stages' output, each error once.

Prefect's engines narrate every state change on the console ("Beginning flow run",
"Finished in state Failed(...)") and log a failure with its traceback at each level (task,
flow), so one stage error used to appear about seven times. In the terminal, ``tlp run``
keeps what the flow and its stages say (``flows/pipeline.py``'s run logger, the stages'
output) and Prefect's own warnings, and prints the run's outcome and error itself, once,
at the end. The Prefect API (the dashboard) still gets every record. ``--verbose``
(``TLP_VERBOSE=1``) shows everything, in the terminal too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

VERBOSE_ENV = "TLP_VERBOSE"
# extra={CONSOLE: False}: a record for the Prefect API (the dashboard) only, e.g. a stage's
# error, which `tlp run` prints itself at the end.
CONSOLE = "tlp_console"
_ENGINES = ("flow_engine.py", "task_engine.py")  # Prefect's run engines: state narration


def verbose() -> bool:
    """Whether the user asked for everything (``tlp run --verbose``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


class QuietConsole(logging.Filter):
    """Keeps a console record unless Prefect's engines narrate it, or it is for the API only.

    Records from elsewhere in Prefect are kept from ``WARNING`` up (e.g. an API that does
    not answer); everything not from Prefect is kept.
    """

    def __init__(self, prefect_dir: str):
        super().__init__()
        self.prefect_dir = prefect_dir

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` goes to the terminal."""
        if not getattr(record, CONSOLE, True):
            return False
        if not record.pathname.startswith(self.prefect_dir):
            return True
        return not record.pathname.endswith(_ENGINES) and record.levelno >= logging.WARNING


def quiet_console() -> None:
    """Put :class:`QuietConsole` on Prefect's console handlers, unless ``--verbose``.

    Call it after Prefect is imported (its logging is set up then).
    """
    if verbose():
        return
    import prefect
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = QuietConsole(str(Path(prefect.__file__).parent))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(quiet)
