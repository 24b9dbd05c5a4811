r"""CO2-Net (Hong et al., MM 2021), PVLR's base model (pvlr.txt Sec. 3.1.2; Table 3 "Baseline").

Built-in benchmark:

  python -m wstal_jax.main --config=configs/co2net.py

  Expected (small, seeds 0-2): average mAP@0.1:0.7 38.3 ± 2.3, ACC 81.0 (README).

THUMOS14 (I3D shards from `python -m wstal_jax.data.convert`):

  python -m wstal_jax.main --config=configs/co2net.py:dataset=thumos14 \
      --config.data.dir=/path/to/thumos14_shards

  Paper (PVLR Table 1 / CO2-Net): average mAP@0.1:0.7 44.6; PVLR Table 3 baseline 35.7 avg
  mAP@0.3:0.7. Ours: not measured (no real features on the development machines).

The family's protocol (CO2-Net / PVLR released code): T=320 random-perturb sampled snippets
(PVLR; CO2-Net uses 500), batch 10, torch Adam lr 5e-5 with weight_decay 1e-3, MIL top-k
T//7 in training and n//20 for the video score at inference, 5000 steps (CO2-Net), test
evaluation every 100 steps keeping the best, whole test videos, post-processing preset
'co2net'. ActivityNet (CO2-Net's ANT settings): T=60, lr 3e-5, k=T//5.
"""
import importlib.util
import os


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"wstal_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def family_protocol(config, dataset):
  """The CO2-Net / PVLR training protocol on top of the dataset preset (see docstring)."""
  config.optim.weight_decay = 1e-3
  if dataset == "thumos14":
    config.data.num_snippets = 320
    config.train.batch_size = 10
    config.train.num_steps = 5000
    config.train.eval_every = 100
    config.optim.lr = 5e-5
    config.eval.num_snippets = None   # CO2-Net evaluates whole test videos
    config.eval.batch_size = 8
  elif dataset == "activitynet":
    config.data.num_snippets = 60
    config.train.batch_size = 10
    config.train.num_steps = 22000
    config.train.eval_every = 1000
    config.optim.lr = 3e-5
  elif dataset == "builtin":
    # The builtin preset (T=128, lr 1e-3) with the family's batch of 10 and 1500 steps:
    # CO2-Net, regularised by dropout everywhere, is still improving at 1000 (seed 0: 24.4
    # avg mAP at 1000 steps, 37.6 at 1500 with dropout 0.5).
    config.train.batch_size = 10
    config.train.num_steps = 1500


def co2net_block(dataset):
  from wstal_jax.methods import co2net  # the package: run from the repo root or installed
  block = co2net.default_config()
  if dataset == "activitynet":
    block.topk_divisor = 5
  if dataset == "builtin":
    # CO2-Net's widths (attention head 512) are for 2 x 1024-d I3D; the small built-in
    # benchmark has 2 x 64-d features. Dropout 0.5 instead of CO2-Net's 0.7, chosen on
    # CO2-Net alone (seed 0, 1500 steps: 37.6 vs 29.0 best avg mAP) and used for PVLR too.
    block.attn_hidden = 64
    block.dropout = 0.5
  return block


def postprocess_block():
  from wstal_jax import postprocess
  return postprocess.get_preset("co2net")


def get_config(arg=None):
  common = _load("common")
  arg = common.parse_arg(arg, dataset="builtin")
  config = common.base_config(name="co2net", method="co2net", dataset=arg.dataset)
  family_protocol(config, arg.dataset)
  config.co2net = co2net_block(arg.dataset)
  config.eval.postprocess = postprocess_block()
  return config
