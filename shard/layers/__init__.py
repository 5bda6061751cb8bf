"""Shared layers, tensor-parallel aware (world size 1 is the plain case)."""
