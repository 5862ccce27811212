"""The one base class of the errors a user can cause.

Every module's error for bad input (``ConfigError``, ``ModelError``, ``TaskError``,
``TrajectoryError``, ``PlotError``, ``CheckpointError``) derives from :class:`UserError`, so the
command line catches one class and library callers may too. This module imports nothing from
zotune: every layer can import it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A user's bad input: a config value, a file, a model name, a run directory.

    The message is one line that names what is wrong (the key, the file and where in it) and, where
    it can, what to do. ``zotune`` prints it as ``zotune COMMAND: error: MESSAGE`` and exits with
    code 2, before anything is written; a traceback means a bug, not a user error.

    A ``ValueError`` so that code catching ``ValueError`` for bad values keeps working.

    Example::

        >>> from zotune.errors import UserError
        >>> from zotune.config import ConfigError, load_config
        >>> issubclass(ConfigError, UserError)
        True
    """
