"""A straightforward PyTorch implementation of VLPO's baseline (vlpo.txt Sec. 3.1, Eq. 2).

What a user of the CO2-Net / ASL family of codebases writes: eager PyTorch, NCT layout for
the temporal convolutions, `torch.optim.Adam(weight_decay=...)`, no masks (training videos are
sampled to a fixed T, so every snippet is valid). It is the comparison point of
`benchmarks/run.py --only=train` and matches `wstal_jax`'s baseline (`methods.get_method` with
method 'base', i.e. `models.vlpo.VLPOModel(vl_mode='none')` + `methods.vlpo.vlpo_loss` with every
switch off) layer for layer:

  embedding  Conv1d(D, embed_dim, kernel, padding=kernel // 2) + ReLU + Dropout
  F_mil      Linear(embed_dim, C) per snippet -> A_BxTxC
  F_act      Conv1d(D, act_hidden_dim, kernel, same padding) + ReLU + Dropout + Linear(., 1)
             + sigmoid -> S^a_BxT
  L_mil      -sum_c y_c / sum(y) log softmax_c(mean of the top-k of A over time), k = T // 8
  L_act      GCE (q = 0.6) with the top-k snippets of S^a as positives, the rest negatives
  loss       mean over videos of L_mil + L_act

`load_flax_params` copies a Flax baseline's parameters in, so tests can check that both give
the same loss on the same batch (dropout off). torch is a benchmark extra: nothing in
`wstal_jax` or the main tests imports this file.
"""
import time

import numpy as np
import torch
from torch import nn


class BaselineModel(nn.Module):
  """x_BxTxD -> (cas_BxTxC logits, s_a_BxT in (0, 1))."""

  def __init__(self, feat_dim: int, num_classes: int, embed_dim: int = 512,
               act_hidden_dim: int = 512, kernel: int = 3, dropout: float = 0.5):
    super().__init__()
    pad = kernel // 2
    self.embedding = nn.Conv1d(feat_dim, embed_dim, kernel, padding=pad)
    self.f_mil = nn.Linear(embed_dim, num_classes)
    self.act_conv = nn.Conv1d(feat_dim, act_hidden_dim, kernel, padding=pad)
    self.act_out = nn.Linear(act_hidden_dim, 1)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x_BxTxD):
    x_BxDxT = x_BxTxD.permute(0, 2, 1)
    emb_BxTxF = self.dropout(torch.relu(self.embedding(x_BxDxT))).permute(0, 2, 1)
    cas_BxTxC = self.f_mil(emb_BxTxF)
    h_BxTxH = self.dropout(torch.relu(self.act_conv(x_BxDxT))).permute(0, 2, 1)
    s_a_BxT = torch.sigmoid(self.act_out(h_BxTxH)[..., 0])
    return cas_BxTxC, s_a_BxT


def baseline_loss(cas_BxTxC, s_a_BxT, label_BxC, *, topk_divisor: int = 8, q: float = 0.6,
                  eps: float = 1e-6):
  """Eq. 2: L_mil + L_act (GCE, Eq. 1), mean over videos. -> (loss, {'l_mil', 'l_act'})."""
  num_t = cas_BxTxC.shape[1]
  k = max(1, num_t // topk_divisor)
  video_logits_BxC = cas_BxTxC.topk(k, dim=1).values.mean(dim=1)
  y_BxC = label_BxC / label_BxC.sum(dim=1, keepdim=True).clamp_min(1e-12)
  l_mil = -(y_BxC * torch.log_softmax(video_logits_BxC, dim=-1)).sum(dim=1).mean()

  top_BxK = s_a_BxT.detach().topk(k, dim=1).indices
  pos_BxT = torch.zeros_like(s_a_BxT).scatter_(1, top_BxK, 1.0)
  neg_BxT = 1.0 - pos_BxT
  s = s_a_BxT.clamp(eps, 1.0 - eps)
  l_pos_B = ((1.0 - s ** q) / q * pos_BxT).sum(1) / pos_BxT.sum(1).clamp_min(1.0)
  l_neg_B = ((1.0 - (1.0 - s) ** q) / q * neg_BxT).sum(1) / neg_BxT.sum(1).clamp_min(1.0)
  l_act = (l_pos_B + l_neg_B).mean()
  return l_mil + l_act, {"l_mil": l_mil, "l_act": l_act}


def load_flax_params(model: BaselineModel, params) -> None:
  """Copies the parameters of a Flax baseline (`VLPOModel`, vl_mode 'none') into `model`."""
  def t(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))

  with torch.no_grad():
    emb = params["embedding"]["conv"]["conv"]
    model.embedding.weight.copy_(t(emb["kernel"]).permute(2, 1, 0))   # [K, D, F] -> [F, D, K]
    model.embedding.bias.copy_(t(emb["bias"]))
    model.f_mil.weight.copy_(t(params["f_mil"]["kernel"]).T)
    model.f_mil.bias.copy_(t(params["f_mil"]["bias"]))
    act = params["f_act"]["conv"]["conv"]
    model.act_conv.weight.copy_(t(act["kernel"]).permute(2, 1, 0))
    model.act_conv.bias.copy_(t(act["bias"]))
    model.act_out.weight.copy_(t(params["f_act"]["out"]["kernel"]).T)
    model.act_out.bias.copy_(t(params["f_act"]["out"]["bias"]))


