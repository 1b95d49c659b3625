"""The experiment config: every section with its defaults, and saved configs completed.

``configs/<experiment>.py`` builds its config from these sections and ends
with ``finish(config, arg)``. The sections and their keys:

  seed
  data:        name, data_dir, manual_dir (the user's download a real
               dataset is built from on first use, into data_dir or
               WORKDIR/data), image_size, train_split, eval_split,
               caption_dropout (also the class-label dropout to the null
               class), text_length, random_flip, random_crop,
               cache_dir (token cache), num_workers, in_memory, num_train,
               num_test (shapes only)
  mesh:        shape {data, fsdp, tensor} (one may be -1), dcn {data, fsdp,
               tensor} (slices; all 1 on one slice), rules (logical -> mesh)
  optim:       learning_rate, b1, b2, weight_decay, warmup_steps, decay
               ("cosine" | "linear" | "constant"), min_lr_ratio, clip_norm,
               ema_decay
  train:       global_batch, num_steps, log_every, checkpoint_every,
               keep_checkpoints, sample_every, dtype, remat,
               remat_policy ("full" | "minimal": keep the weight matmuls),
               scan_layers, matmul_dtype ("float32" | "bfloat16" | "auto":
               bfloat16 where this machine has bfloat16 matrix units),
               steps_per_call
  time_budget: minutes (0: train ``train.num_steps``), reserve_steps, margin
  checkpoint:  resume_from, init_from
  diffusion:   schedule, num_timesteps, aux_weight, adaptive_aux, mask_weight,
               importance_sampling
  vqvae:       model (VQGANConfig fields), path (a trained / converted VQ-VAE
               to use instead of training one), loss (rec, perceptual and
               adversarial weights, disc_start, lpips paths), optim (as
               ``optim``, without EMA), train (global_batch,
               num_steps, matmul_dtype as in train, steps_per_call)
  text:        kind ("trainable" | "clip"), clip_path, width (of a "clip"
               tower: checked against clip_path's; 0 takes it), length,
               num_layers, num_heads, max_vocab, position_encoding ("learned"
               | "rotary") (trainable)
  denoiser:    kind ("transformer" | "paella"), model (TransformerConfig
               sizes and its condition: conditioning "text" | "class" |
               "none", num_classes, learnable_null_class, mlp_type,
               position_grid (empty: the token grid); K, grid, T, text sizes
               derive from the VQ-VAE, text and diffusion sections), paella
               (PaellaPredictor sizes and the label_smoothing of its loss)

The condition of a run: a "transformer" denoiser reads what
``denoiser.model.conditioning`` names: text (``text``: captions through a
trained or CLIP encoder), class labels (the data's ``label``; a
``data.caption_dropout`` fraction of them trains the null class
``num_classes``, a learned row with ``learnable_null_class``, which guided
sampling reads) or nothing (unconditional). A "paella" denoiser reads text
and trains with Paella's objective: a fraction ``1 - abar_t`` of the tokens
(the "uniform" schedule's, at a uniformly drawn step) replaced by random
tokens, cross-entropy of all the original tokens.
  eval:        samplers (specs ``name[/steps[/guidance[/truncation]]]``; none:
               no report), num_samples, batch_size, grid_size, seed,
               inception_path, clip_path (the end-of-run evaluation)

``finish`` fills every section and key a config leaves out with the defaults
here (``complete``), so code reads ``config.section.key`` and never repeats a
default, and refuses keys no section has (``check_known_keys``). A run's
saved config goes through ``complete`` too when it is read back: keys added
since it was written take today's defaults.

``runlocal`` (``--config=configs/X.py:runlocal``) shrinks any config to a
2-core CPU and keeps its path: the same dataset, text kind, VQ-VAE kind and
losses, mesh axes, remat and scan, precision and samplers, at 32 px with
tiny widths and depths, 2 steps a stage and a tiny evaluation. The files a
run reads from the user (``text.clip_path``, ``data.manual_dir``, the LPIPS
weights, ``vqvae.path``, ``checkpoint.init_from``) stay as given on the
command line.
"""

