"""The train state, the optimizer, EMA, and creating the state sharded from birth.

One state type for every trainer (``TrainState``): step, params, opt_state,
ema_params, the importance sampler's loss history, and ``extra`` for
mutable collections (a quantizer's ``vq_stats``). No RNG lives in it; steps
fold the step number into a key they are given.

The optimizer of every trainer is ``make_optimizer``: Adam (AdamW with
masked weight decay when the config asks for decay; the denoiser's official
one has betas (0.9, 0.96) and decay 0.045) after global-norm clipping, with
the warmup + decay ``learning_rate_schedule``.

``create_state`` never materialises anything on one device first: the init
is traced with ``jax.eval_shape``, its logical axis annotations become
``NamedSharding``s (``mesh.logical_shardings``), and the init runs under
``jax.jit(..., out_shardings=...)`` so every device builds only its shard.
``abstract_state`` gives the same tree as ShapeDtypeStructs with shardings,
the target an Orbax restore fills.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from vqdiffusion_jax.diffusion import importance
from vqdiffusion_jax.train import mesh as mesh_lib

DECAYS = ("cosine", "linear", "constant")
# Only matrices and convolution kernels decay (the official minGPT-style split:
# Linear weights decay; biases, LayerNorm scales, embedding and position
# tables, and the learnable null text do not). Flax names every Dense /
# DenseGeneral / Conv weight "kernel" and nothing else.
DECAYED_NAMES = ("kernel",)


@struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: the trainable parameters (unboxed).
    opt_state: the optimizer's state for ``params``.
    ema_params: exponential moving average of ``params``.
    loss_history: the importance sampler's per-timestep statistics (diffusion
      trainers), or None.
    extra: other variable collections the model updates while training (e.g.
      ``{"vq_stats": ...}``), not touched by the optimizer.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  loss_history: importance.LossHistory | None = None
  extra: dict = struct.field(default_factory=dict)


def learning_rate_schedule(optim_config: Any, num_steps: int) -> Callable[[Any], jax.Array]:
  """The learning rate per step: linear warmup, then decay to ``min_lr_ratio``.

  ``lr(s) = peak * (s + 1) / W`` for ``s < W`` (the first step already moves;
  step ``W - 1`` reaches the peak); afterwards, with ``p = (s - W) /
  (num_steps - W)`` clipped to [0, 1] and ``m = min_lr_ratio``:
  cosine ``peak * (m + (1 - m) * (1 + cos(pi p)) / 2)``, linear ``peak * (1 -
  (1 - m) p)``, constant ``peak``.

  Args:
    optim_config: ``config.optim`` (learning_rate, warmup_steps, decay,
      min_lr_ratio).
    num_steps: total training steps (the decay ends there).

  Returns:
    ``schedule(step) -> float32 learning rate``, usable by optax and for logging.
  """
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  decay = optim_config.decay
  floor = float(optim_config.min_lr_ratio)
  if decay not in DECAYS:
    raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
  if warmup < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
  decay_steps = max(num_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if decay == "cosine":
      factor = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif decay == "linear":
      factor = 1.0 - (1.0 - floor) * progress
    else:
      factor = jnp.ones_like(progress)
    return jnp.where(step < warmup, warm, peak * factor)

  return schedule


def _leaf_value(leaf: Any) -> Any:
  return leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def decay_mask(params: Any) -> Any:
  """Which parameters get weight decay: those named in ``DECAYED_NAMES``, ndim >= 2.

  Args:
    params: a params tree, boxed (logical partitioning) or not.

  Returns:
    A tree of bools, one per parameter (per box for boxed trees).
  """
  def rule(path, leaf):
    name = getattr(path[-1], "key", None) if path else None
    return name in DECAYED_NAMES and jnp.ndim(_leaf_value(leaf)) >= 2

  return jax.tree.map_with_path(rule, params,
                                is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam (AdamW with masked weight decay) on the lr schedule.

  Args:
    optim_config: an ``optim`` section: learning_rate, b1, b2, weight_decay
      (0: plain Adam), warmup_steps, decay, min_lr_ratio, clip_norm (<= 0: no
      clipping).
    num_steps: total training steps.

  Returns:
    The optax transformation. Gradients are clipped before Adam's moments see
    them; decay applies to ``decay_mask`` parameters only.
  """
  rate = learning_rate_schedule(optim_config, num_steps)
  b1, b2 = float(optim_config.b1), float(optim_config.b2)
  weight_decay = float(optim_config.weight_decay)
  adam = (optax.adamw(rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
          if weight_decay > 0 else optax.adam(rate, b1=b1, b2=b2))
  clip_norm = float(optim_config.clip_norm)
  if clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam)
  return adam


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """``decay * ema + (1 - decay) * params``, leaf by leaf.

  Args:
    ema: the running average (a params tree).
    params: the new parameters.
    decay: in [0, 1]; 0 copies ``params``.

  Returns:
    The updated average, in ``ema``'s dtypes.
  """
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def _unbox(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _boxed_init(init_fn: Callable[[jax.Array], Mapping[str, Any]],
                optimizer: optax.GradientTransformation,
                history_timesteps: int | None) -> Callable[[jax.Array], TrainState]:
  """``rng -> TrainState`` whose leaves keep the init's partitioning boxes.

  The optimizer is initialised on the boxed params, so its moments carry the
  same logical axes as the parameters they follow.
  """
  def init(rng):
    variables = dict(init_fn(rng))
    params = variables.pop("params")
    history = (None if history_timesteps is None
               else importance.LossHistory.create(history_timesteps))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), ema_params=params,
                      loss_history=history, extra=variables)

  return init


