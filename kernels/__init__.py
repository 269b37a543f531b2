"""Pure functions on tensors: recurrences and their solvers. No nn.Module state, no config objects."""
from unroll.kernels.linear_scan import linear_scan
from unroll.kernels.newton import SolveInfo, newton_solve, sequential_solve
from unroll.kernels.sequential import sequential_scan

__all__ = ["SolveInfo", "linear_scan", "newton_solve", "sequential_scan", "sequential_solve"]
