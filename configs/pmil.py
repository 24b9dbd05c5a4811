r"""P-MIL (Ren et al., CVPR 2023), SEAL's base: proposal-based MIL on candidate proposals.

Built-in benchmark (its synthetic weak-localizer proposals, data/synthetic_proposals.py):

  python -m wstal_jax.main --config=configs/pmil.py

THUMOS14 (I3D shards with proposals: python -m wstal_jax.data.proposals --data_dir=SHARDS
--train=detection_result_base_train.json --test=detection_result_base_test.json --out=DIR):

  python -m wstal_jax.main --config=configs/pmil.py:dataset=thumos14 --config.data.dir=DIR

  Paper: average mAP@0.1:0.7 47.0 (46.4 from the released checkpoint). Ours: not measured.

The released code's protocol: whole videos (here 'pad' sampling with T at least the longest
training video, so nothing is cropped), at most 1,000 proposals a training video (random
subset), batch 10, torch Adam lr 5e-5 with L2 weight decay 1e-3, 200 epochs (4,000 steps on
THUMOS14's 200 training videos), every proposal at test time, post-processing preset 'pmil'
(class threshold 0.2, Gaussian soft-NMS sigma 0.3 with the "+1" tIoU, ambiguous filter).
"""
from wstal_jax import config_common as common


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="builtin")
  config = common.base_config(name="pmil", method="pmil", dataset=arg.dataset)
  pmil_protocol(config, arg.dataset)
  config.pmil = pmil_block(arg.dataset)
  config.eval.postprocess = common.postprocess_block("pmil")
  return config


def pmil_protocol(config, dataset):
  """Proposal batches and the released optimiser settings (configs/seal.py shares them)."""
  config.data.proposals = True
  config.data.max_proposals = 1000
  config.data.sampling = "pad"
  config.optim.weight_decay = 1e-3
  config.train.batch_size = 10
  config.eval.num_snippets = None       # whole test videos, every proposal
  config.eval.batch_size = 8
  if dataset == "thumos14":
    config.data.num_snippets = 2304     # the longest THUMOS14 training video has 2202
    config.train.num_steps = 4000       # 200 epochs x 20 steps
    config.train.eval_every = 200
    config.optim.lr = 5e-5
  elif dataset == "builtin":
    config.data.num_snippets = 400      # the longest built-in video
    config.train.num_steps = 1500
    config.data.max_proposals = 512     # the built-in videos have at most ~400


def pmil_block(dataset):
  from wstal_jax.methods import pmil   # pylint: disable=import-outside-toplevel
  block = pmil.default_config()
  if dataset == "builtin":              # 64-d RGB / flow halves: narrower layers
    block.hidden, block.head_hidden = 256, 128
  return block
