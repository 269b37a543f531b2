"""Pure functions on tensors: recurrences and their solvers. No nn.Module state, no config objects."""
from unroll.kernels.diag_recurrence import diag_recurrence
from unroll.kernels.linear_scan import linear_scan
from unroll.kernels.sequential import sequential_scan

__all__ = ["diag_recurrence", "linear_scan", "sequential_scan"]
