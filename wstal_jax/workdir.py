"""A run's folder: its default name, its saved config, and the checks that keep runs apart.

  WORKDIR/config.json        the run's config (written by process 0 at the start of training)
  WORKDIR/checkpoints/       orbax (checkpointing.py)
  WORKDIR/tensorboard/       event files
  WORKDIR/metrics.json, results.json, plots/   the final evaluation

Re-running a command resumes its run: the config must be the one saved in the folder, except
for the fields in `RESUME_SAFE`. The default folder of a command is derived from its config
and its `--config.x=y` overrides (`default_workdir`), so an ablation never lands in another
run's folder. `--mode=eval` reads the saved config back (`saved_config`).
"""
from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import tensorflow as tf

from wstal_jax import results_io
from wstal_jax.errors import WstalError

# Config fields that may differ when a run is resumed: they change neither the batches, the
# updates nor which checkpoint is selected (mesh.num_devices: only up to float tolerance).
RESUME_SAFE = ("train.num_steps", "train.log_every", "train.sync_every", "train.grad_shares",
               "train.checkpoint_every", "eval.num_plots",
               "eval.batch_size", "data.dir", "data.cache_dir", "checkpoint.async_save",
               "checkpoint.keep_latest", "mesh.num_devices", "eval.forward",
               "eval.chunk_snippets", "compilation_cache")

CONFIG_FILE = "config.json"


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs it); gs://... left alone."""
  return path if "://" in str(path) else os.path.abspath(path)


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_differences(old: dict, new: dict, ignore=()) -> list[str]:
  """Flattened `field: old -> new` lines, except fields under the prefixes in `ignore`."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and v:
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out
  a, b = flat(old), flat(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == p or key.startswith(p.rstrip(".") + ".") for p in ignore):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


def check_config(workdir: str, config):
  """WstalError if `workdir` holds a run whose config differs outside RESUME_SAFE. A folder
  without checkpoints holds nothing to resume (a run stopped by a config error before its
  first save): its config.json is simply replaced."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return
  checkpoints = os.path.join(workdir, "checkpoints")
  if not tf.io.gfile.exists(checkpoints) or not any(
      name.rstrip("/").isdigit() for name in tf.io.gfile.listdir(checkpoints)):
    return
  old = results_io.load_json(path)
  diffs = config_differences(old, config_to_json(config), ignore=RESUME_SAFE)
  if diffs:
    raise WstalError(f"{workdir} holds a run with a different config ({'; '.join(diffs[:6])}"
                     f"{'; ...' if len(diffs) > 6 else ''}); pass a new --workdir for this one "
                     "(or delete the old run)")


def save_config(workdir: str, config):
  results_io.write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_to_json(config),
                               indent=2)


def default_workdir(config, overrides: dict) -> str:
  """workdirs/<name>-<dataset>-seed<seed>[-<overrides>]: a command's own folder, so that
  re-running it resumes it and an ablation override never lands in another run's folder.

  overrides: the command line's `--config.x=y` values ({'x': y}); the seed and the
  RESUME_SAFE fields do not name a folder."""
  name = f"{config.name}-{config.data.dataset}-seed{config.seed}"
  kept = {k: v for k, v in overrides.items() if k != "seed" and k not in RESUME_SAFE}
  if kept:
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(kept.items()))
    if len(text) > 60 or not all(c.isalnum() or c in "_=,.-" for c in text):
      text = hashlib.sha1(repr(sorted(kept.items())).encode()).hexdigest()[:10]
    name += "-" + text
  return os.path.join("workdirs", name)


def saved_config(workdir: str, overrides: dict) -> ml_collections.ConfigDict:
  """The run's saved WORKDIR/config.json with `overrides` ({'a.b': value}) applied on top."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    saved = results_io.load_json(path)
  except WstalError as e:
    raise WstalError(f"{e}: is {workdir} a training run? (or pass --config)") from None
  config = ml_collections.ConfigDict(saved)
  config.eval.tiou = tuple(config.eval.tiou)
  _add_new_fields(config)
  return apply_overrides(config, overrides)


def _add_new_fields(config):
  """Shared config fields added after the run was saved (eval.forward, compilation_cache,
  ...) take their defaults, so that such a run evaluates as before and accepts
  --config.<field> overrides. Fields the run has are never changed; a method's own block
  fills its gaps itself (methods.config_block)."""
  from wstal_jax import config_common   # pylint: disable=import-outside-toplevel
  defaults = config_common.base_config(name="defaults", method=str(config.get("method")))

  def fill(dst, src):
    for key, value in src.items():
      if key not in dst:
        with dst.unlocked():
          dst[key] = value
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(
          dst[key], ml_collections.ConfigDict):
        fill(dst[key], value)
  fill(config, defaults)


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """This file as a config file: `workdir.py:DIR` is DIR's saved config (main.py's --config
  default for --mode=eval, so that --config.x.y overrides parse against the run's fields)."""
  return saved_config(workdir, {})


