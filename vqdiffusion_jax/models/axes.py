"""Logical axis names of parameters, and the default rules that map them onto the mesh.

Every parameter is created with ``nn.with_logical_partitioning(init, axes)``
using the names below; a config's rules map them onto the mesh axes
``data`` / ``fsdp`` / ``tensor`` (``train.mesh.logical_shardings``).

Activations carry no logical constraints. The jitted steps give the state
and the batch their shardings (parameters by these rules, the batch over
``data`` and ``fsdp``) and XLA propagates layouts to the activations from
there; ``tests/test_train_sharding.py`` checks the shardings a sharded step
returns and its results against one device.
"""

from __future__ import annotations

from collections.abc import Sequence

# Parameter axes.
EMBED = "embed"            # model width D
MLP = "mlp"                # feed-forward hidden width
HEADS = "heads"            # attention heads
HEAD_DIM = "head_dim"      # per-head width
VOCAB = "vocab"            # token tables and output classes (codebook K (+1), text vocab)
COND_EMBED = "cond_embed"  # width of the conditioning sequence (text features)
POSITION = "position"      # position tables
TIMESTEP = "timestep"      # the learned timestep table's rows
CONV_IN = "conv_in"        # convolution input channels
CONV_OUT = "conv_out"      # convolution output channels
CONV_HEIGHT = "conv_height"  # convolution kernel height
CONV_WIDTH = "conv_width"    # convolution kernel width (a distinct name: an array's
#                              logical names must be unique for flax's rules)
CONV_KERNEL = (CONV_HEIGHT, CONV_WIDTH)  # the spatial axes of a conv kernel, in order
NORM = "norm"              # scale / bias of normalisation layers
LAYERS = "layers"          # the stacked axis of scanned layers
CODE_DIM = "code_dim"      # codebook vector width

# Default logical -> mesh rules: weights' larger axis over fsdp (ZeRO-3 style),
# heads / mlp over tensor.
DEFAULT_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (VOCAB, "tensor"),
    (COND_EMBED, None),
    (POSITION, None),
    (TIMESTEP, None),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (CONV_HEIGHT, None),
    (CONV_WIDTH, None),
    (NORM, None),
    (LAYERS, None),
    (CODE_DIM, None),
)
