"""Writers of the files a real run reads from its user, laid out as their sources write them.

* ``clip_dir``: a tiny Hugging Face CLIP directory (``save_pretrained`` of a
  ``CLIPTextModel`` or ``CLIPModel``, and of the tokenizer).
* ``lpips_files``: torchvision's ``vgg16().features`` state dict (random
  weights, ``features.{index}`` keys) and the lpips package's heads
  (``lin{i}.model.1.weight``), each saved with ``torch.save``.
* ``converted_vqvae``: a tiny taming ``VQModel`` checkpoint and its YAML, as
  taming saves them, converted into our directory format.
* ``converted_official``: a tiny official VQ-Diffusion text model saved as
  the official solver saves it, converted with that codec and a CLIP
  directory into a whole sampling directory (``checkpoint.init_from``).
* Dataset downloads in the layout each dataset ships in: ``cub_download``
  (images, ``text_c10`` captions, ``filenames.pickle`` per split),
  ``coco_download`` (``annotations/captions_*2014.json`` and the image
  folders), ``cc_download`` (the TSVs and row-named images) and
  ``folder_download`` (images and ``captions.jsonl``), built on the
  lower-level writers the dataset tests use too.
"""

import dataclasses
import json
import pathlib

import numpy as np
import torch
import transformers
import yaml
from PIL import Image
from torch import nn as tnn

from tests import official_taming
from tests import official_vqdiffusion as official
from tests.test_clip_text import TEXT_CONFIG, TOKENIZER
from vqdiffusion_jax.convert import checkpoints, converted
from vqdiffusion_jax.data import folder
from vqdiffusion_jax.models import transformer

H, W = 12, 16
CAPTION_WORDS = ("red", "blue", "cat", "dog", "bird", "small", "big", "the", "a", "sat")


# -- images ---------------------------------------------------------------------------------------

def noise(seed: int, channels: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
  shape = size if channels == 1 else (*size, channels)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
  """A gradient image, which JPEG keeps within a few levels."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size[0], 0:size[1]]
  base, gy, gx = rng.uniform(60, 190, 3), rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3)
  return np.clip(base + y[..., None] * gy + x[..., None] * gx, 0, 255).astype(np.uint8)


def write(path: pathlib.Path, pixels: np.ndarray, mode: str | None = None) -> np.ndarray:
  """Writes pixels (format from the suffix); returns the RGB pixels a reader should get."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(pixels)
  if mode:
    image = image.convert(mode)
  if path.suffix == ".png":
    image.save(path)
  else:
    image.save(path, format="JPEG", quality=95, subsampling=0)
  with Image.open(path) as written:
    return np.asarray(written.convert("RGB"))


def caption(seed: int, words: int = 5) -> str:
  """A lowercase caption the tiny CLIP tokenizer spells out."""
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(CAPTION_WORDS, words))


# -- dataset layouts ------------------------------------------------------------------------------

def py2_pickle(names: list[str]) -> bytes:
  """A protocol-0 pickle of a list of Python 2 ``str``, as the AttnGAN metadata is."""
  items = b"".join(b"S'%s'\np%d\na" % (n.encode(), i + 1) for i, n in enumerate(names))
  return b"(lp0\n" + items + b"."


def cub(root: pathlib.Path, images: str, text: str, classes: dict,
              size: tuple[int, int] = (H, W)) -> dict:
  """Writes CUB images and caption files; returns name -> (pixels, captions)."""
  out = {}
  for c, (cls, stems) in enumerate(classes.items()):
    for s, stem in enumerate(stems):
      name = f"{cls}/{stem}"
      mode = "L" if (c + s) % 3 == 2 else None
      pixels = write(root / images / f"{name}.jpg", smooth(7 * c + s, size), mode)
      captions = [f"bird {name} caption {k}" for k in range(10)]
      text_path = root / text / f"{name}.txt"
      text_path.parent.mkdir(parents=True, exist_ok=True)
      text_path.write_text("".join(f"{line}  \n" for line in captions[:5]) + "\n"
                           + "\n".join(captions[5:]) + "\n")
      out[name] = (pixels, captions)
  return out


def coco_split(root: pathlib.Path, prefix: str, year: str, images: list, nested: bool,
               size: tuple[int, int] = (H, W)) -> dict:
  """Writes one COCO split; images: (image_id, [(annotation_id, caption)]); returns expected."""
  folder_name = f"{prefix}{year}"
  image_dir = root / folder_name / folder_name if nested else root / folder_name
  records, annotations, expected = [], [], {}
  for image_id, captions in images:
    file_name = (f"COCO_{folder_name}_{image_id:012d}.jpg" if year == "2014"
                 else f"{image_id:012d}.jpg")
    mode = "L" if image_id % 2 else None
    pixels = write(image_dir / file_name, smooth(image_id, size), mode)
    records.append({"id": image_id, "file_name": file_name, "height": size[0],
                    "width": size[1]})
    annotations += [{"id": a, "image_id": image_id, "caption": c} for a, c in captions]
    if captions:
      expected[file_name] = (pixels, [" ".join(c.split()) for _, c in sorted(captions)])
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  annotations.reverse()
  (root / "annotations" / f"captions_{folder_name}.json").write_text(
      json.dumps({"images": records[::-1], "annotations": annotations}))
  return expected


