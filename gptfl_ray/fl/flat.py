"""A model's state as one float32 vector: the currency of the FL runtime.

Weights go down and updates come up as flat float32 vectors, so a round moves one buffer per client and
the server's arithmetic (averaging, server optimizers, SCAFFOLD's control variates) is a few vector ops.

Layout: ``[trainable parameters (named_parameters order) | floating-point buffers (e.g. BatchNorm running
statistics)]``. Server optimizers and SCAFFOLD act on the parameter part only; buffers are averaged.
Non-float state (``num_batches_tracked``) is not communicated: it keeps the initial model's value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class VectorLayout:
    params: tuple[Entry, ...]
    buffers: tuple[Entry, ...]

    @classmethod
    def of(cls, model: nn.Module) -> VectorLayout:
        state_names = set(model.state_dict())
        params = tuple(Entry(n, tuple(p.shape), p.numel()) for n, p in model.named_parameters())
        buffers = tuple(
            Entry(n, tuple(b.shape), b.numel())
            for n, b in model.named_buffers()
            if b.is_floating_point() and n in state_names  # persistent float buffers only
        )
        return cls(params, buffers)

    @property
    def num_trainable(self) -> int:
        return sum(e.numel for e in self.params)

    @property
    def size(self) -> int:
        return self.num_trainable + sum(e.numel for e in self.buffers)

    def to_vector(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """State dict -> flat float32 vector (CPU)."""
        return torch.cat(
            [state[e.name].detach().reshape(-1).float().cpu() for e in (*self.params, *self.buffers)]
        )

    def to_state_dict(self, vec: torch.Tensor, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat vector -> state dict; entries outside the layout (non-float buffers) come from ``template``."""
        if vec.shape != (self.size,):
            raise ValueError(f"weight vector has shape {tuple(vec.shape)}, expected ({self.size},)")
        out = {k: v.detach().clone() for k, v in template.items()}
        off = 0
        for e in (*self.params, *self.buffers):
            out[e.name] = vec[off : off + e.numel].view(e.shape).to(template[e.name].dtype).clone()
            off += e.numel
        return out


class FlatModel:
    """Re-points a model's parameters and gradients into two contiguous buffers.

    ``param`` and ``grad`` are views of the whole model: loading weights is one copy, an update is one
    subtraction, an optimizer over ``[param]`` is one fused op per step, and client-side corrections
    (FedProx, SCAFFOLD) are single vector ops. Autograd accumulates in place into the existing ``.grad``
    views, so ``zero_grad`` must zero ``grad`` rather than set gradients to None.
    """

    def __init__(self, model: nn.Module, layout: VectorLayout):
        self.model = model
        self.layout = layout
        params = list(model.parameters())
        device = params[0].device
        self.param = nn.Parameter(torch.zeros(layout.num_trainable, device=device))
        self.param.grad = torch.zeros_like(self.param)
        off = 0
        for p in params:
            k = p.numel()
            self.param.data[off : off + k].copy_(p.data.reshape(-1))
            p.data = self.param.data[off : off + k].view_as(p)
            p.grad = self.param.grad[off : off + k].view_as(p)
            off += k
        if off != layout.num_trainable:
            raise ValueError("model parameters do not match the vector layout")
        named = dict(model.named_buffers())
        self.buffers = [named[e.name] for e in layout.buffers]

    @torch.no_grad()
    def load(self, vec: torch.Tensor) -> None:
        if vec.shape != (self.layout.size,):  # e.g. another model's weights: never load a prefix of them
            raise ValueError(f"weight vector has shape {tuple(vec.shape)}, expected ({self.layout.size},)")
        n = self.layout.num_trainable
        self.param.data.copy_(vec[:n], non_blocking=True)
        off = n
        for b in self.buffers:
            b.copy_(vec[off : off + b.numel()].view_as(b))
            off += b.numel()

    @torch.no_grad()
    def vector(self) -> torch.Tensor:
        parts = [self.param.data, *(b.reshape(-1).float() for b in self.buffers)]
        return torch.cat(parts) if self.buffers else self.param.data.clone()

    def zero_grad(self) -> None:
        self.param.grad.zero_()


def from_shared(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over an array from Ray's object store (read-only; never written to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)
