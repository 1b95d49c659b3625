"""The InceptionV3 of FID (pytorch-fid's ``fid_inception_v3``) in Flax, and its loader.

This is the network TensorFlow's FID code uses (``inception-2015-12-05``), as
pytorch-fid ports it: torchvision's InceptionV3 layout with 1008 output
classes, no auxiliary head, and three patched blocks. In ``Mixed_5b..5d``
(A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) the pool branch's 3 x 3
average pool leaves the zero padding out of its count
(``count_include_pad=False``, as TensorFlow does); in ``Mixed_7c`` (E_2) the
pool branch is a 3 x 3 max pool.

Every ``BasicConv2d`` is a bias-free convolution, a BatchNorm (eps 1e-3) in
inference mode and a ReLU. The BatchNorm is folded at load time into a per
channel ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``.

Images are NHWC in [0, 1]. As pytorch-fid does, they are resized bilinearly
(half-pixel centres, no antialiasing: ``F.interpolate(align_corners=False)``)
to 299 x 299 and mapped to [-1, 1]. The outputs are the 2048-d average-pooled
features (FID's ``pool3``) and the 1008 class logits. The Inception Score of
the papers takes its logits from ``fc`` without the bias (``unbiased_logits``,
torch-fidelity's ``logits_unbiased``); ``feature_function`` gives the pool
features and those logits, jitted, with float32 matmuls and convolutions at
full precision (no TF32 / bfloat16 passes on accelerators).
Without the resize the network accepts any size from 75 x 75 up.

Nothing is downloaded: ``load_inception`` reads the pytorch-fid weight file
(``pt_inception-2015-12-05-6726825d.pth``) or the same keys saved as
``.npz`` / ``.safetensors``, and checks every key and shape.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models import axes

FID_IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75
NUM_CLASSES = 1008
POOL_FEATURES = 2048
BN_EPS = 1e-3
# BatchNorm statistics and running parameters, in the order a state dict holds them.
BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# Buffers a torch state dict may carry that play no part at inference.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)

_CONV_AXES = (*axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)


class ConvBN(nn.Module):
  """torchvision's ``BasicConv2d`` with the BatchNorm folded: ``relu(conv(x) * scale + shift)``.

  Attributes:
    features: output channels.
    kernel: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: symmetric ``(ph, pw)`` zero padding.
    dtype: compute dtype.
  """
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
        self.features, self.kernel, self.strides,
        padding=tuple((p, p) for p in self.padding), use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32, name="conv",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES))(x)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (axes.CONV_OUT,)),
                       (self.features,), jnp.float32)
    shift = self.param("shift", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (axes.CONV_OUT,)),
                       (self.features,), jnp.float32)
    return nn.relu(x * scale.astype(self.dtype) + shift.astype(self.dtype))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3 x 3, stride 1, padding 1, averaging over the in-image pixels only (TensorFlow's)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _reduce_pool(x: jax.Array) -> jax.Array:
  """3 x 3, stride 2, unpadded max pool (the grid reductions)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """``FIDInceptionA``: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's ``InceptionB`` (``Mixed_6a``), a grid reduction: -> 480 + C_in."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _reduce_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """``FIDInceptionC``: factorised 7x7 branches and an avgpool branch -> 768."""
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    c7 = self.channels_7x7
    row = {"kernel": (1, 7), "padding": (0, 3)}
    col = {"kernel": (7, 1), "padding": (3, 0)}
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's ``InceptionD`` (``Mixed_7a``), a grid reduction: -> 512 + C_in."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _reduce_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """``FIDInceptionE_1`` (``pool="avg"``) or ``FIDInceptionE_2`` (``pool="max"``) -> 2048."""
  pool: str = "avg"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', not {self.pool!r}")
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    row = {"kernel": (1, 3), "padding": (0, 1)}
    col = {"kernel": (3, 1), "padding": (1, 0)}
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)]
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [conv(384, **row, name="branch3x3dbl_3a")(bd),
          conv(384, **col, name="branch3x3dbl_3b")(bd)]
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID InceptionV3, from [0, 1] images to pool features and class logits.

  Attributes:
    num_classes: output classes (1008 for the TensorFlow FID weights).
    dtype: compute dtype of the convolutions; pooling and ``fc`` run in float32.
  """
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *,
               resize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs the network.

    Args:
      images: ``(B, H, W, 3)`` in [0, 1].
      resize: resize to 299 x 299 first (pytorch-fid's ``resize_input``); without
        it H and W must be at least 75. A Python bool: bind it with
        ``functools.partial`` before ``jax.jit``.

    Returns:
      ``(pool_features, logits)``: float32 ``(B, 2048)`` and ``(B, num_classes)``.
    """
    x = preprocess(images, resize).astype(self.dtype)
    conv = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    x = conv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = _reduce_pool(conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x))
    x = conv(80, name="Conv2d_3b_1x1")(x)
    x = _reduce_pool(conv(192, (3, 3), name="Conv2d_4a_3x3")(x))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, self.dtype, name=name)(x)
    x = InceptionB(self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, self.dtype, name=name)(x)
    x = InceptionD(self.dtype, name="Mixed_7a")(x)
    x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)
    x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="fc",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (axes.EMBED, axes.VOCAB)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.VOCAB,)))(pool)
    return pool, logits


def preprocess(images: jax.Array, resize: bool = True) -> jax.Array:
  """[0, 1] NHWC images -> the network's [-1, 1] input, resized to 299 x 299 if asked.

  Args:
    images: ``(B, H, W, 3)`` in [0, 1].
    resize: resize bilinearly without antialiasing, like
      ``F.interpolate(mode="bilinear", align_corners=False)``.

  Returns:
    float32 ``(B, 299, 299, 3)`` (or ``(B, H, W, 3)``) in [-1, 1].
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
  if resize:
    shape = (images.shape[0], FID_IMAGE_SIZE, FID_IMAGE_SIZE, 3)
    images = jax.image.resize(images, shape, "bilinear", antialias=False)
  elif min(images.shape[1:3]) < MIN_IMAGE_SIZE:
    raise ValueError(f"without resizing the images must be at least {MIN_IMAGE_SIZE} x "
                     f"{MIN_IMAGE_SIZE}, got {images.shape[1]} x {images.shape[2]}")
  return 2.0 * images - 1.0


def unbiased_logits(params: Any, pool: jax.Array) -> jax.Array:
  """``pool @ fc.weight.T`` without ``fc.bias``: the Inception Score's logits.

  Args:
    params: the network's params (``fc/kernel`` is read).
    pool: ``(B, 2048)`` pool features.

  Returns:
    float32 ``(B, num_classes)``.
  """
  return jnp.dot(pool, params["fc"]["kernel"], precision=jax.lax.Precision.HIGHEST)


def feature_function(module: FIDInceptionV3, params: Any
                     ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Jitted ``[0, 1]`` NHWC images -> ``(pool features, unbiased logits)``.

  Args:
    module: the network (``load_inception``).
    params: its params.

  Returns:
    A function of ``(B, H, W, 3)`` images giving float32 ``(B, 2048)`` and
    ``(B, num_classes)``, traced and run at ``"highest"`` matmul precision.
  """
  def features(p, images):
    pool, _ = module.apply({"params": p}, images)
    return pool, unbiased_logits(p, pool)

  jitted = jax.jit(features)

  def run(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    with jax.default_matmul_precision("highest"):
      return jitted(params, images)
  return run


def abstract_params(module: nn.Module | None = None, image_size: int = MIN_IMAGE_SIZE,
                    in_channels: int = 3) -> dict:
  """The params tree of ``module`` (by default ``FIDInceptionV3()``) as shapes, boxes included.

  Args:
    module: any module of this file (a whole network or one block).
    image_size: the spatial size of the dummy input.
    in_channels: the dummy input's channels (3 for the network, C_in for a block).

  Returns:
    ``jax.eval_shape`` of the init's ``params``.
  """
  module = FIDInceptionV3() if module is None else module
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  init = module.init
  if isinstance(module, FIDInceptionV3):
    init = functools.partial(module.init, resize=False)
  return jax.eval_shape(init, jax.random.key(0), dummy)["params"]


def state_dict_template(abstract: Any = None) -> dict[str, tuple[int, ...]]:
  """The PyTorch key -> shape layout that a params tree converts from.

  Args:
    abstract: a tree from ``abstract_params`` (default: the whole network).

  Returns:
    ``{key: shape}`` in pytorch-fid's layout, e.g. ``Mixed_5b.branch1x1.conv.weight``
    ``(64, 192, 1, 1)``, ``Mixed_5b.branch1x1.bn.running_var`` ``(64,)``,
    ``fc.weight`` ``(1008, 2048)``; ``num_batches_tracked`` buffers are left out
    (they are accepted and ignored).
  """
  abstract = abstract_params() if abstract is None else abstract
  template = {}
  for path, leaf in _flat(abstract).items():
    shape = tuple(leaf.shape)
    prefix = ".".join(path[:-1])
    if path[-1] == "kernel" and path[-2] == "conv":
      template[prefix + ".weight"] = (shape[3], shape[2], shape[0], shape[1])
    elif path[-1] == "kernel":
      template[prefix + ".weight"] = (shape[1], shape[0])
    elif path[-1] == "bias":
      template[prefix + ".bias"] = shape
    elif path[-1] == "scale":
      template.update({f"{prefix}.bn.{name}": shape for name in BN_KEYS})
    elif path[-1] != "shift":
      raise ValueError(f"no PyTorch layout for the parameter {'/'.join(path)}")
  return template


def check_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, tuple[int, ...]],
                     *, what: str = "Inception checkpoint") -> None:
  """Raises ``ConversionError`` naming missing, unexpected and misshapen keys, all at once.

  Args:
    state_dict: PyTorch keys to arrays or tensors.
    template: the expected ``{key: shape}`` (``state_dict_template``).
    what: a name for the checkpoint in error messages.
  """
  problems = []
  missing = sorted(k for k in template if k not in state_dict)
  if missing:
    problems.append(f"keys missing from the {what}: {missing}")
  unexpected = sorted(k for k in state_dict
                      if k not in template and not k.endswith(_OPTIONAL_SUFFIXES))
  if unexpected:
    problems.append(f"unexpected keys in the {what}: {unexpected}")
  wrong = [f"{k}: {tuple(np.shape(state_dict[k]))}, expected {template[k]}"
           for k in sorted(template) if k in state_dict
           and tuple(np.shape(state_dict[k])) != template[k]]
  if wrong:
    problems.append(f"shape mismatches in the {what}: {wrong}")
  if problems:
    raise common.ConversionError(f"{what} does not match the FID Inception:\n  "
                                 + "\n  ".join(problems))


def params_from_state_dict(state_dict: Mapping[str, Any], abstract: Any = None, *,
                           what: str = "Inception checkpoint") -> dict:
  """Checks a pytorch-fid state dict and converts it, folding every BatchNorm.

  Args:
    state_dict: PyTorch keys to arrays or tensors (the layout of ``state_dict_template``).
    abstract: the target tree (default: the whole network); a block's tree
      converts a block's state dict (keys without the block prefix).
    what: a name for the checkpoint in error messages.

  Returns:
    The params tree as float32 NumPy arrays.

  Raises:
    ConversionError: missing, unexpected or misshapen keys, named.
  """
  abstract = abstract_params() if abstract is None else abstract
  check_state_dict(state_dict, state_dict_template(abstract), what=what)
  source = common.to_numpy(state_dict)
  out = {}
  for path in _flat(abstract):
    prefix = ".".join(path[:-1])
    if path[-1] == "kernel":
      transform = common.conv if path[-2] == "conv" else common.linear
      out[path] = transform(source[prefix + ".weight"])
    elif path[-1] == "bias":
      out[path] = source[prefix + ".bias"]
    else:
      scale, shift = fold_batch_norm(*(source[f"{prefix}.bn.{name}"] for name in BN_KEYS))
      out[path] = scale if path[-1] == "scale" else shift
  out = {path: np.asarray(value, np.float32) for path, value in out.items()}
  return flax.traverse_util.unflatten_dict(out)


def fold_batch_norm(weight, bias, mean, var, eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
  """Inference BatchNorm as ``x * scale + shift`` (computed in float64).

  Returns:
    ``(scale, shift)`` with ``scale = weight / sqrt(var + eps)`` and
    ``shift = bias - mean * scale``.
  """
  weight, bias, mean, var = (np.asarray(v, np.float64) for v in (weight, bias, mean, var))
  scale = weight / np.sqrt(var + eps)
  return scale, bias - mean * scale


def load_inception(path: str | os.PathLike) -> tuple[FIDInceptionV3, dict]:
  """Reads the FID Inception weights from a user-supplied file.

  Args:
    path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with
      ``torch.load(weights_only=True)``), or the same keys in a ``.npz`` or
      ``.safetensors`` file.

  Returns:
    ``(module, params)``: ``FIDInceptionV3()`` and its float32 params; run it as
    ``module.apply({"params": params}, images)``.

  Raises:
    FileNotFoundError: no such file (nothing is downloaded).
    ConversionError: missing, unexpected or misshapen keys, named.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"FID Inception weight file not found: {path!r}. Weights are not downloaded; supply "
        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its keys as .npz / "
        ".safetensors).")
  module = FIDInceptionV3()
  return module, params_from_state_dict(common.read_weights(path),
                                        what=f"Inception checkpoint {path}")


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(tree)))
