"""Sharded training: mesh, train state, train steps, checkpoints, the loop."""
