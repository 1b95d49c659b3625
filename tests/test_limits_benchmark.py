"""The arithmetic of benchmarks/limits.py: op kinds, kernel FLOPs and the matmul-only bound."""

import pytest

from benchmarks import limits


@pytest.mark.parametrize("name, kind", [
    ("ynn_fusion.66", "matmul"),
    ("dot_general.160", "matmul"),
    ("copy_bitcast_fusion.5", "layout copy"),
    ("transpose_copy_fusion.9", "layout copy"),
    ("convolution.3", "convolution"),
    ("wrapped_convolution", "convolution"),
    ("convert_bitcast_fusion.15", "dtype convert"),
    ("wrapped_convert", "dtype convert"),
    ("wrapped_broadcast.6", "loop and buffer init"),
    ("bitcast_dynamic-update-slice_fusion.1", "loop and buffer init"),
    ("while", "loop and buffer init"),
    ("multiply_add_fusion", "elementwise and reductions"),
    ("add_convert_fusion", "elementwise and reductions"),
])
def test_xla_ops_are_sorted_by_kind(name, kind):
  assert limits.xla_kind(name) == kind


def test_kernel_flops_count_every_chained_product():
  assert limits.CHAIN == 10
  # the MLP chain alternates up (256 -> 1024) and down (1024 -> 256): 10 products of 256 x 1024
  assert limits._kernel_flops((), 8192, (256, 1024, 256)) == 10 * 2 * 8192 * 256 * 1024
  # attention: 128 heads, scores (256 x 64 @ 64 x 256) then values (256 x 256 @ 256 x 64)
  assert limits._kernel_flops((128,), 256, (64, 256, 64)) == 10 * 2 * 128 * 256 * 64 * 256
  assert limits._kernel_flops((), 100, (8, 8)) == 10 * 2 * 100 * 8 * 8


def test_matmul_bound_is_their_time_over_our_matmul_time():
  ours = {"wall_ms": 100.0, "shares": {"matmul": 0.5, "layout copy": 0.5}}
  theirs = {"wall_ms": 150.0, "shares": {"matmul": 0.6, "everything else": 0.4}}
  assert limits.matmul_bound(ours, theirs) == pytest.approx(3.0)
  assert limits.matmul_bound({"wall_ms": 1.0, "shares": {"copy": 1.0}}, theirs) == float("inf")
