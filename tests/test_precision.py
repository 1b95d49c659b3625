"""bfloat16 matmuls with float32 accumulation: exact products and cotangents, and wiring."""

import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import shapes as shapes_config
from tests.test_transformer import TINY, _inputs, _random_params
from tests.test_vqgan import PATCH
from vqdiffusion_jax import build
from vqdiffusion_jax.models import precision, transformer
from vqdiffusion_jax.models.text_encoder import TextEncoder
from vqdiffusion_jax.models.vqgan import VQGAN

# (lhs shape, rhs shape, dimension numbers): Dense, DenseGeneral out to heads and in
# from heads, both attention matmuls, and batch axes that are not leading.
CASES = [
    ((4, 5, 6), (6, 7), (((2,), (0,)), ((), ()))),
    ((4, 5, 6), (6, 3, 2), (((2,), (0,)), ((), ()))),
    ((4, 5, 3, 2), (3, 2, 7), (((2, 3), (0, 1)), ((), ()))),
    ((2, 3, 5, 4), (2, 3, 6, 4), (((3,), (3,)), ((0, 1), (0, 1)))),
    ((2, 3, 5, 6), (2, 3, 6, 4), (((3,), (2,)), ((0, 1), (0, 1)))),
    ((2, 5, 3, 4), (2, 6, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((5, 2, 4, 3), (3, 4, 2, 7), (((3, 2), (0, 1)), ((1,), (2,)))),
    # Narrowing weights (an MLP's second layer, out from heads): the cotangent goes first.
    ((4, 5, 8), (8, 3), (((2,), (0,)), ((), ()))),
    ((4, 5, 3, 2), (3, 2, 4), (((2, 3), (0, 1)), ((), ()))),
    ((4, 3, 5, 2), (2, 3, 4), (((3, 1), (0, 1)), ((), ()))),
]


def _bf16_values(rng, shape):
  """float32 values that bfloat16 holds exactly."""
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("weight_grads", precision.WEIGHT_GRAD_ORDERS)
@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", CASES)
def test_product_and_cotangents_are_float32_math_on_bfloat16_values(lhs_shape, rhs_shape, dims,
                                                                    weight_grads):
  rng = np.random.default_rng(0)
  lhs, rhs = _bf16_values(rng, lhs_shape), _bf16_values(rng, rhs_shape)
  exact = lambda a, b: lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)  # noqa: E731
  want, want_vjp = jax.vjp(exact, lhs, rhs)
  cotangent = _bf16_values(rng, want.shape)
  mixed = precision.dot_general_for("bfloat16", weight_grads)
  got, got_vjp = jax.vjp(lambda a, b: mixed(a, b, dims), lhs, rhs)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
    assert got_grad.dtype == jnp.float32 and got_grad.shape == want_grad.shape
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width,narrow", [(8, 2), (2, 8)])
def test_weight_cotangent_transposes_the_narrower_operand(width, narrow):
  x = jnp.ones((3, 5, width), jnp.float32)
  w = jnp.ones((width, narrow), jnp.float32)
  dims = (((2,), (0,)), ((), ()))
  grad = jax.grad(lambda w: jnp.sum(precision.mixed_dot_general(x, w, dims)))
  dots = [eqn for eqn in jax.make_jaxpr(grad)(w).eqns if eqn.primitive.name == "dot_general"]
  (first, second), _ = dots[-1].params["dimension_numbers"]
  assert first[0] == second[0] == 0  # contracted over the leading (token) axes
  assert dots[-1].invars[0].aval.shape[-1] == min(width, narrow)  # XLA:CPU transposes this one
  np.testing.assert_allclose(grad(w), np.full((width, narrow), 15.0))


def test_operands_and_cotangent_are_rounded_to_bfloat16():
  rng = np.random.default_rng(1)
  lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 8), (8, 5)))
  dims = (((1,), (0,)), ((), ()))
  cotangent = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  got, vjp = jax.vjp(lambda a, b: precision.mixed_dot_general(a, b, dims), lhs, rhs)
  rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  np.testing.assert_allclose(got, rounded(lhs) @ rounded(rhs), rtol=1e-6)
  assert np.abs(got - lhs @ rhs).max() > 1e-4  # the rounding is real
  lhs_grad, rhs_grad = vjp(cotangent)
  np.testing.assert_allclose(lhs_grad, rounded(cotangent) @ rounded(rhs).T, rtol=1e-6)
  np.testing.assert_allclose(rhs_grad, rounded(lhs).T @ rounded(cotangent), rtol=1e-6)


