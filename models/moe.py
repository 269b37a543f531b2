"""Mixture-of-experts SwiGLU MLP: token-choice top-k routing, dropless, grouped expert matmuls.

Balancing: the Switch/DeepSeek auxiliary loss and router z-loss (in `aux_loss` after each forward, for the
trainer to add), and DeepSeek-V3's auxiliary-loss-free expert bias, which shifts selection only and is
stepped by `update_bias` from the load counted since the last call.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unroll.kernels.context import sequence_mean
from unroll.models.context_parallel import ContextParallel
from unroll.models.init import Rule, constant, init_eagerly, normal
from unroll.models.mlp import SwiGLU

SCORES = ("softmax", "sigmoid")


class _AuxWeight:
    """The gradient the balancing loss of one MoE forward receives, once the loss's backward has run."""

    __slots__ = ("weight",)

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None


class _DeferredAux(torch.autograd.Function):
    """Identity on the MoE's output; when the backward reaches this layer it also starts the backward of
    the layer's balancing loss, with the gradient the loss gave it (recorded by `balancing_loss`'s node),
    × scale. Started here rather than where the loss adds it: the loss's backward runs first, and under
    activation checkpointing the balancing losses' graphs would then recompute every block at once and
    hold all of them, which is what checkpointing is there to avoid."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, aux: torch.Tensor, box: _AuxWeight, scale: float) -> torch.Tensor:
        ctx.box, ctx.scale, ctx.aux_shape = box, scale, aux.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        w = ctx.box.weight
        return g, None if w is None else (w * ctx.scale).expand(ctx.aux_shape), None, None


class _BalancingLoss(torch.autograd.Function):
    """The sum of the layers' balancing losses (its value); its backward only records the gradient it
    receives in every layer's box, for _DeferredAux to apply when the backward reaches that layer."""

    @staticmethod
    def forward(ctx: Any, boxes: list[_AuxWeight], *losses: torch.Tensor) -> torch.Tensor:
        ctx.boxes = boxes
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, ...]:
        for box in ctx.boxes:
            box.weight = g
        return (None,) * (1 + len(ctx.boxes))


def balancing_loss(moes: list[MoE]) -> torch.Tensor | None:
    """Σ of the MoEs' balancing losses (aux and z-loss) of their last forward, to add to the training
    loss: its gradient reaches each layer when the backward does (see _DeferredAux). None without MoEs."""
    if not moes:
        return None
    losses = [m.aux_loss for m in moes]
    boxes = [m.aux_weight_box for m in moes]
    if torch.is_grad_enabled() and any(loss.requires_grad for loss in losses) and all(b is not None for b in boxes):
        # (the ignore: torch leaves Function.apply unannotated)
        total: torch.Tensor = _BalancingLoss.apply(boxes, *losses)  # type: ignore[no-untyped-call]
        return total
    return torch.stack([loss.detach() for loss in losses]).sum()


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *row_widths: int) -> bool:
    """Whether torch._grouped_mm can run these expert matmuls, forward and backward, on this device.

    CPU (checked on torch 2.13): float32/bfloat16/float16 only (float64 raises), autograd works, and every
    matrix's row stride must be a multiple of 16 bytes. CUDA: only the bf16 CUTLASS kernel on sm90/sm100 is
    a real grouped GEMM; elsewhere torch falls back to copying offsets to the host and looping, which is
    what our own loop does, so we take the loop there rather than depend on the fallback's dtype coverage.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    else:
        ok = False
    return ok and all(w * dtype.itemsize % 16 == 0 for w in row_widths)


class ExpertExchange(Protocol):
    """How the rows routed to the experts reach the experts' holders and come back. A MoE without one
    (`expert_exchange` None) holds every expert; expert parallelism (train/parallel/expert_parallel.py)
    sets one that sends each row to the rank holding its expert."""

    def __call__(self, moe: MoE, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, d] sorted by expert, counts[e] of them for expert e of all E (on rows' device) -> the
        experts' outputs [N, d] for these rows, in the same order, computed by `moe.compute_experts`."""
        ...


