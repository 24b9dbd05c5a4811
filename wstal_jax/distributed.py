"""Multi-process start-up: whether to join a job, jax.distributed.initialize, losing a peer.

Start-up. `initialize(mode, ...)` runs before anything touches a device (train.py and
evaluate.py are imported after it). `distributed_reason` decides whether this process is one
of several: --distributed=on always, =off never, =auto (the default) when the command line
(--coordinator_address / --num_processes) or the cluster asks for it: JAX_COORDINATOR_ADDRESS,
a SLURM job of several tasks, a TPU worker list of several hosts, a multislice TPU, or a Cloud
TPU VM slice of several workers (`cloud_tpu_vm_workers`, the GCE metadata server; only asked
when libtpu is installed and nothing else decided). What the flags leave unset
jax.distributed finds itself from the cluster. CPU jobs get gloo cross-process collectives.
A failed start-up is a WstalError (`error: ...`, exit 2) naming the reason and the flags that
fix it.

Failure. A runtime error in a multi-process job (jax.errors.JaxRuntimeError, usually a
collective whose peer died) is reported in one `error:` paragraph and the process exits at
once with code 1 (`run_or_abandon`, `abandon_job`): the normal shutdown barrier would wait
for the lost process until the heartbeat timeout (100 s) and then abort with a C++ stack
dump. Re-running the same command on every process resumes from the latest checkpoint. A
single process re-raises the error. A process that waits for a lost peer *outside* a
collective that fails (e.g. in a cross-process barrier of a checkpoint save, or because the
peer hangs rather than dies) is ended by jax.distributed's coordination service once the peer
has missed heartbeats for --heartbeat_timeout_s seconds, with a C++ stack dump; our
`Watchdog` notices a silent peer at half that time and abandons the job with the one
`error:` paragraph first. jax's default is 100 s; lower it to fail faster, raise it where
processes can stall (long host-side pauses).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
import urllib.request

from absl import logging

from wstal_jax.errors import WstalError


def first_line(e: BaseException) -> str:
  """The first non-blank line of an exception's message (at most 500 characters)."""
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return lines[0][:500] if lines else type(e).__name__


def cloud_tpu_vm_workers(timeout_s: float = 5.0) -> int:
  """Workers of the Cloud TPU VM slice this machine is part of; 0 when it is not a TPU VM.

  A TPU VM has libtpu installed (the package's [tpu] extra) and its GCE metadata server lists
  one `worker-network-endpoints` entry per worker (the attribute jax.distributed itself reads).
  Without libtpu nothing is queried; elsewhere the query fails fast and counts as 0.
  """
  if importlib.util.find_spec("libtpu") is None or "TPU_SKIP_MDS_QUERY" in os.environ:
    return 0
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      text = response.read().decode()
  except (OSError, ValueError):
    return 0
  return len([w for w in text.split(",") if w.strip()])


def distributed_reason(mode, *, coordinator=None, num_processes=None, env=None,
                       tpu_workers=cloud_tpu_vm_workers) -> str | None:
  """Why this process joins a multi-process job (None: it runs on its own).

  mode: --distributed. env: the environment (default os.environ). tpu_workers: a function
  giving the Cloud TPU VM worker count, only called when nothing else decided."""
  env = os.environ if env is None else env
  explicit = [f for f, v in (("--coordinator_address", coordinator),
                             ("--num_processes", num_processes)) if v is not None]
  if mode == "off":
    if explicit:
      raise WstalError(f"--distributed=off contradicts {' and '.join(explicit)}")
    return None
  if mode == "on":
    return "--distributed=on"
  if explicit:
    return explicit[0]
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  try:
    if int(env.get("SLURM_NTASKS", "1")) > 1:
      return f"SLURM job of {env['SLURM_NTASKS']} tasks"
  except ValueError:
    pass
  for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    if "," in env.get(var, ""):
      return f"{var} lists several TPU workers"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multislice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
  workers = tpu_workers()
  if workers > 1:
    return f"Cloud TPU VM slice of {workers} workers"
  return None


