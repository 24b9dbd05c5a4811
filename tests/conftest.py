"""Test setup: 8 fake CPU devices, a fast-failing collective timeout, and no implicit rank
promotion anywhere in the suite (jax_numpy_rank_promotion='raise': a broadcast between arrays
of different ranks must be written out, so a shape slip fails instead of broadcasting).

These must be set before jax is imported anywhere (and reach the CLI subprocesses through the
environment), which is why they live here.
Tests that need a single device restrict the mesh explicitly (config.mesh.num_devices=1).
"""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=60"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # CPU tests, also where libtpu is installed
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

def _find_shared_data():
  """../shared/data next to the checkout, else $WSTAL_SHARED_DATA, else /work/shared/data."""
  for cand in (ROOT.parent / "shared" / "data", os.environ.get("WSTAL_SHARED_DATA"),
               "/work/shared/data"):
    if cand and pathlib.Path(cand).is_dir():
      return pathlib.Path(cand)
  return ROOT.parent / "shared" / "data"


SHARED_DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data (real annotation files); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real annotation files not found at {SHARED_DATA}")
  return SHARED_DATA