class MoE(ContextParallel, nn.Module):
    """route → (exchange) → compute_experts → combine: `forward` is the single-device composition, and
    expert parallelism replaces only the middle step (`expert_exchange`), so both share the routing and
    the expert compute. Context parallelism: the auxiliary loss balances over the whole sequence (its
    statistics averaged over the context group), not this rank's slice."""

    expert_bias: torch.Tensor  # a buffer

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        hidden: int,
        *,
        shared_experts: int = 0,
        shared_hidden: int = 0,
        score: str = "softmax",
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        value: float
        for name, value in (("d_model", d_model), ("n_experts", n_experts), ("top_k", top_k), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if top_k > n_experts:
            raise ValueError(f"top_k={top_k} is more than n_experts={n_experts}")
        for name, value in (
            ("shared_experts", shared_experts),
            ("shared_hidden", shared_hidden),
            ("aux_loss_coef", aux_loss_coef),
            ("z_loss_coef", z_loss_coef),
            ("bias_update_rate", bias_update_rate),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if shared_experts and not shared_hidden:
            raise ValueError(f"shared_hidden must be positive with shared_experts={shared_experts}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.d_model, self.n_experts, self.top_k, self.hidden = d_model, n_experts, top_k, hidden
        self.score = score
        self.aux_loss_coef, self.z_loss_coef, self.bias_update_rate = aux_loss_coef, z_loss_coef, bias_update_rate

        self.router = nn.Linear(d_model, n_experts, bias=False)
        # Stacked so expert/tensor parallelism can shard dim 0; gate and up fused as in SwiGLU.
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.init_std, self.out_std = init_std, out_std or init_std
        # Several shared experts side by side are one SwiGLU of the summed width.
        self.shared = SwiGLU(d_model, shared_experts * shared_hidden, init_std, out_std) if shared_experts else None

        # Selection-only bias (aux-loss-free balancing): saved with the model, it is part of its routing.
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        # Per-expert assignments since the last update_bias, counted in training mode. A plain attribute,
        # not a buffer: DDP broadcasts every buffer (persistent or not) from rank 0 before each forward,
        # which would overwrite each rank's own counts. Integer: exact, and untouched by model.to(dtype).
        self.load_since_update = torch.zeros(n_experts, dtype=torch.long)
        self.last_load = torch.zeros(n_experts)
        self.aux_loss = torch.zeros(())
        self.expert_exchange: ExpertExchange | None = None  # set from outside: expert parallelism
        self.use_grouped_mm: bool | None = None  # None: decide per call; True/False forces a path (tests)
        # Set from outside (tensor parallelism: 1/tp, as every tp rank carries the whole routing)
        self.aux_grad_scale = 1.0
        self.aux_weight_box: _AuxWeight | None = None  # the last forward's, see balancing_loss
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        return {
            "router.weight": normal(self.init_std),
            "w_gate_up": normal(self.init_std),
            "w_down": normal(self.out_std),
            "expert_bias": constant(0.0),
        }

    def inactive_params(self) -> int:
        """Parameters of the routed experts a token is not sent to."""
        per_expert = self.w_gate_up[0].numel() + self.w_down[0].numel()
        return (self.n_experts - self.top_k) * per_expert

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, d] -> expert ids [T, k], combine weights [T, k], per-expert counts [E]; sets aux_loss and
        the load statistics."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # routing never in bf16, float64 kept for tests
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        idx = (scores + self.expert_bias.to(dtype)).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True)

        counts = torch.bincount(idx.flatten(), minlength=self.n_experts)
        # Activation checkpointing recomputes this forward inside the backward: then nothing is recorded (the
        # load is counted once per step, and a recomputed aux_loss would keep the recomputed block's whole
        # graph alive on this module until the next forward).
        recomputing = torch._C._current_graph_task_id() != -1
        if not recomputing:
            self.last_load = counts.detach().float()
        if self.training and not recomputing:
            if self.load_since_update.device != counts.device:  # not a buffer, so .to(device) skips it
                self.load_since_update = torch.zeros_like(counts)
            self.load_since_update += counts
        aux = logits.new_zeros(())
        if self.aux_loss_coef:
            probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
            frac, mean_probs = counts.to(dtype) / idx.numel(), probs.mean(0)
            if self.context_group is not None:  # balance over the whole sequence, not this rank's slice
                frac, mean_probs = (
                    sequence_mean(frac, self.context_group),
                    sequence_mean(mean_probs, self.context_group),
                )
            aux = aux + self.aux_loss_coef * self.n_experts * (frac * mean_probs).sum()
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * logits.logsumexp(-1).square().mean()
        if not recomputing:
            self.aux_loss = aux
        return idx, weights, counts

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the expert matmuls: autocast's when it is on (torch._grouped_mm is not on autocast's
        lists, so the casts are explicit), else x's."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def compute_experts(self, rows: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """The routed experts this module holds on their rows: rows [M, d] grouped by expert, counts[e] of
        them for its e-th expert (counts [w_gate_up.shape[0]] on rows' device; `sizes` the same on the
        host when the caller has read them already) -> the SwiGLU outputs [M, d] in rows' dtype."""
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_supported(rows.dtype, rows.device, self.d_model, self.hidden)
        if grouped and rows.shape[0] > 0:  # torch._grouped_mm's backward fails on zero rows (torch 2.13)
            offs = counts.cumsum(0).to(torch.int32)  # stays on the device: no host sync

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return torch._grouped_mm(a, w, offs=offs)

        else:  # one matmul per expert on its slice; needs the counts on the host
            split = counts.tolist() if sizes is None else sizes

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return torch.cat([a_e @ w[e] for e, a_e in enumerate(torch.split(a, split))])

        gate, up = mm(rows, self.w_gate_up.to(rows.dtype)).chunk(2, dim=-1)
        return mm(F.silu(gate) * up, self.w_down.to(rows.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        idx, weights, counts = self.route(x)

        # Dropless dispatch: sort the T*k (token, expert) assignments by expert so each expert's tokens
        # are one contiguous slice; stable so the order within an expert is the token order.
        order = idx.flatten().argsort(stable=True)
        token = order // self.top_k
        rows = x[token].to(self.compute_dtype(x))
        if self.expert_exchange is None:
            y = self.compute_experts(rows, counts)
        else:
            y = self.expert_exchange(self, rows, counts)

        y = y.to(x.dtype) * weights.flatten()[order, None].to(x.dtype)
        out = x.new_zeros(x.shape).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        return self._with_balancing_loss(out.reshape(shape))

    def _with_balancing_loss(self, out: torch.Tensor) -> torch.Tensor:
        """out, carrying the balancing loss's gradient into this layer's backward (see _DeferredAux)."""
        if torch._C._current_graph_task_id() != -1:  # recomputed (see route): the first forward's stays
            return out
        self.aux_weight_box = None
        if torch.is_grad_enabled() and self.aux_loss.requires_grad:
            self.aux_weight_box = _AuxWeight()
            # (the ignore: torch leaves Function.apply unannotated)
            box, scale = self.aux_weight_box, self.aux_grad_scale
            out = _DeferredAux.apply(out, self.aux_loss, box, scale)  # type: ignore[no-untyped-call]
        return out

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the over-loaded.

        counts: per-expert load to balance (e.g. load_since_update all-reduced over data-parallel ranks);
        default this module's load_since_update. The accumulator is reset either way, so it always
        counts since the last call; the bias is untouched when bias_update_rate is 0.
        """
        counts = self.load_since_update if counts is None else counts
        if self.bias_update_rate:
            counts = counts.to(self.expert_bias.device, torch.float32)
            self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts).to(self.expert_bias.dtype)
        self.load_since_update.zero_()
