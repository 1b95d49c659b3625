"""The official VQ-Diffusion image codecs: taming GumbelVQ / VQModel checkpoints, configs and
token remaps, and ITHQ's PatchVQGAN, converted and checked against PyTorch statements of the
official code."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the official spelling)
import yaml

from tests import official_patch_vqgan as patch_official
from tests import official_taming as official
from vqdiffusion_jax.convert import checkpoints, converted
from vqdiffusion_jax.convert import vqvae as vqvae_convert
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.models.vqgan import VQGAN

# Tiny taming configs (taming's GroupNorm has 32 groups, so widths are multiples of 32).
GUMBEL_DD = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3,
             "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
             "attn_resolutions": [4], "dropout": 0.0}
VQ_DD = {**GUMBEL_DD, "ch_mult": [1, 2], "attn_resolutions": [8], "z_channels": 8}
N_EMBED, USED = 64, 20
GUMBEL_TARGET = "image_synthesis.taming.models.vqgan.GumbelVQ"
VQ_TARGET = "image_synthesis.taming.models.vqgan.VQModel"
NET2NET_TARGET = "image_synthesis.taming.models.cond_transformer.Net2NetTransformer"


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random weights everywhere, norms included; spread codebooks (no near ties)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (1.0 if "embed" in name else 0.05))
  return model.eval()


def _remap(seed: int) -> torch.Tensor:
  """A remap as the official files are: K int64 entries covering 0..USED-1."""
  generator = torch.Generator().manual_seed(seed)
  values = torch.cat([torch.arange(USED), torch.randint(0, USED, (N_EMBED - USED,),
                                                        generator=generator)])
  return values[torch.randperm(N_EMBED, generator=generator)]


def _model_yaml(target: str, ddconfig: dict, embed_dim: int) -> dict:
  params = {"embed_dim": embed_dim, "n_embed": N_EMBED, "ddconfig": ddconfig,
            "lossconfig": {"target": "image_synthesis.taming.modules.losses.vqperceptual."
                                     "DummyLoss"}}
  if target == GUMBEL_TARGET:
    params |= {"kl_weight": 1e-8, "temperature_scheduler_config": {
        "target": "image_synthesis.taming.lr_scheduler.LambdaWarmUpCosineScheduler",
        "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                   "lr_max": 0.9, "lr_min": 1e-6}}}
  return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}


def _write(path, value):
  if str(path).endswith(".yaml"):
    path.write_text(yaml.safe_dump(value))
  else:
    torch.save(value, path)
  return str(path)


def _jitted(module: VQGAN):
  return (jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")),
          jax.jit(lambda p, t: module.apply({"params": p}, t, method="decode")))


def _mode_gumbel_softmax(logits, tau=1.0, hard=False, dim=-1):
  """``F.gumbel_softmax`` without the noise: the hard one-hot of the argmax."""
  del tau, hard
  return F.one_hot(logits.argmax(dim), logits.shape[dim]).movedim(-1, dim).float()


def _images(seed: int, size: int = 16) -> torch.Tensor:
  return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def _ours(images: torch.Tensor) -> np.ndarray:
  """The official preprocessing (``/255``, ``2x - 1``) as our NHWC input."""
  return (2 * images.div(255) - 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def gumbel(tmp_path_factory):
  """A COCO-style codec: GumbelVQ with loss keys, its YAML and a 2887-style remap."""
  root = tmp_path_factory.mktemp("gumbel")
  model = _perturb(official.GumbelVQ(GUMBEL_DD, N_EMBED, embed_dim=8), seed=0)
  remap = _remap(1)
  files = {"checkpoint": _write(root / "last.pth", {"state_dict": model.state_dict()}),
           "config": _write(root / "gumbel.yaml", _model_yaml(GUMBEL_TARGET, GUMBEL_DD, 8)),
           "remap": _write(root / "remap.pt", remap)}
  module, params = vqvae_convert.load_official_codec(files["checkpoint"], files["config"],
                                                     files["remap"])
  codec = official.TamingCodec(model, [4, 4], quantize_number=USED, full_to_quantize=remap)
  return {"model": model, "codec": codec, "full_to_quantize": remap, "module": module,
          "params": params,
          "root": root, "functions": _jitted(module), **files}


def _check_parity(codec, params, functions, images, monkeypatch=None, used=USED):
  """Tokens equal the official codec's (remapped); decoding them matches to 1e-4."""
  encode, decode = functions
  if monkeypatch is not None:
    monkeypatch.setattr(F, "gumbel_softmax", _mode_gumbel_softmax)
  expected = codec.get_tokens(images)["token"].numpy()
  tokens = np.asarray(encode(params, _ours(images)))
  np.testing.assert_array_equal(tokens.reshape(len(tokens), -1), expected)
  random_tokens = torch.randint(0, used, expected.shape, generator=torch.Generator()
                                .manual_seed(3))
  for sequence in (torch.from_numpy(expected), random_tokens):
    reference = codec.decode(sequence).permute(0, 2, 3, 1).numpy() / 255
    grid = sequence.numpy().reshape(len(sequence), *codec.token_shape)
    ours = np.clip(np.asarray(decode(params, jnp.asarray(grid))), -1, 1)
    np.testing.assert_allclose((ours + 1) / 2, reference, atol=1e-4)
  return tokens


