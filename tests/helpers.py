"""Assertions shared by the model tests."""

import flax
import flax.linen as nn
import jax

from vqdiffusion_jax.models import axes

KNOWN_AXES = {v for k, v in vars(axes).items() if k.isupper() and isinstance(v, str)}


def assert_logically_partitioned(params) -> None:
  """Every parameter carries logical axis names, one known name per dim."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves, "no parameters"
  for path, leaf in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(params), is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned)
  ).items():
    name = "/".join(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axes"
    assert len(leaf.names) == leaf.value.ndim, f"{name}: {leaf.names} for {leaf.value.shape}"
    unknown = [n for n in leaf.names if n is not None and n not in KNOWN_AXES]
    assert not unknown, f"{name}: unknown axis names {unknown}"
