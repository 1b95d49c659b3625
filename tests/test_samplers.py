"""Samplers: shapes, determinism, no [MASK] left, inpainting, reveal counts, guidance."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional

from tests import dense, official_sampling
from vqdiffusion_jax.diffusion import discrete, guidance, samplers
from vqdiffusion_jax.diffusion import schedule as schedules

K, T, N, B = 16, 20, 12, 3
MASK_SCHEDULE = schedules.mask_and_replace(T, K)
UNIFORM_SCHEDULE = schedules.uniform(T, K)
TARGET = (np.arange(B * N).reshape(B, N) * 7) % K


def certain(x_t, t):
  """A network sure that x0 is TARGET."""
  del t
  return discrete.log_onehot(jnp.asarray(TARGET)[: x_t.shape[0]], K + 1)


def uniform(x_t, t):
  """A network with no idea: uniform over the codebook."""
  del t
  return discrete.x0_log_probs(jnp.zeros((*x_t.shape, K)))


ALL = [("vqdiffusion", 7, MASK_SCHEDULE), ("vqdiffusion", T, MASK_SCHEDULE),
       ("vqdiffusion", 1, MASK_SCHEDULE), ("vqdiffusion_fast", 5, MASK_SCHEDULE),
       ("fewer_tokens", 5, MASK_SCHEDULE),
       ("purity", 4, MASK_SCHEDULE), ("paella", 6, UNIFORM_SCHEDULE),
       ("vqdiffusion", 9, UNIFORM_SCHEDULE)]


@functools.cache
def _run(name, steps, schedule_kind, network, truncation=1.0, inpaint=False):
  schedule = MASK_SCHEDULE if schedule_kind == "mask" else UNIFORM_SCHEDULE
  config = samplers.SamplerConfig(name, steps, truncation_rate=truncation, typical_mass=0.9)
  fn = certain if network == "certain" else uniform
  kwargs = {}
  if inpaint:
    kwargs = {"known_tokens": jnp.asarray(KNOWN), "known_mask": jnp.asarray(KNOWN_MASK)}
  return jax.jit(lambda key: samplers.sample(fn, schedule, key, (B, N), config, **kwargs))


def _kind(schedule):
  return "mask" if schedule is MASK_SCHEDULE else "uniform"


KNOWN = (np.arange(B * N).reshape(B, N) * 5 + 3) % K
KNOWN_MASK = np.random.default_rng(0).random((B, N)) < 0.4


@pytest.mark.parametrize(("name", "steps", "schedule"), ALL)
def test_sampler_shapes_determinism_and_no_mask(name, steps, schedule):
  run = _run(name, steps, _kind(schedule), "uniform")
  a, b = np.asarray(run(jax.random.key(1))), np.asarray(run(jax.random.key(1)))
  c = np.asarray(run(jax.random.key(2)))
  assert a.shape == (B, N) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.min() >= 0 and a.max() < K  # no [MASK] (index K) left


@pytest.mark.parametrize(("name", "steps", "schedule"), ALL)
def test_certain_network_gives_its_tokens(name, steps, schedule):
  tokens = _run(name, steps, _kind(schedule), "certain")(jax.random.key(0))
  np.testing.assert_array_equal(tokens, TARGET)


@pytest.mark.parametrize(("name", "steps", "schedule"), ALL)
def test_inpainting_keeps_known_tokens(name, steps, schedule):
  tokens = np.asarray(_run(name, steps, _kind(schedule), "certain", inpaint=True)(
      jax.random.key(3)))
  np.testing.assert_array_equal(tokens[KNOWN_MASK], KNOWN[KNOWN_MASK])
  np.testing.assert_array_equal(tokens[~KNOWN_MASK], TARGET[~KNOWN_MASK])


@pytest.mark.parametrize("num_timesteps", [1, 10, 100, 37])
def test_inference_timesteps_are_distinct_and_span(num_timesteps):
  for steps in range(1, num_timesteps + 1):
    ts = samplers.inference_timesteps(num_timesteps - 1, steps)
    assert len(ts) == steps and ts[0] == num_timesteps - 1 and ts[-1] == 0 or steps == 1
    assert (np.diff(ts) < 0).all()


def _recording(network, calls):
  """Wraps a network to record (masked count, t) of every call from inside the loop."""
  def record(x_t, t):
    calls.append((np.sum(np.asarray(x_t) == K, axis=-1), np.asarray(t)))

  def fn(x_t, t):
    jax.debug.callback(record, x_t, t)
    return network(x_t, t)
  return fn


@pytest.mark.parametrize(("name", "rounds", "expected"), [
    ("fewer_tokens", 4, [12, 9, 6, 3]), ("purity", 5, [12, 9, 6, 3]),
    ("purity", 12, list(range(12, 0, -1))), ("fewer_tokens", 1, [12])])
def test_reveal_samplers_reveal_exactly_the_requested_counts(name, rounds, expected):
  calls = []
  config = samplers.SamplerConfig(name, rounds)
  tokens = jax.jit(lambda key: samplers.sample(_recording(uniform, calls), MASK_SCHEDULE, key,
                                               (B, N), config))(jax.random.key(0))
  jax.effects_barrier()
  assert [int(c[0][0]) for c in calls] == expected  # ceil(N / rounds) per call
  for masked, t in calls:
    assert (masked == masked[0]).all()
    cbar = np.exp(np.asarray(MASK_SCHEDULE.log_cumprod_ct))[:T]
    np.testing.assert_array_equal(t, np.argmin(np.abs(cbar[None] - masked[:, None] / N), -1))
  assert np.asarray(tokens).max() < K


def test_reveal_round_changes_exactly_quota_masked_positions():
  rng = np.random.default_rng(1)
  x = np.where(rng.random((4, 30)) < 0.6, K, rng.integers(0, K, (4, 30)))
  quota = np.minimum(np.array([0, 3, 7, 30]), (x == K).sum(-1))
  log_x0 = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 30, K + 1))), -1)
  for purity_prior in (False, True):
    out = np.asarray(samplers.reveal_round(jax.random.key(0), log_x0, jnp.asarray(x),
                                           jnp.asarray(quota), mask_index=K,
                                           purity_prior=purity_prior))
    changed = out != x
    assert (x[changed] == K).all()
    np.testing.assert_array_equal(changed.sum(-1), quota)
    assert (out[changed] < K).all()


def test_purity_prior_prefers_pure_positions():
  pure = np.arange(40) % 2 == 0
  logits = np.where(pure[:, None], np.where(np.arange(K) == 0, 30.0, 0.0), 0.0)
  log_x0 = discrete.x0_log_probs(jnp.broadcast_to(jnp.asarray(logits), (1000, 40, K)))
  x = jnp.full((1000, 40), K)
  out = np.asarray(samplers.reveal_round(jax.random.key(0), log_x0, x, jnp.ones(1000, int),
                                         mask_index=K, purity_prior=True))
  chosen = np.argmax(out != K, axis=-1)
  # Purity 1 against 1/16 at the others: a pure position wins with probability 16/17.
  np.testing.assert_allclose(pure[chosen].mean(), 16 / 17, atol=0.03)


def _official(num_timesteps, num_tokens, *, prior_rule=2, prior_weight=1.0):
  official = official_sampling.OfficialSampling(num_timesteps, K + 1, num_tokens)
  official.prior_rule, official.prior_weight = prior_rule, prior_weight
  return official


def _purity_inputs(batch=3, num_tokens=10, seed=4):
  """x0 log-probs clamped as the official's, and tokens with [MASK]s and revealed tokens."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_tokens, K)) * np.linspace(0.5, 1.5, num_tokens)[:, None]
  logits[:, -1, 0] += 4.0
  log_x0 = np.asarray(discrete.x0_log_probs(jnp.asarray(logits, jnp.float32)))
  x = np.where(rng.random((batch, num_tokens)) < 0.6, K, rng.integers(0, K, (batch, num_tokens)))
  x[:, -1] = rng.integers(0, K, batch)  # the purest position is already revealed
  x[:, 0] = K
  return log_x0, x