def test_gumbel_codec_gives_the_official_mode_tokens_and_images(gumbel, monkeypatch):
  tokens = _check_parity(gumbel["codec"], gumbel["params"], gumbel["functions"], _images(0),
                         monkeypatch)
  assert tokens.max() < USED and len(np.unique(tokens)) > 4


def test_gumbel_decoder_matches_before_the_clamp(gumbel):
  full = gumbel["codec"].quantize_to_full
  tokens = torch.randint(0, USED, (2, 4, 4), generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    z = gumbel["model"].quantize.get_codebook_entry(full[tokens].reshape(-1), (2, 4, 4, -1))
    reference = gumbel["model"].decode(z).permute(0, 2, 3, 1).numpy()
  ours = gumbel["functions"][1](gumbel["params"], jnp.asarray(tokens.numpy()))
  assert np.abs(reference).max() > 1.0  # the clamp would hide differences here
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)


def test_gumbel_logits_argmax_and_forward_tokens(gumbel):
  images = _images(1)
  with torch.no_grad():
    h = gumbel["model"].quant_conv(gumbel["model"].encoder(2 * images.div(255) - 1))
    full = gumbel["model"].quantize.proj(h).argmax(1).numpy()
  _, aux = gumbel["module"].apply({"params": gumbel["params"]}, _ours(images))
  np.testing.assert_array_equal(aux["tokens"], gumbel["full_to_quantize"].numpy()[full])
  remap = gumbel["params"]["remap"]
  np.testing.assert_array_equal(remap["full_to_compact"], gumbel["full_to_quantize"].numpy())
  np.testing.assert_array_equal(remap["compact_to_full"], gumbel["codec"].quantize_to_full)
  assert remap["full_to_compact"].dtype == np.int32


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """An ImageNet-style codec: VQModel (nearest code) with loss keys and a 974-style remap."""
  root = tmp_path_factory.mktemp("imagenet")
  model = _perturb(official.VQModel(VQ_DD, N_EMBED, embed_dim=4), seed=2)
  remap = _remap(4)
  module, params = vqvae_convert.load_official_codec(
      _write(root / "vq.pth", {"state_dict": model.state_dict()}),
      _write(root / "vq.yaml", _model_yaml(VQ_TARGET, VQ_DD, 4)), _write(root / "974.pt", remap))
  codec = official.TamingCodec(model, [8, 8], quantize_number=USED, full_to_quantize=remap)
  return {"codec": codec, "module": module, "params": params, "functions": _jitted(module)}


def test_vqmodel_codec_with_remap_gives_the_official_tokens_and_images(imagenet):
  assert not imagenet["module"].config.gumbel
  assert imagenet["module"].config.vocabulary_size == USED
  _check_parity(imagenet["codec"], imagenet["params"], imagenet["functions"], _images(2))


