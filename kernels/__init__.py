"""Pure functions on tensors: recurrences and their solvers. No nn.Module state, no config objects.

linear_scan(a, b, h0=None, *, reverse=False, resets=None)       h_t = a_t h_{t−1} + b_t, O(T) work
newton_solve(cell, x, h0, *, structure=..., resets=None, tol=None, max_iters=None, damping=...) -> (h, SolveInfo)
sequential_solve(cell, x, h0, *, structure=..., resets=None)     the linear-time loop, same gradient
Cell                                                             what a cell must provide (kernels/cell.py)
"""

from unroll.kernels.cell import Cell
from unroll.kernels.linear_scan import linear_scan
from unroll.kernels.newton import SolveInfo, newton_solve, sequential_solve

__all__ = ["Cell", "SolveInfo", "linear_scan", "newton_solve", "sequential_solve"]