def apply_overrides(config, overrides: dict):
  """Sets config.<a.b.c> = value for every {'a.b.c': value}; returns the config."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# ------------------------------------------------------------------------------ run lock

LOCK_FILE = "run.lock"     # local and shared filesystems: a kernel lock on this file
LEASE_FILE = "run.lease"   # object stores (gs://): a lease renewed by a heartbeat
LEASE_HEARTBEAT_S = 30.0
LEASE_EXPIRY_S = 120.0


class RunLock:
  """Keeps a second run out of a live run's folder. Held by process 0 for the whole run.

  Local and shared filesystems (NFS, Lustre and GPFS mounted with locking): an exclusive
  `flock` on WORKDIR/run.lock, which the kernel releases when the process ends however it
  ends, so a run killed with kill -9 never blocks its resume. While the run lives the file
  holds its host, pid, start time and command line, for the error message; the run empties
  it when it ends (the empty file stays).

  Object stores (gs://...), and filesystems without locks: a lease, WORKDIR/run.lease, with
  the same fields and a heartbeat time renewed every LEASE_HEARTBEAT_S seconds, deleted when
  the run ends. A lease renewed within LEASE_EXPIRY_S seconds refuses a second run; a killed
  run's lease expires after that long. Unlike the kernel lock this is not atomic: two runs
  started within the same second can both take it.
  """

  def __init__(self, workdir: str, *, what: str = "run", flag: str = "--workdir",
               lease: bool | None = None):
    self.workdir = workdir
    self.what = what
    self.flag = flag
    self.use_lease = "://" in workdir if lease is None else lease
    self._fd = None
    self._stop = None
    self._thread = None

  def _holder(self) -> dict:
    import socket
    import sys
    import time
    return {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}

  def _refuse(self, holder: dict, extra: str = ""):
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')}: {holder.get('command', '?')}")
    raise WstalError(f"{self.workdir} is in use by a live {holder.get('what', 'run')} ({who})"
                     f"{extra}; wait for it to end or stop it, or pass another {self.flag}")

  def acquire(self) -> "RunLock":
    tf.io.gfile.makedirs(self.workdir)
    if not self.use_lease:
      import fcntl
      path = os.path.join(self.workdir, LOCK_FILE)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        with os.fdopen(fd, "r") as f:
          text = f.read()
        self._refuse(_parse_holder(text))
      except OSError:   # a filesystem without locks: fall back to the lease
        os.close(fd)
        self.use_lease = True
        return self.acquire()
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(self._holder()) + "\n").encode(), 0)
      self._fd = fd
      return self
    import threading
    import time
    path = f"{self.workdir.rstrip('/')}/{LEASE_FILE}"
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        holder = _parse_holder(f.read())
      age = time.time() - float(holder.get("heartbeat", 0))
      if age < LEASE_EXPIRY_S:
        self._refuse(holder, f"; its lease was renewed {age:.0f} s ago (a killed run's lease "
                             f"expires after {LEASE_EXPIRY_S:.0f} s)")
    holder = self._holder()

    def renew():
      results_io.write_json_atomic(path, dict(holder, heartbeat=time.time()))

    renew()
    self._stop = threading.Event()

    def beat():
      while not self._stop.wait(LEASE_HEARTBEAT_S):
        try:
          renew()
        except Exception:  # a transient storage error: the next beat tries again
          pass

    self._thread = threading.Thread(target=beat, name="wstal-run-lease", daemon=True)
    self._thread.start()
    self._lease_path = path
    return self

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)   # an ended run leaves an empty file (the same in every run)
      os.close(self._fd)   # closing the file releases the flock
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      try:
        tf.io.gfile.remove(self._lease_path)
      except Exception:  # already gone: nothing to release
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _parse_holder(text: str) -> dict:
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}