def build(feat_dim, num_classes, *, embed_dim, act_hidden_dim, kernel=3, dropout=0.5, lr=1e-4,
          weight_decay=5e-4, seed=0):
  """-> (model, optimizer): torch.optim.Adam with L2 weight decay (as ASL / VLPO train)."""
  torch.manual_seed(seed)
  model = BaselineModel(feat_dim, num_classes, embed_dim, act_hidden_dim, kernel, dropout)
  opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
  return model, opt


def train_step(model, opt, x_BxTxD, label_BxC, topk_divisor=8, q=0.6):
  """One eager training step -> loss (a float: reading it waits for the step, as a log does)."""
  model.train()
  opt.zero_grad(set_to_none=True)
  cas_BxTxC, s_a_BxT = model(x_BxTxD)
  loss, _ = baseline_loss(cas_BxTxC, s_a_BxT, label_BxC, topk_divisor=topk_divisor, q=q)
  loss.backward()
  opt.step()
  return loss.item()


def make_train_step(batch, *, embed_dim, act_hidden_dim, kernel=3, dropout=0.5, lr=1e-4,
                    weight_decay=5e-4, topk_divisor=8, q=0.6, seed=0):
  """A fresh model + Adam and a zero-argument callable running one step on `batch` (numpy
  feat_BxTxD, label_BxC) -> loss."""
  x = torch.from_numpy(np.ascontiguousarray(batch["feat_BxTxD"]))
  y = torch.from_numpy(np.ascontiguousarray(batch["label_BxC"]))
  model, opt = build(x.shape[-1], y.shape[-1], embed_dim=embed_dim,
                     act_hidden_dim=act_hidden_dim, kernel=kernel, dropout=dropout, lr=lr,
                     weight_decay=weight_decay, seed=seed)
  return lambda: train_step(model, opt, x, y, topk_divisor, q)


def time_train(batch, *, warmup=1, steps=3, **kwargs):
  """Times `steps` training steps after `warmup` (kwargs as make_train_step).

  -> {'step_s': [seconds per step], 'loss': last loss, 'threads': torch threads}.
  """
  step = make_train_step(batch, **kwargs)
  loss = None
  for _ in range(warmup):
    loss = step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  return {"step_s": times, "loss": loss, "threads": torch.get_num_threads()}


def time_eval_forward(lengths, feat_dim, num_classes, *, embed_dim, act_hidden_dim, kernel=3,
                      topk_divisor=8, seed=0, threads=None):
  """The CO2-Net / ASL test loop's forward: one video at a time (batch 1, whole video), eval
  mode, no_grad, scores to numpy. Features are random (values do not change the cost).
  `threads`: torch intra-op threads for this call (default: leave as is).

  -> seconds for all videos of `lengths` (feature creation excluded).
  """
  old_threads = torch.get_num_threads()
  if threads is not None:
    torch.set_num_threads(threads)
  try:
    return _time_eval_forward(lengths, feat_dim, num_classes, embed_dim=embed_dim,
                              act_hidden_dim=act_hidden_dim, kernel=kernel,
                              topk_divisor=topk_divisor, seed=seed)
  finally:
    torch.set_num_threads(old_threads)


def _time_eval_forward(lengths, feat_dim, num_classes, *, embed_dim, act_hidden_dim, kernel,
                       topk_divisor, seed):
  model, _ = build(feat_dim, num_classes, embed_dim=embed_dim, act_hidden_dim=act_hidden_dim,
                   kernel=kernel)
  model.eval()
  gen = torch.Generator().manual_seed(seed)
  pool = torch.rand((1, int(max(lengths)), feat_dim), generator=gen)
  total = 0.0
  with torch.no_grad():
    for num_t in lengths:
      x = pool[:, :int(num_t)]
      t0 = time.perf_counter()
      cas, s_a = model(x)
      k = max(1, int(num_t) // topk_divisor)
      video = torch.softmax(cas.topk(k, dim=1).values.mean(1), dim=-1)
      _ = (video.numpy(), torch.softmax(cas, dim=-1).numpy(), s_a.numpy())
      total += time.perf_counter() - t0
  return total
