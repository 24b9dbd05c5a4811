r"""Ju et al. 2023 (CVPR): distillation-collaboration of a CBP and a VLP branch.

Built-in benchmark (I3D-like `i3d` stream for CBP, CLIP-like `clip` stream for VLP, the
built-in CLIP text embeddings + a learnable offset per class for the text side):

  python -m wstal_jax.main --config=configs/ju2023.py                # the full method
  python -m wstal_jax.main --config=configs/ju2023.py:exp=cbp        # CBP branch alone
  python -m wstal_jax.main --config=configs/ju2023.py:exp=only_f,fusion=weighted  # Table 4
  python -m wstal_jax.main --config=configs/ju2023.py:losses=kd      # Table 5 A1 ('fb': A2)
  python -m wstal_jax.main --config=configs/ju2023.py:cbp=co2net     # Table 6

`exp`: 'full' (warm-up, then alternating B / F steps), 'cbp' (warm-up only for all steps: the
CBP branch alone), 'only_f' / 'only_b' (Table 4). `fusion`: 'cbp' (Sec. 3.4), 'average',
'weighted' (Table 4's fusions of the two branches at inference), 'vlp' (the VLP branch alone
localizes). `losses`: 'both', 'kd', 'fb' (Table 5). `cbp`: 'transformer' (ours, below) or
'co2net' (Table 6: CO2-Net, with its own losses and config.co2net sizes, as the CBP branch).

Built-in streams: CBP reads `i3d`; the VLP branch reads `videoclip`, the stream calibrated to
the paper's Table 3 vision-language pseudo-labels (`clip`, PVLR's per-frame CLIP stream,
works too: --config.data.vlm_feature=clip).

THUMOS14 / ActivityNet (I3D shards plus a CLIP ViT-B/16 feature stream; a converted CLIP
checkpoint for the text encoder with 16 + 16 learnable prompts):

  python -m wstal_jax.main --config=configs/ju2023.py:dataset=thumos14 \
      --config.data.dir=/path/to/thumos14_shards \
      --config.ju2023.clip_checkpoint=/path/to/clip_vitb16.npz

Sizes. The paper gives none for the CBP Transformer. Ours: a kernel-3 temporal conv embedding
to 256 (THUMOS14 / ActivityNet; 128 on the built-in data, whose I3D stream is 128-d), two
pre-LN blocks (4 heads, MLP 512, attention over t - 4 .. t + 4: methods/ju2023.py says why
not global), a linear head over C (C + 1 with
`--config.ju2023.cbp_probs=softmax_bg`): about 1.9 M parameters on 2048-d
I3D, near CO2-Net's ~2.5 M and ASL's ~1.6 M. VLP: 2 blocks of width 512 (CLIP ViT-B/16),
8 heads, MLP 1024, 16 + 16 prompt vectors (Sec. 4.1).

Schedule (Sec. 3.3; lengths not given): the built-in run is 400 warm-up steps + 3 x (100 B +
100 F) = 1000 steps, the preset's length; THUMOS14 / ActivityNet scale the same shape to their
step counts. Sampling: T consecutive snippets at a random offset ('pad' sampling: a random
window, zero padding for shorter videos), T = 1000 THUMOS14, 400 ActivityNet (Sec. 4.1), 256
on the built-in data (its videos have 40-400 snippets). Adam 1e-4 (Sec. 4.1; the built-in
preset's 1e-3 on the built-in data, as every method there, except B steps at the paper's 1e-4:
`ju2023.b_lr_scale=0.1`, methods/ju2023.py says why).
"""
from wstal_jax import config_common as common

EXPS = ("full", "cbp", "only_f", "only_b")
CBPS = ("transformer", "co2net")
FUSIONS = ("cbp", "average", "weighted", "vlp")
LOSSES = ("both", "kd", "fb")


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="builtin", exp="full", fusion="cbp", losses="both",
                         cbp="transformer")
  if arg.cbp not in CBPS:
    raise ValueError(f"cbp={arg.cbp}: choose one of {', '.join(CBPS)}")
  if arg.exp not in EXPS:
    raise ValueError(f"exp={arg.exp}: choose one of {', '.join(EXPS)}")
  if arg.fusion not in FUSIONS:
    raise ValueError(f"fusion={arg.fusion}: choose one of {', '.join(FUSIONS)}")
  if arg.losses not in LOSSES:
    raise ValueError(f"losses={arg.losses}: choose one of {', '.join(LOSSES)}")
  from wstal_jax.methods import ju2023   # pylint: disable=import-outside-toplevel
  name = "ju2023" + "".join(f"-{k}{v}" for k, v, d in (
      ("exp", arg.exp, "full"), ("fusion", arg.fusion, "cbp"), ("losses", arg.losses, "both"),
      ("cbp", arg.cbp, "transformer"))
      if v != d)
  config = common.base_config(name=name, method="ju2023", dataset=arg.dataset)
  config.data.vlm_feature = "clip"
  config.data.sampling = "pad"          # T consecutive snippets at a random offset
  config.optim.weight_decay = 0.0       # Sec. 4.1: Adam, no weight decay mentioned
  block = ju2023.default_config()
  block.mode = arg.exp
  block.fusion = arg.fusion
  block.use_kd = arg.losses in ("both", "kd")
  block.use_fb = arg.losses in ("both", "fb")
  if arg.cbp == "co2net":   # Table 6: CO2-Net (its losses, its sizes) as the CBP branch
    block.cbp_arch = block.cbp_probs = "co2net"
    config.co2net = common.co2net_block(arg.dataset)
  if arg.dataset == "builtin":
    # The VLP branch reads the built-in `videoclip` stream: the one calibrated to Ju et al.'s
    # Table 3 vision-language pseudo-labels (over-complete: high foreground, low background
    # mIoU; benchmarks/calibrate_synthetic.py). The `clip` stream (PVLR's per-frame CLIP,
    # no temporal leakage) has the reverse profile (README).
    config.data.vlm_feature = "videoclip"
    # B steps at the paper's 1e-4 (Sec. 4.1): the built-in preset's 1e-3 trains the
    # CBP branch from scratch in few steps, but moves the pre-trained VLP prior so far in
    # 100 steps that it collapses onto the CBP teacher (README).
    block.b_lr_scale = 0.1
    config.data.num_snippets = 256
    block.cbp_width = 128
    block.cbp_mlp_dim = 256
    block.warmup_steps, block.b_steps, block.f_steps, block.num_alternations = 400, 100, 100, 3
    config.train.num_steps = 1000
  elif arg.dataset == "thumos14":
    config.data.num_snippets = 1000
    config.optim.lr = 1e-4
    config.train.batch_size = 16
    block.warmup_steps, block.b_steps, block.f_steps, block.num_alternations = 1000, 250, 250, 4
    config.train.num_steps = 3000
    config.train.eval_every = 100
    config.eval.num_snippets = None     # whole test videos
  else:   # activitynet
    config.data.num_snippets = 400
    config.optim.lr = 1e-4
    block.topk_divisor = block.eval_topk_divisor = 4
    block.warmup_steps, block.b_steps, block.f_steps, block.num_alternations = 4000, 1000, 1000, 4
    config.train.num_steps = 12000
    config.eval.num_snippets = None
  config.ju2023 = block
  config.eval.postprocess = common.postprocess_block("ju2023")
  return config