import difflib
from typing import Any

import ml_collections

from vqdiffusion_jax.models import axes


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, dcn_data: int = 1,
         dcn_fsdp: int = 1, dcn_tensor: int = 1) -> ml_collections.ConfigDict:
  """Device mesh: ICI axis sizes within a slice, DCN sizes across slices."""
  return ml_collections.ConfigDict({
      "shape": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "dcn": {"data": dcn_data, "fsdp": dcn_fsdp, "tensor": dcn_tensor},
      "rules": tuple((name, axis) for name, axis in axes.DEFAULT_RULES),
  })


def optim(learning_rate: float, *, warmup_steps: int = 5000, decay: str = "cosine",
          weight_decay: float = 0.045, clip_norm: float = 1.0,
          ema_decay: float = 0.9999) -> ml_collections.ConfigDict:
  """AdamW with the official betas (0.9, 0.96) and weight decay 0.045."""
  return ml_collections.ConfigDict({
      "learning_rate": learning_rate, "b1": 0.9, "b2": 0.96, "weight_decay": weight_decay,
      "warmup_steps": warmup_steps, "decay": decay, "min_lr_ratio": 0.0,
      "clip_norm": clip_norm, "ema_decay": ema_decay,
  })


def train(global_batch: int, num_steps: int, *, dtype: str = "bfloat16", remat: bool = False,
          log_every: int = 50, checkpoint_every: int = 1000, keep_checkpoints: int = 3,
          sample_every: int = 5000) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "global_batch": global_batch, "num_steps": num_steps, "log_every": log_every,
      "checkpoint_every": checkpoint_every, "keep_checkpoints": keep_checkpoints,
      "sample_every": sample_every, "dtype": dtype, "remat": remat,
      "remat_policy": "full", "scan_layers": False, "matmul_dtype": "float32",
      "steps_per_call": 1,  # train steps per jitted call (one lax.scan); runner.py
  })


def data(name: str, image_size: int, *, data_dir: str = "", text_length: int = 77,
         caption_dropout: float = 0.1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": name, "data_dir": data_dir, "manual_dir": "", "image_size": image_size,
      "train_split": "train", "eval_split": "test", "caption_dropout": caption_dropout,
      "text_length": text_length, "random_flip": False, "random_crop": False,
      "cache_dir": "",
      "num_workers": 0,  # grain reader threads per host that prefetch batches (0: none)
      "in_memory": False,  # keep decoded records (images, token-cache entries) after first read
      "num_train": 0, "num_test": 0,  # shapes only: split sizes (0: the builder's default)
  })


def diffusion(num_timesteps: int = 100, aux_weight: float = 5e-4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "schedule": "mask_and_replace", "num_timesteps": num_timesteps,
      "aux_weight": aux_weight, "adaptive_aux": True, "mask_weight": (1.0, 1.0),
      "importance_sampling": True,
  })


def time_budget(minutes: float = 0.0) -> ml_collections.ConfigDict:
  """The main job's wall-clock budget; above 0 the denoiser's step count fits it (budget.py).

  ``reserve_steps`` step-times are kept for checkpoints, evaluation and the
  report, and ``margin`` of the time left for the machine's drift.
  """
  return ml_collections.ConfigDict({"minutes": minutes, "reserve_steps": 700, "margin": 0.1})


def checkpoint(resume_from: str = "", init_from: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"resume_from": resume_from, "init_from": init_from})