def _class_first(array):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, 1)))


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0, 3.0])
def test_purity_sharpening_and_weights_match_official(r):
  log_x0, x = _purity_inputs()
  official = _official(T, x.shape[1], prior_weight=r)
  log_x = official_sampling.index_to_log_onehot(torch.from_numpy(x), K + 1)
  score = official.prior_score(log_x, _class_first(log_x0))
  ours = samplers.relative_purity(jnp.asarray(log_x0[..., :K]))
  np.testing.assert_allclose(ours, score.numpy(), rtol=1e-6)
  raw = np.exp(log_x0[..., :K].max(-1))
  assert (raw.argmax(-1) == x.shape[1] - 1).all() and raw.max() < 0.99  # revealed, not 1
  prob = official.adjusted(_class_first(log_x0), score).numpy()
  sharpened = samplers.sharpen(jnp.asarray(log_x0[..., :K]), r)
  np.testing.assert_allclose(sharpened, np.moveaxis(prob, 1, -1)[..., :K], atol=1e-4)
  weights = official.choice_weights(log_x, score).numpy()
  np.testing.assert_allclose(samplers.reveal_weights(jnp.asarray(log_x0), jnp.asarray(x),
                                                     mask_index=K, purity_prior=True),
                             weights, rtol=1e-6)
  official.prior_rule = 1  # fewer tokens: uniform over [MASK] positions, no sharpening
  uniform_weights = official.choice_weights(log_x, official.prior_score(log_x, None)).numpy()
  np.testing.assert_array_equal(samplers.reveal_weights(jnp.asarray(log_x0), jnp.asarray(x),
                                                        mask_index=K, purity_prior=False),
                                uniform_weights)


