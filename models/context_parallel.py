"""The one hook context parallelism reaches a module through.

Under context parallelism each rank of a process group holds one contiguous slice of every sequence (rank
r the r-th). A module that looks across the sequence (every mixer; a MoE for its balancing statistics)
needs that group to exchange what crosses the slice boundaries, and it alone knows what that is (each
mixer's docstring says what it exchanges: kernels/context.py and kernels/seqpar_newton.py provide the
collectives). Such modules inherit `ContextParallel`; train/parallel/parallelize.py calls
`set_context_group` on every one of them, and lifts the group (None) while whole sequences run.
"""

from __future__ import annotations

from torch.distributed import ProcessGroup


class ContextParallel:
    """Mixin of the modules that can run on one rank's slice of a sequence. `context_group` is None
    (the default: the module sees whole sequences) or the group the sequence is split over."""

    context_group: ProcessGroup | None = None

    def set_context_group(self, group: ProcessGroup | None) -> None:
        """Run on this rank's slice of sequences split over `group` from the next forward; None: whole
        sequences."""
        self.context_group = group
