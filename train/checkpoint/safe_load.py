"""Reading a DCP checkpoint without running code from it.

torch.distributed.checkpoint pickles two things: the `.metadata` file (read with pickle.load) and each
non-tensor value in the shards (the optimizer's hyperparameters: read with torch.load(weights_only=False)).
Either could name any function for unpickling to call. Here both are read with allowlists instead:
  .metadata    a pickle.Unpickler that resolves only DCP's own metadata classes and the few torch and
               pathlib types they hold (SAFE_METADATA_GLOBALS); anything else stops the load with the
               file and the name it asked for
  values       torch.load(weights_only=True): numbers, strings, tuples, lists, dicts, tensors
Tensors were already read by DCP with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
import re

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

# (module, name) → what unpickling may resolve. A checkpoint written by another torch version that needs
# more fails loudly here, naming the global; extend the set after reading what that global does.
SAFE_METADATA_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.strided & co., looked up by name
        ("collections", "OrderedDict"),
    }
    | {
        (module, cls)
        for module in ("pathlib", "pathlib._local")  # StorageMeta's checkpoint_id
        for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    }
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle in a checkpoint asked for something a checkpoint never holds; the message names it."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # torch.float32 & co.
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks for {module}.{name}, which DCP metadata never holds; "
            f"not loaded (unpickling it could run code)"
        )

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source} holds a persistent reference, which DCP metadata never does")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled through the allowlist (its read_metadata otherwise)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None  # set just above when missing
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with torch.load(weights_only=True) (its load_bytes
    otherwise)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        name = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's message: the global it refused, among advice on one line each
            found = re.search(r"GLOBAL (\S+)|(Unsupported operand \d+)", str(e))
            what = found.group(1) or found.group(2) if found else type(e).__name__
            raise UnsafeCheckpointError(
                f"the value {name} asks for {what}, which a checkpoint's values never hold; "
                f"not loaded (unpickling it could run code)"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[name], obj)
        else:
            self.state_dict[name] = obj