def test_ffhq_net2net_checkpoint_keys_under_first_stage_model(tmp_path):
  model = _perturb(official.VQModel(VQ_DD, N_EMBED, embed_dim=4, with_loss=False), seed=6)
  net2net = official.Net2NetTransformer(model)
  config = {"model": {"target": NET2NET_TARGET, "params": {
      "cond_stage_config": "__is_unconditional__", "first_stage_key": "image",
      "first_stage_config": _model_yaml(VQ_TARGET, VQ_DD, 4)["model"]}}}
  checkpoint = _write(tmp_path / "ffhq.pth", {"state_dict": net2net.state_dict()})
  module, params = vqvae_convert.load_official_codec(checkpoint,
                                                     _write(tmp_path / "ffhq.yaml", config))
  assert module.config.used_codes == 0 and "remap" not in params
  _check_parity(official.TamingCodec(model, [8, 8]), params, _jitted(module), _images(3),
                used=N_EMBED)


def test_codec_keys_inside_an_official_model_checkpoint(gumbel, tmp_path):
  dalle = official.DALLE(gumbel["codec"])
  keys = dalle.state_dict().keys()
  assert "content_codec.enc.quantize.proj.weight" in keys
  assert "content_codec.dec.quantize.embed.weight" in keys
  checkpoint = _write(tmp_path / "coco.pth", {"model": dalle.state_dict(), "last_epoch": 3})
  _, params = vqvae_convert.load_official_codec(checkpoint, gumbel["config"], gumbel["remap"])
  jax.tree.map(np.testing.assert_array_equal, params, gumbel["params"])


def test_a_decoder_quantizer_unlike_the_encoders_is_an_error(gumbel, tmp_path):
  state = official.DALLE(gumbel["codec"]).state_dict()
  state["content_codec.dec.quantize.embed.weight"] = state[
      "content_codec.dec.quantize.embed.weight"] + 1
  checkpoint = _write(tmp_path / "odd.pth", {"model": state})
  with pytest.raises(ConversionError, match=r"odd\.pth.*content_codec\.dec\.quantize\.embed"):
    vqvae_convert.load_official_codec(checkpoint, gumbel["config"], gumbel["remap"])


def test_wrong_code_count_is_named(gumbel, tmp_path):
  config = _model_yaml(GUMBEL_TARGET, GUMBEL_DD, 8)
  config["model"]["params"]["n_embed"] = 2 * N_EMBED
  path = _write(tmp_path / "big.yaml", config)
  with pytest.raises(ConversionError, match=rf"last\.pth.*{N_EMBED} codes.*big\.yaml.*"
                                            rf"n_embed={2 * N_EMBED}"):
    vqvae_convert.load_official_codec(gumbel["checkpoint"], path)


def test_missing_keys_are_named_with_the_file(gumbel, tmp_path):
  state = gumbel["model"].state_dict()
  del state["decoder.up.0.block.1.conv2.weight"]
  checkpoint = _write(tmp_path / "cut.pth", {"state_dict": state})
  with pytest.raises(ConversionError, match=r"cut\.pth(.|\n)*decoder\.up\.0\.block\.1\.conv2"):
    vqvae_convert.load_official_codec(checkpoint, gumbel["config"], gumbel["remap"])


