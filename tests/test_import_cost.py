"""What a rank imports: every rank of every run start pays for each import, so a layout's process loads only what
that layout uses. megatron.core (seconds: its layers, fusions, inference contexts) is for `unroll data prepare`
alone; torch.distributed.pipelining (which loads torch._dynamo) for pp > 1 alone."""

import subprocess
import sys

import numpy as np

from unroll.data.shards import indexed_dataset_module

HEAVY = ("megatron", "torch.distributed.pipelining", "torch._dynamo")


def test_a_rank_without_pipelining_reads_shards_without_megatron_or_dynamo(tmp_path):
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(str(tmp_path / "s.bin"), dtype=np.uint16)
    builder.add_document(np.arange(10), [10])
    builder.finalize(str(tmp_path / "s.idx"))
    code = (
        "import sys, unroll.train.trainer, unroll.train.preflight\n"
        "from unroll.data.shards import TokenShard\n"
        f"print(TokenShard({str(tmp_path / 's')!r}).n_tokens)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))\n"
        "import unroll.train.parallel.pipeline\n"
        "print('torch.distributed.pipelining' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["10", "[]", "True"]
