"""`unroll bench attention`: attention over rows packed with isolated documents, three ways side by side:

  causal      SDPA's own causal flag, documents ignored: the floor (what packed rows cost)
  sdpa-mask   SDPA with the dense boolean [B, 1, T, T] document mask (model.attention_kernel=sdpa)
  flex-tiles  flex_attention, compiled, over the tile mask built from the document ids (=flex; auto on CUDA)

Each path includes building its mask from the document ids, as the model does in every layer. On CUDA the
paths run forward and backward; on CPU forward only (flex_attention has no CPU backward). Printed per path:
the time's minimum and median over --rounds, its ratio to causal, and the bytes its mask holds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unroll.launch.bench import harness
from unroll.models.attention import document_layout
from unroll.models.document_mask import document_block_mask, document_dense_mask, flex_document_attention

PATHS = ("causal", "sdpa-mask", "flex-tiles")


def attention_paths(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, backward: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    gqa = k.shape[1] != q.shape[1]
    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
        "sdpa-mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=document_dense_mask(doc, doc, 0), enable_gqa=gqa
        ),
        "flex-tiles": lambda: flex_document_attention(q, k, v, document_block_mask(doc, doc, 0), fused=True),
    }

    def timed(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if not backward:
                with torch.no_grad():
                    return forward()
            y = forward()
            y.sum().backward()
            return y

        return run

    return {name: timed(fn) for name, fn in forwards.items()}


def mask_bytes(doc: torch.Tensor) -> dict[str, int]:
    tiles = document_block_mask(doc, doc, 0)
    held = [tiles.kv_num_blocks, tiles.kv_indices, tiles.full_kv_num_blocks, tiles.full_kv_indices]
    held += [tiles.q_num_blocks, tiles.q_indices, tiles.full_q_num_blocks, tiles.full_q_indices]
    return {
        "causal": 0,
        "sdpa-mask": doc.shape[0] * doc.shape[1] ** 2,  # one bool per (query, key) pair of each row
        "flex-tiles": sum(t.numel() * t.element_size() for t in held if t is not None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench attention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--documents", type=float, default=1024, metavar="L", help="mean document length")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    harness.add_arguments(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backward = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    B, T, hd = args.batch, args.seq_len, args.head_dim
    starts = torch.rand(B, T, generator=g) < 1.0 / args.documents
    doc = document_layout(starts, 0)[0].to(device)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(B, heads, T, hd, generator=g).to(device, dtype).requires_grad_(backward)

    q, k, v = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)
    with harness.session(args.threads, prog="unroll bench attention"):
        times = harness.alternate(attention_paths(q, k, v, doc, backward), device, args.rounds)
    held = mask_bytes(doc)
    what = "forward and backward" if backward else "forward only (flex_attention has no CPU backward)"
    print(
        f"attention, {what}; batch {B}, T {T}, {args.heads}/{args.kv_heads} heads of {hd}, {args.dtype}, "
        f"{int(starts.sum())} document starts, {args.device}, {args.rounds} rounds; ratio = time over causal's "
        f"(of the {harness.RATIOS_OF})"
    )
    print(f"{'path':11} {'ms min/med':>17} {'ratio':>6} {'mask bytes':>14}")
    for name in PATHS:
        t = times[name]
        ms = f"{t.min * 1e3:.2f}/{t.median * 1e3:.2f}"
        print(f"{name:11} {ms:>17} {harness.ratio(t, times['causal']):6.2f} {held[name]:14,}")
    return 0
