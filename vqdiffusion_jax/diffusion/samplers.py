"""Every sampler of the papers, each one whole run as a single ``lax`` loop.

A sampler sees the network only through ``log_x0_fn(x_t (B, N) int, t (B,)
int) -> (B, N, K + 1)`` x0 log-probabilities ([MASK] last), so guidance,
multi-prompt regions and the model family stay outside it
(``conditioned_log_x0`` builds that function for a conditioned network with
every pass batched together, in calls of at most ``max_batch`` sequences).
The RNG key is part of the loop state: the result is a deterministic
function of the key.

Samplers (``SamplerConfig.name``):

* ``vqdiffusion``: the reverse process from all-[MASK], visiting
  ``num_inference_steps`` evenly spaced steps (any number from 1 to T) and
  moving between visited steps t -> s by the skip-step posterior
  ``q(x_s | x_t, x~_0)``; the last move draws x_0 and never yields [MASK].
* ``vqdiffusion_fast``: the official ``sample_fast``: it visits every
  ``stride``-th step from the start, and step 0 (``official_fast_steps``);
  at a visited step t the network sees t, but the tokens move by the
  one-step posterior of step ``t - stride + 1`` (of t itself once
  ``t < stride``), as if x_t were at that step, to the step below it.
* ``fewer_tokens``: Improved VQ-Diffusion's fewer-tokens sampling (the
  official ``prior_rule`` 1): each call reveals exactly
  ``ceil(N / num_inference_steps)`` of the [MASK] positions (the last call
  the rest), chosen uniformly, drawn from the x0 prediction, at the step t
  whose cbar_t is nearest to the masked fraction.
* ``purity``: the official purity prior (``prior_rule`` 2, ``prior_weight``
  r): as ``fewer_tokens`` but with each position's purity (its largest x0
  probability) divided by the image's largest over all positions: positions
  are chosen with probability proportional to it (Gumbel top-k, so without
  replacement, as ``torch.multinomial``) and revealed from the sharpened
  distribution ``softmax((1 + r * purity) * log p)``. Every position is
  revealed within the rounds, so no final pass redraws them.
* ``fewer_tokens_official``, ``purity_official``: the official ``sample``
  with ``prior_rule`` 1 or 2 (``official_reveal_calls``): it visits every
  t = T-1..1, revealing the official table's count at t in calls of at
  most ``max_reveal_per_call`` (the official ``prior_ps``), each call a
  network call at t, then one call at t = 0 redraws every position from the
  unsharpened x0 prediction (the official v1 step at t = 0). The tables
  exist for 1024 tokens and T in {10, 25, 50, 100} only.
* ``paella``: the renoising sampler of Paella: from noise tokens, predict and
  sample every token (locally typical sampling with mass ``typical_mass``),
  then return the fraction ``1 - abar_s`` of positions to their initial
  noise; for models trained with uniform noise.

Options shared by all: truncation rate r (``truncation_rate``, 1 = off),
classifier-free guidance (in ``conditioned_log_x0``), inpainting (known
tokens clamped after every step and never chosen for revealing), and editing
(``start_step``: start from ``init_tokens`` noised to that step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import values
from vqdiffusion_jax.diffusion import discrete, guidance
from vqdiffusion_jax.diffusion.logspace import LOG_PROB_MIN
from vqdiffusion_jax.diffusion.schedule import Schedule

LogX0Fn = Callable[[jax.Array, jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SAMPLERS = ("vqdiffusion", "vqdiffusion_fast", "fewer_tokens", "purity", "fewer_tokens_official",
            "purity_official", "paella")
REVEAL_SAMPLERS = ("fewer_tokens", "purity")
OFFICIAL_REVEAL_SAMPLERS = ("fewer_tokens_official", "purity_official")

# The official ``n_sample`` tables (index t = 0..T-1), written for 1024 tokens; the T = 100 one
# has other ends when at most 10 positions are revealed per call.
OFFICIAL_TOKENS = 1024
OFFICIAL_MAX_REVEAL_PER_CALL = 1024
OFFICIAL_REVEAL_TABLES = {
    100: [1, 10] + [11, 10, 10] * 32 + [11, 11],
    50: [10] + [21, 20] * 24 + [30],
    25: [21] + [41] * 23 + [60],
    10: [69] + [102] * 8 + [139],
}
OFFICIAL_SMALL_CALLS_TABLE = [1, 6] + [11, 10, 10] * 32 + [11, 15]

# "auto" network batches on CPU hold at most this many tokens (batch x N) per call.
CPU_TOKENS_PER_CALL = 2048

# The allowed range of each float option of ``SamplerConfig`` (``values.number``'s bounds).
OPTION_RANGES = {
    "truncation_rate": {"low": 0.0, "high": 1.0, "low_open": True},
    "guidance_scale": {"low": 0.0},
    "purity_temperature": {"low": 0.0},
    "typical_mass": {"low": 0.0, "high": 1.0, "low_open": True},
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What to sample and how; hashable, so it can be a static jit argument.

  Attributes:
    name: one of ``SAMPLERS``.
    num_inference_steps: network calls: visited steps (``vqdiffusion``,
      ``paella``; 1..T, or 1..start_step + 1 when editing) or reveal rounds
      (``fewer_tokens``, ``purity``; 1..N). None means T (resp. N).
      ``vqdiffusion_fast`` visits every ``ceil(T / num_inference_steps)``-th
      step, and step 0, which can be one call more. The official reveal
      samplers take None: their tables fix the calls.
    truncation_rate: keep the most likely classes covering this mass (0, 1].
    guidance_scale: classifier-free guidance scale, 1 = off (used by
      ``conditioned_log_x0``; kept here so one object describes a run).
    purity_temperature: r >= 0 in the purity sharpening ``(1 + r * purity)``;
      0 chooses positions by purity without sharpening.
    typical_mass: tau of locally typical sampling (``paella``), (0, 1].
    start_step: editing: start at this step from noised ``init_tokens``.
    max_reveal_per_call: the official ``prior_ps`` of the official reveal
      samplers: at most this many positions per network call, so a step
      whose count is larger takes several calls. None is the official
      default, 1024 (one call per step); the official high-quality inference
      at speed s < 1 sets ``int(1024 // T * s)``.
  """

  name: str = "vqdiffusion"
  num_inference_steps: int | None = None
  truncation_rate: float = 1.0
  guidance_scale: float = 1.0
  purity_temperature: float = 1.0
  typical_mass: float = 1.0
  start_step: int | None = None
  max_reveal_per_call: int | None = None

  def steps(self, num_timesteps: int, num_tokens: int) -> int:
    """The checked number of network calls for a T-step model and N tokens."""
    if self.name not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.name!r}; choose one of {SAMPLERS}")
    self._check_options()
    if self.name in OFFICIAL_REVEAL_SAMPLERS:
      return self._official_calls(num_timesteps, num_tokens)
    start = num_timesteps - 1 if self.start_step is None else self.start_step
    if not 0 <= start < num_timesteps:
      raise ValueError(f"start_step {self.start_step} is outside 0..{num_timesteps - 1}")
    reveal = self.name in REVEAL_SAMPLERS
    limit = num_tokens if reveal else start + 1
    steps = limit if self.num_inference_steps is None else int(self.num_inference_steps)
    if not 1 <= steps <= limit:
      unit = f"reveal rounds for {num_tokens} tokens" if reveal else (
          f"visited steps from step {start}")
      raise ValueError(f"num_inference_steps={steps} is out of range 1..{limit} ({unit})")
    return steps

  def _check_options(self) -> None:
    for name, allowed in OPTION_RANGES.items():
      values.number(name, getattr(self, name), **allowed)
    if self.max_reveal_per_call is not None and (
        self.name not in OFFICIAL_REVEAL_SAMPLERS or self.max_reveal_per_call < 1):
      raise ValueError(f"max_reveal_per_call={self.max_reveal_per_call} needs a positive count "
                       f"and one of the samplers {OFFICIAL_REVEAL_SAMPLERS}, not {self.name!r}")

  def _official_calls(self, num_timesteps: int, num_tokens: int) -> int:
    if self.num_inference_steps is not None:
      raise ValueError(f"{self.name} makes the official number of calls: leave "
                       f"num_inference_steps unset (got {self.num_inference_steps}) and bound "
                       "the positions per call with max_reveal_per_call")
    if self.start_step is not None:
      raise ValueError(f"{self.name} starts from all [MASK]; editing (start_step) is not part "
                       "of the official schedule")
    steps, _ = official_reveal_calls(num_timesteps, num_tokens, self.max_reveal_per_call)
    return len(steps) + 1