def _pair_probabilities(weights):
  """Exact P(chosen set = {i, j}) of two draws without replacement in proportion to weights."""
  total = weights.sum()
  pairs = {}
  for i, j in itertools.permutations(np.flatnonzero(weights), 2):
    key = (min(i, j), max(i, j))
    pairs[key] = pairs.get(key, 0.0) + weights[i] / total * weights[j] / (total - weights[i])
  return pairs


def _pair_frequencies(revealed):
  keys, counts = np.unique(np.sort(np.argwhere(revealed)[:, 1].reshape(-1, 2), axis=1), axis=0,
                           return_counts=True)
  return {tuple(k): c / len(revealed) for k, c in zip(keys, counts, strict=True)}


def test_purity_reveals_the_official_positions_and_tokens():
  draws = 20000
  log_x0, x = _purity_inputs(batch=1, num_tokens=6, seed=5)
  x[0] = [K, K, 3, K, K, 5]
  official = _official(T, 6)
  log_x = official_sampling.index_to_log_onehot(torch.from_numpy(x), K + 1)
  score = official.prior_score(log_x, _class_first(log_x0))
  exact = _pair_probabilities(official.choice_weights(log_x, score).numpy()[0].astype(np.float64))
  keys = jax.random.split(jax.random.key(0), draws)
  ours = np.asarray(jax.jit(jax.vmap(lambda key: samplers.reveal_round(
      key, jnp.asarray(log_x0), jnp.asarray(x), jnp.array([2]), mask_index=K,
      purity_prior=True)[0]))(keys))
  torch.manual_seed(0)
  batch_log_x = log_x.expand(draws, -1, -1).clone()
  out, sampled = official.p_sample(batch_log_x, _class_first(log_x0).expand(draws, -1, -1),
                                   torch.full((draws,), 5), [0] * draws, 2)
  theirs = official_sampling.log_onehot_to_index(out).numpy()
  assert set(sampled) == {2}
  for name, tokens in (("ours", ours), ("official", theirs)):
    frequencies = _pair_frequencies(tokens != x)
    assert set(frequencies) <= set(exact), name
    for pair, p in exact.items():
      assert abs(frequencies.get(pair, 0.0) - p) < 0.015, (name, pair, p)
  # Position 3 is revealed most: its tokens follow the official sharpened distribution.
  prob = np.exp(official.adjusted(_class_first(log_x0), score).numpy()[0, :K, 3])
  for tokens in (ours, theirs):
    drawn = tokens[:, 3][tokens[:, 3] != K]
    np.testing.assert_allclose(np.bincount(drawn, minlength=K) / len(drawn), prob, atol=0.015)


