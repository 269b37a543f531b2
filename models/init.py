"""Layout-independent initialisation: every element of every parameter is a function of (seed, parameter
name, the element's index in the whole tensor) and of nothing else, so a rank that holds a shard computes
exactly its elements of the weights one process would hold, without building the rest.

The random numbers come from a counter-based generator (the idea of Philox/threefry, as in JAX): element c
(its flat index in the whole, contiguous tensor) of stream j under key k is

    h_0 = mix(c_lo ^ k_0 [+ mix(c_hi ^ k_7)])      h_{j+1} = mix(h_j ^ k_{j+1})
    mix(x) = lowbias-style xorshift-multiply rounds on 32 bits (products kept below 2⁶³: exact in int64)

with k = blake2b(f"{seed}/{name}") split into 32-bit words. Everything up to the final scaling is integer
arithmetic, and the scaling is one or two IEEE operations, so the values are bit-identical on any device,
thread count, vector width or shard boundary:

    uniform(lo, hi)  lo + (hi − lo)·u, u = (24 bits of h_0 + ½) / 2²⁴
    normal(std)      std · (Σ_{i<12} v_i + 6 − 6·2¹⁶) / 2¹⁶, the v_i the six h_1..h_6 split into 16-bit
                     halves: Irwin–Hall with 12 terms (mean 0, variance exactly 1, support ±6σ, kurtosis
                     2.9 against the normal's 3), which needs no logarithm or cosine whose last bit
                     differs between a vectorised and a scalar code path

Rules with a transcendental function (log, exp, softplus⁻¹: the ParaRNN chrono biases, M²RNN's A and dt)
are `whole=True`: evaluated over the entire tensor (they are per-channel vectors) and then indexed, so
even they are the same computation in every layout.

Modules declare their rules (`init_rules()`: parameter or buffer name relative to the module → Rule); a
parent's rule for a child's tensor overrides the child's. RMSNorm weights default to ones; any other
tensor without a rule is an error, so a new module cannot silently start from uninitialised memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2²⁷: a 32-bit value times it stays below 2⁶³
_BLOCK = 1 << 22  # elements per evaluation block: bounds the int64 temporaries to ~100 MB


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit values (held in int64) with good avalanche; returns a new tensor."""
    x = x ^ (x >> 16)
    x.mul_(_MUL).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16).mul_(_MUL).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def name_key(seed: int, name: str) -> list[int]:
    """The 8 32-bit words every draw of the tensor `name` under `seed` derives from."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=32).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(8)]


class Draws:
    """Random draws and coordinates for a set of elements of one tensor, given by per-dimension global
    indices (`index[d]`: the indices along dimension d, a 1-D int64 tensor; the set is their product)."""

    def __init__(self, key: list[int], shape: tuple[int, ...], index: list[torch.Tensor], device: torch.device):
        self.key, self.full_shape, self.device = key, shape, device
        self.index = [i.to(device) for i in index]
        self.shape = tuple(len(i) for i in index)
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        counter = torch.zeros((), dtype=torch.int64, device=device)
        for d, (idx, stride) in enumerate(zip(self.index, strides)):
            view = [1] * len(shape)
            view[d] = -1
            counter = counter + (idx * stride).view(view)
        self.counter = counter.expand(self.shape)
        # a property of the whole tensor, never of the part held here: every layout hashes alike
        self.wide = math.prod(shape) > _M32 + 1

    def coordinate(self, dim: int) -> torch.Tensor:
        """The global index along `dim` of every element (broadcast to the set's shape)."""
        view = [1] * len(self.shape)
        view[dim] = -1
        return self.index[dim].view(view).expand(self.shape)

    def _hashes(self, n: int) -> list[torch.Tensor]:
        c = self.counter
        h = (c & _M32) ^ self.key[0]
        if self.wide:
            h = h + _mix((c >> 32) ^ self.key[7])
        h = _mix(h & _M32)
        out = [h]
        for j in range(1, n):
            out.append(_mix(out[-1] ^ self.key[j]))
        return out

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        u = ((self._hashes(1)[0] >> 8).float() + 0.5) / float(1 << 24)
        return lo + (hi - lo) * u

    def normal(self, std: float = 1.0) -> torch.Tensor:
        total = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        h = self._hashes(1)[0]
        for j in range(1, 7):
            h = _mix(h.bitwise_xor_(self.key[j]))
            total += h & 0xFFFF
            total += h >> 16
        return std * ((total + 6 - 6 * (1 << 16)).float() / float(1 << 16))

    def full(self, value: float) -> torch.Tensor:
        return torch.full(self.shape, float(value), device=self.device)


@dataclass(frozen=True)
class Rule:
    """fn(draws) → the values of those elements (float32). whole: evaluate over the entire tensor, then
    index (for transcendental functions, see the module docstring). key: draw from the stream of another
    parameter's name (a pipeline's replica of the tied embedding draws what `embed.weight` draws)."""

    fn: Callable[[Draws], torch.Tensor]
    whole: bool = False
    key: str | None = None


def normal(std: float) -> Rule:
    return Rule(lambda d: d.normal(std))


def uniform(lo: float, hi: float) -> Rule:
    return Rule(lambda d: d.uniform(lo, hi))


def constant(value: float) -> Rule:
    return Rule(lambda d: d.full(value))


def identity() -> Rule:
    """1 on the diagonal of the last two dimensions, 0 elsewhere."""
    return Rule(lambda d: (d.coordinate(-1) == d.coordinate(-2)).float())


# index_of(tensor) -> (global shape, per-dimension global indices, local tensor to fill)
IndexOf = Callable[[torch.Tensor], tuple[tuple[int, ...], list[torch.Tensor], torch.Tensor]]


def full_index(t: torch.Tensor) -> tuple[tuple[int, ...], list[torch.Tensor], torch.Tensor]:
    """(global shape, per-dimension indices, local tensor to fill) of a tensor held whole."""
    return tuple(t.shape), [torch.arange(n) for n in t.shape], t


def collect_rules(module: nn.Module) -> dict[str, Rule]:
    """Every declared rule under full names; a parent's rule wins over its child's for the same tensor."""
    rules: dict[str, Rule] = {}
    for prefix, m in module.named_modules():
        declared = m.init_rules() if hasattr(m, "init_rules") else {}
        for name, rule in declared.items():
            rules.setdefault(f"{prefix}.{name}" if prefix else name, rule)
    return rules


def _default(module: nn.Module, name: str) -> Rule | None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(owner, (nn.RMSNorm, nn.LayerNorm)):
        return constant(1.0 if leaf == "weight" else 0.0)
    return None


@torch.no_grad()
def fill(t: torch.Tensor, rule: Rule, key: list[int], shape: tuple[int, ...], index: list[torch.Tensor]) -> None:
    """Writes `rule`'s values of the elements `index` (of a tensor of global `shape`) into `t`."""
    device = t.device
    if rule.whole:
        values = rule.fn(Draws(key, shape, [torch.arange(n) for n in shape], device))
        for d, idx in enumerate(index):
            values = values.index_select(d, idx.to(device))
        t.copy_(values)
        return
    if not shape:
        t.copy_(rule.fn(Draws(key, shape, [], device)))
        return
    rows = max(1, _BLOCK // max(1, t[0].numel() if t.shape[0] else 1))  # blocks along the first dimension
    for start in range(0, len(index[0]), rows):
        part = [index[0][start : start + rows]] + index[1:]
        t[start : start + rows].copy_(rule.fn(Draws(key, shape, part, device)))


def init_parameters(module: nn.Module, seed: int, index_of: IndexOf = full_index) -> None:
    """Initialises every parameter and buffer of `module` (not on the meta device) by its rule, under its
    name in `module`. index_of(tensor) → (global shape, per-dimension global indices, local tensor): what
    part of the whole tensor this process holds (train/parallel/materialize.py answers it for shards)."""
    rules = collect_rules(module)
    named = list(module.named_parameters()) + list(module.named_buffers())
    chosen = {name: rules.get(name) or _default(module, name) for name, _ in named}
    missing = [name for name, rule in chosen.items() if rule is None]
    if missing:
        raise TypeError(f"no initialisation rule for {missing} (declare them in the module's init_rules())")
    for name, t in named:
        rule = chosen[name]
        if t.device.type == "meta" or rule is None:
            continue
        shape, index, local = index_of(t)
        fill(local, rule, name_key(seed, rule.key or name), shape, index)


def fresh_seed() -> int:
    """A seed drawn from torch's global generator: a module built eagerly after torch.manual_seed(s) is
    a function of s, as with torch's own initialisers."""
    return int(torch.randint(0, 2**62, (1,)).item())


def init_eagerly(module: nn.Module) -> None:
    """The end of a module's __init__: initialise it unless it was built on the meta device (then whoever
    materialises it initialises it, see train/parallel/materialize.py)."""
    if any(t.device.type == "meta" for t in module.parameters()):
        return
    init_parameters(module, fresh_seed())
