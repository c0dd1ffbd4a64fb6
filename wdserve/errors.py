"""Errors a user can act on, and the exit codes ``wdserve`` gives them.

Library code raises a ``WdserveError`` (or a stage's own subclass: ``distill.data.DataError``,
``export.convert.ExportError``, ``server.models.ModelLoadError``, ``loadtest.accounting.BenchError``)
with a message that names the file, flag or setting to fix, and never prints or exits. Only
``wdserve.cli.main`` turns one into ``wdserve <command>: error: <message>`` on stderr and its
``exit_code``; any other exception is a bug and keeps its traceback.

Exit codes:

- 2: the command line or a config file asks for something that cannot work (``ConfigError``), the code
  argparse itself gives a bad flag;
- 1: everything that fails while running: an input file missing or malformed, a model that cannot be
  loaded, exported or verified, a bench that cannot run.

This module imports nothing heavy: the serving install raises these too.
"""

from __future__ import annotations


class WdserveError(Exception):
    """A failure the user can fix; the message says what and where."""

    exit_code = 1


class ConfigError(WdserveError):
    """Flags or a config file that cannot work: unreadable, the wrong shape, unknown keys, bad values."""

    exit_code = 2