@pytest.mark.parametrize("num_timesteps", [2, 10, 37, 100])
def test_official_fast_steps_match_official_list(num_timesteps):
  official = _official(num_timesteps, N)
  for steps in range(1, num_timesteps + 1):
    visited, posterior = samplers.official_fast_steps(num_timesteps - 1, steps)
    skip_step = -(-num_timesteps // steps) - 1
    expected = official.sample_fast_steps(skip_step)
    np.testing.assert_array_equal(np.stack([visited, posterior], 1), np.array(expected))

def test_every_official_speed_has_its_number_of_steps():
  official = _official(100, N)
  for speed in range(2, 11):  # the official infer_speed 2..10 with T = 100
    visited, _ = samplers.official_fast_steps(99, -(-100 // speed))
    assert [int(v) for v in visited] == [i for i, _ in official.sample_fast_steps(speed - 1)]


POSTERIOR_STEP = jax.jit(functools.partial(samplers.posterior_step, MASK_SCHEDULE))


def _fast_inputs(seed=6):
  rng = np.random.default_rng(seed)
  log_x0 = np.asarray(discrete.x0_log_probs(jnp.asarray(rng.normal(size=(2, N, K)) * 2.0,
                                                        jnp.float32)))
  x = np.where(rng.random((2, N)) < 0.5, K, rng.integers(0, K, (2, N)))
  return log_x0, x


@pytest.mark.parametrize("steps", [10, 7, 4])
def test_official_fast_moves_match_official_sample_fast(steps):
  official = _official(T, N)
  log_x0, x = _fast_inputs()
  speed = -(-T // steps)  # strides 2, 3 and 5; with 5, step 4 moves to 3, then 0 to x_0
  network, source, target = samplers.reverse_moves("vqdiffusion_fast", T - 1, steps)
  matrices = dense.step_matrices(MASK_SCHEDULE)
  size = K + 1
  for (index, _), t, frm, to in zip(official.sample_fast_steps(speed - 1), network, source,
                                    target, strict=True):
    assert index == t
    theirs, _ = official.sample_fast_step(
        official_sampling.index_to_log_onehot(torch.from_numpy(x), K + 1),
        _class_first(log_x0), index, speed - 1)
    theirs = np.exp(np.moveaxis(theirs.numpy(), 1, -1))
    ours = np.exp(np.asarray(POSTERIOR_STEP(jnp.asarray(log_x0), jnp.asarray(x),
                                            jnp.full((2,), frm), jnp.full((2,), to))))
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    # On explicit matrices: the one-step posterior of step frm, whatever step x_t was at.
    qbar = [dense.product(matrices[:u + 1], size) for u in (to, frm)]
    for b, n in itertools.product(range(2), range(N)):
      expected = dense.posterior(np.exp(log_x0[b, n, :K].astype(np.float64)), x[b, n], qbar[0],
                                 matrices[frm], qbar[1])
      np.testing.assert_allclose(ours[b, n], expected, rtol=1e-5, atol=1e-7)


def test_exact_and_official_skips_differ_by_the_posterior_step():
  log_x0, x = _fast_inputs(7)
  network, source, target = samplers.reverse_moves("vqdiffusion_fast", T - 1, 5)
  exact = samplers.reverse_moves("vqdiffusion", T - 1, 5)
  np.testing.assert_array_equal(exact[0], [19, 14, 10, 5, 0])
  np.testing.assert_array_equal(network, [19, 15, 11, 7, 3, 0])
  np.testing.assert_array_equal(source, [16, 12, 8, 4, 3, 0])
  np.testing.assert_array_equal(target, source - 1)
  matrices = dense.step_matrices(MASK_SCHEDULE)
  t, s = 19, 15  # the first official move, from x_19 to x_15
  exact_move = np.exp(np.asarray(POSTERIOR_STEP(jnp.asarray(log_x0), jnp.asarray(x),
                                                 jnp.full((2,), t), jnp.full((2,), s))))
  expected = dense.posterior(np.exp(log_x0[0, 0, :K].astype(np.float64)), x[0, 0],
                             dense.product(matrices[:s + 1], K + 1),
                             dense.product(matrices[s + 1:t + 1], K + 1),
                             dense.product(matrices[:t + 1], K + 1))
  np.testing.assert_allclose(exact_move[0, 0], expected, rtol=1e-5, atol=1e-7)
  official_move = np.exp(np.asarray(POSTERIOR_STEP(jnp.asarray(log_x0), jnp.asarray(x),
                                                    jnp.full((2,), 16), jnp.full((2,), 15))))
  assert np.abs(official_move - exact_move).max() > 0.05


def test_vqdiffusion_fast_calls_the_network_at_the_official_steps():
  calls = []
  config = samplers.SamplerConfig("vqdiffusion_fast", 6)
  jax.jit(lambda key: samplers.sample(_recording(uniform, calls), MASK_SCHEDULE, key, (B, N),
                                      config))(jax.random.key(0))
  jax.effects_barrier()
  official = _official(T, N)
  assert [int(t[0]) for _, t in calls] == [i for i, _ in official.sample_fast_steps(3)]


def test_typical_filter_against_numpy():
  rng = np.random.default_rng(3)
  log_p = np.log(rng.dirichlet(np.ones(K) * 0.5, size=20))
  out = np.asarray(samplers.typical_filter(jnp.asarray(log_p), 0.5))
  for row, kept in zip(log_p, out, strict=True):
    p = np.exp(row)
    order = np.argsort(np.abs(-row - (-(p * row).sum())), kind="stable")
    before = np.cumsum(p[order]) - p[order]
    expect = np.zeros(K, bool)
    expect[order[before < 0.5]] = True
    np.testing.assert_array_equal(np.isfinite(kept), expect)
    np.testing.assert_allclose(kept[expect], row[expect], rtol=1e-6)
  np.testing.assert_allclose(samplers.typical_filter(jnp.asarray(log_p), 1.0), log_p, rtol=1e-6)


def _conditional_network(calls):
  """Logits depend on the condition (B, 2): favour token cond[0] with strength cond[1]."""
  def logits_fn(x_t, t, cond):
    calls.append(x_t.shape[0])
    del t
    onehot = jax.nn.one_hot(cond[:, 0].astype(int), K)
    return jnp.broadcast_to((onehot * cond[:, 1:2])[:, None, :], (*x_t.shape, K))
  return logits_fn


def test_guidance_batches_both_passes_and_matches_guide():
  calls = []
  cond = jnp.array([[3, 2.0], [5, 1.0]])
  null = jnp.array([[3, 0.5], [1, 1.0]])
  fn = samplers.conditioned_log_x0(_conditional_network(calls), [cond], null, 3.0)
  x, t = jnp.full((2, N), K), jnp.array([4, 4])
  out = fn(x, t)
  assert calls == [4]  # one network call with conditional and null passes batched
  logits_fn = _conditional_network([])
  expected = guidance.guide(discrete.x0_log_probs(logits_fn(x, t, cond)),
                            discrete.x0_log_probs(logits_fn(x, t, null)), 3.0)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  plain = samplers.conditioned_log_x0(_conditional_network(calls), [cond])
  np.testing.assert_allclose(plain(x, t), discrete.x0_log_probs(logits_fn(x, t, cond)), rtol=1e-6)
  assert calls[-1] == 2  # scale 1: no unconditional pass


def test_regions_select_each_prompt_per_position():
  calls = []
  cond_a, cond_b = jnp.array([[2, 50.0]]), jnp.array([[9, 50.0]])
  left = (np.arange(N) < N // 2).astype(np.float32)
  fn = samplers.conditioned_log_x0(_conditional_network(calls), [cond_a, cond_b],
                                   region_weights=jnp.asarray(np.stack([left, 1 - left])))
  config = samplers.SamplerConfig("vqdiffusion", 5)
  tokens = np.asarray(samplers.sample(fn, MASK_SCHEDULE, jax.random.key(0), (1, N), config))
  np.testing.assert_array_equal(tokens[0], np.where(left > 0, 2, 9))
  assert calls == [2] * len(calls)


def test_editing_starts_from_the_given_tokens():
  config = samplers.SamplerConfig("vqdiffusion", 3, start_step=4)
  out = samplers.sample(certain, MASK_SCHEDULE, jax.random.key(0), (B, N), config,
                        init_tokens=jnp.asarray(KNOWN))
  np.testing.assert_array_equal(out, TARGET)
  # A network that returns x_t's own tokens where unmasked keeps an edit at step 0 intact.
  keep = lambda x_t, t: discrete.log_onehot(jnp.minimum(x_t, K - 1), K + 1)  # noqa: E731
  kept = samplers.sample(keep, MASK_SCHEDULE, jax.random.key(0), (B, N),
                         samplers.SamplerConfig("vqdiffusion", 1, start_step=0),
                         init_tokens=jnp.asarray(KNOWN))
  assert (np.asarray(kept) == KNOWN).mean() > 0.9


def test_truncation_limits_drawn_tokens_to_the_top_classes():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15] + [0.05 / (K - 3)] * (K - 3)))
  fn = lambda x_t, t: discrete.x0_log_probs(jnp.broadcast_to(logits, (*x_t.shape, K)))  # noqa: E731
  config = samplers.SamplerConfig("vqdiffusion", 4, truncation_rate=0.7)
  out = np.asarray(samplers.sample(fn, MASK_SCHEDULE, jax.random.key(0), (64, N), config))
  assert set(np.unique(out)) <= {0, 1}  # mass above class 2 is 0.8 >= 0.7


@pytest.mark.parametrize(("config", "message"), [
    (samplers.SamplerConfig("ddim"), "unknown sampler"),
    (samplers.SamplerConfig("vqdiffusion", 0), "out of range"),
    (samplers.SamplerConfig("vqdiffusion", T + 1), "out of range"),
    (samplers.SamplerConfig("purity", N + 1), "reveal rounds"),
    (samplers.SamplerConfig("vqdiffusion", 3, truncation_rate=0.0), "truncation_rate"),
    (samplers.SamplerConfig("vqdiffusion", 3, truncation_rate=float("nan")),
     "truncation_rate must be a finite number in \\(0, 1\\], got nan"),
    (samplers.SamplerConfig("vqdiffusion", 3, guidance_scale=float("nan")),
     "guidance_scale must be a finite number >= 0, got nan"),
    (samplers.SamplerConfig("purity", 3, purity_temperature=float("inf")),
     "purity_temperature must be a finite number >= 0, got inf"),
    (samplers.SamplerConfig("vqdiffusion", 3, start_step=T), "start_step"),
    (samplers.SamplerConfig("purity_official"), "1024 tokens and T in .* got 12 tokens and T = 20"),
    (samplers.SamplerConfig("purity_official", 5), "leave num_inference_steps unset"),
    (samplers.SamplerConfig("fewer_tokens_official", start_step=3), "editing"),
    (samplers.SamplerConfig("purity", max_reveal_per_call=5), "max_reveal_per_call=5"),
    (samplers.SamplerConfig("purity_official", max_reveal_per_call=0), "max_reveal_per_call=0"),
])
def test_bad_requests_are_clear_errors(config, message):
  with pytest.raises(ValueError, match=message):
    samplers.sample(uniform, MASK_SCHEDULE, jax.random.key(0), (B, N), config)


def test_mismatched_inputs_are_clear_errors():
  config = samplers.SamplerConfig("vqdiffusion", 3)
  with pytest.raises(ValueError, match="known_mask has shape"):
    samplers.sample(uniform, MASK_SCHEDULE, jax.random.key(0), (B, N), config,
                    known_tokens=jnp.zeros((B, N), int), known_mask=jnp.zeros((B, N + 1), bool))
  with pytest.raises(ValueError, match="editing needs"):
    samplers.sample(uniform, MASK_SCHEDULE, jax.random.key(0), (B, N), config,
                    init_tokens=jnp.zeros((B, N), int))
  with pytest.raises(ValueError, match="null condition"):
    samplers.conditioned_log_x0(_conditional_network([]), [jnp.zeros((1, 2))], None, 2.0)
  with pytest.raises(ValueError, match="schedule has none"):
    samplers.sample(uniform, UNIFORM_SCHEDULE, jax.random.key(0), (B, N),
                    samplers.SamplerConfig("purity", 3))


def _row_network(calls):
  """Logits that differ per row: they depend on its tokens, its t and its condition."""
  def logits_fn(x_t, t, cond):
    calls.append(x_t.shape[0])
    by_token = 2.0 * jax.nn.one_hot(x_t, K)
    return by_token + 0.1 * t[:, None, None] + cond["scale"][:, None, None] * jnp.arange(K) / K
  return logits_fn


def test_network_calls_split_by_max_batch_give_the_one_call_result():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, K + 1, (7, N)))
  t = jnp.asarray(rng.integers(0, 10, 7))
  cond = {"scale": jnp.asarray(rng.normal(size=7), jnp.float32)}
  whole = samplers.batched_calls(_row_network([]), None)(x, t, cond)
  calls = []
  split = jax.jit(samplers.batched_calls(_row_network(calls), 3))(x, t, cond)
  assert calls == [3]  # one traced body: three calls of three rows, two padding rows dropped
  np.testing.assert_allclose(split, whole, rtol=1e-6)


