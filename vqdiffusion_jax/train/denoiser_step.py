"""The denoiser's training step: one pure function, jitted with explicit shardings.

``train_step(state, batch, rng[, frozen_params]) -> (state, metrics)``:

  key     = fold_in(rng, state.step)
  t, p(t) = importance sampler over state.loss_history (uniform when
            ``diffusion.importance_sampling`` is off)
  x_t     ~ q(x_t | x_0)                                  (discrete.q_sample)
  y       = text features, rows with ``drop_text`` replaced by the model's
            learnable null text (classifier-free guidance training)
  loss    = discrete.training_losses(p_theta(x_0 | x_t, y))
  then clipped AdamW, the EMA of the params and the loss-history update.

The batch is a dict of arrays sharing a leading batch dimension:

  tokens     (B, N) int    clean image tokens x_0 in [0, K)
  text       (B, L, D)     cached text features ("text" conditioning), or
  text_ids   (B, L) int    text ids, encoded by the denoiser's own text encoder
                           (which trains with it) or by its frozen one (whose
                           params are the step's 4th argument, not state)
  drop_text  (B,) bool     optional: rows trained unconditionally
  label      (B,) int      class labels ("class" conditioning); ``drop_text``
                           turns a row into the null class ``num_classes``
                           (the share of such rows is logged as
                           ``null_class_fraction``)

Paella's convolutional predictor (a resizable ``Denoiser``) trains with its
own objective instead (``make_train_step`` picks it; ``paella_loss``): t
uniform over the steps, x_t = x_0 with a fraction 1 - abar_t of the tokens
replaced by uniformly drawn ones (``q_sample`` of a "uniform" schedule, which
never masks), and the label-smoothed cross-entropy of every original token.
Paella's sampler ("paella") renoises with the same abar_t.

Compute dtype (bfloat16) and rematerialisation come from the model's config.
A non-finite loss or gradient norm shows as ``metrics["finite"] == False``;
the loop stops on it and names the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from vqdiffusion_jax.diffusion import discrete, importance
from vqdiffusion_jax.diffusion.schedule import Schedule
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train.state import TrainState


def sample_timesteps(rng: jax.Array, history: importance.LossHistory | None, batch_size: int,
                     num_timesteps: int, importance_sampling: bool) -> tuple[jax.Array, jax.Array]:
  """Draws (t, p(t)) per sample, by importance or uniformly.

  Args:
    rng: a PRNG key.
    history: the loss history (needed when ``importance_sampling``).
    batch_size: B.
    num_timesteps: T.
    importance_sampling: use ``importance.sample_timesteps`` on ``history``.

  Returns:
    (B,) int32 steps and (B,) float32 probabilities.
  """
  if importance_sampling:
    if history is None:
      raise ValueError("importance_sampling needs a loss history in the state "
                       "(create_state(..., history_timesteps=T))")
    return importance.sample_timesteps(rng, history, batch_size)
  t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.full((batch_size,), 1.0 / num_timesteps, jnp.float32)


def _text_features(denoiser: Denoiser, params: Any, batch: Mapping[str, jax.Array],
                   frozen_params: Any) -> jax.Array | None:
  """The batch's text features: cached ones, else its ids through the denoiser's encoder."""
  if denoiser.conditioning != "text":
    return None
  if "text" in batch:
    return batch["text"]
  if "text_ids" not in batch:
    raise ValueError("a text-conditioned batch needs 'text' features or 'text_ids'")
  return denoiser.encode_text(params, frozen_params, batch["text_ids"])


def condition_input(denoiser: Denoiser, params: Any, batch: Mapping[str, jax.Array],
                    text: jax.Array | None) -> jax.Array | None:
  """The denoiser's condition for a batch, with dropped rows made unconditional.

  Args:
    denoiser: the denoiser.
    params: its params (the null text is read from them, so it gets gradient
      through the dropped rows).
    batch: the batch (``drop_text``, ``label``).
    text: (B, L, D) text features for "text" conditioning, else unused.

  Returns:
    (B, L, D) features, (B,) labels, or None, by ``denoiser.conditioning``.
  """
  conditioning = denoiser.conditioning
  drop = batch.get("drop_text")
  if conditioning == "none":
    return None
  if conditioning == "class":
    labels = batch["label"]
    if drop is None:
      return labels
    num_classes = denoiser.network.config.num_classes
    return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)
  if drop is None:
    return text
  if not denoiser.has_null_condition:
    raise ValueError("the batch has 'drop_text' but the model has no learnable null text; "
                     "put the empty caption's features in 'text' instead")
  null = denoiser.null_condition(params, text.shape[0])
  return jnp.where(drop[:, None, None], null.astype(text.dtype), text)


def masked_accuracy(logits: jax.Array, x0: jax.Array, x_t: jax.Array,
                    mask_index: int) -> jax.Array:
  """Fraction of [MASK] positions of x_t where argmax p(x_0 | x_t) is the true token.

  Args:
    logits: (B, N, K) network output.
    x0: (B, N) clean tokens.
    x_t: (B, N) noised tokens.
    mask_index: K, the [MASK] token.

  Returns:
    A float32 scalar (0 when nothing is masked).
  """
  masked = x_t == mask_index
  hits = jnp.sum(jnp.where(masked, jnp.argmax(logits, axis=-1) == x0, False))
  return hits / jnp.maximum(jnp.sum(masked), 1).astype(jnp.float32)


def paella_loss(logits: jax.Array, x0: jax.Array, label_smoothing: float) -> jax.Array:
  """Paella's loss: mean label-smoothed cross-entropy of every clean token.

  Args:
    logits: (B, N, K) network output.
    x0: (B, N) clean tokens.
    label_smoothing: the mass spread evenly over the K classes.

  Returns:
    A float32 scalar.
  """
  targets = optax.smooth_labels(jax.nn.one_hot(x0, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def _optimizer_update(state: TrainState, grads: Any, optimizer, ema_decay: float,
                      history: Any) -> TrainState:
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=state_lib.ema_update(state.ema_params, params, ema_decay),
                       loss_history=history)


def make_paella_step(denoiser: Denoiser, schedule: Schedule, train_config: Any,
                     optimizer: optax.GradientTransformation, grid: tuple[int, int]) -> Callable:
  """The train step of Paella's predictor (module docstring); arguments as ``make_train_step``."""
  if np.any(np.exp(np.asarray(schedule.log_cumprod_ct)) > 0):
    raise ValueError("Paella's objective renoises with random tokens, never [MASK]: set "
                     "diffusion.schedule to 'uniform'")
  learning_rate = state_lib.learning_rate_schedule(train_config.optim,
                                                   int(train_config.train.num_steps))
  ema_decay = float(train_config.optim.ema_decay)
  label_smoothing = float(train_config.denoiser.paella.label_smoothing)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                 frozen_params: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    rng_t, rng_q = jax.random.split(jax.random.fold_in(rng, state.step))
    x0 = batch["tokens"]
    t, _ = sample_timesteps(rng_t, None, x0.shape[0], schedule.num_timesteps, False)
    x_t = discrete.q_sample(schedule, rng_q, x0, t)

    def loss_fn(params):
      text = _text_features(denoiser, params, batch, frozen_params)
      condition = condition_input(denoiser, params, batch, text)
      logits = denoiser.logits(params, x_t, t, condition, grid, extra=state.extra)
      return paella_loss(logits, x0, label_smoothing), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = _optimizer_update(state, grads, optimizer, ema_decay, state.loss_history)
    grad_norm = state_lib.global_norm(grads)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": state_lib.global_norm(new_state.params),
        "learning_rate": learning_rate(state.step),
        "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == x0),
        "noise_fraction": jnp.mean(x_t != x0),
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    }
    return new_state, metrics

  return train_step


