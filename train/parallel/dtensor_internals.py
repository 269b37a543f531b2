"""The private torch internals that tensor parallelism and its checkpoints rely on, in one place, with why
(torch 2.13; after a torch upgrade, check these first):

  _StridedShard (torch.distributed.tensor.placement_types)
      the placement of a fused weight ([gate | up], [q | k | v]): each tp rank holds its part of every
      segment, which no public placement describes (tensor_parallel/layout.py). FSDP2 uses it too, to label
      a dimension tp has already sharded; fsdp_shard_placement keeps FSDP off our strided dimensions
      (tensor_parallel/placement.py) and the checkpoint views tell the two uses apart (checkpoint/views.py).
  LocalShardsWrapper (torch.distributed.tensor._shards_wrapper)
      a local tensor made of several blocks: the checkpoint view presents a strided weight to DCP as the
      blocks of the single-device tensor it holds, since DCP writes a DTensor as one block and refuses a
      strided one (checkpoint/views.py).
  DTensorSpec, TensorMeta (torch.distributed.tensor._dtensor_spec)
      to build that DTensor directly: DTensor.from_local calls view_as, which LocalShardsWrapper supports
      only up to 2-D (checkpoint/views.py).
  nn.Module._parameters
      a module's forward runs on its parameters' local shards: tensor_parallel/style.py puts plain tensors
      in place of the DTensor parameters in `_parameters` for the call (setattr would refuse a non-Parameter
      or register it) and restores exactly what was there.
"""

from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["DTensorSpec", "LocalShardsWrapper", "TensorMeta", "_StridedShard"]