def test_guided_passes_in_several_calls_match_one_call():
  cond = jnp.array([[3, 2.0], [5, 1.0], [7, 0.5]])
  null = jnp.array([[3, 0.5], [1, 1.0], [2, 2.0]])
  calls = []
  several = samplers.conditioned_log_x0(_conditional_network(calls), [cond], null, 3.0,
                                        max_batch=2)
  one = samplers.conditioned_log_x0(_conditional_network([]), [cond], null, 3.0, max_batch=None)
  x, t = jnp.full((3, N), K), jnp.array([4, 4, 4])
  np.testing.assert_allclose(several(x, t), one(x, t), rtol=1e-6)
  assert calls == [2]  # six rows (conditional and null) in three calls of two


@pytest.mark.parametrize("max_batch, tokens, platform, expected", [
    ("auto", 256, "cpu", samplers.CPU_TOKENS_PER_CALL // 256),
    ("auto", 4 * samplers.CPU_TOKENS_PER_CALL, "cpu", 1),
    ("auto", 256, "gpu", None),
    ("auto", 256, "tpu", None),
    (None, 256, "cpu", None),
    (5, 256, "gpu", 5),
])
def test_network_batch_resolves_auto_by_platform(max_batch, tokens, platform, expected):
  assert samplers.network_batch(max_batch, tokens, platform) == expected


@pytest.mark.parametrize("bad", [0, -1, "many"])
def test_bad_max_batch_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="max_batch"):
    samplers.conditioned_log_x0(_conditional_network([]), [jnp.zeros((1, 2))], max_batch=bad)