def test_bad_remaps_are_named(gumbel, tmp_path):
  short = _write(tmp_path / "short.pt", gumbel["full_to_quantize"][:N_EMBED // 2])
  with pytest.raises(ConversionError, match=rf"short\.pt has {N_EMBED // 2} entries.*"
                                            rf"n_embed={N_EMBED}"):
    vqvae_convert.load_official_codec(gumbel["checkpoint"], gumbel["config"], short)
  gap = _write(tmp_path / "gap.pt", torch.where(gumbel["full_to_quantize"] == 3, 4,
                                              gumbel["full_to_quantize"]))
  with pytest.raises(ConversionError, match=r"gap\.pt.*misses \[3\]"):
    vqvae_convert.load_official_codec(gumbel["checkpoint"], gumbel["config"], gap)
  floats = _write(tmp_path / "floats.pt", gumbel["full_to_quantize"].float())
  with pytest.raises(ConversionError, match=r"floats\.pt.*integer"):
    vqvae_convert.load_official_codec(gumbel["checkpoint"], gumbel["config"], floats)


def test_unknown_configs_and_missing_files_are_named(gumbel, tmp_path):
  config = _model_yaml(GUMBEL_TARGET, GUMBEL_DD, 8)
  config["model"]["target"] = "image_synthesis.modeling.models.dalle.DALLE"
  path = _write(tmp_path / "dalle.yaml", config)
  with pytest.raises(ConversionError, match=r"dalle\.yaml.*DALLE"):
    vqvae_convert.load_official_codec(gumbel["checkpoint"], path)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    vqvae_convert.load_official_codec(tmp_path / "nope.pth", gumbel["config"])
  empty = _write(tmp_path / "empty.pth", {"state_dict": {"transformer.weight": torch.ones(2)}})
  with pytest.raises(ConversionError, match=r"empty\.pth holds no image codec"):
    vqvae_convert.load_official_codec(empty, gumbel["config"])


def test_converted_directory_keeps_the_remap(gumbel, tmp_path):
  module, params = checkpoints.load_vqvae(gumbel["checkpoint"], config_yaml=gumbel["config"],
                                          remap=gumbel["remap"])
  jax.tree.map(np.testing.assert_array_equal, params, gumbel["params"])
  config = json.loads(json.dumps(dataclasses.asdict(module.config)))
  converted.save(tmp_path / "codec", {"vqvae": (config, params)}, source="test")
  loaded, restored = checkpoints.load_vqvae(tmp_path / "codec")
  assert loaded.config == module.config
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  assert restored["remap"]["full_to_compact"].dtype == np.int32
  images = _ours(_images(4))
  np.testing.assert_array_equal(_jitted(loaded)[0](restored, images),
                                gumbel["functions"][0](params, images))
  with pytest.raises(ValueError, match=r"last\.pth.*config YAML"):
    checkpoints.load_vqvae(gumbel["checkpoint"])


# The real configs (OUTPUT/pretrained_model/taming_dvae/*.yaml): COCO / CUB / CC and ImageNet.
F8_DD = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
         "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
         "dropout": 0.0}
FULL_SIZE = {"f8_gumbel_8192": (F8_DD, 8192, 256, True),
             "f16_16384": ({**F8_DD, "ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16]},
                           16384, 256, False)}


def _assert_rules_cover(shapes: dict, config):
  """Every parameter of our eval_shape tree comes from one statement key of the right shape,
  and every statement key but the ignored ones is used."""
  module = VQGAN(config)
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
                      ["params"])
  codebook = "quantize.embedding" if "quantize.embedding" in shapes else None
  rules = (vqvae_convert.taming_rules(abstract, config) if codebook is None
           else vqvae_convert.taming_rules(abstract, config, codebook))
  target = {path: leaf.shape for path, leaf in
            jax.tree_util.tree_flatten_with_path(abstract)[0]
            for path in [tuple(k.key for k in path)]}
  for path, shape in target.items():
    key, transform = rules[path]
    assert key in shapes, f"{'/'.join(path)} <- {key} not in the statement"
    converted_shape = transform(np.broadcast_to(np.int8(0), shapes[key])).shape
    assert converted_shape == tuple(shape), (key, converted_shape, shape)
  used = {key for key, _ in rules.values()}
  ignored = ("quantize.cluster_size", "quantize.embedding_avg")
  assert sorted(k for k in shapes if k not in used and not k.startswith("loss.")
                and k not in ignored) == []
  assert len(target) == len(used)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_rules_on_abstract_shapes(name):
  """Every key of the real configs' statement maps onto our eval_shape tree, nothing built."""
  ddconfig, n_embed, embed_dim, gumbel_vq = FULL_SIZE[name]
  with torch.device("meta"):
    cls = official.GumbelVQ if gumbel_vq else official.VQModel
    shapes = {k: tuple(v.shape) for k, v in cls(ddconfig, n_embed, embed_dim).state_dict()
              .items()}
  config = vqvae_convert.config_from_taming(ddconfig, n_embed=n_embed, embed_dim=embed_dim,
                                            gumbel=gumbel_vq)
  assert config.encoder_attention_levels == (len(ddconfig["ch_mult"]) - 1,)
  _assert_rules_cover(shapes, config)


# ITHQ: PatchVQGAN with an EMA codebook, its config.yaml in the official layout
# (OUTPUT/pretrained_model/taming_dvae/config.yaml), shrunk. The encoder attends at [8, 4]
# (level 1) and the decoder at [16, 8] (level 0), so the two placements are read apart.
PATCH = "image_synthesis.modeling.codecs.image_codec.patch_vqgan."
PATCH_ENCODER = {"activate_output": False, "attn_resolutions": [[8, 4]], "ch": 32,
                 "ch_mult": [1, 2], "dropout": 0.0, "in_channels": 3, "num_res_blocks": 1,
                 "out_ch": 3, "resolution": [16, 8], "z_channels": 8}
PATCH_DECODER = {"attn_resolutions": [[16, 8]], "ch": 32, "ch_mult": [1, 2], "dropout": 0.0,
                 "num_res_blocks": 1, "out_ch": 3, "resolution": [16, 8], "z_channels": 8}
ITHQ_DECODER = {"attn_resolutions": [[32, 32]], "ch": 64, "ch_mult": [1, 2, 4, 8],
                "dropout": 0.0, "num_res_blocks": 2, "out_ch": 3, "resolution": [256, 256],
                "z_channels": 256}
ITHQ_ENCODER = {**ITHQ_DECODER, "activate_output": False, "in_channels": 3}


def _patch_yaml(encoder=PATCH_ENCODER, decoder=PATCH_DECODER, n_embed=N_EMBED, embed_dim=4,
                **extra):
  return {"model": {"target": PATCH + "PatchVQGAN", "params": {
      "decoder_config": {"params": decoder, "target": PATCH + "Decoder"},
      "embed_dim": embed_dim,
      "encoder_config": {"params": encoder, "target": PATCH + "Encoder"},
      "n_embed": n_embed, "quantizer_type": "EMAVQ", "trainable": True, **extra}}}


def _move_ema(quantize: torch.nn.Module, seed: int):
  """Trained-looking EMA buffers: counts and sums, then one training step of the official
  update, so ``embedding``, ``embedding_avg`` and ``cluster_size`` all differ from init."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    quantize.cluster_size.copy_(torch.rand(quantize.n_e, generator=generator) * 2 + 1)
    quantize.embedding_avg.copy_(quantize.embedding * quantize.cluster_size[:, None])
    quantize.train()
    quantize(torch.randn(2, quantize.e_dim, 4, 4, generator=generator))
    quantize.eval()


@pytest.fixture(scope="module")
def ithq(tmp_path_factory):
  """An ITHQ-style codec saved as ``ithq_vqvae.pth`` ({"model": ...}) with its config.yaml."""
  root = tmp_path_factory.mktemp("ithq")
  config = _patch_yaml()
  torch.manual_seed(7)
  model = _perturb(patch_official.PatchVQGAN(**config["model"]["params"]), seed=7)
  _move_ema(model.quantize, seed=8)
  files = {"checkpoint": _write(root / "ithq_vqvae.pth", {"model": model.state_dict()}),
           "config": _write(root / "config.yaml", config)}
  module, params = vqvae_convert.load_official_codec(files["checkpoint"], files["config"])
  codec = patch_official.PatchVQVAE(model, token_shape=[8, 8])
  return {"model": model, "codec": codec, "module": module, "params": params,
          "functions": _jitted(module), **files}


def test_ithq_codec_gives_the_official_tokens_and_images(ithq):
  quantize = ithq["model"].quantize
  assert not torch.allclose(quantize.embedding, quantize.embedding_avg)
  config = ithq["module"].config
  assert (config.encoder_attention_levels, config.decoder_attention_levels) == ((1,), (0,))
  assert config.used_codes == 0 and "remap" not in ithq["params"]
  np.testing.assert_array_equal(ithq["params"]["quantize"]["codebook"], quantize.embedding)
  tokens = _check_parity(ithq["codec"], ithq["params"], ithq["functions"], _images(5),
                         used=N_EMBED)
  assert len(np.unique(tokens)) > 4


def test_ithq_decoder_matches_before_the_clamp(ithq):
  model = ithq["model"]
  tokens = torch.randint(0, N_EMBED, (2, 8, 8), generator=torch.Generator().manual_seed(9))
  with torch.no_grad():
    z = model.quantize.get_codebook_entry(tokens.reshape(-1), shape=(2, 8, 8))
    reference = model.decoder(model.post_quant_conv(z)).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(ithq["functions"][1](ithq["params"], jnp.asarray(tokens.numpy())))
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_ithq_codec_inside_an_official_model_checkpoint(ithq, tmp_path):
  state = official.DALLE(ithq["codec"]).state_dict()
  assert {"content_codec.enc.quantize.embedding", "content_codec.dec.quantize.embedding_avg",
          "content_codec.dec.decoder.up.0.attn.1.q.weight"} <= set(state)
  checkpoint = _write(tmp_path / "ithq_learnable.pth", {"model": state, "epoch": 9})
  module, params = checkpoints.load_vqvae(checkpoint, config_yaml=ithq["config"])
  assert module.config == ithq["module"].config
  jax.tree.map(np.testing.assert_array_equal, params, ithq["params"])


def test_ithq_mismatches_are_named_with_the_file(ithq, tmp_path):
  big = _write(tmp_path / "big.yaml", _patch_yaml(n_embed=2 * N_EMBED))
  with pytest.raises(ConversionError, match=rf"ithq_vqvae\.pth: quantize\.embedding holds "
                                            rf"{N_EMBED} codes.*big\.yaml"):
    vqvae_convert.load_official_codec(ithq["checkpoint"], big)
  state = ithq["model"].state_dict()
  del state["quantize.embedding"]
  cut = _write(tmp_path / "cut.pth", {"model": state})
  with pytest.raises(ConversionError, match=r"cut\.pth(.|\n)*quantize\.embedding"):
    vqvae_convert.load_official_codec(cut, ithq["config"])


@pytest.mark.parametrize("change, message", [
    ({"quantizer_dis_type": "cosine"}, r"quantizer_dis_type='cosine'"),
    ({"quantizer_type": "VQ"}, r"quantizer_type='VQ'"),
    ({"decoder": {**PATCH_DECODER, "z_channels": 16}}, r"latent_channels 8 vs 16"),
    ({"encoder": {**PATCH_ENCODER, "scale_by_2": [True, False]}}, r"scale_by_2"),
])
def test_ithq_configs_we_cannot_hold_are_named(ithq, tmp_path, change, message):
  path = _write(tmp_path / "odd.yaml", _patch_yaml(**change))
  with pytest.raises(ConversionError, match=rf"odd\.yaml.*{message}"):
    vqvae_convert.load_official_codec(ithq["checkpoint"], path)


def test_ithq_full_size_config_on_abstract_shapes(tmp_path):
  """The official config.yaml's PatchVQGAN on the meta device against our eval_shape tree."""
  path = _write(tmp_path / "config.yaml", _patch_yaml(ITHQ_ENCODER, ITHQ_DECODER, n_embed=4096,
                                                      embed_dim=128))
  config = vqvae_convert.read_codec_config(path)
  assert config.encoder_attention_levels == config.decoder_attention_levels == (3,)
  assert (config.num_embeddings, config.embed_dim, config.latent_channels) == (4096, 128, 256)
  with torch.device("meta"):
    params = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["params"]
    model = patch_official.PatchVQGAN(**params)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert shapes["quantize.embedding"] == (4096, 128)
  _assert_rules_cover(shapes, config)


def test_activate_output_has_no_effect(tmp_path):
  """Both official encoders take ``activate_output`` into ``**ignore_kwargs``."""
  plain = vqvae_convert.read_codec_config(_write(tmp_path / "plain.yaml", _patch_yaml()))
  flagged = _patch_yaml({**PATCH_ENCODER, "activate_output": True})
  assert vqvae_convert.read_codec_config(_write(tmp_path / "flagged.yaml", flagged)) == plain
