"""Pure functions on tensors: recurrences and their solvers. No nn.Module state, no config objects."""
from unroll.kernels.diag_recurrence import diag_recurrence
from unroll.kernels.sequential import sequential_scan

__all__ = ["diag_recurrence", "sequential_scan"]