def inference_timesteps(start: int, num_steps: int) -> np.ndarray:
  """``num_steps`` distinct steps from ``start`` down to 0, evenly spaced, descending."""
  if not 1 <= num_steps <= start + 1:
    raise ValueError(f"cannot visit {num_steps} distinct steps in 0..{start}")
  if num_steps == 1:
    return np.array([start])
  return np.floor(np.linspace(start, 0, num_steps) + 0.5).astype(np.int32)


def official_fast_steps(start: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The steps the official ``sample_fast`` visits and the step of each one's posterior.

  The stride is ``ceil((start + 1) / num_steps)`` (the official ``skip_step``
  is one less): steps start, start - stride, ... and 0. At visited step t the
  tokens move by the one-step posterior of step ``t - stride + 1`` when that
  is above 0, else of t itself, to the step below that one (-1 is x_0).

  Args:
    start: the first visited step, T - 1 when sampling from all-[MASK].
    num_steps: 1..start + 1; the number of visited steps is this or one more.

  Returns:
    (visited steps, posterior steps), int32, both descending.
  """
  if not 1 <= num_steps <= start + 1:
    raise ValueError(f"cannot visit {num_steps} steps in 0..{start}")
  stride = -(-(start + 1) // num_steps)
  visited = np.arange(start, -1, -stride)
  if visited[-1] != 0:
    visited = np.append(visited, 0)
  posterior = np.where(visited > stride - 1, visited - (stride - 1), visited)
  return visited.astype(np.int32), posterior.astype(np.int32)


def official_reveal_counts(num_timesteps: int, num_tokens: int,
                           max_reveal_per_call: int | None = None) -> np.ndarray:
  """The official ``n_sample``: how many positions the official ``sample`` reveals at each t.

  Index t = 0..T-1; the counts at t >= 1 are revealed at t, and the count
  at t = 0 is what is left for the final call (which redraws everything).

  Args:
    num_timesteps: T; the official tables exist for 10, 25, 50 and 100.
    num_tokens: N; the tables are written for 1024.
    max_reveal_per_call: the official ``prior_ps`` (None: 1024); T = 100
      has another table when it is at most 10.

  Returns:
    (T,) int32 counts.
  """
  if num_tokens != OFFICIAL_TOKENS or num_timesteps not in OFFICIAL_REVEAL_TABLES:
    raise ValueError(f"the official reveal tables are written for {OFFICIAL_TOKENS} tokens and "
                     f"T in {tuple(OFFICIAL_REVEAL_TABLES)}; got {num_tokens} tokens and "
                     f"T = {num_timesteps}")
  per_call = OFFICIAL_MAX_REVEAL_PER_CALL if max_reveal_per_call is None else max_reveal_per_call
  if num_timesteps == 100 and per_call <= 10:
    return np.asarray(OFFICIAL_SMALL_CALLS_TABLE, np.int32)
  return np.asarray(OFFICIAL_REVEAL_TABLES[num_timesteps], np.int32)


def official_call_sizes(count: int, max_per_call: int) -> list[int]:
  """Positions revealed by each official call at a step that reveals ``count``.

  Calls reveal at most ``max_per_call`` each, except that a call that would
  leave exactly one position takes it too.
  """
  sizes, left = [], count
  while left > 0:
    size = min(left, max_per_call)
    size = left if left - size == 1 else size
    sizes.append(size)
    left -= size
  return sizes


def official_reveal_calls(num_timesteps: int, num_tokens: int,
                          max_reveal_per_call: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The official ``sample``'s network calls before its last: (step t, positions revealed).

  Every t = T-1..1 is visited, its table count (``official_reveal_counts``)
  split into calls by ``official_call_sizes``; the official per-image
  counters advance together, as every image reveals the same count per
  call. The run then makes one call at t = 0.

  Returns:
    (steps, counts), int32, one entry per call, steps descending.
  """
  table = official_reveal_counts(num_timesteps, num_tokens, max_reveal_per_call)
  per_call = OFFICIAL_MAX_REVEAL_PER_CALL if max_reveal_per_call is None else max_reveal_per_call
  calls = [(t, size) for t in range(num_timesteps - 1, 0, -1)
           for size in official_call_sizes(int(table[t]), per_call)]
  return tuple(np.asarray(column, np.int32) for column in zip(*calls, strict=True))


def reveal_quota(call: jax.Array, per_call: int, num_masked: jax.Array) -> jax.Array:
  """Positions to reveal at reveal round ``call``: per_call until none are left, (B,)."""
  return (jnp.minimum((call + 1) * per_call, num_masked)
          - jnp.minimum(call * per_call, num_masked))


def typical_filter(log_probs: jax.Array, mass: float) -> jax.Array:
  """Locally typical sampling: keeps the classes nearest the entropy in information.

  Classes are ranked by ``|-log p - H|`` and kept while the probability mass
  ranked before them is below ``mass`` (the first always survives); the
  others get -inf. ``mass = 1`` keeps everything.

  Args:
    log_probs: (..., K) normalised log-probabilities.
    mass: tau in (0, 1].

  Returns:
    (..., K) filtered log-probabilities (not renormalised).
  """
  if mass >= 1.0:
    return log_probs
  probs = jnp.exp(log_probs)
  entropy = -jnp.sum(probs * log_probs, axis=-1, keepdims=True)
  order = jnp.argsort(jnp.abs(-log_probs - entropy), axis=-1)
  ranked = jnp.take_along_axis(probs, order, axis=-1)
  keep_ranked = (jnp.cumsum(ranked, axis=-1) - ranked) < mass
  keep = jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, log_probs, -jnp.inf)


