"""Sampling: prefill the prompt in one forward, then one `step` per new token (O(1) state for
recurrent layers, a growing KV cache for attention)."""

from __future__ import annotations

import torch

from unroll.models.lm import LM


@torch.no_grad()
def sample(
    model: LM,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Returns the new token ids (not the prompt). temperature 0 = greedy."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    logits, states = model(torch.tensor([prompt], device=device), return_states=True)
    logits = logits[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_k, generator)
        if stop_id is not None and token.item() == stop_id:
            break
        out.append(int(token.item()))
        logits, states = model.step(token, states)
    return out


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)