OFFICIAL_N = 1024
_TOY = np.random.default_rng(11)
TOY_TARGET = _TOY.integers(0, K, OFFICIAL_N)
TOY_BONUS = _TOY.uniform(1.0, 4.0, OFFICIAL_N)  # how pure each position's prediction is
TOY_LOGITS = _TOY.uniform(0.0, 0.3, (OFFICIAL_N, K)) + TOY_BONUS[:, None] * (
    TOY_TARGET[:, None] == np.arange(K))


def _toy_logits(x_t, t, xp):
  """(B, N, K) logits of a fixed network that favours TOY_TARGET.

  Unsure at t > 0 (the more so where TOY_BONUS is low), surer as more of x_t
  is revealed, and certain at t = 0. ``xp`` is numpy or jax.numpy.
  """
  revealed = xp.mean((x_t != K) * 1.0, axis=-1)[:, None, None]
  scale = 1.0 + 49.0 * (t == 0)[:, None, None]
  return scale * TOY_LOGITS + 2.0 * revealed * (TOY_TARGET[:, None] == np.arange(K))


def _official_schedule_run(name, num_timesteps, max_reveal, batch):
  """Ours: (x_t, t) of every network call and the tokens drawn, under a fixed key."""
  calls = []

  def record(x_t, t):
    calls.append((np.asarray(x_t), np.asarray(t)))

  def log_x0_fn(x_t, t):
    jax.debug.callback(record, x_t, t)
    return discrete.x0_log_probs(_toy_logits(x_t, t, jnp))

  config = samplers.SamplerConfig(name, max_reveal_per_call=max_reveal)
  schedule = schedules.mask_and_replace(num_timesteps, K)
  tokens = jax.jit(lambda key: samplers.sample(log_x0_fn, schedule, key, (batch, OFFICIAL_N),
                                               config))(jax.random.key(0))
  jax.effects_barrier()
  return calls, np.asarray(tokens)


