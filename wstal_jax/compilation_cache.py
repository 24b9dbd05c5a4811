"""JAX's persistent compilation cache, on by default for training, --mode=eval and predict.

Re-running a command, resuming a run, the next seed of a sweep or an evaluation from a
checkpoint compiles nothing that an earlier process on this machine already compiled: XLA
executables are stored on disk keyed by the program, the devices and the compiler options.

Where (first that applies):
  config.compilation_cache   'off' disables it, a path (local or gs://) puts it there;
                             '' (the default) defers to
  $WSTAL_COMPILATION_CACHE   the same values;
  $JAX_COMPILATION_CACHE_DIR jax's own setting, when the user set it;
  default                    <$WSTAL_DATA_CACHE or ~/.cache/wstal_jax>/jax_compilation.

Programs that compile in under MIN_COMPILE_S are not stored (the lookup would cost about as
much; $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, wins); the cache keeps at most
MAX_BYTES, dropping the least recently used entries.
`enable` must run before the first compilation of the process (jax reads the settings once).
"""
from __future__ import annotations

import os

from absl import logging

ENV = "WSTAL_COMPILATION_CACHE"
OFF = ("off", "none", "false", "0")
MIN_COMPILE_S = 0.2
MAX_BYTES = 4 << 30


def resolve(config=None) -> str | None:
  """The cache directory for `config` (module docstring), or None when disabled."""
  value = str((config.get("compilation_cache", "") if config is not None else "") or "")
  if not value:
    value = os.environ.get(ENV, "") or os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if value.strip().lower() in OFF:
    return None
  if value:
    return value
  from wstal_jax.data import builtin_cache   # pylint: disable=import-outside-toplevel
  return os.path.join(builtin_cache.default_cache_dir(), "jax_compilation")


def enable(config=None) -> str | None:
  """Turns the persistent cache on at resolve(config); returns the directory (None: off)."""
  import jax   # pylint: disable=import-outside-toplevel
  path = resolve(config)
  if path is None:
    logging.info("persistent compilation cache: off")
    return None
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  logging.info("persistent compilation cache: %s", path)
  return path