def _sub_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
  """Operand dtypes of every dot_general in a jaxpr and the jaxprs inside it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in _sub_jaxprs(eqn.params):
      found.extend(_dot_operand_dtypes(sub))
  return found


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_denoiser_matmul_runs_on_bfloat16_forward_and_backward(scan_layers):
  config = dataclasses.replace(TINY, matmul_dtype="bfloat16", pooled_text=True,
                               scan_layers=scan_layers, remat=scan_layers)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        nn.meta.unbox(transformer.abstract_params(config)))
  tokens, t, text = _inputs(config)
  module = transformer.VQDiffusionTransformer(config)
  loss = lambda p: jnp.sum(module.apply({"params": p}, tokens, t, text))  # noqa: E731
  dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  # Per block: q, k, v, scores, mix and out of two attentions, two modulations, the
  # pooled text and two MLP layers; then the head. Each has two backward products.
  blocks_traced = 1 if scan_layers else config.num_layers
  assert len(dtypes) >= 3 * (17 * blocks_traced + 1)
  assert set(dtypes) == {("bfloat16", "bfloat16")}


def test_bfloat16_matmuls_track_the_float32_model():
  _, params = _random_params(TINY)
  inputs = _inputs(TINY)
  mixed = dataclasses.replace(TINY, matmul_dtype="bfloat16")
  outputs = {}
  for name, config in (("float32", TINY), ("bfloat16", mixed)):
    module = transformer.VQDiffusionTransformer(config)
    loss = lambda p, m=module: jnp.mean(  # noqa: E731
        jax.nn.log_softmax(m.apply({"params": p}, *inputs))[..., 0])
    outputs[name] = (module.apply({"params": params}, *inputs), jax.grad(loss)(params))
  (logits32, grads32), (logits16, grads16) = outputs["float32"], outputs["bfloat16"]
  assert logits16.dtype == jnp.float32
  scale = np.abs(logits32).max()
  assert 0 < np.abs(logits16 - logits32).max() < 0.05 * scale
  flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
  largest = max(float(jnp.linalg.norm(a)) for a in flat32)
  # Key biases get no gradient at all (a softmax ignores a shift shared by a query's
  # scores): float32 leaves rounding noise there, bfloat16 more; skip such leaves.
  cosines = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
             for a, b in zip(flat32, flat16, strict=True)
             if jnp.linalg.norm(a) > 1e-4 * largest]
  assert len(cosines) > 0.8 * len(flat32) and min(cosines) > 0.99


def test_text_encoder_bfloat16_matmuls_track_float32():
  ids = jnp.asarray(np.random.default_rng(2).integers(4, 20, (2, 6)), jnp.int32)
  plain = TextEncoder(vocab_size=20, width=32, num_layers=2, num_heads=4, max_length=6)
  params = plain.init(jax.random.key(0), ids)
  mixed = dataclasses.replace(plain, matmul_dtype="bfloat16")
  want, got = plain.apply(params, ids), mixed.apply(params, ids)
  assert got.dtype == jnp.float32
  assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_unknown_matmul_dtype_is_an_error():
  with pytest.raises(ValueError, match="matmul dtype 'float16'"):
    dataclasses.replace(TINY, matmul_dtype="float16")
  with pytest.raises(ValueError, match="matmul dtype"):
    precision.dot_general_for("fp8")


# (input shape, kernel side, stride, padding): the patch tokenizer's 3 x 3, 1 x 1 and
# patch-embedding convolutions, and a strided overlapping one with "SAME" padding.
CONVS = [
    ((2, 6, 5, 4), 3, 1, ((1, 1), (1, 1))),
    ((2, 6, 5, 4), 1, 1, ((0, 0), (0, 0))),
    ((2, 16, 12, 3), 4, 4, "VALID"),
    ((1, 9, 7, 3), 3, 2, "SAME"),
]


@pytest.mark.parametrize("shape,kernel,stride,padding", CONVS)
def test_matmul_conv_equals_the_convolution_and_its_gradients(shape, kernel, stride, padding):
  rng = np.random.default_rng(3)
  images, weights = _bf16_values(rng, shape), _bf16_values(rng, (kernel, kernel, shape[-1], 5))
  numbers = lax.conv_dimension_numbers(images.shape, weights.shape, ("NHWC", "HWIO", "NHWC"))

  def reference(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=numbers,
                                    precision=lax.Precision.HIGHEST)

  conv = precision.conv_for("bfloat16")
  want, want_vjp = jax.vjp(reference, images, weights)
  got, got_vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), padding,
                                           dimension_numbers=numbers), images, weights)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cotangent = _bf16_values(rng, want.shape)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)
  assert precision.conv_for("float32") is None
  with pytest.raises(ValueError, match="dilation"):
    conv(images, weights, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=numbers)


def test_patch_tokenizer_convolutions_run_as_bfloat16_matmuls():
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  plain = VQGAN(PATCH)
  mixed = VQGAN(PATCH, matmul_dtype="bfloat16")
  variables = plain.init(jax.random.key(1), images)
  assert jax.tree.structure(mixed.init(jax.random.key(1), images)) == jax.tree.structure(
      variables)

  def loss(params, model):
    return jnp.mean(model.apply({**variables, "params": params}, images)[0] ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(variables["params"], mixed).jaxpr
  names = {eqn.primitive.name for eqn in jaxpr.eqns}
  assert "conv_general_dilated" not in names
  # 14 convolutions (patch embedding, 2 x 2 in the blocks, conv_out, quant_conv,
  # post_quant_conv, conv_in, 2 x 2 in the blocks, patch_out), three products each;
  # the quantizer's distances stay float32.
  dtypes = _dot_operand_dtypes(jaxpr)
  assert dtypes.count(("bfloat16", "bfloat16")) == 3 * 14
  want, got = plain.apply(variables, images)[0], mixed.apply(variables, images)[0]
  assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
  with pytest.raises(ValueError, match="patch VQ-VAE"):
    VQGAN(dataclasses.replace(PATCH, patch_size=0, block_out_channels=(32,),
                              norm_num_groups=8), matmul_dtype="bfloat16").init(
        jax.random.key(1), images)


@pytest.mark.parametrize("platform,flags,want", [
    ("cpu", {"avx2", "fma"}, "float32"),
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
    ("cpu", {"avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", set(), "float32"),
    ("gpu", set(), "bfloat16"),
    ("tpu", set(), "bfloat16"),
])
def test_auto_matmul_dtype_is_bfloat16_only_where_there_are_bfloat16_units(platform, flags,
                                                                          want):
  assert precision.resolve_matmul_dtype("auto", platform, frozenset(flags)) == want
  for name in precision.MATMUL_DTYPES:
    assert precision.resolve_matmul_dtype(name, platform, frozenset(flags)) == name
  with pytest.raises(ValueError, match="'float16' not in"):
    precision.resolve_matmul_dtype("float16", platform, frozenset(flags))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\n"
                     "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
  assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "amx_bf16"}
  assert precision.cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_the_trainers_resolve_auto_for_this_machine():
  config = shapes_config.get_config("runlocal")
  with config.unlocked():
    config.train.matmul_dtype = config.vqvae.train.matmul_dtype = "auto"
    config.vqvae.model.patch_size = 4
  here = precision.resolve_matmul_dtype("auto")
  assert build.denoiser_matmul_dtype(config) == here
  assert build.vqvae_module(config, training=True).matmul_dtype == here
  assert build.vqvae_module(config).matmul_dtype == "float32"  # inference
  with config.unlocked():
    config.vqvae.model.patch_size = 0
  assert build.vqvae_module(config, training=True).matmul_dtype == "float32"
