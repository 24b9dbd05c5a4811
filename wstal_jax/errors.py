"""The one exception type for bad user input, and the CLI wrapper that reports it."""
import functools
import sys


class WstalError(Exception):
  """Bad input. The message names the file (or setting) and what is wrong with it."""


def cli_main(fn):
  """Wraps a CLI entry point: a WstalError becomes `error: ...` on stderr and exit code 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except WstalError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapper
