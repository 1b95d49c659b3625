"""Side by side with diffusers: train steps and guided sampling on the same weights.

  PYTHONPATH=. python benchmarks/vs_diffusers.py [--sizes tiny large] [--train-batch 8 32]
      [--sample-batch 4 16] [--steps 10 25 100] [--repeats 3] [--precision bfloat16]
      [--their-precision float32] [--remat-policy full|minimal]
      [--steps-per-call 1] [--max-batch auto|none|N] [--json out.json]

For each size the script builds one diffusers ``Transformer2DModel`` (discrete
input: ``num_vector_embeds`` = K + 1, AdaLN, approximate GEGLU) and its
learned null text with random weights, converts both with
``convert.denoiser.from_diffusers``, and times the same work on each side,
interleaved (ours, theirs, ours, theirs, ...), after one untimed warm-up run:

  train   one optimiser step at batch B: t, q(x_t | x_0), forward, the
          official loss (vb + adaptive aux, weight 5e-4, uniform t), backward,
          global-norm clipping, AdamW. Ours is the library's jitted
          ``denoiser_step.make_train_step`` (which also updates the EMA);
          theirs is eager PyTorch with the official loss on diffusers'
          ``q_posterior`` (tests/torch_reference.py), one t per batch because
          diffusers' AdaLayerNorm takes a scalar timestep.
          ``--steps-per-call K`` times K steps per call on each side: ours
          one jitted ``lax.scan`` over K batches (``runner.scan_steps``, as
          the trainer's ``train.steps_per_call``), theirs K loop iterations.
  sample  tokens from all-[MASK] for a batch of B prompts with guidance scale
          5 and truncation 0.86: S network calls, each on 2B rows (prompt and
          null text). Ours is ``samplers.sample`` compiled as one program
          (skip-step over T = 100); theirs is VQDiffusionPipeline's denoising
          loop (its transformer call, guidance, ``truncate`` and
          ``VQDiffusionScheduler.step``), which visits the last S steps.

``--precision bfloat16`` runs both sides' matmuls on bfloat16: ours with
``matmul_dtype="bfloat16"`` (bfloat16 operands, float32 accumulation,
float32 activations and softmax), theirs under ``torch.autocast("cpu",
torch.bfloat16)``; the loss and the sampler's log-space updates stay float32
on both sides. The log-probability gap is always that of the float32 networks.
``--their-precision`` sets diffusers' side apart from ours, to compare each
side at its fastest (autocast slowed diffusers down on every CPU measured so far).

Neither side decodes tokens or encodes text. Each row gives medians and the
ratio ours / theirs in samples (train) or images (sample) per second, so a
ratio above 1 means we are faster; the last line lists every ratio.
The ``large`` size is slow on a few CPU cores: a guided 100-step batch of 16
is 3,200 network rows of 1,024 tokens on each side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from diffusers import Transformer2DModel, VQDiffusionScheduler
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
  LearnedClassifierFreeSamplingEmbeddings,
  VQDiffusionPipeline,
)

from benchmarks import harness
from tests import torch_reference
from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.convert import denoiser as convert_denoiser
from vqdiffusion_jax.diffusion import discrete, samplers
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import attention
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.transformer import REMAT_POLICIES, VQDiffusionTransformer
from vqdiffusion_jax.train import denoiser_step, runner
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib

TIMESTEPS = 100
AUX_WEIGHT = 5e-4
GUIDANCE = 5.0
TRUNCATION = 0.86
PRECISIONS = ("float32", "bfloat16")  # matmul dtypes either side can run
SAMPLE_KEY = jax.random.key(2)


@dataclasses.dataclass(frozen=True)
class Size:
  grid: int
  codebook: int
  layers: int
  dim: int
  heads: int
  text_length: int
  text_dim: int

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid


SIZES = {
    "tiny": Size(grid=16, codebook=256, layers=4, dim=256, heads=4, text_length=16,
                 text_dim=256),
    "large": Size(grid=32, codebook=1024, layers=8, dim=512, heads=8, text_length=77,
                  text_dim=512),
}


def diffusers_denoiser(size: Size, seed: int = 0):
  """Their transformer and learned null text, random weights (eval mode)."""
  torch.manual_seed(seed)
  model = Transformer2DModel(
      num_attention_heads=size.heads, attention_head_dim=size.dim // size.heads,
      num_layers=size.layers, num_vector_embeds=size.codebook + 1, sample_size=size.grid,
      cross_attention_dim=size.text_dim, num_embeds_ada_norm=TIMESTEPS, norm_type="ada_norm",
      activation_fn="geglu-approximate", attention_bias=True)
  null = LearnedClassifierFreeSamplingEmbeddings(True, hidden_size=size.text_dim,
                                                 length=size.text_length)
  with torch.no_grad():
    null.embeddings.normal_()
  return model.eval(), null


def our_denoiser(model, null, size: Size, *, scan_layers: bool, remat: bool):
  """The same network as ours: (module, params) through the diffusers converter."""
  config = convert_denoiser.config_from_diffusers(
      dict(model.config), null_text_config={"learnable": True, "length": size.text_length},
      scan_layers=scan_layers, remat=remat)
  params = convert_denoiser.from_diffusers(model.state_dict(), config, null.state_dict())
  return VQDiffusionTransformer(config), jax.tree.map(jnp.asarray, params)


def _run_config(batch: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"optim": schema.optim(1e-4, warmup_steps=0),
                                    "train": schema.train(batch, 1000)})


def train_program(module, size: Size, batch: int, steps_per_call: int = 1):
  """``(jitted step, state, batch, state shardings)``: our train step on a fixed random batch.

  The state is freshly initialised; the step donates it. With ``steps_per_call``
  above 1 the step scans over that many copies of the batch in one call.
  """
  run = _run_config(batch)
  diffusion = schema.diffusion(TIMESTEPS, aux_weight=AUX_WEIGHT)
  diffusion.importance_sampling = False
  optimizer = state_lib.make_optimizer(run.optim, run.train.num_steps)
  mesh_config = schema.mesh()
  mesh = mesh_lib.make_mesh(mesh_config.to_dict())
  state, shardings = state_lib.create_state(
      jax.random.key(0), Denoiser(module).init, optimizer, mesh,
      mesh_config.rules)
  schedule = schedules.mask_and_replace(TIMESTEPS, size.codebook)
  train_step = denoiser_step.make_train_step(Denoiser(module), schedule, run, diffusion,
                                             optimizer)
  if steps_per_call > 1:
    train_step = runner.scan_steps(train_step)
  train_step = jax.jit(train_step, donate_argnums=0)
  rng = np.random.default_rng(1)
  data = {"tokens": jnp.asarray(rng.integers(0, size.codebook, (batch, size.num_tokens)),
                                jnp.int32),
          "text": jnp.asarray(rng.normal(size=(batch, size.text_length, size.text_dim)),
                              jnp.float32),
          "drop_text": jnp.asarray(rng.random(batch) < 0.1)}
  if steps_per_call > 1:
    data = jax.tree.map(lambda x: jnp.stack([x] * steps_per_call), data)
  return train_step, state, data, shardings


def blocking_steps(train_step, state, data):
  """A ``step()`` that trains one step and waits for it, carrying the state along."""
  key = jax.random.key(2)
  holder = [state]

  def step():
    holder[0], metrics = train_step(holder[0], data, key)
    jax.block_until_ready(metrics["loss"])

  return step


def our_train(module, params, size: Size, batch: int, steps_per_call: int = 1):
  """A blocking ``step()`` that trains ours from ``params`` on a fixed random batch."""
  train_step, state, data, shardings = train_program(module, size, batch, steps_per_call)
  fresh = lambda: jax.device_put(jax.tree.map(jnp.copy, params), shardings.params)  # noqa: E731
  state = state.replace(params=fresh(), ema_params=fresh())  # the step donates its state
  return blocking_steps(train_step, state, data)


def _torch_q_sample(scheduler, x0: torch.Tensor, t: int, codebook: int, generator):
  """Mask-and-replace noising: [MASK] with prob. cumulative gamma, uniform with K beta."""
  mask_prob = float(scheduler.log_cumprod_ct[t].exp())
  replace_prob = codebook * float(scheduler.log_cumprod_bt[t].exp())
  u = torch.rand(x0.shape, generator=generator)
  replaced = torch.where(u < replace_prob, torch.randint(codebook, x0.shape, generator=generator),
                         x0)
  return torch.where(u > 1.0 - mask_prob, codebook, replaced)


def _autocast(precision: str):
  return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")


def their_train(model, null, size: Size, batch: int, precision: str = "float32",
                steps_per_call: int = 1):
  """A blocking ``step()`` of the same optimiser step(s) in eager PyTorch."""
  scheduler = VQDiffusionScheduler(num_vec_classes=size.codebook + 1,
                                   num_train_timesteps=TIMESTEPS)
  model.train()
  parameters = list(model.parameters()) + list(null.parameters())
  optim = _run_config(batch).optim
  optimizer = torch.optim.AdamW(parameters, lr=optim.learning_rate, betas=(optim.b1, optim.b2),
                                weight_decay=optim.weight_decay)
  generator = torch.Generator().manual_seed(1)
  x0 = torch.randint(size.codebook, (batch, size.num_tokens), generator=generator)
  text = torch.randn((batch, size.text_length, size.text_dim), generator=generator)
  drop = torch.rand(batch, generator=generator) < 0.1
  pt = torch.full((batch,), 1.0 / TIMESTEPS)

  def one_step():
    t = int(torch.randint(TIMESTEPS, (1,), generator=generator))
    x_t = _torch_q_sample(scheduler, x0, t, size.codebook, generator)
    condition = torch.where(drop[:, None, None], null.embeddings[None], text)
    with _autocast(precision):
      log_probs = model(x_t, encoder_hidden_states=condition, timestep=torch.tensor(t)).sample
    loss, _, _ = torch_reference.training_loss(
        scheduler, log_probs.float().permute(0, 2, 1), x0, x_t, torch.full((batch,), t), pt,
        aux_weight=AUX_WEIGHT, mask_weight=(1.0, 1.0))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, optim.clip_norm)
    optimizer.step()

  def step():
    for _ in range(steps_per_call):
      one_step()

  return step


def guided_sampler(module, params, size: Size, batch: int, steps: int,
                   max_batch: int | str | None = "auto"):
  """``(compiled sampler, condition)``: our guided sampler over a random condition."""
  config = samplers.SamplerConfig(name="vqdiffusion", num_inference_steps=steps,
                                  guidance_scale=GUIDANCE, truncation_rate=TRUNCATION)
  schedule = schedules.mask_and_replace(TIMESTEPS, size.codebook)
  condition = jax.random.normal(jax.random.key(1), (batch, size.text_length, size.text_dim))
  program = harness.sampler_program(module, schedule, size.num_tokens, config, batch, max_batch)
  return program.lower(params, condition, SAMPLE_KEY).compile(), condition


def our_sample(module, params, size: Size, batch: int, steps: int,
               max_batch: int | str | None = "auto"):
  """A blocking ``run()`` of our guided sampler, compiled ahead of time."""
  compiled, condition = guided_sampler(module, params, size, batch, steps, max_batch)
  return lambda: jax.block_until_ready(compiled(params, condition, SAMPLE_KEY))


def their_sample(model, null, size: Size, batch: int, steps: int, precision: str = "float32"):
  """A blocking ``run()`` of VQDiffusionPipeline's guided denoising loop."""
  model.eval()
  scheduler = VQDiffusionScheduler(num_vec_classes=size.codebook + 1,
                                   num_train_timesteps=TIMESTEPS)
  generator = torch.Generator().manual_seed(2)
  text = torch.randn((batch, size.text_length, size.text_dim), generator=generator)

  @torch.no_grad()
  def run():
    embeds = torch.cat([null.embeddings[None].expand(batch, -1, -1), text])
    scheduler.set_timesteps(steps)
    sample = torch.full((batch, size.num_tokens), size.codebook)
    for t in scheduler.timesteps:
      with _autocast(precision):
        out = model(torch.cat([sample] * 2), encoder_hidden_states=embeds, timestep=t).sample
      uncond, cond = out.float().chunk(2)
      out = uncond + GUIDANCE * (cond - uncond)
      out = out - torch.logsumexp(out, dim=1, keepdim=True)
      out = VQDiffusionPipeline.truncate(None, out, TRUNCATION).clamp(-70)
      sample = scheduler.step(out, timestep=t, sample=sample, generator=generator).prev_sample
    return sample

  return run


def max_log_prob_gap(model, null, module, params, size: Size) -> float:
  """Largest |log p(x_0)| difference of one forward pass: the two sides hold the same network."""
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, size.codebook + 1, (1, size.num_tokens))
  text = rng.normal(size=(1, size.text_length, size.text_dim)).astype(np.float32)
  t = TIMESTEPS // 2
  model.eval()
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(text),
                   timestep=torch.tensor(t)).sample.numpy().transpose(0, 2, 1)
  logits = module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray([t]),
                        jnp.asarray(text))
  ours = np.asarray(discrete.x0_log_probs(logits))[..., :-1]
  return float(np.max(np.abs(ours - theirs)))


def _pair(name: str, size_name: str, setting: str, units: int, ours, theirs,
          repeats: int) -> dict:
  ours(), theirs()  # compile / warm up
  seconds = harness.interleaved({"ours": ours, "theirs": theirs}, repeats)
  row = {"size": size_name, "work": name, "setting": setting,
         "ours_per_s": units / seconds["ours"], "theirs_per_s": units / seconds["theirs"]}
  row["ratio"] = row["ours_per_s"] / row["theirs_per_s"]
  print(f"| {size_name} | {name} | {setting} | {row['ours_per_s']:.2f} | "
        f"{row['theirs_per_s']:.2f} | {row['ratio']:.2f}x |", flush=True)
  return row


def run_size(size_name: str, args) -> list[dict]:
  size = SIZES[size_name]
  model, null = diffusers_denoiser(size)
  module, params = our_denoiser(model, null, size, scan_layers=args.scan_layers,
                                remat=args.remat)
  print(f"| {size_name} | same weights | max abs log p gap "
        f"{max_log_prob_gap(model, null, module, params, size):.1e} | | | |", flush=True)
  module = module.clone(config=dataclasses.replace(
      module.config, matmul_dtype=args.precision, remat_policy=args.remat_policy,
      attention=args.attention))
  rows = []
  per_call = args.steps_per_call
  for batch in args.train_batch:
    setting = f"batch {batch}" + (f", {per_call} steps per call" if per_call > 1 else "")
    rows.append(_pair("train", size_name, setting, batch * per_call,
                      our_train(module, params, size, batch, per_call),
                      their_train(model, null, size, batch, args.their_precision, per_call),
                      args.repeats))
  for steps in args.steps:
    for batch in args.sample_batch:
      rows.append(_pair("sample", size_name, f"{steps} steps, batch {batch}", batch,
                        our_sample(module, params, size, batch, steps, args.max_batch),
                        their_sample(model, null, size, batch, steps,
                                     args.their_precision),
                        args.repeats))
  return rows


