"""The official VQ-Diffusion loss in PyTorch, on diffusers' posterior.

Written from the definition in ``microsoft/VQ-Diffusion``
(``DiffusionTransformer._train_loss``), class-first ``(B, K + 1, N)`` as
there, with ``diffusers.VQDiffusionScheduler.q_posterior`` supplying both
posteriors. Tests compare our JAX loss and its gradient with this one.
"""

import torch
from torch.nn import functional


def _log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
  return torch.log(functional.one_hot(x, num_classes).permute(0, 2, 1).float().clamp(min=1e-30))


def _posterior(scheduler, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
  """Official clamp of diffusers' posterior; it takes a scalar t, so one call per distinct t."""
  if bool((t == t[0]).all()):
    return scheduler.q_posterior(log_x0[:, :-1], x_t, int(t[0])).clamp(-70, 0)
  rows = [scheduler.q_posterior(log_x0[b:b + 1, :-1], x_t[b:b + 1], int(t[b]))
          for b in range(x_t.shape[0])]
  return torch.cat(rows).clamp(-70, 0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
  return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def training_loss(scheduler, logits, x0, x_t, t, pt, *, aux_weight, mask_weight):
  """Scalar loss and per-sample (vb, aux) of the official objective.

  Args:
    scheduler: a ``VQDiffusionScheduler`` with K + 1 classes.
    logits: (B, N, K) float32 tensor (may require grad).
    x0, x_t: (B, N) long tensors.
    t: (B,) long tensor; pt: (B,) float tensor.
    aux_weight: lambda; the adaptive (1 - t/T) + 1 scale is always applied.
    mask_weight: (masked, unmasked).
  """
  batch, length, num_codes = logits.shape
  num_timesteps = scheduler.config.num_train_timesteps
  log_pred = functional.log_softmax(logits.double(), dim=-1).float().permute(0, 2, 1)
  floor = torch.full((batch, 1, length), -70.0)
  log_x0_model = torch.cat([log_pred, floor], dim=1).clamp(-70, 0)
  log_x0_true = _log_onehot(x0, num_codes + 1)

  log_model = _posterior(scheduler, log_x0_model, x_t, t)
  log_true = _posterior(scheduler, log_x0_true, x_t, t)
  masked = (x_t == num_codes).float()
  weights = masked * mask_weight[0] + (1 - masked) * mask_weight[1]
  kl = (_kl(log_true, log_model) * weights).sum(dim=1)
  decoder_nll = -(log_x0_true.exp() * log_model).sum(dim=1).sum(dim=1)
  at_start = (t == 0).float()
  vb = at_start * decoder_nll + (1 - at_start) * kl

  kl_aux = (_kl(log_x0_true[:, :-1], log_x0_model[:, :-1]) * weights).sum(dim=1)
  aux = at_start * decoder_nll + (1 - at_start) * kl_aux
  scale = (1 - t / num_timesteps) + 1.0
  total = vb / pt + scale * aux_weight * aux / pt
  return total.sum() / (batch * length), vb, aux