def vqvae(*, block_out_channels=(128, 128, 256, 256, 512), num_embeddings=2887,
          embed_dim=256, latent_channels=256, attention_levels=(4,),
          path: str = "") -> ml_collections.ConfigDict:
  """The VQ-VAE (image tokenizer): model sizes, its VQGAN loss and its own optimizer."""
  return ml_collections.ConfigDict({
      "path": path,
      "model": {
          "block_out_channels": tuple(block_out_channels), "layers_per_block": 2,
          "latent_channels": latent_channels, "num_embeddings": num_embeddings,
          "embed_dim": embed_dim, "norm_num_groups": 32,
          "encoder_attention_levels": tuple(attention_levels),
          "decoder_attention_levels": tuple(attention_levels), "mid_block_attention": True,
          "ema": True, "beta": 0.25, "dead_code_threshold": 1.0, "patch_size": 0,
      },
      "loss": {
          "rec_loss": "l1", "perceptual_weight": 1.0, "codebook_weight": 1.0,
          "disc_weight": 0.8, "disc_start": 30001, "disc_loss": "hinge",
          "disc_layers": 3, "disc_channels": 64,
          "lpips_vgg_path": "", "lpips_heads_path": "",
      },
      "optim": {"learning_rate": 4.5e-6 * 64, "b1": 0.5, "b2": 0.9, "weight_decay": 0.0,
                "warmup_steps": 0, "clip_norm": 0.0, "decay": "constant", "min_lr_ratio": 0.0},
      "train": {"global_batch": 64, "num_steps": 200000, "matmul_dtype": "float32",
                "steps_per_call": 1},
  })


def text(kind: str = "clip", clip_path: str = "", width: int = 512,
         length: int = 77) -> ml_collections.ConfigDict:
  """Text conditioning: a frozen CLIP text tower, or a small trained encoder."""
  return ml_collections.ConfigDict({
      "kind": kind, "clip_path": clip_path, "width": width, "length": length,
      "num_layers": 2, "num_heads": 4, "max_vocab": 1024, "position_encoding": "learned",
  })


def denoiser(num_layers: int = 19, embed_dim: int = 1024, num_heads: int = 16, *,
             conditioning: str = "text", num_classes: int = 1000,
             kind: str = "transformer") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "kind": kind,
      "model": {"num_layers": num_layers, "embed_dim": embed_dim, "num_heads": num_heads,
                "mlp_ratio": 4, "learnable_null_text": True, "pooled_text": False,
                # attention.IMPLEMENTATIONS; "auto": one head at a time for long sequences on CPU
                "attention": "auto",
                "conditioning": conditioning, "num_classes": num_classes,
                "learnable_null_class": True, "mlp_type": "fc", "position_grid": ()},
      "paella": paella(),
  })


def paella(channels=(256, 512), *, blocks_per_level: int = 2,
           modulation_dim: int = 256) -> ml_collections.ConfigDict:
  """Paella's convolutional predictor (``denoiser.kind = "paella"``) and its loss."""
  return ml_collections.ConfigDict({
      "channels": tuple(channels), "blocks_per_level": blocks_per_level, "kernel_size": 3,
      "mlp_ratio": 4, "modulation_dim": modulation_dim, "timestep_dim": 64,
      "label_smoothing": 0.1,  # Paella's cross-entropy
  })


def evaluation(samplers=("vqdiffusion/all/1", "vqdiffusion/all/3", "vqdiffusion/25/3",
                         "purity/16/3"), *, num_samples: int = 256, batch_size: int = 64,
               grid_size: int = 16) -> ml_collections.ConfigDict:
  """The end-of-run evaluation: sampler specs (see ``vqdiffusion_jax.evaluate``) and sizes."""
  return ml_collections.ConfigDict({
      "samplers": tuple(samplers), "num_samples": num_samples, "batch_size": batch_size,
      "grid_size": grid_size, "seed": 0, "inception_path": "", "clip_path": "",
  })


RUNLOCAL_IMAGE_SIZE = 32
RUNLOCAL_STEPS = 2
RUNLOCAL_BATCH = 8
RUNLOCAL_SAMPLER_STEPS = 3
RUNLOCAL_FSDP = 4


