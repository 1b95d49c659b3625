"""Vector quantizer of the VQ-VAE: nearest code, straight-through, EMA codebook.

Each latent vector (last axis, width ``embed_dim``) is replaced by its nearest codebook entry
in L2 distance; the entry's index is the image token. Gradients pass straight through
(``z + stop_gradient(z_q - z)``) and a commitment loss pulls the encoder towards its codes.

The codebook is learned in one of two ways, chosen by ``VectorQuantizer.ema``:

- **EMA** (``ema=True``, what VQ-Diffusion trains with). The codebook is *not* a parameter:
  it lives in the mutable collection ``"vq_stats"`` as ``codebook`` (K, D), next to the EMA
  statistics ``cluster_size`` (K,) and ``embed_avg`` (K, D), so the optimizer never sees it.
  With ``train=True`` (and the collection passed as mutable) every call does, on the batch's
  assignments ``n_k`` (counts) and ``s_k`` (sums of the vectors assigned to code k)::

      cluster_size <- decay * cluster_size + (1 - decay) * n
      embed_avg    <- decay * embed_avg    + (1 - decay) * s
      N            =  sum(cluster_size)
      smoothed     =  (cluster_size + eps) / (N + K * eps) * N      # Laplace smoothing
      codebook     =  embed_avg / smoothed[:, None]

  then restarts dead codes: every code whose ``cluster_size`` is below
  ``dead_code_threshold`` gets a random vector of the current batch (drawn with the RNG
  stream ``"vq_restart"``), its ``embed_avg`` set to that vector and its ``cluster_size`` to 1.
  The statistics start at ``cluster_size = 1``, ``embed_avg = codebook`` (a consistent state);
  the official code starts ``cluster_size`` at 0, which makes its first update divide the
  prior ``embed_avg`` by a near-zero count. The official EMA loss is the commitment term with
  weight 1; here it is weighted by ``beta`` (0.25 by default; pass 1.0 for the official).

- **Plain** (``ema=False``). The codebook is the parameter ``codebook``, trained by the
  codebook loss; the forward pass equals diffusers' ``VectorQuantizer``, including its
  ``legacy`` placement of ``beta`` (``legacy=True``: ``mse(z, sg(z_q)) + beta * mse(sg(z),
  z_q)``; ``legacy=False``: ``beta * mse(z, sg(z_q)) + mse(sg(z), z_q)``).

Distances, statistics and the returned losses are float32 whatever the compute dtype. Under
``jit`` with a batch-sharded input the EMA counts and sums are over the global batch, so
every replica applies the same update (the official code all-reduces them by hand).

Two pieces serve converted codecs: ``GumbelQuantizer`` (taming's GumbelVQ at inference:
logits over the codes, the most likely one) and ``CodeRemap`` (tokens over a compact
vocabulary of the codes a codec actually uses).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import axes

STATS = "vq_stats"
RESTART_RNG = "vq_restart"

Array = jax.Array


def nearest_codes(z: Array, codebook: Array) -> Array:
  """Index of the nearest codebook entry (L2) for every vector.

  Args:
    z: vectors, shape (..., D).
    codebook: entries, shape (K, D).

  Returns:
    int32 indices, shape ``z.shape[:-1]``; ties go to the lowest index.
  """
  flat = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  codebook = codebook.astype(jnp.float32)
  cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
  distances = (jnp.sum(flat**2, axis=-1, keepdims=True) - 2.0 * cross
               + jnp.sum(codebook**2, axis=-1)[None, :])
  return jnp.argmin(distances, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def codebook_statistics(tokens: Array, num_embeddings: int) -> dict[str, Array]:
  """Perplexity and usage of the codebook over a batch of tokens.

  Args:
    tokens: int indices of any shape.
    num_embeddings: codebook size K.

  Returns:
    ``perplexity``: ``exp(entropy)`` of the empirical code distribution (K when uniform, 1
    when one code takes everything); ``usage``: fraction of the K codes used at least once.
  """
  counts = code_counts(tokens.reshape(-1), num_embeddings)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


def code_counts(flat_tokens: Array, num_embeddings: int) -> Array:
  """How many times each of the K codes occurs in ``flat_tokens`` (N,), float32 (K,)."""
  ones = jnp.ones(flat_tokens.shape, jnp.float32)
  return jax.ops.segment_sum(ones, flat_tokens, num_segments=num_embeddings)


def ema_update(stats: dict[str, Array], flat_z: Array, flat_tokens: Array, *, decay: float,
               eps: float) -> dict[str, Array]:
  """One EMA step of the codebook statistics (formulas in the module docstring).

  Args:
    stats: ``cluster_size`` (K,), ``embed_avg`` (K, D), ``codebook`` (K, D).
    flat_z: the batch's vectors, (N, D).
    flat_tokens: their assigned codes, (N,).
    decay: EMA decay (0.99).
    eps: Laplace smoothing constant (1e-5).

  Returns:
    The new ``stats`` (same keys), float32.
  """
  num_embeddings = stats["cluster_size"].shape[0]
  counts = code_counts(flat_tokens, num_embeddings)
  sums = jax.ops.segment_sum(flat_z.astype(jnp.float32), flat_tokens,
                             num_segments=num_embeddings)
  cluster_size = decay * stats["cluster_size"] + (1.0 - decay) * counts
  embed_avg = decay * stats["embed_avg"] + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + num_embeddings * eps) * total
  return {"cluster_size": cluster_size, "embed_avg": embed_avg,
          "codebook": embed_avg / smoothed[:, None]}


def restart_dead_codes(stats: dict[str, Array], flat_z: Array, rng: Array,
                       threshold: float) -> tuple[dict[str, Array], Array]:
  """Re-initialises codes whose EMA cluster size is below ``threshold``.

  Args:
    stats: ``cluster_size``, ``embed_avg``, ``codebook`` as in ``ema_update``.
    flat_z: the batch's vectors, (N, D).
    rng: key choosing which batch vectors replace the dead codes (without replacement
      when N >= K).
    threshold: dead when ``cluster_size < threshold``.

  Returns:
    ``(stats, dead)``: the new statistics (a restarted code takes one batch vector as its
    entry and ``embed_avg``, with cluster size 1) and the boolean mask of restarted codes.
  """
  num_embeddings = stats["cluster_size"].shape[0]
  num_vectors = flat_z.shape[0]
  picks = jax.random.choice(rng, num_vectors, (num_embeddings,),
                            replace=num_vectors < num_embeddings)
  fresh = jnp.take(flat_z.astype(jnp.float32), picks, axis=0)
  dead = stats["cluster_size"] < threshold
  new_stats = {
      "cluster_size": jnp.where(dead, 1.0, stats["cluster_size"]),
      "embed_avg": jnp.where(dead[:, None], fresh, stats["embed_avg"]),
      "codebook": jnp.where(dead[:, None], fresh, stats["codebook"]),
  }
  return new_stats, dead


def ema_stats_from_codebook(codebook: Array) -> dict[str, Array]:
  """EMA statistics consistent with a given codebook (e.g. a converted plain one).

  Args:
    codebook: (K, D) entries.

  Returns:
    The quantizer's ``vq_stats`` entries: ``codebook``, ``cluster_size`` = 1,
    ``embed_avg`` = ``codebook``.
  """
  codebook = jnp.asarray(codebook, jnp.float32)
  return {"codebook": codebook, "cluster_size": jnp.ones(codebook.shape[:1], jnp.float32),
          "embed_avg": codebook}


class VectorQuantizer(nn.Module):
  """Nearest-code vector quantizer (module docstring: modes, collections, formulas).

  Attributes:
    num_embeddings: codebook size K.
    embed_dim: vector width D.
    beta: commitment weight.
    ema: EMA codebook in ``"vq_stats"`` (True) or plain codebook parameter (False).
    decay: EMA decay.
    eps: Laplace smoothing of the EMA cluster sizes.
    dead_code_threshold: EMA cluster size under which a code is restarted (0: never).
    legacy: plain mode only, diffusers' placement of ``beta``.
    dtype: dtype of the quantized output; the math is float32.
  """
  num_embeddings: int
  embed_dim: int
  beta: float = 0.25
  ema: bool = True
  decay: float = 0.99
  eps: float = 1e-5
  dead_code_threshold: float = 1.0
  legacy: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    shape = (self.num_embeddings, self.embed_dim)
    table_axes = (axes.VOCAB, axes.CODE_DIM)
    if self.ema:
      normal = lambda s: jax.random.normal(self.make_rng("params"), s, jnp.float32)
      self.codebook_var = self.variable(
          STATS, "codebook", nn.with_logical_partitioning(normal, table_axes), shape)
      self.cluster_size_var = self.variable(
          STATS, "cluster_size",
          nn.with_logical_partitioning(lambda s: jnp.ones(s, jnp.float32), (axes.VOCAB,)),
          shape[:1])
      self.embed_avg_var = self.variable(
          STATS, "embed_avg",
          nn.with_logical_partitioning(lambda s: self.codebook_var.value, table_axes), shape)
    else:
      limit = 1.0 / self.num_embeddings
      init = lambda key, s, dtype: jax.random.uniform(key, s, dtype, -limit, limit)
      self.codebook_param = self.param(
          "codebook", nn.with_logical_partitioning(init, table_axes), shape, jnp.float32)

  def codebook(self) -> Array:
    """The (K, D) float32 codebook, from ``vq_stats`` or ``params`` by mode."""
    return self.codebook_var.value if self.ema else self.codebook_param

  def tokens(self, z: Array) -> Array:
    """Nearest-code indices of ``z`` (..., D) as int32 (...)."""
    self._check_width(z)
    return nearest_codes(z, self.codebook())

  def lookup(self, tokens: Array) -> Array:
    """Codebook entries of int ``tokens`` (...) as (..., D) in ``dtype``."""
    return jnp.take(self.codebook(), tokens, axis=0).astype(self.dtype)

  def __call__(self, z: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Quantizes ``z`` (..., D).

    Args:
      z: encoder outputs, last axis ``embed_dim``.
      train: update the EMA statistics (EMA mode; needs ``"vq_stats"`` mutable and, when
        ``dead_code_threshold > 0``, the ``"vq_restart"`` RNG stream).

    Returns:
      ``(z_q, aux)``: straight-through quantized vectors in ``dtype``; ``aux`` holds
      ``loss`` (the quantizer's whole loss term), ``commitment_loss`` (its weighted
      ``mse(z, sg(z_q))`` part), ``tokens`` (int32, ``z.shape[:-1]``), ``perplexity`` and
      ``usage`` (see ``codebook_statistics``).
    """
    self._check_width(z)
    z = z.astype(jnp.float32)
    codebook = self.codebook()
    tokens = nearest_codes(z, codebook)
    z_q = jnp.take(codebook, tokens, axis=0)
    commitment = jnp.mean((z - jax.lax.stop_gradient(z_q)) ** 2)
    if self.ema:
      commitment_loss = self.beta * commitment
      loss = commitment_loss
      if train and not self.is_initializing():
        self._update_statistics(jax.lax.stop_gradient(z), tokens)
    else:
      codebook_term = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
      commitment_loss = commitment if self.legacy else self.beta * commitment
      loss = commitment_loss + (self.beta * codebook_term if self.legacy else codebook_term)
    z_q = z + jax.lax.stop_gradient(z_q - z)
    aux = {"loss": loss, "commitment_loss": commitment_loss, "tokens": tokens,
           **codebook_statistics(tokens, self.num_embeddings)}
    return z_q.astype(self.dtype), aux

  def _update_statistics(self, z: Array, tokens: Array) -> None:
    stats = {"codebook": self.codebook_var.value, "cluster_size": self.cluster_size_var.value,
             "embed_avg": self.embed_avg_var.value}
    flat_z = z.reshape(-1, self.embed_dim)
    stats = ema_update(stats, flat_z, tokens.reshape(-1), decay=self.decay, eps=self.eps)
    if self.dead_code_threshold > 0:
      stats, _ = restart_dead_codes(stats, flat_z, self.make_rng(RESTART_RNG),
                                    self.dead_code_threshold)
    self.codebook_var.value = stats["codebook"]
    self.cluster_size_var.value = stats["cluster_size"]
    self.embed_avg_var.value = stats["embed_avg"]

  def _check_width(self, z: Array) -> None:
    if z.shape[-1] != self.embed_dim:
      raise ValueError(f"VectorQuantizer expects vectors of width embed_dim={self.embed_dim} "
                       f"on the last axis, got shape {z.shape}")


