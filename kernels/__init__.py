"""Pure functions on tensors: recurrences and their solvers. No nn.Module state, no config objects."""
from unroll.kernels.sequential import sequential_scan

__all__ = ["sequential_scan"]