def tsv(path: pathlib.Path, captions: list[str]):
  """A Conceptual Captions TSV: ``caption<TAB>url``, one image a row."""
  path.write_text("".join(f"{c}\thttp://example.com/{i}.jpg\n" for i, c in enumerate(captions)))


def listing(manual: pathlib.Path, lines: list) -> pathlib.Path:
  """``manual/captions.jsonl`` of a captioned folder; ``lines``: dicts or raw text lines."""
  manual.mkdir(parents=True, exist_ok=True)
  text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
  (manual / folder.CAPTIONS_FILE).write_text(text + "\n")
  return manual


# -- whole downloads for a run --------------------------------------------------------------------

def cub_download(root: pathlib.Path, size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """A CUB manual directory of 12 train and 4 test birds (AttnGAN split pickles)."""
  classes = {f"{i:03d}.Bird_{i}": [f"Bird_{i}_{j:04d}" for j in range(4)] for i in (1, 2, 3, 4)}
  names = sorted(cub(root, "CUB_200_2011/images", "text_c10", classes, size))
  for split, chosen in (("train", names[:12]), ("test", names[12:])):
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / split / "filenames.pickle").write_bytes(py2_pickle(chosen))
  return root


def coco_download(root: pathlib.Path, size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """A COCO 2014 manual directory: 12 train and 4 val images, two captions each."""
  for prefix, ids in (("train", range(1, 13)), ("val", range(100, 104))):
    coco_split(root, prefix, "2014",
               [(i, [(10 * i, caption(i)), (10 * i + 1, caption(1000 + i))]) for i in ids],
               nested=False, size=size)
  return root


def cc_download(root: pathlib.Path, size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """A Conceptual Captions manual directory: 12 train and 4 validation rows with images."""
  for table, images, count, seed in (("Train_GCC-training.tsv", "training", 12, 0),
                                     ("Validation_GCC-1.1.0-Validation.tsv", "validation", 4, 50)):
    root.mkdir(parents=True, exist_ok=True)
    tsv(root / table, [caption(seed + row) for row in range(count)])
    for row in range(count):
      write(root / images / f"{row}.jpg", smooth(seed + row, size))
  return root


def folder_download(root: pathlib.Path, size: tuple[int, int] = (40, 48)) -> pathlib.Path:
  """A captioned folder of 16 images, the last 4 marked as test."""
  lines = []
  for i in range(16):
    name = f"{'photos' if i % 2 else 'pictures'}/{i:03d}.{'png' if i % 3 else 'jpg'}"
    write(root / name, smooth(200 + i, size))
    lines.append({"file": name, "caption": caption(200 + i)} | ({"split": "test"} if i >= 12
                                                               else {}))
  return listing(root, lines)


# -- CLIP ---------------------------------------------------------------------------------------

def clip_dir(path, *, hidden_size: int = 32, num_heads: int = 4, intermediate_size: int = 37,
             num_layers: int = 1, vision: bool = False, seed: int = 0) -> str:
  """A tiny random CLIP directory with its tokenizer, as ``save_pretrained`` writes them.

  Args:
    path: the directory to write.
    hidden_size, num_heads, intermediate_size, num_layers: the text tower's sizes.
    vision: write a whole ``CLIPModel`` (text and vision towers, for CLIP
      scores) instead of a ``CLIPTextModel``.
    seed: the torch seed of the random weights.
  """
  torch.manual_seed(seed)
  sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_layers,
           "num_attention_heads": num_heads, "intermediate_size": intermediate_size}
  if vision:
    config = transformers.CLIPConfig(
        text_config={**TEXT_CONFIG, **sizes},
        vision_config={**sizes, "image_size": 16, "patch_size": 8}, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(str(path))
  else:
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TEXT_CONFIG, **sizes})
                               ).save_pretrained(str(path))
  TOKENIZER.save_pretrained(str(path))
  return str(path)


# -- LPIPS ----------------------------------------------------------------------------------------

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
LPIPS_WIDTHS = (64, 128, 256, 512, 512)


