"""Denoiser conversion: parity with diffusers' Transformer2DModel and the official model.

Official checkpoints are written the way the official solver writes them, from
``tests/official_vqdiffusion.py`` (a PyTorch statement of the official module
tree) after two optimizer steps and EMA updates, and read back through
``checkpoints.load_denoiser``; the released sizes are checked on the
statement's abstract (meta device) state dicts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.embeddings import ImagePositionalEmbeddings
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
    LearnedClassifierFreeSamplingEmbeddings,
)

from tests import official_vqdiffusion as official
from vqdiffusion_jax.convert import checkpoints, common, denoiser
from vqdiffusion_jax.models import transformer

K, SIZE, LAYERS, HEADS, HEAD_DIM, TEXT_LEN, TEXT_DIM, T = 31, 4, 2, 4, 16, 7, 24, 10
WIDTH = HEADS * HEAD_DIM
TOLERANCE = 1e-4

def _diffusers_model(seed, cross_attention_dim=TEXT_DIM, grid=None):
  torch.manual_seed(seed)
  model = Transformer2DModel(
      num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS,
      num_vector_embeds=K + 1, sample_size=SIZE, cross_attention_dim=cross_attention_dim,
      num_embeds_ada_norm=T, norm_type="ada_norm", activation_fn="geglu-approximate",
      attention_bias=True)
  if grid is not None:
    model.latent_image_embedding = ImagePositionalEmbeddings(
        num_embed=K + 1, height=grid[0], width=grid[1], embed_dim=WIDTH)
  with torch.no_grad():
    for p in model.parameters():  # move LayerNorm affines and biases off their init
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _null_text(seed):
  torch.manual_seed(seed)
  module = LearnedClassifierFreeSamplingEmbeddings(True, hidden_size=TEXT_DIM, length=TEXT_LEN)
  with torch.no_grad():
    module.embeddings.normal_()
  return module


def _inputs(num_tokens, seed=0, text=True):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, K + 1, size=(2, num_tokens))
  tokens[:, ::3] = K  # [MASK]
  t = np.array([3, T - 1])
  features = rng.normal(size=(2, TEXT_LEN, TEXT_DIM)).astype(np.float32) if text else None
  return tokens, t, features


def _reference(model, tokens, t, text):
  """diffusers log p(x_0), class-last; AdaLayerNorm takes one timestep per call."""
  rows = []
  with torch.no_grad():
    for b in range(tokens.shape[0]):
      context = None if text is None else torch.from_numpy(text[b:b + 1])
      out = model(torch.from_numpy(tokens[b:b + 1]), encoder_hidden_states=context,
                  timestep=torch.tensor(int(t[b]))).sample
      rows.append(out.numpy().transpose(0, 2, 1))
  return np.concatenate(rows)


@functools.lru_cache
def _log_probs_fn(config):
  module = transformer.VQDiffusionTransformer(config)
  return jax.jit(lambda p, *a: jax.nn.log_softmax(module.apply({"params": p}, *a), axis=-1))


def _ours(config, params, tokens, t, text):
  out = _log_probs_fn(config)(params, jnp.asarray(tokens), jnp.asarray(t), text)
  assert out.shape == (tokens.shape[0], tokens.shape[1], K) and out.dtype == jnp.float32
  return np.asarray(out)


def _assert_close(ours, reference):
  diff = np.max(np.abs(ours - reference))
  print(f"max abs diff of log-probs: {diff:.2e}")
  assert diff < TOLERANCE, f"max abs diff {diff}"


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_diffusers_pipeline_directory_matches_diffusers(tmp_path):
  model, null = _diffusers_model(0), _null_text(1)
  model.save_pretrained(tmp_path / "transformer")
  null.save_pretrained(tmp_path / denoiser.PIPELINE_NULL_TEXT)
  config, params = denoiser.load_diffusers_pipeline(str(tmp_path))
  assert config.spatial_size == (SIZE, SIZE) and config.codebook_size == K
  assert config.condition_length == TEXT_LEN and config.has_null_text
  tokens, t, text = _inputs(SIZE * SIZE)
  _assert_close(_ours(config, params, tokens, t, text), _reference(model, tokens, t, text))
  null_text = transformer.VQDiffusionTransformer(config).apply(
      {"params": params}, 3, method="null_text")
  assert null_text.shape == (3, TEXT_LEN, TEXT_DIM)
  np.testing.assert_array_equal(null_text[2], null.embeddings.detach().numpy())


@pytest.mark.parametrize("grid, text", [((3, 5), True), ((SIZE, SIZE), False)],
                         ids=["non_square_text", "unconditional"])
def test_from_diffusers_matches_diffusers(grid, text):
  model = _diffusers_model(2, cross_attention_dim=TEXT_DIM if text else None, grid=grid)
  config = denoiser.config_from_diffusers(dict(model.config), spatial_size=grid)
  assert config.conditioning == ("text" if text else "none")
  params = denoiser.from_diffusers(model.state_dict(), config)
  tokens, t, features = _inputs(grid[0] * grid[1], seed=1, text=text)
  _assert_close(_ours(config, params, tokens, t, features),
                _reference(model, tokens, t, features))


# The official model at tiny sizes: each family as the official yaml states it
# and as our config states it.
OFFICIAL_SIZES = {"n_layer": LAYERS, "n_embd": WIDTH, "n_head": HEADS, "num_embed": K,
                  "spatial_size": (SIZE, SIZE), "diffusion_step": T}
OFFICIAL_GRID = (8, 8)  # position tables bigger than the token grid, as ImageNet / FFHQ have
TINY_CLIP = {"num_embed": 64, "width": 16, "layers": 1, "heads": 2}
OUR_SIZES = {"codebook_size": K, "spatial_size": (SIZE, SIZE), "num_layers": LAYERS,
             "embed_dim": WIDTH, "num_heads": HEADS, "num_timesteps": T}
OFFICIAL_TEXT_LEN, OFFICIAL_TEXT_DIM = official.EMPTY_TEXT_SHAPE
_TEXT = {"condition_length": OFFICIAL_TEXT_LEN, "condition_dim": OFFICIAL_TEXT_DIM}
_CONV = {"mlp_type": "conv", "position_grid": OFFICIAL_GRID}
OFFICIAL_FAMILIES = {
    "text_learnable": (
        lambda: official.text_config(**OFFICIAL_SIZES, learnable_cf=True, clip=TINY_CLIP),
        transformer.TransformerConfig(**OUR_SIZES, **_TEXT)),
    "text": (
        lambda: official.text_config(**OFFICIAL_SIZES, clip=TINY_CLIP),
        transformer.TransformerConfig(**OUR_SIZES, **_TEXT, learnable_null_text=False)),
    # imagenet_learnable.pth: 1001 class rows, and an empty_text_embed nobody reads.
    "class_learnable": (
        lambda: official.class_config(**OFFICIAL_SIZES, emb_spatial_size=OFFICIAL_GRID,
                                      class_number=1001, learnable_cf=True),
        transformer.TransformerConfig(**OUR_SIZES, **_CONV, conditioning="class",
                                      learnable_null_class=True)),
    "class": (
        lambda: official.class_config(**OFFICIAL_SIZES, emb_spatial_size=OFFICIAL_GRID),
        transformer.TransformerConfig(**OUR_SIZES, **_CONV, conditioning="class",
                                      num_classes=1000)),
    "unconditional": (
        lambda: official.unconditional_config(**OFFICIAL_SIZES, emb_spatial_size=OFFICIAL_GRID),
        transformer.TransformerConfig(**OUR_SIZES, **_CONV, conditioning="none")),
}


def official_conditions(family, seed=4):
  """Condition batches to compare on. The official AdaLN decides "past the table"
  by the batch's first label, so the mean-row null (label 1000 of 1000 rows)
  comes as a batch of its own."""
  if family.startswith("text"):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, OFFICIAL_TEXT_LEN, OFFICIAL_TEXT_DIM)).astype(np.float32)]
  if family == "class_learnable":
    return [np.array([7, 1000])]
  if family == "class":
    return [np.array([7, 999]), np.array([1000, 1000])]
  return [None]


def trained_official(family, path, seed=0):
  """The official model after two AdamW steps with EMA updates, saved as the solver does.

  Returns:
    (model, ema): the DALLE-level statement and its ``official.EMA``.
  """
  torch.manual_seed(seed)
  model = official.build_model(OFFICIAL_FAMILIES[family][0]())
  ema = official.EMA(model, decay=0.9)
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=0.05, betas=(0.9, 0.96), weight_decay=4.5e-2)
  for iteration in range(2):
    for p in trainable:
      p.grad = torch.randn_like(p)
    optimizer.step()
    ema.update(iteration)
  official.save_checkpoint(path, model, ema, optimizer, last_epoch=0, last_iter=1)
  return model, ema


def official_log_probs(diffusion, tokens, t, condition):
  """The official log p(x_0 | x_t), class-last, through ``predict_start``."""
  with torch.no_grad():
    log_x_t = official.index_to_log_onehot(torch.from_numpy(tokens), diffusion.num_classes)
    if condition is None:
      cond_emb = None
    elif condition.ndim == 1:  # labels through the identity ClassEmbedding, as sample() does
      cond_emb = diffusion.condition_emb(torch.from_numpy(condition)).float()
    else:
      cond_emb = torch.from_numpy(condition)
    out = diffusion.predict_start(log_x_t, cond_emb, torch.from_numpy(t))
  return out[:, :-1].numpy().transpose(0, 2, 1)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  return {family: (str(root / f"{family}.pth"),
                   *trained_official(family, str(root / f"{family}.pth"), seed=i))
          for i, family in enumerate(OFFICIAL_FAMILIES)}


@pytest.mark.parametrize("family", list(OFFICIAL_FAMILIES))
def test_official_checkpoint_matches_the_official_log_probs(official_files, family):
  path, model, ema = official_files[family]
  config = OFFICIAL_FAMILIES[family][1]
  module, ema_params = checkpoints.load_denoiser(path, config=config)
  assert module.config == config
  _, raw_params = checkpoints.load_denoiser(path, config=config, use_ema=False)
  tokens, t, _ = _inputs(SIZE * SIZE, seed=3)
  for condition in official_conditions(family):
    want_ema = official_log_probs(ema.ema_model, tokens, t, condition)
    want_raw = official_log_probs(model.transformer, tokens, t, condition)
    assert np.max(np.abs(want_ema - want_raw)) > 1e-2  # the two weight sets differ
    _assert_close(_ours(config, ema_params, tokens, t, condition), want_ema)
    _assert_close(_ours(config, raw_params, tokens, t, condition), want_raw)
  assert ("null_text" in ema_params) == config.has_null_text
  if config.has_null_text:
    for params, diffusion in ((ema_params, ema.ema_model), (raw_params, model.transformer)):
      np.testing.assert_array_equal(params["null_text"],
                                    diffusion.empty_text_embed.detach().float().numpy())


def test_official_state_dicts_at_every_level_read_the_same_weights(official_files):
  path, _, _ = official_files["class_learnable"]
  config = OFFICIAL_FAMILIES["class_learnable"][1]
  checkpoint = torch.load(path, weights_only=True)
  want = denoiser.from_official(checkpoint, config)
  # The EMA entry alone is a DiffusionTransformer state dict.
  _assert_same_params(denoiser.from_official(checkpoint["ema"], config), want)
  inner = {k[len("transformer."):]: v for k, v in checkpoint["ema"].items()
           if k.startswith("transformer.")}
  _assert_same_params(denoiser.from_official(inner, config), want)
  scanned = denoiser.from_official(checkpoint, dataclasses.replace(config, scan_layers=True))
  _assert_same_params(transformer.unstack_layers(scanned), want)


def _expect_load_error(tmp_path, checkpoint, config, *fragments):
  path = str(tmp_path / "edited.pth")
  torch.save(checkpoint, path)
  with pytest.raises(common.ConversionError) as error:
    checkpoints.load_denoiser(path, config=config)
  for fragment in (path, *fragments):
    assert fragment in str(error.value)


def _edited(checkpoint, drop=(), **added):
  """The checkpoint without the model keys ``drop`` (in the EMA entry too), with ``added``."""
  ema = {k: v for k, v in checkpoint["ema"].items() if f"transformer.{k}" not in drop}
  model = {k: v for k, v in checkpoint["model"].items() if k not in drop}
  return checkpoint | {"model": model | added, "ema": ema}


def test_official_checkpoint_errors_name_the_key_and_the_file(official_files, tmp_path):
  path, _, _ = official_files["text_learnable"]
  config = OFFICIAL_FAMILIES["text_learnable"][1]
  checkpoint = torch.load(path, weights_only=True)
  block = "transformer.transformer.blocks.1"
  extra = {f"{block}.attn2.extra": torch.zeros(3), "transformer.unknown_buffer": torch.zeros(3)}
  _expect_load_error(tmp_path, _edited(checkpoint, **extra), config, *extra)
  missing = f"{block}.attn2.key.weight"
  _expect_load_error(tmp_path, _edited(checkpoint, drop={missing}), config, missing)
  wrong = {"transformer.transformer.to_logits.1.bias": torch.zeros(K + 1)}
  edited = _edited(checkpoint, drop=set(wrong), **wrong)
  _expect_load_error(tmp_path, edited, config, *wrong, f"({K + 1},)")
  # A mask buffer is skipped only for a block the config has.
  one_layer = dataclasses.replace(config, num_layers=1)
  _expect_load_error(tmp_path, checkpoint, one_layer, f"{block}.attn2.mask")
  no_null = dataclasses.replace(config, learnable_null_text=False)
  _expect_load_error(tmp_path, checkpoint, no_null, "transformer.empty_text_embed",
                     "learnable_null_text=False")
  null_path, _, _ = official_files["text"]
  _expect_load_error(tmp_path, torch.load(null_path, weights_only=True), config,
                     "transformer.empty_text_embed", "missing")


@functools.lru_cache
def _released_shapes(name):
  """The state dict of a released file's model at full size, as ShapeDtypeStructs.

  Built on torch's meta device (nothing allocated); the EMA entry is the
  DiffusionTransformer's state dict, as the solver saves it.
  """
  with torch.device("meta"):
    model = official.build_model(official.RELEASED[name]())
  def abstract(state):
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32 if v.is_floating_point()
                                    else np.int64) for k, v in state.items()}
  return {"model": abstract(model.state_dict()), "ema": abstract(model.transformer.state_dict())}


def _convert_abstract(name, config):
  return jax.eval_shape(functools.partial(denoiser.from_official, config=config),
                        _released_shapes(name))


# Released files by official yaml: COCO, CUB-200 and CC share config_text.yaml.
RELEASED_GROUPS = [("coco", "cub200", "cc"), ("coco_learnable", "cc_learnable"), ("ithq",),
                   ("imagenet",), ("imagenet_learnable",), ("ffhq",)]


def test_released_groups_cover_every_released_file():
  assert sorted(sum(RELEASED_GROUPS, ())) == sorted(official.RELEASED)


@pytest.mark.parametrize("names", RELEASED_GROUPS, ids=lambda names: names[0])
def test_released_checkpoints_convert_at_full_size_with_their_preset(names):
  for name in names:
    assert official.RELEASED[name]() == official.RELEASED[names[0]]()
    assert transformer.PRESETS[name] == transformer.PRESETS[names[0]]
  config = transformer.preset(names[0])
  # assemble checks every parameter's key and shape against the module's tree.
  converted = _convert_abstract(names[0], config)
  model = _released_shapes(names[0])["model"]
  inner = "transformer.transformer."
  assert converted["token_embed"]["tokens"].shape == model[f"{inner}content_emb.emb.weight"].shape
  blocks = {k.split(".")[3] for k in model if k.startswith(f"{inner}blocks.")}
  assert len(blocks) == config.num_layers
  if config.conditioning == "class":
    assert converted["block_0"]["mlp_norm"]["embedding"].shape == (
        model[f"{inner}blocks.0.ln2.emb.weight"].shape)


@pytest.mark.parametrize("name, wrong, fragments", [
    ("coco", "ithq", ("transformer.transformer.content_emb.emb.weight", "(2888, 1024)",
                      "transformer.transformer.blocks.35.ln1.emb.weight")),
    ("coco_learnable", "coco", ("transformer.empty_text_embed", "_learnable preset")),
    ("imagenet_learnable", "imagenet", ("transformer.transformer.blocks.0.ln2.emb.weight",
                                        "(1001, 512)", "(1000, 512)")),
    ("ffhq", "imagenet", ("transformer.transformer.blocks.0.ln2.weight",
                          "transformer.transformer.blocks.0.ln2.emb.weight")),
])
def test_a_wrong_preset_names_the_mismatched_keys(name, wrong, fragments):
  with pytest.raises(common.ConversionError) as error:
    _convert_abstract(name, transformer.preset(wrong))
  for fragment in fragments:
    assert fragment in str(error.value)
