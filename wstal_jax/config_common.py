"""Config helpers shared by the recipes in configs/ (as big_vision.configs.common is).

Each `configs/<method>.py` is the whole recipe for one method, read top to bottom:

  from wstal_jax import config_common as common

  def get_config(arg=None):
    arg = common.parse_arg(arg, dataset="builtin")
    config = common.base_config(name=..., method=..., dataset=arg.dataset)
    common.co2net_protocol(config, arg.dataset)        # the shared pieces it uses, by name
    config.co2net = common.co2net_block(arg.dataset)
    config.eval.postprocess = common.postprocess_block("co2net")
    ...                                                # then its own settings, written out

What lives here is what more than one recipe uses, one definition per protocol, so that two
recipes that name the same protocol cannot drift apart:

  parse_arg, tiou_range       the `file.py:key=value,...` argument; tIoU threshold tuples.
  base_config, apply_dataset  the method-independent blocks and the dataset presets below.
  DATASETS, TOPK_DIVISOR      the dataset preset names; VLPO/ASL top-k divisor per dataset.
  vlpo_block                  `config.vlpo` (configs/vlpo.py; configs/base.py, its baseline).
  co2net_protocol             the CO2-Net family's training protocol (co2net.py, pvlr.py).
  co2net_block                `config.co2net` (co2net.py, pvlr.py).
  postprocess_block           a post-processing preset, spelled out field by field.

Anything only one method uses (its table of ablations, its own block) stays in its recipe.
The recipes are still loaded by path (`--config=configs/<method>.py:...`, ml_collections
config_flags); this module is imported normally from the installed package.

Dataset presets (`--config=configs/<method>.py:dataset=NAME`):
  builtin     the built-in synthetic benchmark (`small` size), generated once and cached;
              sized so the whole default run fits in 10 minutes on 2 CPU cores.
  thumos14    THUMOS14 shards (`--config.data.dir=...`): T=750 snippets per training video,
              batch 16, Adam lr 1e-4, L2 5e-4, 1300 steps (the ASL / VLPO protocol),
              tIoU 0.1:0.1:0.7.
  activitynet ActivityNet1.2/1.3 shards: T=50, lr 1e-5, tIoU 0.5:0.05:0.95.
The number of classes always comes from the dataset manifest, never from the config.
"""
import ml_collections
from ml_collections import config_dict

DATASETS = ("builtin", "thumos14", "activitynet")


