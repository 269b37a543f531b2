"""Parallelism, applied to the single-device model from outside: mesh, data/tensor/expert/pipeline parallelism."""