def max_batch_arg(text: str) -> int | str | None:
  """``--max-batch``: a positive number, "auto" or "none"."""
  if text in ("auto", "none"):
    return None if text == "none" else text
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive number, auto or none, got {text!r}")
  return int(text)


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "large"])
  parser.add_argument("--train-batch", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--sample-batch", type=int, nargs="+", default=[4, 16])
  parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 100],
                      help="network calls per sampling run")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-scan", dest="scan_layers", action="store_false",
                      help="our blocks as a Python loop rather than nn.scan")
  parser.add_argument("--no-remat", dest="remat", action="store_false",
                      help="keep activations instead of rematerialising each block")
  parser.add_argument("--remat-policy", choices=sorted(REMAT_POLICIES), default="full",
                      help="what a rematerialised block recomputes (minimal: all but the "
                           "weight products)")
  parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                      help="both sides' matmul dtype (theirs through torch.autocast)")
  parser.add_argument("--their-precision", choices=PRECISIONS,
                      help="diffusers' matmul dtype when it differs from --precision")
  parser.add_argument("--steps-per-call", type=int, default=1,
                      help="train steps per timed call (ours: one lax.scan over them)")
  parser.add_argument("--attention", choices=attention.IMPLEMENTATIONS, default="auto",
                      help="our attention (auto: per head on CPU from 32x32 tokens)")
  parser.add_argument("--max-batch", type=max_batch_arg, default="auto",
                      help="our sequences per network call in sampling: a number, auto "
                           "(2,048 tokens per call on CPU) or none (one call)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args()
  args.their_precision = args.their_precision or args.precision
  if args.repeats < 1 or args.steps_per_call < 1:
    parser.error("--repeats and --steps-per-call must be at least 1")
  if any(not 1 <= s <= TIMESTEPS for s in args.steps):
    parser.error(f"--steps must lie in [1, {TIMESTEPS}]")
  return args


def main():
  args = _parse()
  print(f"# vqdiffusion-jax vs diffusers {torch.__version__} on {jax.default_backend()} "
        f"({harness.device_name()}), torch threads {torch.get_num_threads()}")
  print(f"medians of {args.repeats} interleaved runs; guidance {GUIDANCE:g}, truncation "
        f"{TRUNCATION}; matmuls: ours {args.precision}, theirs {args.their_precision}; "
        f"ours: scan {args.scan_layers}, remat {args.remat} ({args.remat_policy}), "
        f"attention {args.attention}, sampling calls of at most {args.max_batch} sequences\n")
  print("| size | work | setting | ours / s | diffusers / s | ours / diffusers |")
  print("|---|---|---|---:|---:|---:|")
  rows = [row for name in args.sizes for row in run_size(name, args)]
  print("\nratios: " + ", ".join(f"{r['size']} {r['work']} {r['setting']} {r['ratio']:.2f}x"
                                 for r in rows))
  if args.json:
    with open(args.json, "w") as file:
      json.dump({"device": harness.device_name(), "precision": args.precision,
                 "their_precision": args.their_precision, "rows": rows},
                file, indent=1)


if __name__ == "__main__":
  main()