def initialize(mode, *, coordinator_address=None, num_processes=None,
               process_id=None, heartbeat_timeout_s: int = 100) -> str | None:
  """jax.distributed.initialize() when this is a multi-process job; logs the layout.

  mode: --distributed ('auto', 'on', 'off'); the other arguments are the flags of the same
  names (None: jax.distributed finds them from the cluster); heartbeat_timeout_s: see
  the module docstring ("Failure"). Returns distributed_reason's
  answer (None: a single process). WstalError when the job cannot start."""
  import jax
  reason = distributed_reason(mode, coordinator=coordinator_address,
                              num_processes=num_processes)
  if int(heartbeat_timeout_s) < 1:
    raise WstalError(f"--heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1")
  if reason is not None:
    # CPU jobs need a cross-process collectives backend (jax's CPU default has been 'none').
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s)", reason)
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except (ValueError, TypeError, RuntimeError) as e:
      cause = first_line(e).rstrip(".")
      raise WstalError(f"cannot start the multi-process job ({reason}): {cause}; pass "
                       "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or "
                       "--distributed=off for a single process") from None
  logging.info("JAX process %d of %d; %d local / %d global devices (%s)%s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform,
               f"; local: {[d.id for d in jax.local_devices()]}" if reason else "")
  return reason


def abandon_job(e: BaseException):
  """A runtime failure in a multi-process job (usually a collective whose peer died): say so and
  exit at once. os._exit skips jax.distributed's shutdown barrier, which would wait for the lost
  process until the heartbeat timeout (100 s) and then abort with a C++ stack dump."""
  import jax
  sys.stdout.flush()
  print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{first_line(e)}\nAnother process of this job has probably died or stopped "
        "responding (see its log). Re-running the same command on every process resumes from "
        "the latest checkpoint.", file=sys.stderr, flush=True)
  os._exit(1)


class LostPeer(Exception):
  """A peer process stopped answering (`Watchdog`)."""


class Watchdog:
  """Notices a lost peer before jax.distributed's coordination service does.

  Every `period` s each process bumps a counter under its own key of the coordination
  service's key-value store and reads the others'. A peer whose counter has not moved for
  `silence_s` s (half the heartbeat timeout: jax's service would otherwise end this process
  at the full timeout with a C++ stack dump), or a store that no longer answers (process 0,
  which hosts it, died), abandons the job with one `error:` paragraph (`abandon_job`). A
  process that finishes marks its key 'done' and is no longer watched. Needs jax's
  distributed client (private `jax._src.distributed.global_state.client`); without it
  `start` does nothing."""
  PREFIX = "wstal_watchdog"

  def __init__(self, heartbeat_timeout_s: float):
    self.silence_s = max(heartbeat_timeout_s / 2.0, 1.0)
    self.period = min(max(self.silence_s / 10.0, 0.2), 5.0)
    self._stop = threading.Event()
    self._thread = None
    self._client = None

  def start(self) -> "Watchdog":
    import jax
    from jax._src import distributed as jax_distributed
    self._client = getattr(jax_distributed.global_state, "client", None)
    if self._client is None or jax.process_count() == 1:
      return self
    self.me, self.num = jax.process_index(), jax.process_count()
    self._thread = threading.Thread(target=self._loop, name="wstal-watchdog", daemon=True)
    self._thread.start()
    return self

  def _key(self, p):
    return f"{self.PREFIX}/{p}"

  def _loop(self):
    counter = 0
    seen = {p: (None, time.monotonic()) for p in range(self.num) if p != self.me}
    while not self._stop.is_set():
      try:
        self._client.key_value_set(self._key(self.me), str(counter), allow_overwrite=True)
        counter += 1
        for p, (value, since) in list(seen.items()):
          try:
            now_value = self._client.key_value_try_get(self._key(p))
          except Exception:  # pylint: disable=broad-except  (NOT_FOUND: not started yet)
            now_value = None
          if now_value == "done":
            del seen[p]
          elif now_value != value:
            seen[p] = (now_value, time.monotonic())
          elif time.monotonic() - since > self.silence_s:
            raise LostPeer(f"process {p} has not answered for {self.silence_s:.0f} s "
                           "(--heartbeat_timeout_s / 2)")
      except LostPeer as e:
        if not self._stop.is_set():
          abandon_job(e)
      except Exception as e:  # pylint: disable=broad-except  (the store is gone)
        if not self._stop.is_set():
          abandon_job(LostPeer(f"the coordination service of process 0 does not answer "
                               f"({first_line(e)})"))
      self._stop.wait(self.period)

  def stop(self):
    """This process is done: stop watching and let the peers stop watching it."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    try:
      self._client.key_value_set(self._key(self.me), "done", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


def run_or_abandon(fn, *args, heartbeat_timeout_s: float = 100.0, **kwargs):
  """fn(*args, **kwargs); a jax.errors.JaxRuntimeError in a multi-process job abandons the
  job (`abandon_job`), in a single process it is re-raised. In a multi-process job a
  `Watchdog` watches the peers meanwhile."""
  import jax
  watchdog = Watchdog(heartbeat_timeout_s).start()
  try:
    return fn(*args, **kwargs)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    abandon_job(e)
  finally:
    watchdog.stop()