def state_shardings(rng: jax.Array, init_fn: Callable, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: Sequence[Sequence[Any]], *,
                    history_timesteps: int | None = None) -> TrainState:
  """The NamedSharding of every leaf of the state ``create_state`` would build.

  Args:
    rng: a PRNG key (only its type matters).
    init_fn: ``rng -> variables`` (e.g. ``lambda r: model.init(r, *inputs)``),
      whose leaves carry logical partitioning.
    optimizer: the optax transformation.
    mesh: the device mesh.
    rules: logical name -> mesh axes (``config.mesh.rules``).
    history_timesteps: T for a loss history, or None for none.

  Returns:
    A TrainState of NamedShardings.
  """
  boxed = jax.eval_shape(_boxed_init(init_fn, optimizer, history_timesteps), rng)
  return mesh_lib.logical_shardings(boxed, mesh, rules)


def abstract_state(rng: jax.Array, init_fn: Callable, optimizer: optax.GradientTransformation,
                   mesh: Mesh, rules: Sequence[Sequence[Any]], *,
                   history_timesteps: int | None = None) -> TrainState:
  """The state as ShapeDtypeStructs carrying their shardings (an Orbax restore target).

  Args:
    rng, init_fn, optimizer, mesh, rules, history_timesteps: as ``create_state``.

  Returns:
    A TrainState of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``;
    nothing is allocated.
  """
  boxed = jax.eval_shape(_boxed_init(init_fn, optimizer, history_timesteps), rng)
  shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding), _unbox(boxed), shardings)


def create_state(rng: jax.Array, init_fn: Callable, optimizer: optax.GradientTransformation,
                 mesh: Mesh, rules: Sequence[Sequence[Any]], *,
                 history_timesteps: int | None = None) -> tuple[TrainState, TrainState]:
  """Initialises the train state directly in its sharded layout.

  Args:
    rng: the init key.
    init_fn: ``rng -> variables`` with a "params" collection (boxed with
      logical axes) and optionally others, which go to ``state.extra``.
    optimizer: the optax transformation.
    mesh: the device mesh.
    rules: logical name -> mesh axes (``config.mesh.rules``).
    history_timesteps: T to create an importance-sampling loss history.

  Returns:
    ``(state, shardings)``: the state, every leaf already laid out by its
    sharding, and the TrainState of NamedShardings (the train step's in/out
    shardings).
  """
  boxed_init = _boxed_init(init_fn, optimizer, history_timesteps)
  shardings = mesh_lib.logical_shardings(jax.eval_shape(boxed_init, rng), mesh, rules)
  init = jax.jit(lambda key: _unbox(boxed_init(key)), out_shardings=shardings)
  return init(rng), shardings


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of every leaf together, computed in float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