def _official_statement_run(name, num_timesteps, max_reveal, batch):
  """The statement of the official ``sample``: the same records, under a fixed torch seed."""
  official = _official(num_timesteps, OFFICIAL_N, prior_rule=2 if name.startswith("purity") else 1)
  if max_reveal is not None:
    official.prior_ps = max_reveal
    official.update_n_sample()
  calls = []

  def predict_start(log_x, t):
    x_t = official_sampling.log_onehot_to_index(log_x).numpy()
    calls.append((x_t, t.numpy()))
    logits = torch.from_numpy(np.moveaxis(_toy_logits(x_t, t.numpy(), np), -1, 1))
    log_pred = functional.log_softmax(logits.double(), dim=1).float()
    log_pred = torch.cat((log_pred, torch.full((batch, 1, OFFICIAL_N), -70.0)), dim=1)
    return torch.clamp(log_pred, -70, 0)

  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # hundreds of calls on small tensors: faster without thread handoffs
  try:
    torch.manual_seed(0)
    return calls, official.sample(predict_start, batch).numpy()
  finally:
    torch.set_num_threads(threads)


@functools.cache
def _official_runs(name, num_timesteps, max_reveal, batch):
  return (_official_schedule_run(name, num_timesteps, max_reveal, batch),
          _official_statement_run(name, num_timesteps, max_reveal, batch))


@pytest.mark.parametrize(("name", "num_timesteps", "max_reveal", "batch"), [
    ("purity_official", 10, None, 16), ("purity_official", 100, 5, 2),
    ("purity_official", 50, 7, 2), ("fewer_tokens_official", 25, None, 2)])
