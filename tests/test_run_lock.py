"""A second run on a live workdir refuses (wstal_jax.workdir.RunLock): the kernel lock on local
and shared filesystems, the heartbeat lease on object stores; a run killed with kill -9 never
blocks its resume."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from wstal_jax import evaluate, train, workdir as workdir_lib
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TinyMethod, tiny_config, tiny_data  # noqa: E402,F401  (fixture)

_HOLDER = r"""
import sys, time
from wstal_jax import workdir
lock = workdir.RunLock(sys.argv[1], what="training run", lease=sys.argv[2] == "lease").acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def _hold(path, mode):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode, "--flag=x"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.strip() == "HELD", proc.stderr.read()[-3000:]
  return proc


def _kill9(proc):
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)


def test_second_training_run_refuses_and_a_killed_run_does_not_block(tiny_data, tmp_path):
  workdir = tmp_path / "run"
  holder = _hold(workdir, "flock")
  try:
    with pytest.raises(WstalError) as e:
      train.train_and_evaluate(tiny_config(tiny_data), str(workdir), method=TinyMethod())
    message = str(e.value)
    assert message.startswith(f"{workdir} is in use by a live training run (pid {holder.pid} "
                              f"on {socket.gethostname()}, started ")
    assert "--flag=x" in message and message.endswith("or pass another --workdir")
    # Nothing of the second run was written.
    assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]
    # Evaluation into the live folder refuses too (it would overwrite metrics.json).
    with pytest.raises(WstalError, match="in use by a live training run.*--eval_dir"):
      workdir_lib.RunLock(str(workdir), what="evaluation", flag="--eval_dir").acquire()
  finally:
    _kill9(holder)
  # kill -9: the kernel dropped the lock with the process; the run starts (and holds it).
  out = train.train_and_evaluate(tiny_config(tiny_data, num_steps=4), str(workdir),
                                 method=TinyMethod())
  assert out["step"] == 4
  lock = workdir_lib.RunLock(str(workdir)).acquire()   # released at the end of the run
  lock.release()
  # An evaluation of the finished run into its own folder is allowed now.
  assert evaluate.evaluate_checkpoint(tiny_config(tiny_data, num_steps=4), str(workdir),
                                      method=TinyMethod())["step"] == 4


def test_lease_on_object_stores(tmp_path, monkeypatch):
  """The lease (what gs:// workdirs get), exercised on a local folder: a live holder refuses
  a second run; a killed holder's lease blocks until it expires; a released lease is gone."""
  workdir = tmp_path / "run"
  holder = _hold(workdir, "lease")
  lease = workdir / workdir_lib.LEASE_FILE
  try:
    with pytest.raises(WstalError, match=rf"in use by a live training run \(pid {holder.pid} "
                                         r".*lease was renewed \d+ s ago"):
      workdir_lib.RunLock(str(workdir), lease=True).acquire()
  finally:
    _kill9(holder)
  assert json.loads(lease.read_text())["pid"] == holder.pid
  with pytest.raises(WstalError, match="expires after 120 s"):
    workdir_lib.RunLock(str(workdir), lease=True).acquire()
  # Expired: the killed run's last heartbeat is older than LEASE_EXPIRY_S.
  stale = json.loads(lease.read_text())
  stale["heartbeat"] = time.time() - workdir_lib.LEASE_EXPIRY_S - 1
  lease.write_text(json.dumps(stale))
  monkeypatch.setattr(workdir_lib, "LEASE_HEARTBEAT_S", 0.05)
  lock = workdir_lib.RunLock(str(workdir), lease=True).acquire()
  first = json.loads(lease.read_text())
  assert first["pid"] == os.getpid()
  time.sleep(0.3)
  assert json.loads(lease.read_text())["heartbeat"] > first["heartbeat"]   # renewed
  lock.release()
  assert not lease.exists()
