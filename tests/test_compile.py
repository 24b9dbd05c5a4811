"""--mode=compile: VLPO's and PVLR's steps compiled for a TPU topology on this CPU machine
(the real TPU compiler, from libtpu); skipped where libtpu is not installed."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from wstal_jax import compile_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); CI does not "
    "install it (0.7 GB), see README 'Before you rent a slice'")

TINY = ["--config.train.batch_size=8", "--config.eval.batch_size=8",
        "--config.data.num_snippets=32"]


def _compile(config, tmp_path, *extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", WSTAL_DATA_CACHE=str(tmp_path))
  env.pop("JAX_PLATFORMS", None)   # the command itself keeps jax on the CPU
  return subprocess.run([sys.executable, "-m", "wstal_jax.main", "--mode=compile",
                         f"--config={ROOT / 'configs' / config}", "--topology=v5e:2x2",
                         f"--workdir={tmp_path / 'out'}", *TINY, *extra], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=900)


@needs_libtpu
@pytest.mark.parametrize("config,phases,pure_data_parallel", [
    ("vlpo.py", 1, True),   # whole-video evaluation in exact chunks: also eval_network_rows
    # PVLR on CO2-Net: the CO2-Net family's losses pair videos of the batch (CO2-Net's
    # co-activity term), which XLA serves with collectives across the data axis: reported.
    ("pvlr.py", 1, False)])
def test_compile_for_a_tpu_topology(tmp_path, config, phases, pure_data_parallel):
  proc = _compile(config, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("could not determine TPU", "Traceback"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  out = json.loads((tmp_path / "out" / "compile.json").read_text())
  assert out["topology"] == "v5e:2x2" and out["num_devices"] == 4
  assert out["device_kind"].startswith("TPU v5")
  names = [f"train_phase{i}" for i in range(phases)] + ["eval_forward"]
  if config == "vlpo.py":
    names.append("eval_network_rows")
  assert sorted(out["steps"]) == sorted(names)
  for name, step in out["steps"].items():
    # per-chip bytes: positive and far below the chip's 16 GiB at these tiny shapes
    assert 0 < step["argument_bytes"] < 1 << 30 and 0 < step["output_bytes"] < 1 << 30
    assert step["temp_bytes"] >= 0 and step["flops"] > 0
  train = out["steps"]["train_phase0"]
  assert "train_phase0" in proc.stdout
  if pure_data_parallel:
    assert train["collectives"] == ["all-reduce"]   # gradients and terms only
    # the gradient all-reduce moves about the parameters (float32), no activations
    assert 0 < train["all_reduce_bytes"] <= 1.1 * train["output_bytes"] + (1 << 16)
    assert out["findings"] == [] and "findings: none" in proc.stdout
  else:
    assert "all-reduce" in train["collectives"] and len(train["collectives"]) > 1
    assert any(f.startswith("train_phase0: unexpected collectives") for f in out["findings"])
    assert "finding: train_phase0: unexpected collectives" in proc.stdout


@needs_libtpu
def test_phases_with_the_same_program_compile_once(tmp_path):
  """Ju et al.'s 7 phases (warm-up, then B / F three times) lower to 3 programs: each is
  compiled once and the repeats name the phase whose program they are."""
  proc = _compile("ju2023.py", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps = json.loads((tmp_path / "out" / "compile.json").read_text())["steps"]
  assert sorted(steps) == sorted([f"train_phase{i}" for i in range(7)] + ["eval_forward"])
  same = {name: step.get("same_program_as") for name, step in steps.items()}
  assert same == {"train_phase0": None, "train_phase1": None, "train_phase2": None,
                  "train_phase3": "train_phase1", "train_phase4": "train_phase2",
                  "train_phase5": "train_phase1", "train_phase6": "train_phase2",
                  "eval_forward": None}
  assert "(the program of train_phase1)" in proc.stdout


@needs_libtpu
def test_a_batch_that_does_not_divide_over_the_slice(tmp_path):
  proc = _compile("vlpo.py", tmp_path, "--config.train.batch_size=6")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "config.train.batch_size" in proc.stderr and "error:" in proc.stderr


def test_collectives_from_hlo_text():
  hlo = "\n".join([
      "  %all-reduce.1 = f32[512,512]{1,0} all-reduce(f32[512,512]{1,0} %p), replica_groups={}",
      "  %ar2 = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce-start(f32[10]{0} %a, bf16[4,4] %b)",
      "  %all-gather = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %x), dimensions={0}",
      "  %add = f32[4] add(f32[4] %a, f32[4] %b)"])
  ops, reduce_bytes = compile_check.collectives(hlo)
  assert ops == ["all-gather", "all-reduce"]
  assert reduce_bytes == 512 * 512 * 4 + 10 * 4 + 16 * 2


def test_unknown_chip_is_one_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", WSTAL_DATA_CACHE=str(tmp_path))
  proc = subprocess.run([sys.executable, "-m", "wstal_jax.main", "--mode=compile",
                         f"--config={ROOT / 'configs' / 'vlpo.py'}", "--topology=v9:2x2",
                         f"--workdir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "error: --topology=v9:2x2: unknown chip 'v9'" in proc.stderr
