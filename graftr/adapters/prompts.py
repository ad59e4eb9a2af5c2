"""Where a gated prompt's ``P_l ∈ R^{L×D}`` comes from, when it is not a plain per-layer parameter.

Both generators are *shared* by all the sites of a rule in one layer stack (one module, installed once by
:func:`graftr.passes.rewrite`), and are called with the absolute layer index ``l`` of a site, returning its
prompt in fp32. They follow the official code of Diep et al., ICML 2025 ("On Zero-Initialized Attention: Optimal
Prompt and Gating Factor Estimation", https://arxiv.org/abs/2502.03029, `llama/model.py`).

``Hypernetwork`` (the paper's non-linear prompt, ``typ_act=hypermodel``)::

    E ∈ R^{N×e}, N(0,1)                           one row per absolute layer index of the stack (N layers)
    P_l = reshape(W2 · σ(W1 · E[l] + b1) + b2, (L, D))       W1: e→h (nn.Linear init), W2: h→L·D
    hidden h = 0:  P_l = reshape(σ(W2 · E[l] + b2), (L, D))  W2: e→L·D
    W2 ~ U(−c, c), c = 1e-3·√(3/(h·D)) (h = e when h = 0), b2 = 0     so prompts start around 1e-5 at D = 4096

``SharedMLP`` (the code's ``typ_act=deepshare``)::

    T ∈ R^{K·L×e}, N(0,1)                          L low-dimensional rows for each of the K prompted layers
    P_l = W2 · σ(W1 · T[kL:(k+1)L] + b1) + b2       applied row-wise, W1: e→h, W2: h→D (both nn.Linear init)
    hidden h = 0:  P_l = σ(W2 · T[kL:(k+1)L] + b2)   W2: e→D

where ``k`` is the rank of layer ``l`` among the rule's selected layers of the stack (the official code prompts
the last K layers in order). Two attention sites of one layer (T5's decoder self- and cross-attention) share
their layer's prompt in both generators, as they share ``E[l]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graftr.adapters.base import full_shape

ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, negative_slope=0.1),  # the official code's nn.LeakyReLU(0.1)
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), layer.bias.float())


class _MLP(nn.Module):
    """``W2 σ(W1 x + b1) + b2`` (``hidden > 0``) or ``σ(W2 x + b2)`` (``hidden == 0``), computed in fp32."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation: str, dtype, device):
        super().__init__()
        self.activation = activation
        if hidden:
            self.w1 = nn.Linear(in_dim, hidden, dtype=dtype, device=device)
        self.w2 = nn.Linear(hidden or in_dim, out_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        if hasattr(self, "w1"):
            return _linear(act(_linear(x, self.w1)), self.w2)
        return act(_linear(x, self.w2))


class Hypernetwork(nn.Module):
    """A learned per-layer embedding mapped to the whole prompt ``P_l`` of that layer (see the module docstring)."""

    def __init__(self, num_layers: int, dim: int, length: int, embedding_dim: int, hidden: int, activation: str,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.length, self.dim = length, dim
        self.layer_embedding = nn.Parameter(torch.randn(num_layers, embedding_dim, dtype=dtype, device=device))
        self.mlp = _MLP(embedding_dim, hidden, length * dim, activation, dtype, device)
        bound = 1e-3 * math.sqrt(3 / ((hidden or embedding_dim) * dim))  # the code's hyperfanin_init_weight
        with torch.no_grad():
            self.mlp.w2.weight.uniform_(-bound, bound)
            self.mlp.w2.bias.zero_()

    def forward(self, layer: int) -> torch.Tensor:
        return self.mlp(self.layer_embedding[layer].float()).view(self.length, self.dim)

    def extra_repr(self) -> str:
        return f"layers={full_shape(self.layer_embedding)[0]}, length={self.length}, dim={self.dim}"


class SharedMLP(nn.Module):
    """A table of low-dimensional prompt rows, L per prompted layer, through one MLP to the model width."""

    def __init__(self, layers: list[int], dim: int, length: int, embedding_dim: int, hidden: int, activation: str,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.layers = tuple(sorted(layers))  # absolute indices of the prompted layers; row block k is layers[k]
        self.length = length
        self.table = nn.Parameter(torch.randn(len(self.layers) * length, embedding_dim, dtype=dtype, device=device))
        self.mlp = _MLP(embedding_dim, hidden, dim, activation, dtype, device)

    def forward(self, layer: int) -> torch.Tensor:
        k = self.layers.index(layer)
        return self.mlp(self.table[k * self.length:(k + 1) * self.length].float())

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, length={self.length}"