def make_train_step(denoiser: Denoiser, schedule: Schedule, train_config: Any,
                    diffusion_config: Any, optimizer: optax.GradientTransformation,
                    grid: tuple[int, int] | None = None) -> Callable:
  """Builds the pure train step of the denoiser.

  Args:
    denoiser: the denoiser (its network's config sets dtype and remat).
    schedule: the noise schedule.
    train_config: the experiment config (its ``optim`` section: ema_decay and
      the learning-rate schedule, logged; ``train.num_steps``; for Paella
      ``denoiser.paella.label_smoothing``).
    diffusion_config: ``config.diffusion`` (aux_weight, adaptive_aux,
      mask_weight, importance_sampling).
    optimizer: the optax transformation the state was created with.
    grid: (h, w) of the tokens; needed by a resizable (Paella) network,
      which trains with ``make_paella_step``.

  Returns:
    ``train_step(state, batch, rng, frozen_params=None) -> (state, metrics)``.
  """
  if denoiser.resizable:
    if grid is None:
      raise ValueError("Paella's predictor needs the token grid to train")
    return make_paella_step(denoiser, schedule, train_config, optimizer, grid)
  learning_rate = state_lib.learning_rate_schedule(train_config.optim,
                                                   int(train_config.train.num_steps))
  ema_decay = float(train_config.optim.ema_decay)
  importance_sampling = bool(diffusion_config.importance_sampling)
  loss_options = {"aux_weight": float(diffusion_config.aux_weight),
                  "adaptive_aux": bool(diffusion_config.adaptive_aux),
                  "mask_weight": tuple(float(w) for w in diffusion_config.mask_weight)}

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                 frozen_params: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    rng_t, rng_q = jax.random.split(jax.random.fold_in(rng, state.step))
    x0 = batch["tokens"]
    t, pt = sample_timesteps(rng_t, state.loss_history, x0.shape[0],
                             schedule.num_timesteps, importance_sampling)
    x_t = discrete.q_sample(schedule, rng_q, x0, t)

    def loss_fn(params):
      text = _text_features(denoiser, params, batch, frozen_params)
      condition = condition_input(denoiser, params, batch, text)
      logits = denoiser.logits(params, x_t, t, condition, extra=state.extra)
      out = discrete.training_losses(schedule, logits, x0, x_t, t, pt, **loss_options)
      return out["loss"], (out, masked_accuracy(logits, x0, x_t, schedule.mask_index))

    (loss, (out, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    history = (None if state.loss_history is None
               else importance.update_history(state.loss_history, t, out["vb"]))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=state_lib.ema_update(state.ema_params, params, ema_decay),
        loss_history=history)
    grad_norm = state_lib.global_norm(grads)
    metrics = {
        "loss": loss, "vb": jnp.mean(out["vb"]), "aux": jnp.mean(out["aux"]),
        "grad_norm": grad_norm, "param_norm": state_lib.global_norm(params),
        "learning_rate": learning_rate(state.step), "accuracy": accuracy,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    }
    if denoiser.conditioning == "class":
      labels = condition_input(denoiser, state.params, batch, None)
      metrics["null_class_fraction"] = jnp.mean(labels == denoiser.num_classes)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings: TrainState,
                   batch_shardings: Any, *, frozen_shardings: Any = None,
                   compiler_options: Mapping[str, Any] | None = None) -> Callable:
  """Jits a train step with explicit in/out shardings, donating the old state.

  Activations take their layout by propagation from these shardings (params
  over fsdp / tensor, the batch over data and fsdp). Do not trace the step
  under ``nn.logical_axis_rules``: flax then constrains the flattened kernels
  of the model's ``DenseGeneral`` layers with their 3-d logical names while
  checking shapes in ``apply``, which fails.

  Args:
    train_step: from ``make_train_step``.
    mesh: the device mesh.
    state_shardings: the TrainState of NamedShardings (from ``create_state``).
    batch_shardings: a NamedSharding for every batch array, or a dict of them
      (e.g. ``mesh.batch_sharding(mesh)``).
    frozen_shardings: shardings of the frozen text encoder's params; when
      given, the jitted step takes them as a 4th argument.
    compiler_options: XLA options for this program (e.g. TPU scheduler
      flags, or a lower CPU optimisation level in tests).

  Returns:
    ``step(state, batch, rng[, frozen_params]) -> (state, metrics)``; the
    metrics are replicated scalars, the rng is replicated.
  """
  replicated: NamedSharding = mesh_lib.replicated(mesh)
  in_shardings = (state_shardings, batch_shardings, replicated)
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  return jax.jit(train_step, in_shardings=in_shardings,
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                 compiler_options=dict(compiler_options) if compiler_options else None)
