"""The built-in datasets on disk: the cache folder, generation on first use, and the variants
methods derive from them (with descriptions, with candidate proposals).

  python -m wstal_jax.main --config=configs/vlpo.py   # generates builtin-small-... once

Entries are generated into a private temporary folder and renamed into place, so processes
that race (several seeds started at once, several hosts on one filesystem) all end up with
one complete, byte-identical copy.
"""
import os
import uuid

import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.data import synthetic
from wstal_jax.errors import WstalError


def default_cache_dir() -> str:
  """$WSTAL_DATA_CACHE, else ~/.cache/wstal_jax."""
  return os.environ.get("WSTAL_DATA_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "wstal_jax")


def ensure_builtin(size: str, seed: int = 0, cache_dir: str | None = None) -> str:
  """Returns the directory of the `size` benchmark of `seed`, generating it on first use.

  The entry is cache_dir/synthetic.builtin_name(size, seed) (cache_dir defaults to
  default_cache_dir()).
  It is generated into a private temporary directory and renamed into place, so a process that
  loses a race to another one keeps the winner's (identical) copy.
  """
  synthetic.get_spec(size)
  seed = synthetic._check_seed(seed)
  cache_dir = str(cache_dir or default_cache_dir()).rstrip("/")
  target = f"{cache_dir}/{synthetic.builtin_name(size, seed)}"
  if tf.io.gfile.exists(f"{target}/{fmt.MANIFEST}"):
    return _with_tfds_metadata(target)
  if tf.io.gfile.exists(target):
    raise WstalError(f"{target}: incomplete cached dataset (no {fmt.MANIFEST}); remove it and "
                     "try again")
  name = synthetic.builtin_name(size, seed)
  tmp = f"{cache_dir}/.{name}.gen-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    tf.io.gfile.makedirs(cache_dir)
    synthetic.generate(tmp, size, seed)   # looked up here: tests replace it
    try:
      tf.io.gfile.rename(tmp, target)
    except (tf.errors.OpError, OSError) as e:
      if not tf.io.gfile.exists(f"{target}/{fmt.MANIFEST}"):  # not a lost race
        raise WstalError(f"cannot move the generated dataset to {target}: {e}") from e
  except (tf.errors.OpError, OSError) as e:
    raise WstalError(f"cannot write the synthetic dataset cache in {cache_dir}: {e}") from e
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)
  return target


def ensure_derived(plain: str, suffix: str, add) -> str:
  """`plain`-<suffix>: the built-in dataset `plain` with inputs a method adds (descriptions,
  proposals), made on first use by add(sources_dir, target) (which writes its source files
  into the temporary sources_dir and the dataset at target, atomically). A process that loses
  a race to another one keeps the winner's (identical) copy."""
  target = f"{plain}-{suffix}"
  if tf.io.gfile.exists(f"{target}/{fmt.MANIFEST}"):
    return _with_tfds_metadata(target)
  sources = f"{plain}-{suffix}-sources.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    try:
      add(sources, target)
    except WstalError:
      if not tf.io.gfile.exists(f"{target}/{fmt.MANIFEST}"):   # not a lost race
        raise
  finally:
    if tf.io.gfile.exists(sources):
      tf.io.gfile.rmtree(sources)
  return target


def _with_tfds_metadata(data_dir: str) -> str:
  """A cache entry written before datasets carried TFDS metadata gets it (the shards are
  unchanged; every writer now adds it)."""
  if not tf.io.gfile.exists(f"{data_dir}/dataset_info.json"):
    from wstal_jax.data import tfds_io   # pylint: disable=import-outside-toplevel
    manifest = fmt.read_manifest(data_dir)
    infos = [fmt.read_video_info(data_dir, split) for split in manifest["splits"]]
    complete = [f for f in manifest["optional_fields"]
                if all(f in v.extras for split in infos for v in split)]
    tfds_io.write_metadata(data_dir, manifest, complete)
  return data_dir