class GumbelQuantizer(nn.Module):
  """taming's Gumbel quantizer at inference: logits over K codes, the most likely code's entry.

  A Dense layer (taming's 1x1 ``proj`` convolution) maps each vector (..., D) to K logits;
  the token is their argmax and its vector the row of a separate ``codebook`` (K, D)
  (taming's ``embed``). taming's own forward draws Gumbel noise before the argmax even in
  eval mode, so its tokens are a sample; ours are the mode, deterministic. No training
  objective: ``__call__`` returns a zero loss and no gradient reaches ``proj``.

  Attributes:
    num_embeddings: codebook size K.
    embed_dim: vector width D (input and codebook).
    dtype: dtype of the looked-up vectors; logits are float32.
  """
  num_embeddings: int
  embed_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    self.proj = nn.Dense(
        self.num_embeddings, dtype=jnp.float32, param_dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (axes.CODE_DIM, axes.VOCAB)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.VOCAB,)))
    self.codebook_param = self.param(
        "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                 (axes.VOCAB, axes.CODE_DIM)),
        (self.num_embeddings, self.embed_dim), jnp.float32)

  def codebook(self) -> Array:
    """The (K, D) float32 table of code vectors."""
    return self.codebook_param

  def logits(self, z: Array) -> Array:
    """float32 logits (..., K) of vectors ``z`` (..., D)."""
    if z.shape[-1] != self.embed_dim:
      raise ValueError(f"GumbelQuantizer expects vectors of width embed_dim={self.embed_dim} "
                       f"on the last axis, got shape {z.shape}")
    return self.proj(z.astype(jnp.float32))

  def tokens(self, z: Array) -> Array:
    """The most likely code of every vector of ``z`` (..., D), int32 (...)."""
    return jnp.argmax(self.logits(z), axis=-1).astype(jnp.int32)

  def lookup(self, tokens: Array) -> Array:
    """Code vectors of int ``tokens`` (...) as (..., D) in ``dtype``."""
    return jnp.take(self.codebook(), tokens, axis=0).astype(self.dtype)

  def __call__(self, z: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """``(lookup(tokens(z)), aux)`` with the aux keys of ``VectorQuantizer`` (zero losses)."""
    del train  # Nothing to update.
    tokens = self.tokens(z)
    zero = jnp.zeros((), jnp.float32)
    aux = {"loss": zero, "commitment_loss": zero, "tokens": tokens,
           **codebook_statistics(tokens, self.num_embeddings)}
    return self.lookup(tokens), aux


class CodeRemap(nn.Module):
  """Tokens over the K codes <-> a compact vocabulary of the codes a codec uses.

  VQ-Diffusion's official codecs keep only the codes seen on their training images (e.g.
  2,887 of taming's 8,192): ``full_to_compact`` (K,) sends every code to a compact index
  (unused codes to one of a used code), ``compact_to_full`` (K',) sends a compact index back
  to the first code that maps onto it. Both are int32 entries of ``params`` (never trained),
  so they travel with the weights.

  Attributes:
    num_embeddings: K.
    used_codes: K', the compact vocabulary size.
  """
  num_embeddings: int
  used_codes: int

  def setup(self):
    table = lambda fn: nn.with_logical_partitioning(fn, (None,))
    self.full_to_compact = self.param(
        "full_to_compact", table(lambda _, shape, dtype: jnp.arange(shape[0], dtype=dtype)
                                 % self.used_codes), (self.num_embeddings,), jnp.int32)
    self.compact_to_full = self.param(
        "compact_to_full", table(lambda _, shape, dtype: jnp.arange(shape[0], dtype=dtype)),
        (self.used_codes,), jnp.int32)

  def to_compact(self, tokens: Array) -> Array:
    """Full code indices -> compact token indices, int32, same shape."""
    return jnp.take(self.full_to_compact, tokens, axis=0).astype(jnp.int32)

  def to_full(self, tokens: Array) -> Array:
    """Compact token indices -> full code indices, int32, same shape."""
    return jnp.take(self.compact_to_full, tokens, axis=0).astype(jnp.int32)