def test_official_reveal_run_follows_the_official_sample(name, num_timesteps, max_reveal, batch):
  table = samplers.official_reveal_counts(num_timesteps, OFFICIAL_N, max_reveal)
  for calls, tokens in _official_runs(name, num_timesteps, max_reveal, batch):
    steps = [t for _, t in calls]
    masked = np.stack([np.sum(x_t == K, axis=-1) for x_t, _ in calls])  # (calls, B)
    for t in range(num_timesteps):  # [MASK]s before each step's first call, per image
      first = next(i for i, step in enumerate(steps) if step[0] == t)
      np.testing.assert_array_equal(masked[first], np.full(batch, OFFICIAL_N - table[t + 1:].sum()))
    for (before, _), (after, _) in itertools.pairwise(calls):
      revealed = before != K
      np.testing.assert_array_equal(after[revealed], before[revealed])  # kept until t = 0
    before_last = calls[-1][0]
    assert ((before_last != TOY_TARGET) & (before_last != K)).any()  # t = 0 redraws these
    np.testing.assert_array_equal(tokens, np.broadcast_to(TOY_TARGET, tokens.shape))
  (ours, _), (theirs, _) = _official_runs(name, num_timesteps, max_reveal, batch)
  assert len(ours) == len(theirs) == samplers.SamplerConfig(
      name, max_reveal_per_call=max_reveal).steps(num_timesteps, OFFICIAL_N)
  np.testing.assert_array_equal(np.stack([t for _, t in ours]), np.stack([t for _, t in theirs]))
  np.testing.assert_array_equal(np.stack([np.sum(x == K, -1) for x, _ in ours]),
                                np.stack([np.sum(x == K, -1) for x, _ in theirs]))


def test_official_purity_run_draws_as_the_official_sample():
  """The same statistics of both runs, which use different random streams."""
  stats = []
  for calls, _ in _official_runs("purity_official", 10, None, 16):
    first = np.nonzero(calls[1][0] != K)[1]  # the positions the first call revealed
    before_last = calls[-1][0]
    revealed = before_last != K
    on_target = (before_last == TOY_TARGET)[revealed].mean()
    stats.append((TOY_BONUS[first].mean(), on_target))
  (ours_bonus, ours_on_target), (theirs_bonus, theirs_on_target) = stats
  # Purity reveals the surer positions first: above the mean bonus by ~12 standard errors.
  assert min(ours_bonus, theirs_bonus) > TOY_BONUS.mean() + 0.2
  assert abs(ours_bonus - theirs_bonus) < 0.12
  # The revealed tokens follow the same sharpened distributions.
  assert abs(ours_on_target - theirs_on_target) < 0.02


@pytest.mark.parametrize("max_reveal", [None, 5, 10, 11])
def test_official_reveal_counts_are_the_official_tables(max_reveal):
  for num_timesteps in (10, 25, 50, 100):
    official = _official(num_timesteps, OFFICIAL_N)
    if max_reveal is not None:
      official.prior_ps = max_reveal
      official.update_n_sample()
    counts = samplers.official_reveal_counts(num_timesteps, OFFICIAL_N, max_reveal)
    np.testing.assert_array_equal(counts, official.n_sample)
    assert counts[1:].sum() <= OFFICIAL_N  # t = 0 fills what the steps before it leave


def test_official_tables_name_the_supported_sizes():
  with pytest.raises(ValueError, match=r"T in \(100, 50, 25, 10\); got 1024 tokens and T = 20"):
    samplers.official_reveal_counts(20, OFFICIAL_N)
  with pytest.raises(ValueError, match="got 256 tokens and T = 100"):
    samplers.SamplerConfig("purity_official").steps(100, 256)


def test_official_purity_keeps_known_tokens():
  known_mask = np.random.default_rng(2).random((1, OFFICIAL_N)) < 0.3
  known = (TOY_TARGET + 1) % K
  network = lambda x_t, t: discrete.x0_log_probs(_toy_logits(x_t, t, jnp))  # noqa: E731
  schedule = schedules.mask_and_replace(10, K)
  tokens = np.asarray(jax.jit(lambda key: samplers.sample(
      network, schedule, key, (1, OFFICIAL_N), samplers.SamplerConfig("purity_official"),
      known_tokens=jnp.asarray(known[None]), known_mask=jnp.asarray(known_mask)))(
          jax.random.key(0)))[0]
  np.testing.assert_array_equal(tokens, np.where(known_mask[0], known, TOY_TARGET))