def runlocal(config: ml_collections.ConfigDict, *,
             keep_dtype: bool = False) -> ml_collections.ConfigDict:
  """Shrinks a config's sizes and steps to a 2-core CPU (minutes), keeping its path.

  Every kind stays: dataset, text kind, patch or convolutional VQ-VAE, its
  perceptual and adversarial losses (the adversarial term from step 0),
  mesh axes (an fsdp axis over ``RUNLOCAL_FSDP`` devices), remat, scanned
  layers, sampler names. Sizes shrink: ``RUNLOCAL_IMAGE_SIZE`` px images,
  tiny widths and depths, ``RUNLOCAL_STEPS`` steps a stage of
  ``RUNLOCAL_BATCH`` images, and samplers of at most
  ``RUNLOCAL_SAMPLER_STEPS`` steps on 8 images. Compute is float32
  (bfloat16 is emulated on most CPUs, ten times slower) unless
  ``keep_dtype``, and so are matmuls. User files stay as given.
  """
  with config.unlocked():
    _shrink_data(config.data)
    if config.mesh.shape.fsdp != 1:
      config.mesh.shape.update(data=-1, fsdp=RUNLOCAL_FSDP, tensor=1)
    config.time_budget = time_budget()
    _shrink_vqvae(config.vqvae)
    _shrink_text(config.text)
    config.denoiser.model.update(num_layers=2, embed_dim=32, num_heads=2)
    config.diffusion.num_timesteps = 10
    config.optim.update(learning_rate=1e-3, warmup_steps=1, ema_decay=0.99)
    # float32 matmuls: "auto" would pick bfloat16 on some CPUs, and tests want one answer.
    config.train.update(global_batch=RUNLOCAL_BATCH, num_steps=RUNLOCAL_STEPS, log_every=1,
                        checkpoint_every=1, sample_every=0, steps_per_call=1,
                        matmul_dtype="float32")
    if not keep_dtype:
      config.train.dtype = "float32"
    samplers = dict.fromkeys(_shrunk_sampler(s) for s in config.eval.samplers)
    config.eval.update(samplers=tuple(samplers),
                       num_samples=8, batch_size=8, grid_size=4)
  return config


def _shrink_data(section: ml_collections.ConfigDict) -> None:
  section.image_size = RUNLOCAL_IMAGE_SIZE
  section.in_memory = False
  if section.name == "shapes":
    section.update(num_train=64, num_test=16)


def _shrink_vqvae(section: ml_collections.ConfigDict) -> None:
  """Tiny widths (f = 4: an 8x8 token grid at 32 px), 64 codes, 2 steps from step 0."""
  model = section.model
  if model.patch_size:
    model.update(block_out_channels=(32,), latent_channels=32)
  else:
    attention = (2,) if model.encoder_attention_levels else ()
    model.update(block_out_channels=(32, 64, 64), latent_channels=32, norm_num_groups=8,
                 encoder_attention_levels=attention, decoder_attention_levels=attention)
  model.update(num_embeddings=64, embed_dim=16)
  section.loss.update(disc_start=0, disc_channels=8, disc_layers=2)
  section.optim.update(learning_rate=1e-3, warmup_steps=0)
  section.train.update(global_batch=RUNLOCAL_BATCH, num_steps=RUNLOCAL_STEPS, steps_per_call=1,
                       matmul_dtype="float32")


def _shrink_text(section: ml_collections.ConfigDict) -> None:
  if section.kind == "clip":
    section.width = 0  # the user's CLIP decides, a tiny one or the real one
  else:
    section.update(width=32, length=min(int(section.length), 24), max_vocab=256)


def _shrunk_sampler(spec: str) -> str:
  """``name/steps/...`` with at most ``RUNLOCAL_SAMPLER_STEPS`` steps (all steps too)."""
  name, *rest = spec.split("/")
  if rest and (rest[0] in ("", "all") or int(rest[0]) > RUNLOCAL_SAMPLER_STEPS):
    rest[0] = str(RUNLOCAL_SAMPLER_STEPS)
  return "/".join([name, *rest]) if rest else f"{name}/{RUNLOCAL_SAMPLER_STEPS}"


