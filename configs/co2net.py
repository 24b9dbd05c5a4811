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
from wstal_jax import config_common as common


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="builtin")
  config = common.base_config(name="co2net", method="co2net", dataset=arg.dataset)
  common.co2net_protocol(config, arg.dataset)
  config.co2net = common.co2net_block(arg.dataset)
  config.eval.postprocess = common.postprocess_block("co2net")
  return config