def vgg16_features() -> tnn.Sequential:
  """torchvision's vgg16().features, index for index, with random weights."""
  layers, in_channels = [], 3
  for item in VGG16_LAYOUT:
    if item == "M":
      layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
      continue
    conv = tnn.Conv2d(in_channels, item, kernel_size=3, padding=1)
    tnn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    tnn.init.normal_(conv.bias, 0.0, 0.1)
    layers += [conv, tnn.ReLU(inplace=True)]
    in_channels = item
  return tnn.Sequential(*layers)


class LpipsHead(tnn.Module):
  """The lpips package's ``NetLinLayer``: dropout, then a 1x1 conv to one channel."""

  def __init__(self, channels):
    super().__init__()
    self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(channels, 1, 1, bias=False))
    with torch.no_grad():
      self.model[1].weight.uniform_(0.0, 2.0 / channels)


def lpips_files(root: pathlib.Path, seed: int = 0) -> tuple[str, str]:
  """``(vgg16.pth, vgg.pth)``: torchvision's VGG16 and the LPIPS heads, random weights."""
  torch.manual_seed(seed)
  root.mkdir(parents=True, exist_ok=True)
  vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
  heads = {}
  for level, width in enumerate(LPIPS_WIDTHS):
    heads |= {f"lin{level}.{k}": v for k, v in LpipsHead(width).state_dict().items()}
  vgg_path, heads_path = root / "vgg16-397923af.pth", root / "vgg.pth"
  torch.save(vgg, vgg_path)
  torch.save(heads, heads_path)
  return str(vgg_path), str(heads_path)


# -- a converted VQ-VAE ---------------------------------------------------------------------------

VQGAN_TARGET = "image_synthesis.taming.models.vqgan.VQModel"
# f = 4 (two downsamplings): an 8x8 token grid at 32 px; taming's GroupNorm needs 32 channels.
VQGAN_DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3,
                  "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [8], "dropout": 0.0}
VQGAN_CODES, VQGAN_EMBED_DIM = 64, 8


def taming_vqgan(root: pathlib.Path, seed: int = 0) -> tuple[str, str]:
  """``(last.ckpt, model.yaml)`` of a tiny taming VQModel, as taming's trainer saves them."""
  torch.manual_seed(seed)
  model = official_taming.VQModel(VQGAN_DDCONFIG, VQGAN_CODES, VQGAN_EMBED_DIM)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (1.0 if "embed" in name else 0.05))
  root.mkdir(parents=True, exist_ok=True)
  checkpoint, config = root / "last.ckpt", root / "model.yaml"
  torch.save({"state_dict": model.state_dict()}, checkpoint)
  params = {"embed_dim": VQGAN_EMBED_DIM, "n_embed": VQGAN_CODES, "ddconfig": VQGAN_DDCONFIG,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
  config.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6,
                                              "target": VQGAN_TARGET, "params": params}}))
  return str(checkpoint), str(config)


def converted_vqvae(root: pathlib.Path) -> str:
  """A tiny taming VQGAN converted into our directory format (``vqvae.path``)."""
  checkpoint, config = taming_vqgan(root / "taming")
  module, params = checkpoints.load_vqvae(checkpoint, config_yaml=config)
  fields = json.loads(json.dumps(dataclasses.asdict(module.config)))
  out = root / "converted"
  converted.save(out, {"vqvae": (fields, params)}, source=checkpoint)
  return str(out)


def converted_official(root: pathlib.Path, clip: str, sizes: transformer.TransformerConfig
                       ) -> str:
  """An official text model of ``sizes`` with the tiny taming codec, converted with ``clip``.

  Args:
    root: where the official files and the converted directory go.
    clip: a Hugging Face CLIP directory as wide as ``sizes.condition_dim``,
      which is 512: the official model's null text is (77, 512).
    sizes: the denoiser's sizes; ``codebook_size`` is ``VQGAN_CODES`` and
      ``spatial_size`` the codec's grid.

  Returns:
    The converted directory: denoiser, VQ-VAE and CLIP text tower.
  """
  torch.manual_seed(1)
  config = official.text_config(
      n_layer=sizes.num_layers, n_embd=sizes.embed_dim, n_head=sizes.num_heads,
      num_embed=sizes.codebook_size, spatial_size=sizes.spatial_size,
      condition_dim=sizes.condition_dim, diffusion_step=sizes.num_timesteps,
      learnable_cf=sizes.learnable_null_text,
      clip={"num_embed": 64, "width": 16, "layers": 1, "heads": 2})
  model = official.build_model(config)
  ema = official.EMA(model, decay=0.9)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
  root.mkdir(parents=True, exist_ok=True)
  checkpoint = str(root / "coco_learnable.pth")
  official.save_checkpoint(checkpoint, model, ema, optimizer)
  codec, codec_yaml = taming_vqgan(root / "taming")
  out = root / "converted_official"
  checkpoints.convert(checkpoint, out, config=sizes, vqvae=codec, vqvae_config=codec_yaml,
                      clip_dir=clip)
  return str(out)
