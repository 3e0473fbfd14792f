"""Command-line entry points: one-line errors, tracebacks only on request.

:func:`run` replaces ``absl.app.run`` for the ``launch/`` commands. An exception, while the flags
are parsed (a ``--config.<field>`` that does not exist, a value of the wrong type, an unknown config
part) or while the command runs (a missing model folder, a mismatched checkpoint), ends the
process with one line on stderr that names the problem, and exit status 2 (usage) or 1 (failure).
``--debug`` (or ``SVDQUANT_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags

DEBUG_ENV = "SVDQUANT_DEBUG"


def _debug(argv: Sequence[str]) -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def _fail(message: str, status: int) -> NoReturn:
  line = " ".join(message.split())
  print(f"error: {line} (--debug shows the traceback)", file=sys.stderr)
  sys.exit(status)


def _config_field_error(error: AttributeError, argv: Sequence[str]) -> str | None:
  """A ``--config.a.b=v`` naming a field the config does not have, as ml_collections reports it."""
  text = str(error)
  for _ in range(3):  # ml_collections wraps the KeyError's repr in an AttributeError's repr
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  key = text.split("\n")[0].strip("\"'")
  hint = next((m.group(0) for m in [re.search(r'Did you mean "[^"]+"', text)] if m), "")
  for arg in argv:
    name = arg.split("=", 1)[0]
    if name.startswith("--") and "." in name and name.rsplit(".", 1)[-1] == key:
      field = name.split(".", 1)[1]
      return (f"{arg}: the config has no field {field!r}" + (f" ({hint.lower()}?)" if hint else "")
              + "; list the fields with --helpfull")
  return None


def _usage_error(e: Exception, argv: Sequence[str]) -> NoReturn:
  if isinstance(e, AttributeError):
    message = _config_field_error(e, argv)
    if message:
      _fail(message, 2)
  text = str(e)
  if "Traceback (most recent call last)" in text:  # a config file's own error, wrapped with its traceback
    prefix = text.split("Traceback (most recent call last)")[0].rstrip(": \n")
    text = f"{prefix}: {text.strip().splitlines()[-1].strip()}"
  _fail(f"{text}; see --helpfull", 2)


def define_config_file(default: str, help_string: str, name: str = "config") -> flags.FlagHolder:
  """``config_flags.DEFINE_config_file`` with one-line errors.

  ml_collections applies the ``--config.<field>`` overrides of ``sys.argv`` while it defines the
  flag, so a misspelled field fails here, before :func:`run` starts.
  """
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:  # see parse_flags
    if _debug(sys.argv):
      raise
    _usage_error(e, sys.argv)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """``absl`` flag parsing with one-line errors (the ``flags_parser`` of :func:`run`)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flag and config parsing raise many types; each becomes one line
    if _debug(argv):
      raise
    _usage_error(e, argv)


def run(main: Callable[[Sequence[str]], object]) -> None:
  """``app.run(main)`` with one-line errors (see the module docstring)."""
  # jax reports at INFO that it found no TPU on every start; absl shows INFO, and users need not.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Show full tracebacks on errors (also: {DEBUG_ENV}=1).")

  def guarded(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      _fail(f"unexpected arguments {list(argv[1:])}; settings go through --flags (see --helpfull)", 2)
    try:
      main(argv)
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:  # the command's own errors name their cause; show that line only
      if flags.FLAGS.debug or _debug(sys.argv):
        raise
      _fail(f"{type(e).__name__}: {e}", 1)

  app.run(guarded, flags_parser=parse_flags)
