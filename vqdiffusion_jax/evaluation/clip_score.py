"""CLIP score: the CLIP image and text embeddings of a Hugging Face ``CLIPModel``, in Flax.

The image side is the ViT of ``CLIPVisionModel``: a bias-free patch
convolution, a class token and learned position embeddings, ``pre_layrnorm``,
pre-LN encoder layers (full attention, ``config.hidden_act``), and
``post_layernorm`` on the class token, then ``visual_projection`` (no bias).
The text side reuses ``CLIPTextTransformer`` (the tower VQ-Diffusion
conditions on): its final-LayerNorm state at the end-of-text token, then
``text_projection`` (no bias). The end-of-text position follows transformers:
the largest id when the config's ``eos_token_id`` is the legacy 2, else the
first position holding ``eos_token_id``.

Images are NHWC in [0, 1]. ``preprocess_images`` resizes the whole image to
the model's ``image_size`` (bicubic with antialiasing, close to the PIL
resize of ``CLIPImageProcessor``; for square images its shortest-side resize
and centre crop are the same operation), clips to [0, 1] and normalises with
CLIP's mean and std.

``clip_score`` is the torchmetrics ``CLIPScore`` per pair,
``100 * max(cos(image, text), 0)``; the reported score is its mean.

Nothing is downloaded: ``load_clip`` reads a ``CLIPModel`` directory
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) the user
supplies, and checks every key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import extras
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models import axes
from vqdiffusion_jax.models.clip_text import (
    ACTIVATIONS,
    CLIPTextTransformer,
    EncoderLayer,
    l2_normalize,
    layer_norm,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LEGACY_EOS_TOKEN_ID = 2
VISION_PREFIX = "vision_model."
_SHARED_IGNORED = ("logit_scale",)


class CLIPVisionEncoder(nn.Module):
  """CLIP's ViT image tower and ``visual_projection``: normalised pixels -> image embeds.

  Defaults are CLIP ViT-B/32's vision tower.
  """
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  image_size: int = 224
  patch_size: int = 32
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  def setup(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    positions = (self.image_size // self.patch_size) ** 2 + 1
    self.patch_embedding = nn.Conv(
        self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (*axes.CONV_KERNEL, axes.CONV_IN, axes.EMBED)))
    self.class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                        (axes.EMBED,)),
        (self.hidden_size,), jnp.float32)
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.POSITION, axes.EMBED)),
        (positions, self.hidden_size), jnp.float32)
    self.pre_norm = layer_norm(self.layer_norm_eps, self.dtype)
    self.layers = [
        EncoderLayer(self.num_heads, self.intermediate_size, self.layer_norm_eps,
                     self.activation, self.dtype, name=f"layer_{i}")
        for i in range(self.num_layers)]
    self.post_norm = layer_norm(self.layer_norm_eps, jnp.float32)
    self.visual_projection = _projection(self.projection_dim)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Embeds images.

    Args:
      pixels: ``(B, image_size, image_size, 3)``, already normalised
        (``preprocess_images``).

    Returns:
      float32 ``(B, projection_dim)``, equal to ``CLIPModel.get_image_features``.
    """
    if pixels.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"pixels must be (B, {self.image_size}, {self.image_size}, 3), got "
                       f"{pixels.shape}")
    patches = self.patch_embedding(pixels.astype(self.dtype))
    patches = patches.reshape(patches.shape[0], -1, self.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype),
                           (patches.shape[0], 1, self.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding.astype(patches.dtype)
    x = self.pre_norm(x)
    for layer in self.layers:
      x = layer(x, None)
    return self.visual_projection(self.post_norm(x[:, 0]))


class CLIPTextEncoder(nn.Module):
  """``CLIPTextTransformer`` pooled at the end-of-text token, then ``text_projection``.

  Attributes:
    text_model: the text tower.
    projection_dim: the joint embedding width.
    eos_token_id: the end-of-text id (the legacy 2 means "the largest id").
  """
  text_model: CLIPTextTransformer
  projection_dim: int = 512
  eos_token_id: int = 49407

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """Embeds token ids.

    Args:
      ids: int ``(B, L)`` with an end-of-text token in every row.

    Returns:
      float32 ``(B, projection_dim)``, equal to ``CLIPModel.get_text_features``.
    """
    hidden = self.text_model(ids)
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(hidden, eos[:, None, None], axis=1)[:, 0]
    return _projection(self.projection_dim, name="text_projection")(pooled)


def _projection(features: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(
      features, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (axes.EMBED, axes.COND_EMBED)))


@dataclasses.dataclass(frozen=True)
class CLIPEmbedder:
  """A loaded CLIP model: image and text towers with their params, and the tokenizer.

  Attributes:
    vision: the image encoder.
    vision_params: its params.
    text: the text encoder.
    text_params: its params.
    tokenizer: a ``transformers.CLIPTokenizer``, or None when the checkpoint
      directory has none (then ``embed_texts`` takes token ids only).
  """
  vision: CLIPVisionEncoder
  vision_params: Any
  text: CLIPTextEncoder
  text_params: Any
  tokenizer: Any = None

  def embed_images(self, images: jax.Array, *, preprocess: bool = True) -> jax.Array:
    """Image embeddings (not normalised).

    Args:
      images: ``(B, H, W, 3)`` in [0, 1]; or, with ``preprocess=False``,
        pixels already resized and normalised (``preprocess_images``).
      preprocess: resize and normalise first.

    Returns:
      float32 ``(B, projection_dim)``.
    """
    if preprocess:
      images = preprocess_images(images, self.vision.image_size)
    return _apply(self.vision, self.vision_params, jnp.asarray(images, jnp.float32))

  def embed_texts(self, texts: str | Sequence[str] | np.ndarray | jax.Array) -> jax.Array:
    """Text embeddings (not normalised).

    Args:
      texts: prompts (tokenized with the ``"official"`` convention, which keeps
        the end-of-text token of a too-long prompt), or int ``(B, L)`` ids.

    Returns:
      float32 ``(B, projection_dim)``.
    """
    if isinstance(texts, str) or (isinstance(texts, Sequence) and isinstance(texts[0], str)):
      if self.tokenizer is None:
        raise ValueError("this CLIP checkpoint has no tokenizer; pass token ids")
      texts = clip_convert.tokenize(self.tokenizer, texts, self.text.text_model.max_positions)
    return _apply(self.text, self.text_params, jnp.asarray(texts, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, params, inputs: jax.Array) -> jax.Array:
  return module.apply({"params": params}, inputs)


def preprocess_images(images: jax.Array, image_size: int) -> jax.Array:
  """[0, 1] NHWC images -> CLIP's normalised input (see the module docstring).

  Args:
    images: ``(B, H, W, 3)`` in [0, 1].
    image_size: the model's input size.

  Returns:
    float32 ``(B, image_size, image_size, 3)``.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
  if images.shape[1:3] != (image_size, image_size):
    shape = (images.shape[0], image_size, image_size, 3)
    images = jnp.clip(jax.image.resize(images, shape, "bicubic", antialias=True), 0.0, 1.0)
  return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """torchmetrics' CLIP score of each (image, text) pair.

  Args:
    image_embeds: ``(B, P)`` image embeddings.
    text_embeds: ``(B, P)`` embeddings of the matching texts.

  Returns:
    float32 ``(B,)``: ``100 * max(cos(image, text), 0)``.
  """
  if jnp.shape(image_embeds) != jnp.shape(text_embeds) or jnp.ndim(image_embeds) != 2:
    raise ValueError(f"expected two (B, P) arrays of one shape, got {jnp.shape(image_embeds)} "
                     f"and {jnp.shape(text_embeds)}")
  cos = jnp.sum(l2_normalize(image_embeds) * l2_normalize(text_embeds), axis=-1)
  return 100.0 * jnp.maximum(cos, 0.0)


def load_clip(path: str | os.PathLike, *, dtype=jnp.float32) -> CLIPEmbedder:
  """Reads a Hugging Face ``CLIPModel`` directory.

  Args:
    path: a directory with ``config.json`` (a ``CLIPModel`` config),
      ``model.safetensors`` or ``pytorch_model.bin``, and optionally the
      tokenizer files.
    dtype: compute dtype of the towers (params stay float32).

  Returns:
    A ``CLIPEmbedder``.

  Raises:
    FileNotFoundError: a missing directory, config or weights.
    ConversionError: weights that do not match the config, naming the keys.
  """
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no config.json in the CLIP checkpoint directory {path}")
  transformers = extras.require("transformers", f"reading the CLIP checkpoint {path}")
  config = transformers.CLIPConfig.from_pretrained(path)
  vision = CLIPVisionEncoder(dtype=dtype, **_vision_fields(config))
  tower = CLIPTextTransformer(dtype=dtype, **clip_convert.text_config(path))
  text = CLIPTextEncoder(tower, config.projection_dim, config.text_config.eos_token_id)
  state_dict = clip_convert.load_state_dict(path)
  what = f"CLIP checkpoint {path}"
  has_tokenizer = any(os.path.isfile(os.path.join(path, f))
                      for f in ("tokenizer.json", "vocab.json"))
  return CLIPEmbedder(
      vision=vision, vision_params=convert_vision(vision, state_dict, what=what),
      text=text, text_params=convert_text(text, state_dict, what=what),
      tokenizer=clip_convert.load_tokenizer(path) if has_tokenizer else None)


def _vision_fields(config) -> dict:
  vision = config.vision_config
  return {
      "hidden_size": vision.hidden_size,
      "num_layers": vision.num_hidden_layers,
      "num_heads": vision.num_attention_heads,
      "intermediate_size": vision.intermediate_size,
      "image_size": vision.image_size,
      "patch_size": vision.patch_size,
      "projection_dim": config.projection_dim,
      "layer_norm_eps": vision.layer_norm_eps,
      "activation": vision.hidden_act,
  }


def convert_vision(module: CLIPVisionEncoder, state_dict: dict[str, np.ndarray], *,
                   what: str = "CLIP checkpoint"):
  """A ``CLIPModel`` state dict's vision tower and ``visual_projection`` -> params.

  Args:
    module: the target ``CLIPVisionEncoder``.
    state_dict: ``CLIPModel`` keys to arrays (the text keys are left alone).
    what: the checkpoint's name in error messages.

  Returns:
    The params tree as float32 ``jax.Array``s.
  """
  dummy = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
  embeddings = f"{VISION_PREFIX}embeddings."
  rules = {path: rule for path, rule in clip_convert.text_rules(module, VISION_PREFIX).items()
           if path[0].startswith("layer_")}
  rules.update({
      ("patch_embedding", "kernel"): (f"{embeddings}patch_embedding.weight", common.conv),
      ("class_embedding",): (f"{embeddings}class_embedding", common.same),
      ("position_embedding",): (f"{embeddings}position_embedding.weight", common.same),
      ("pre_norm", "scale"): (f"{VISION_PREFIX}pre_layrnorm.weight", common.same),
      ("pre_norm", "bias"): (f"{VISION_PREFIX}pre_layrnorm.bias", common.same),
      ("post_norm", "scale"): (f"{VISION_PREFIX}post_layernorm.weight", common.same),
      ("post_norm", "bias"): (f"{VISION_PREFIX}post_layernorm.bias", common.same),
      ("visual_projection", "kernel"): ("visual_projection.weight", common.linear),
  })
  ignore = lambda key: (key.startswith(clip_convert.TEXT_PREFIX) or key.endswith("position_ids")
                        or key in (*_SHARED_IGNORED, "text_projection.weight"))
  params = common.assemble(abstract, rules, state_dict, what=what, ignore=ignore)
  return jax.tree.map(jnp.asarray, params)


def convert_text(module: CLIPTextEncoder, state_dict: dict[str, np.ndarray], *,
                 what: str = "CLIP checkpoint"):
  """A ``CLIPModel`` state dict's text tower and ``text_projection`` -> params.

  Args:
    module: the target ``CLIPTextEncoder``.
    state_dict: ``CLIPModel`` keys (``text_model.``-prefixed) to arrays.
    what: the checkpoint's name in error messages.

  Returns:
    The params tree as float32 ``jax.Array``s.
  """
  dummy = jax.ShapeDtypeStruct((1, module.text_model.max_positions), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
  tower_rules = clip_convert.text_rules(module.text_model, clip_convert.TEXT_PREFIX)
  rules = {("text_model", *path): rule for path, rule in tower_rules.items()}
  rules[("text_projection", "kernel")] = ("text_projection.weight", common.linear)
  ignore = lambda key: (key.startswith(VISION_PREFIX) or key.endswith("position_ids")
                        or key in (*_SHARED_IGNORED, "visual_projection.weight"))
  params = common.assemble(abstract, rules, state_dict, what=what, ignore=ignore)
  return jax.tree.map(jnp.asarray, params)