def reads_text(config: Any) -> bool:
  """Whether the configured denoiser is conditioned on text (``text`` section) at all."""
  return config.denoiser.kind == "paella" or config.denoiser.model.conditioning == "text"


def check_user_paths(config: Any) -> None:
  """A ValueError naming the flag to set for each file the run needs that the config lacks.

  A denoiser that reads "clip" text needs ``text.clip_path``; a VQ-VAE trained with a
  perceptual loss needs both LPIPS weight files.
  """
  missing = []
  if reads_text(config) and config.text.kind == "clip" and not config.text.clip_path:
    missing.append("--config.text.clip_path=DIR (a Hugging Face CLIP directory: weights and "
                   "tokenizer)")
  loss = config.vqvae.loss
  if not config.vqvae.path and float(loss.perceptual_weight) > 0:
    if not loss.lpips_vgg_path:
      missing.append("--config.vqvae.loss.lpips_vgg_path=FILE (torchvision's VGG16 state dict, "
                     "vgg16-397923af.pth)")
    if not loss.lpips_heads_path:
      missing.append("--config.vqvae.loss.lpips_heads_path=FILE (the LPIPS heads, vgg.pth of "
                     "the lpips package)")
    if not (loss.lpips_vgg_path and loss.lpips_heads_path):
      missing.append("or --config.vqvae.loss.perceptual_weight=0 to train without LPIPS")
  if missing:
    raise ValueError("the config needs files it does not name; pass " + "; ".join(missing))


def defaults() -> ml_collections.ConfigDict:
  """Every section at its defaults; what ``complete`` takes a missing key's value from.

  Keys that every experiment sets (a dataset, a learning rate, a batch) get
  placeholder values: a config never lacks them.
  """
  return ml_collections.ConfigDict({
      "seed": 0, "data": data("shapes", 32), "mesh": mesh(), "optim": optim(1e-4),
      "train": train(1, 1), "time_budget": time_budget(), "checkpoint": checkpoint(),
      "diffusion": diffusion(), "vqvae": vqvae(), "text": text(), "denoiser": denoiser(),
      "eval": evaluation(samplers=()),
  })


def complete(config: Any) -> ml_collections.ConfigDict:
  """``config`` (a ConfigDict or a saved config's dict) with every missing key defaulted.

  Sections and keys it has keep their values, also keys unknown here; nested
  sections are completed key by key.

  Returns:
    A new, unlocked ConfigDict.
  """
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return ml_collections.ConfigDict(_filled(values, defaults().to_dict()))


def _filled(values: dict, default: dict) -> dict:
  out = dict(values)
  for key, value in default.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _filled(out[key], value)
  return out


def finish(config: ml_collections.ConfigDict, arg: str | None, *,
           runlocal_keeps_dtype: bool = False) -> ml_collections.ConfigDict:
  """Applies the config argument (only "runlocal" exists), completes and locks the config.

  ``runlocal_keeps_dtype``: ``runlocal`` keeps ``train.dtype`` (a config
  whose path is its precision) instead of float32.
  """
  if arg == "runlocal":
    config = runlocal(config, keep_dtype=runlocal_keeps_dtype)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
  config = complete(config)
  check_known_keys(config)
  config.lock()
  return config


def check_known_keys(config: ml_collections.ConfigDict) -> None:
  """A ValueError naming each key no section has (a typo would be ignored), with the nearest."""
  unknown = []

  def walk(values: dict, known: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in known:
        nearest = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.0)
        unknown.append(f"{prefix}{key} (nearest: {', '.join(prefix + k for k in nearest)})")
      elif isinstance(value, dict) and isinstance(known[key], dict):
        walk(value, known[key], f"{prefix}{key}.")

  walk(config.to_dict(), defaults().to_dict(), "")
  if unknown:
    raise ValueError(f"unknown config keys: {'; '.join(unknown)}")