def parse_arg(arg, **defaults):
  """Parses `key=value,flag,...` (the part after `:` in `--config=file.py:...`).

  Every key must be one of `defaults`; a value is converted to the type of its default
  (bool accepts true/false/1/0/yes/no; a bare `flag` means `flag=True`).
  Returns a locked ConfigDict with all defaults filled in.
  """
  out = ml_collections.ConfigDict(defaults)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, sep, value = token.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: "
                       f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    value = value.strip()
    if isinstance(default, bool):
      lowered = value.lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = lowered in ("true", "1", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  out.lock()
  return out


def tiou_range(start, stop, step):
  """Inclusive tIoU thresholds rounded to 2 decimals: (0.1, 0.2, ..., 0.7)."""
  n = int(round((stop - start) / step)) + 1
  return tuple(round(start + i * step, 2) for i in range(n))


def base_config(*, name, method, dataset="builtin", seed=0):
  """The method-independent blocks. Fields that take None are declared placeholders so
  `--config.x=...` can set them from the command line."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
  c = ml_collections.ConfigDict()
  c.name = name                      # experiment name: default workdir workdirs/<name>-...
  c.method = method                  # methods.get_method dispatches on this
  c.seed = seed
  c.compilation_cache = ""           # compilation_cache.py: '' default dir, 'off', or a path

  c.data = ml_collections.ConfigDict()
  c.data.dataset = dataset           # which preset filled in the fields below (informative)
  c.data.dir = config_dict.placeholder(str)   # None + builtin -> builtin_cache.ensure_builtin
  c.data.builtin_size = "small"
  c.data.builtin_seed = 0
  c.data.cache_dir = config_dict.placeholder(str)  # None -> synthetic's default cache
  c.data.num_snippets = 750          # T of every training sample
  c.data.sampling = "random_perturb"
  c.data.vlm_feature = config_dict.placeholder(str)  # second feature stream (e.g. videoclip)
  # Per-video LLM descriptions (data/descriptions.py; MLLM4WTAL): training batches carry
  # key_tokens_BxL / complete_tokens_BxL (truncated / padded to these lengths) and the
  # constants hold the word vectors; the built-in preset uses synthetic descriptions.
  c.data.descriptions = False
  c.data.max_key_tokens = 24
  c.data.max_complete_tokens = 64
  # Candidate proposals (data/proposals.py; P-MIL, SEAL): training batches carry
  # proposals_BxMx2 / proposal_mask_BxM (at most max_proposals a video, a random subset beyond:
  # P-MIL's 1,000), evaluation batches every proposal; the built-in preset uses synthetic
  # weak-localizer proposals (data/synthetic_proposals.py).
  c.data.proposals = False
  c.data.max_proposals = 1000

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16            # global, over all processes and devices
  c.train.num_steps = 5000
  c.train.log_every = 50
  c.train.eval_every = 100           # each evaluation saves a checkpoint ranked by its mAP
  c.train.checkpoint_every = 0       # extra unevaluated checkpoints (0: only at evaluations)
  c.train.sync_every = 4             # wait for the device at least this often (see train.py)
  c.train.grad_shares = True         # log each loss term's share of the gradient norm too

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 5e-4
  # 'l2': torch.optim.Adam(weight_decay=wd), the field's practice: wd * w is added to the
  # gradient before Adam's scaling. 'decoupled': AdamW.
  c.optim.weight_decay_style = "l2"
  c.optim.grad_clip_norm = 0.0       # 0: no clipping
  # Parameters (by name, anywhere in the tree) that weight decay never touches: a learnable
  # logit scale is a temperature, not a weight (CLIP excludes it; PVLR's learnable scale).
  c.optim.no_decay = ("log_logit_scale",)

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.tiou = tiou_range(0.1, 0.7, 0.1)
  # 'official': ActivityNet's algorithm on seconds; 'wtalc': the W-TALC / CO2-Net family's
  # (ground truth rounded to snippets, ambiguous filter; wstal_jax/protocols.py). Official for
  # every method, the family's too: one protocol for every row of a comparison table, and
  # the protocol is a property of the evaluation, not of the method (README, "Evaluation
  # protocols", gives both on CO2-Net's released proposals).
  c.eval.protocol = "official"
  c.eval.batch_size = 8              # global; padded with masked dummy videos
  c.eval.num_snippets = config_dict.placeholder(int)   # None: whole videos
  c.eval.forward = "auto"            # eval_forward.py: 'auto' (exact chunks where the network
                                     # is local, else length buckets), 'buckets' or 'chunked'
  c.eval.chunk_snippets = 1024       # chunked: snippets per row of the network's input
  c.eval.sampling = "uniform"        # with num_snippets: bin centres, or 'floor' (bin starts,
                                     # ASL's test resampling; proposals shift <= half a bin)
  c.eval.select_on = "test"          # 'test' (the field's practice) or 'heldout'
  c.eval.heldout_fraction = 0.2      # of the TRAIN videos, excluded from training
  c.eval.num_plots = 4
  # Diagnostic only: methods that need labels at inference (VLPO's DSP) take the test videos'
  # ground-truth labels instead of predicting them, as some released code does. Every table
  # and metrics.json of such a run is marked `oracle_labels: true`; never a result to quote.
  c.eval.oracle_labels = False
  # --mode=eval only: 'raw' also writes proposals_<split>.json for every split of the dataset
  # (ActivityNet results format, seconds): the method's proposals before NMS, the candidate
  # proposals of proposal-based methods (python -m wstal_jax.data.proposals adds them).
  c.eval.export_proposals = "none"
  # Post-processing: the method's preset (postprocess.get_preset(method.postprocess_preset))
  # with these fields replaced. A method config fills it with its full preset so that every
  # field is overridable from the command line.
  c.eval.postprocess = ml_collections.ConfigDict()

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep_latest = 2
  c.checkpoint.keep_best = 1
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0             # 0: all devices; n: the first n (single process only)

  apply_dataset(c, dataset)
  return c


# Top-k pooling uses k = T // divisor (VLPO Sec. 4.2, after ASL): T/8 THUMOS14, T/4 ActivityNet.
TOPK_DIVISOR = {"builtin": 8, "thumos14": 8, "activitynet": 4}


def apply_dataset(c, dataset):
  """Fills the dataset preset's protocol into config `c` (model-independent fields).

  THUMOS14 follows the ASL protocol VLPO adopts ("consistent with the baseline", Sec. 4.2) as
  ASL's released code runs it: T=750 random-perturb sampled snippets, batch 16, torch Adam
  lr 1e-4 with weight_decay 5e-4, 100 epochs of 13 batches (1300 steps), test evaluation
  every 50 steps keeping the best, and test videos uniformly resampled to 750 snippets.
  ActivityNet: T=50 and lr 1e-5 from VLPO Sec. 4.2; batch size and length are not given by
  VLPO or ASL (ours: batch 64, 8000 steps, about 50 epochs of ActivityNet1.3's 10k videos).
  """
  if dataset == "builtin":
    # The small benchmark's videos have 40..400 snippets (median ~110). 1000 steps and 4
    # evaluations keep the whole default run (generation included) well within 10 minutes on
    # 2 CPU cores. Test videos are evaluated whole.
    c.data.num_snippets = 128
    c.train.batch_size = 16
    c.train.num_steps = 1000
    c.train.log_every = 100
    c.train.eval_every = 250
    # lr 1e-3, not THUMOS14's 1e-4: with 1000 steps the baseline under-fits at 1e-4 (video
    # ACC ~75%, avg mAP 11-18, below the untrained zero-shot localizer); at 1e-3 it converges
    # (ACC ~85%). Chosen on the baseline's convergence and applied to every method alike.
    c.optim.lr = 1e-3
    c.eval.tiou = tiou_range(0.1, 0.7, 0.1)
    c.eval.batch_size = 16
    c.eval.num_snippets = None
    return
  if dataset == "thumos14":
    c.data.num_snippets = 750
    c.train.batch_size = 16
    c.train.num_steps = 1300
    c.train.log_every = 50
    c.train.eval_every = 50
    c.optim.lr = 1e-4
    c.eval.tiou = tiou_range(0.1, 0.7, 0.1)
    c.eval.batch_size = 8
    c.eval.num_snippets = 750
    return
  if dataset == "activitynet":
    c.data.num_snippets = 50
    c.train.batch_size = 64
    c.train.num_steps = 8000
    c.train.log_every = 100
    c.train.eval_every = 500
    c.optim.lr = 1e-5
    c.eval.tiou = tiou_range(0.5, 0.95, 0.05)
    c.eval.batch_size = 32
    c.eval.num_snippets = 50
    return
  raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- shared blocks
# The method modules are imported inside the functions: parse_arg and the dataset presets
# stay usable without importing JAX / Flax.


def vlpo_block(dataset):
  """config.vlpo: VLPO's defaults (the paper's settings) with the dataset's top-k.

  Used by configs/vlpo.py and by configs/base.py (the baseline shares the widths, q and k,
  with every VLPO component switched off).
  """
  from wstal_jax.methods import vlpo
  block = vlpo.default_config()
  block.topk_divisor = TOPK_DIVISOR[dataset]
  if dataset == "builtin":
    # Sized for the 10-minute CPU budget of the built-in run; the paper's widths (512) are
    # for 2048-d I3D features, the small built-in benchmark has 128-d ones.
    block.embed_dim = 128
    block.act_hidden_dim = 128
  return block


def co2net_protocol(config, dataset):
  """The CO2-Net family's training protocol, on top of the dataset preset of `config`.

  CO2-Net / PVLR released code: T=320 random-perturb sampled snippets (PVLR; CO2-Net uses
  500), batch 10, torch Adam lr 5e-5 with weight_decay 1e-3, 5000 steps (CO2-Net), test
  evaluation every 100 steps keeping the best, whole test videos. ActivityNet (CO2-Net's
  ANT settings): T=60, lr 3e-5. Used by configs/co2net.py and configs/pvlr.py.
  """
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
  """config.co2net: CO2-Net's defaults (MIL top-k T//7 in training, n//20 for the video
  score at inference) with the dataset's sizes (ActivityNet: k=T//5). Used by
  configs/co2net.py and configs/pvlr.py (PVLR's base model)."""
  from wstal_jax.methods import co2net
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


def postprocess_block(preset):
  """config.eval.postprocess: the post-processing preset `preset` ('vlpo': the ASL family;
  'co2net': CO2-Net and PVLR), spelled out so every field is overridable from the command
  line (`--config.eval.postprocess.nms.sigma=0.3`)."""
  from wstal_jax import postprocess
  return postprocess.get_preset(preset)
