"""The official VQ-Diffusion sampling rules in PyTorch, for parity tests.

A statement of ``DiffusionTransformer`` from ``microsoft/VQ-Diffusion``
(``image_synthesis/modeling/transformers/diffusion_transformer.py``), written
from reading it: the ``alpha1`` schedule buffers, ``q_pred``,
``q_pred_one_timestep``, ``q_posterior``, ``p_sample`` with its prior rules
(1: fewer tokens chosen uniformly, 2: the purity prior with weight r), the
``n_sample`` tables of ``update_n_sample``, the loop of ``sample`` from
all-[MASK] and the step rule of ``sample_fast``. Layout is class-first,
(B, K + 1, N), as there. The network is not part of it: ``p_sample`` takes
the x0 log-probs (``cf_predict_start``'s output, guidance and truncation
applied) as input, and ``sample`` a function giving them.
"""

import torch
from torch import nn

from tests.official_vqdiffusion import (
  alpha_schedule,
  index_to_log_onehot,
  log_1_min_a,
  log_add_exp,
)


def extract(a, t, x_shape):
  b, *_ = t.shape
  out = a.gather(-1, t)
  return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def log_onehot_to_index(log_x):
  return log_x.argmax(1)


class OfficialSampling(nn.Module):
  """The sampling half of ``DiffusionTransformer`` with its schedule buffers."""

  def __init__(self, num_timesteps: int, num_classes: int, content_seq_len: int):
    super().__init__()
    self.num_timesteps = num_timesteps
    self.num_classes = num_classes
    self.content_seq_len = content_seq_len
    at, bt, ct, att, btt, ctt = alpha_schedule(num_timesteps, n=num_classes - 1)
    tables = {"log_at": at, "log_bt": bt, "log_ct": ct, "log_cumprod_at": att,
              "log_cumprod_bt": btt, "log_cumprod_ct": ctt}
    logs = {name: torch.log(torch.tensor(v.astype("float64"))) for name, v in tables.items()}
    logs["log_1_min_ct"] = log_1_min_a(logs["log_ct"])
    logs["log_1_min_cumprod_ct"] = log_1_min_a(logs["log_cumprod_ct"])
    for name, value in logs.items():
      self.register_buffer(name, value.float())
    self.prior_rule = 0
    self.prior_ps = 1024
    self.prior_weight = 0
    self.update_n_sample()

  def update_n_sample(self):
    """The official tables of positions to reveal at each t; none for other T."""
    if self.num_timesteps == 100:
      if self.prior_ps <= 10:
        self.n_sample = [1, 6] + [11, 10, 10] * 32 + [11, 15]
      else:
        self.n_sample = [1, 10] + [11, 10, 10] * 32 + [11, 11]
    elif self.num_timesteps == 50:
      self.n_sample = [10] + [21, 20] * 24 + [30]
    elif self.num_timesteps == 25:
      self.n_sample = [21] + [41] * 23 + [60]
    elif self.num_timesteps == 10:
      self.n_sample = [69] + [102] * 8 + [139]

  def q_pred_one_timestep(self, log_x_t, t):
    log_at = extract(self.log_at, t, log_x_t.shape)
    log_bt = extract(self.log_bt, t, log_x_t.shape)
    log_ct = extract(self.log_ct, t, log_x_t.shape)
    log_1_min_ct = extract(self.log_1_min_ct, t, log_x_t.shape)
    return torch.cat([log_add_exp(log_x_t[:, :-1, :] + log_at, log_bt),
                      log_add_exp(log_x_t[:, -1:, :] + log_1_min_ct, log_ct)], dim=1)

  def q_pred(self, log_x_start, t):
    t = (t + (self.num_timesteps + 1)) % (self.num_timesteps + 1)
    log_cumprod_at = extract(self.log_cumprod_at, t, log_x_start.shape)
    log_cumprod_bt = extract(self.log_cumprod_bt, t, log_x_start.shape)
    log_cumprod_ct = extract(self.log_cumprod_ct, t, log_x_start.shape)
    log_1_min_cumprod_ct = extract(self.log_1_min_cumprod_ct, t, log_x_start.shape)
    return torch.cat([log_add_exp(log_x_start[:, :-1, :] + log_cumprod_at, log_cumprod_bt),
                      log_add_exp(log_x_start[:, -1:, :] + log_1_min_cumprod_ct, log_cumprod_ct)],
                     dim=1)

  def q_posterior(self, log_x_start, log_x_t, t):
    """The one-step posterior q(x_{t-1} | x_t, x~_0) of step t, clamped to [-70, 0]."""
    assert t.min().item() >= 0 and t.max().item() < self.num_timesteps
    batch_size = log_x_start.size()[0]
    onehot_x_t = log_onehot_to_index(log_x_t)
    mask = (onehot_x_t == self.num_classes - 1).unsqueeze(1)
    log_one_vector = torch.zeros(batch_size, 1, 1).type_as(log_x_t)
    log_zero_vector = torch.log(log_one_vector + 1.0e-30).expand(-1, -1, self.content_seq_len)

    log_qt = self.q_pred(log_x_t, t)[:, :-1, :]
    log_cumprod_ct = extract(self.log_cumprod_ct, t, log_x_start.shape)
    ct_cumprod_vector = log_cumprod_ct.expand(-1, self.num_classes - 1, -1)
    log_qt = (~mask) * log_qt + mask * ct_cumprod_vector

    log_qt_one_timestep = self.q_pred_one_timestep(log_x_t, t)
    log_qt_one_timestep = torch.cat((log_qt_one_timestep[:, :-1, :], log_zero_vector), dim=1)
    log_ct = extract(self.log_ct, t, log_x_start.shape)
    ct_vector = log_ct.expand(-1, self.num_classes - 1, -1)
    ct_vector = torch.cat((ct_vector, log_one_vector), dim=1)
    log_qt_one_timestep = (~mask) * log_qt_one_timestep + mask * ct_vector

    q = log_x_start[:, :-1, :] - log_qt
    q = torch.cat((q, log_zero_vector), dim=1)
    q_log_sum_exp = torch.logsumexp(q, dim=1, keepdim=True)
    q = q - q_log_sum_exp
    log_ev = self.q_pred(q, t - 1) + log_qt_one_timestep + q_log_sum_exp
    return torch.clamp(log_ev, -70, 0)

  def log_sample_categorical(self, logits):
    uniform = torch.rand_like(logits)
    gumbel_noise = -torch.log(-torch.log(uniform + 1e-30) + 1e-30)
    sample = (gumbel_noise + logits).argmax(dim=1)
    return index_to_log_onehot(sample, self.num_classes)

  def prior_score(self, log_x, log_x_recon):
    """``score`` of ``p_sample``: ones (rule 1) or purity over the image's largest (rule 2)."""
    if self.prior_rule == 1:
      return torch.ones((log_x.shape[0], log_x.shape[2]))
    score = torch.exp(log_x_recon).max(dim=1).values.clamp(0, 1)
    score /= (score.max(dim=1, keepdim=True).values + 1e-10)
    return score

  def adjusted(self, log_x_recon, score):
    """``prob`` of ``p_sample``: the x0 log-probs, sharpened under rule 2 with r > 0."""
    if self.prior_rule != 1 and self.prior_weight > 0:
      prob = ((1 + score * self.prior_weight).unsqueeze(1) * log_x_recon).softmax(dim=1)
      return prob.log().clamp(-70, 0)
    return log_x_recon

  def choice_weights(self, log_x, score):
    """``_score`` of ``p_sample``: what ``torch.multinomial`` chooses positions by."""
    log_x_idx = log_onehot_to_index(log_x)
    weights = score.clone()
    if weights.sum() < 1e-6:
      weights += 1
    weights[log_x_idx != self.num_classes - 1] = 0
    return weights

  def p_sample(self, log_x, log_x_recon, t, sampled=None, to_sample=None):
    """One official ``p_sample`` call given the network's x0 log-probs ``log_x_recon``."""
    model_log_prob = self.q_posterior(log_x_recon, log_x, t)
    max_sample_per_step = self.prior_ps
    if t[0] > 0 and self.prior_rule > 0 and to_sample is not None:
      log_x_idx = log_onehot_to_index(log_x)
      score = self.prior_score(log_x, log_x_recon)
      out_idx = log_onehot_to_index(self.log_sample_categorical(
          self.adjusted(log_x_recon, score)))
      out2_idx = log_x_idx.clone()
      weights = self.choice_weights(log_x, score)
      for i in range(log_x.shape[0]):
        n_sample = min(to_sample - sampled[i], max_sample_per_step)
        if to_sample - sampled[i] - n_sample == 1:
          n_sample = to_sample - sampled[i]
        if n_sample <= 0:
          continue
        sel = torch.multinomial(weights[i], n_sample)
        out2_idx[i][sel] = out_idx[i][sel]
        sampled[i] += ((out2_idx[i] != self.num_classes - 1).sum()
                       - (log_x_idx[i] != self.num_classes - 1).sum()).item()
      out = index_to_log_onehot(out2_idx, self.num_classes)
    else:
      out = self.log_sample_categorical(model_log_prob)
      sampled = [1024] * log_x.shape[0]
    if to_sample is not None:
      return out, sampled
    return out

  def sample(self, predict_start, batch_size):
    """The official ``sample`` from all-[MASK] (``filter_ratio=0``): token indices (B, N).

    ``predict_start(log_x, t)`` stands for ``cf_predict_start``: the x0
    log-probs (B, K + 1, N) of the tokens ``log_x`` at steps ``t``, called
    once per ``p_sample``.
    """
    zero_logits = torch.zeros((batch_size, self.num_classes - 1, self.content_seq_len))
    one_logits = torch.ones((batch_size, 1, self.content_seq_len))
    log_z = torch.log(torch.cat((zero_logits, one_logits), dim=1))
    for diffusion_index in range(self.num_timesteps - 1, -1, -1):
      t = torch.full((batch_size,), diffusion_index, dtype=torch.long)
      sampled = [0] * batch_size
      while min(sampled) < self.n_sample[diffusion_index]:
        log_z, sampled = self.p_sample(log_z, predict_start(log_z, t), t, sampled,
                                       self.n_sample[diffusion_index])
    return log_onehot_to_index(log_z)

  def sample_fast_steps(self, skip_step):
    """``sample_fast``'s visited steps and, per step, the t its ``q_posterior`` gets."""
    diffusion_list = list(range(self.num_timesteps - 1, -1, -1 - skip_step))
    if diffusion_list[-1] != 0:
      diffusion_list.append(0)
    return [(index, index - skip_step if index > skip_step else index)
            for index in diffusion_list]

  def sample_fast_step(self, log_z, log_x_recon, diffusion_index, skip_step):
    """One iteration of ``sample_fast``'s loop: the posterior and the drawn next tokens."""
    t = torch.full((log_z.shape[0],), diffusion_index, dtype=torch.long)
    if diffusion_index > skip_step:
      model_log_prob = self.q_posterior(log_x_start=log_x_recon, log_x_t=log_z, t=t - skip_step)
    else:
      model_log_prob = self.q_posterior(log_x_start=log_x_recon, log_x_t=log_z, t=t)
    return model_log_prob, self.log_sample_categorical(model_log_prob)