def network_batch(max_batch: int | str | None, num_tokens: int, platform: str) -> int | None:
  """Sequences per network call: ``max_batch`` resolved, None for one call over the batch.

  "auto" is ``CPU_TOKENS_PER_CALL // num_tokens`` sequences (at least one) on CPU,
  where a batch whose activations outgrow the caches runs slower per sequence
  (the tiny size of benchmarks/vs_diffusers.py samples 1.4x faster at guided
  batch 32 in four calls of 8), and one call on GPUs and TPUs.
  """
  _check_max_batch(max_batch)
  if max_batch == "auto":
    return max(1, CPU_TOKENS_PER_CALL // num_tokens) if platform == "cpu" else None
  return max_batch


def _check_max_batch(max_batch) -> None:
  if max_batch in (None, "auto"):
    return
  if isinstance(max_batch, str) or max_batch < 1:
    raise ValueError(f"max_batch must be a positive int, 'auto' or None, got {max_batch!r}")


def batched_calls(logits_fn: LogitsFn, max_batch: int | None) -> LogitsFn:
  """``logits_fn`` over at most ``max_batch`` sequences per call, in a ``lax.map``.

  A batch that does not divide evenly is padded with copies of its first row,
  whose outputs are dropped; the result equals one call over the whole batch.
  """
  def call(x_t: jax.Array, t: jax.Array, condition) -> jax.Array:
    batch = x_t.shape[0]
    if max_batch is None or batch <= max_batch:
      return logits_fn(x_t, t, condition)
    calls = -(-batch // max_batch)
    per_call = -(-batch // calls)
    pad = calls * per_call - batch

    def split(x):
      x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
      return x.reshape(calls, per_call, *x.shape[1:])

    logits = jax.lax.map(lambda args: logits_fn(*args), jax.tree.map(split, (x_t, t, condition)))
    return logits.reshape(calls * per_call, *logits.shape[2:])[:batch]

  return call


def conditioned_log_x0(logits_fn: LogitsFn, conditions: Sequence, null_condition=None,
                       guidance_scale: float = 1.0,
                       region_weights: jax.Array | None = None,
                       max_batch: int | str | None = "auto") -> LogX0Fn:
  """The x0 log-probs of a conditioned network, every pass batched together.

  With one condition and ``guidance_scale`` 1 this is the network's
  ``x0_log_probs``. With guidance, the null condition's pass is batched with
  the conditional one and ``guidance.guide`` mixes them. With R conditions
  (multi-prompt), each region's (guided) log-probs are combined per position
  as ``sum_r w_r log p_r`` renormalised over the codebook, so hard 0/1
  region masks select each position's prompt.

  Args:
    logits_fn: ``(x_t (B', N), t (B',), condition) -> (B', N, K)`` logits.
    conditions: R condition pytrees, each with leading batch B.
    null_condition: the unconditional input (learnable null text), batch B;
      required when ``guidance_scale != 1``.
    guidance_scale: s; 1 turns guidance off (no extra pass).
    region_weights: (R, N) non-negative weights summing to 1 over R; needed
      when R > 1.
    max_batch: the batched call runs over at most this many sequences at a
      time (``network_batch``: "auto" by platform; None for one call).

  Returns:
    ``log_x0_fn(x_t, t) -> (B, N, K + 1)``.
  """
  conditions = list(conditions)
  _check_max_batch(max_batch)
  guided = guidance_scale != 1.0
  if guided and null_condition is None:
    raise ValueError("classifier-free guidance needs the null condition (learnable null text)")
  if len(conditions) > 1 and region_weights is None:
    raise ValueError(f"{len(conditions)} prompts need region weights (R, N)")
  inputs = conditions + ([null_condition] if guided else [])
  stacked = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *inputs)
  copies = len(inputs)

  def log_x0_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
    batch = x_t.shape[0]
    per_call = network_batch(max_batch, x_t.shape[1], jax.default_backend())
    logits = batched_calls(logits_fn, per_call)(jnp.tile(x_t, (copies, 1)), jnp.tile(t, copies),
                                                stacked)
    log_probs = discrete.x0_log_probs(logits).reshape(copies, batch, *logits.shape[1:-1], -1)
    per_region = log_probs[:len(conditions)]
    if guided:
      per_region = guidance.guide(per_region, log_probs[-1:], guidance_scale)
    if len(conditions) == 1:
      return per_region[0]
    weights = jnp.asarray(region_weights, per_region.dtype)[:, None, :, None]
    mixed = jnp.sum(weights * per_region[..., :-1], axis=0)
    mixed = jnp.clip(mixed - jax.nn.logsumexp(mixed, axis=-1, keepdims=True), LOG_PROB_MIN, 0.0)
    return jnp.concatenate([mixed, jnp.full_like(mixed[..., :1], LOG_PROB_MIN)], axis=-1)

  return log_x0_fn


def _has_mask(schedule: Schedule) -> bool:
  """Whether x_T is [MASK] (masking schedules) rather than uniform noise."""
  try:
    final = np.asarray(schedule.log_cumprod_ct)[schedule.num_timesteps - 1]
  except jax.errors.TracerArrayConversionError as error:
    raise ValueError("samplers need a concrete schedule: close over it instead of passing it "
                     "to jit as an argument") from error
  return bool(np.exp(final) > 0.5)


def _noise_tokens(schedule: Schedule, rng: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """x_T: all [MASK] for masking schedules, uniform codebook tokens otherwise."""
  if _has_mask(schedule):
    return jnp.full(shape, schedule.mask_index, jnp.int32)
  return jax.random.randint(rng, shape, 0, schedule.codebook_size, jnp.int32)


def _clamp(x: jax.Array, known_tokens: jax.Array | None,
           known_mask: jax.Array | None) -> jax.Array:
  if known_mask is None:
    return x
  return jnp.where(known_mask, known_tokens, x)


def _truncated(log_x0_fn: LogX0Fn, rate: float) -> LogX0Fn:
  if rate >= 1.0:
    return log_x0_fn
  return lambda x, t: guidance.truncate(log_x0_fn(x, t), rate)


def _step_pairs(timesteps: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(current, following) visited steps; the step after the last is -1 (x_0)."""
  return (jnp.asarray(timesteps, jnp.int32),
          jnp.asarray(np.append(timesteps[1:], -1), jnp.int32))


def reverse_moves(name: str, start: int, num_steps: int) -> tuple[np.ndarray, ...]:
  """(network step, posterior from, posterior to) per call of a reverse-process sampler.

  ``vqdiffusion`` moves between its evenly spaced visited steps by the exact
  skip-step posterior; ``vqdiffusion_fast`` by the official one-step rule
  (``official_fast_steps``). A move to -1 draws x_0.
  """
  if name == "vqdiffusion_fast":
    visited, posterior = official_fast_steps(start, num_steps)
    return visited, posterior, posterior - 1
  visited = inference_timesteps(start, num_steps)
  return visited, visited, np.append(visited[1:], -1).astype(np.int32)


def posterior_step(schedule: Schedule, log_x0: jax.Array, x_t: jax.Array, t: jax.Array,
                   s: jax.Array) -> jax.Array:
  """log q(x_s | x_t, x~_0) for tokens x_t taken at step t; never [MASK] at s = -1.

  Args:
    schedule: the noise schedule.
    log_x0: (B, N, K + 1) x0 log-probs.
    x_t: (B, N) tokens.
    t: (B,) step x_t is taken at, 0..T-1.
    s: (B,) step to move to, -1..t-1.

  Returns:
    (B, N, K + 1) log-probs of x_s.
  """
  mask_class = jnp.arange(schedule.num_classes) == schedule.mask_index
  log_p = discrete.q_posterior_tokens(schedule, log_x0, x_t, t, s)
  return jnp.where((s[:, None, None] < 0) & mask_class, -jnp.inf, log_p)


def _reverse_process(log_x0_fn, schedule, rng, x, moves, known_tokens, known_mask):
  batch = x.shape[0]
  network, source, target = (jnp.asarray(m, jnp.int32) for m in moves)

  def body(i, carry):
    x, key = carry
    key, draw = jax.random.split(key)
    t, frm, to = (jnp.full((batch,), m[i]) for m in (network, source, target))
    log_p = posterior_step(schedule, log_x0_fn(x, t), x, frm, to)
    x = discrete.sample_categorical(draw, log_p).astype(jnp.int32)
    return _clamp(x, known_tokens, known_mask), key

  return jax.lax.fori_loop(0, len(moves[0]), body, (x, rng))[0]


def relative_purity(log_x0: jax.Array) -> jax.Array:
  """Each position's purity (``guidance.purity``) over the image's largest, (B, N).

  Args:
    log_x0: (B, N, K) codebook log-probs; every position counts towards the
      image's largest, revealed ones included.
  """
  pure = jnp.exp(jnp.max(log_x0, axis=-1))
  return pure / (jnp.max(pure, axis=-1, keepdims=True) + 1e-10)


def sharpen(log_x0: jax.Array, temperature: float) -> jax.Array:
  """Purity sharpening: ``log softmax((1 + r * purity) * log p)`` clamped to [-70, 0].

  Args:
    log_x0: (B, N, K) codebook log-probs.
    temperature: r; 0 returns ``log_x0`` unchanged.

  Returns:
    (B, N, K) normalised log-probs.
  """
  if temperature <= 0:
    return log_x0
  scaled = (1.0 + temperature * relative_purity(log_x0))[..., None] * log_x0
  return jnp.clip(jax.nn.log_softmax(scaled, axis=-1), LOG_PROB_MIN, 0.0)


def reveal_weights(log_x0: jax.Array, x: jax.Array, *, mask_index: int,
                   purity_prior: bool) -> jax.Array:
  """(B, N) weights for choosing positions to reveal: 0 where x is not [MASK].

  ``relative_purity`` with ``purity_prior``, else 1: positions are drawn in
  proportion to these, without replacement.
  """
  weight = relative_purity(log_x0[..., :mask_index]) if purity_prior else jnp.ones(x.shape)
  return jnp.where(x == mask_index, weight, 0.0)


def reveal_round(rng: jax.Array, log_x0: jax.Array, x: jax.Array, quota: jax.Array, *,
                 mask_index: int, purity_prior: bool, temperature: float = 1.0) -> jax.Array:
  """Replaces exactly ``quota`` [MASK] positions per sample by drawn tokens.

  Positions are chosen with probability proportional to ``reveal_weights``
  (Gumbel top-k: sequential draws without replacement), and drawn from the
  x0 distribution, sharpened by purity (``sharpen``) when ``purity_prior``.
  Other positions are returned unchanged.

  Args:
    rng: PRNG key.
    log_x0: (B, N, K + 1) x0 log-probs ([MASK] entry ignored).
    x: (B, N) current tokens.
    quota: (B,) positions to reveal (at most the number of [MASK]s).
    mask_index: the [MASK] token, K.
    purity_prior: choose and sharpen by purity.
    temperature: r of the sharpening.

  Returns:
    (B, N) tokens.
  """
  pick, draw = jax.random.split(rng)
  weights = reveal_weights(log_x0, x, mask_index=mask_index, purity_prior=purity_prior)
  log_x0 = log_x0[..., :mask_index]
  if purity_prior:
    log_x0 = sharpen(log_x0, temperature)
  is_mask = x == mask_index
  score = jnp.where(is_mask, jnp.log(weights) + jax.random.gumbel(pick, x.shape), -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)
  reveal = is_mask & (rank < quota[:, None])
  tokens = discrete.sample_categorical(draw, log_x0).astype(x.dtype)
  return jnp.where(reveal, tokens, x)


def _reveal_rounds(log_x0_fn, schedule, rng, x, num_rounds, *, purity_prior: bool,
                   temperature: float):
  num_tokens = x.shape[1]
  per_call = -(-num_tokens // num_rounds)
  mask = schedule.mask_index
  cbar = jnp.exp(schedule.log_cumprod_ct[:schedule.num_timesteps])
  num_masked = jnp.sum(x == mask, axis=-1)

  def body(call, carry):
    x, key = carry
    key, round_key = jax.random.split(key)
    fraction = jnp.mean(x == mask, axis=-1)
    t = jnp.argmin(jnp.abs(cbar[None, :] - fraction[:, None]), axis=-1).astype(jnp.int32)
    quota = reveal_quota(call, per_call, num_masked)
    return reveal_round(round_key, log_x0_fn(x, t), x, quota, mask_index=mask,
                        purity_prior=purity_prior, temperature=temperature), key

  rounds = -(-num_tokens // per_call)
  return jax.lax.fori_loop(0, rounds, body, (x, rng))[0]


def _official_reveals(log_x0_fn, schedule, rng, x, calls, known_tokens, known_mask, *,
                      purity_prior: bool, temperature: float):
  batch = x.shape[0]
  steps, counts = (jnp.asarray(column, jnp.int32) for column in calls)

  def body(call, carry):
    x, key = carry
    key, round_key = jax.random.split(key)
    t = jnp.full((batch,), steps[call])
    return reveal_round(round_key, log_x0_fn(x, t), x, jnp.full((batch,), counts[call]),
                        mask_index=schedule.mask_index, purity_prior=purity_prior,
                        temperature=temperature), key

  x, key = jax.lax.fori_loop(0, len(calls[0]), body, (x, rng))
  last = jnp.zeros((batch,), jnp.int32)
  log_p = posterior_step(schedule, log_x0_fn(x, last), x, last, last - 1)
  return _clamp(discrete.sample_categorical(key, log_p).astype(jnp.int32), known_tokens,
                known_mask)


def _renoising(log_x0_fn, schedule, rng, x, noise, timesteps, typical_mass, known_tokens,
               known_mask):
  batch = x.shape[0]
  current, following = _step_pairs(timesteps)
  abar = jnp.exp(schedule.log_cumprod_at)

  def body(i, carry):
    x, key = carry
    key, draw, renoise = jax.random.split(key, 3)
    t = jnp.full((batch,), current[i])
    log_x0 = typical_filter(log_x0_fn(x, t)[..., :-1], typical_mass)
    x0 = discrete.sample_categorical(draw, log_x0).astype(jnp.int32)
    s = following[i]
    noise_fraction = jnp.where(s < 0, 0.0, 1.0 - abar[jnp.maximum(s, 0)])
    back = jax.random.uniform(renoise, x.shape) < noise_fraction
    return _clamp(jnp.where(back, noise, x0), known_tokens, known_mask), key

  return jax.lax.fori_loop(0, len(timesteps), body, (x, rng))[0]


def sample(log_x0_fn: LogX0Fn, schedule: Schedule, rng: jax.Array, shape: tuple[int, int],
           config: SamplerConfig = SamplerConfig(), *, known_tokens: jax.Array | None = None,
           known_mask: jax.Array | None = None,
           init_tokens: jax.Array | None = None) -> jax.Array:
  """Draws (B, N) codebook tokens with the sampler ``config`` describes.

  Args:
    log_x0_fn: ``(x_t, t) -> (B, N, K + 1)`` x0 log-probs (guidance and
      regions already applied, e.g. by ``conditioned_log_x0``).
    schedule: the model's noise schedule.
    rng: PRNG key; the result is a deterministic function of it.
    shape: (B, N).
    config: the sampler and its options.
    known_tokens: (B, N) tokens to keep where ``known_mask`` (inpainting).
    known_mask: (B, N) bool, True where the token is known.
    init_tokens: (B, N) tokens of an image to edit from ``config.start_step``.

  Returns:
    (B, N) int32 tokens in [0, K).
  """
  num_steps = config.steps(schedule.num_timesteps, shape[1])
  for name, value in (("known_tokens", known_tokens), ("known_mask", known_mask),
                      ("init_tokens", init_tokens)):
    if value is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
  if (known_tokens is None) != (known_mask is None):
    raise ValueError("inpainting needs both known_tokens and known_mask")
  if (config.start_step is None) != (init_tokens is None):
    raise ValueError("editing needs both config.start_step and init_tokens")

  noise_key, rng = jax.random.split(rng)
  noise = _noise_tokens(schedule, noise_key, shape)
  x = noise
  if init_tokens is not None:
    start = jnp.full((shape[0],), config.start_step, jnp.int32)
    x = discrete.q_sample(schedule, noise_key, init_tokens.astype(jnp.int32), start)
  if known_mask is not None:
    known_mask = known_mask.astype(bool)
    known_tokens = known_tokens.astype(jnp.int32)
  x = _clamp(x, known_tokens, known_mask)
  log_x0_fn = _truncated(log_x0_fn, config.truncation_rate)
  start = schedule.num_timesteps - 1 if config.start_step is None else config.start_step

  if config.name in ("vqdiffusion", "vqdiffusion_fast"):
    return _reverse_process(log_x0_fn, schedule, rng, x,
                            reverse_moves(config.name, start, num_steps), known_tokens, known_mask)
  if config.name == "paella":
    return _renoising(log_x0_fn, schedule, rng, x, noise, inference_timesteps(start, num_steps),
                      config.typical_mass, known_tokens, known_mask)
  if not _has_mask(schedule):
    raise ValueError(f"the {config.name!r} sampler reveals [MASK] tokens; this schedule has none")
  purity_prior = config.name.startswith("purity")
  if config.name in OFFICIAL_REVEAL_SAMPLERS:
    calls = official_reveal_calls(schedule.num_timesteps, shape[1], config.max_reveal_per_call)
    return _official_reveals(log_x0_fn, schedule, rng, x, calls, known_tokens, known_mask,
                             purity_prior=purity_prior, temperature=config.purity_temperature)
  return _reveal_rounds(log_x0_fn, schedule, rng, x, num_steps, purity_prior=purity_prior,
                        temperature=config.purity_temperature)
