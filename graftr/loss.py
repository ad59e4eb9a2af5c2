"""Cross-entropy of a frozen linear head, computed without keeping the logits for backward.

A language model's loss is ``mean_i CE(W h_i + b, y_i)`` over the tokens whose label is not ``-100``. Computed the
usual way, autograd keeps an (N, V) fp32 ``log_softmax`` for backward (65 MB for 512 tokens of a 32k vocabulary),
and backward makes three more passes over N×V values. With the head frozen, the only gradient needed is

    ∂L/∂h_i = (softmax(W h_i + b) − onehot(y_i))ᵀ W / n        (zero for ignored tokens; n = tokens scored)

which :class:`LinearCrossEntropy` computes during the forward, chunk by chunk in place, keeping only the (N, D)
result. Backward multiplies it by the incoming scalar gradient. In eager mode the logits of ignored tokens (a
prompt masked out of the loss, padding) are not computed at all; a compiled graph, which cannot select rows by
value, computes them and masks them. The arithmetic is transformers' own
(``ForCausalLMLoss``, ``ForMaskedLMLoss``): logits in the model's dtype, upcast to fp32 for the softmax, the
gradient cast back to the model's dtype for the product with ``W``; mean reduction, ``nan`` when nothing is scored.

Each chunk makes one exponential pass: with ``e = exp(z − max z)`` and ``s = Σ e``, the loss is ``log s − (z_y − max z)``
and the gradient row is ``(e − s·onehot(y)) W / (s·n)``, the ``1/(s·n)`` applied to the (rows, D) product. A
:class:`Scratch` passed in holds the chunk's logits from call to call: on CPU, glibc gives an allocation above
32 MiB back to the OS when it is freed, and the next step's first touch of each 4 KiB page is a page fault
(~1.25 µs each here: 40 ms a step for a 65 MB chunk and its log-softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a token that is not learned (the cross-entropy ignore index)
CHUNK_BYTES = 1 << 27  # fp32 logits of one chunk: 128 MiB (1,048 tokens of a 32k vocabulary, 262 of a 128k one)


def workspace_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes :func:`linear_cross_entropy` allocates for ``rows`` tokens besides its saved gradient: one chunk of fp32
    logits (the :class:`Scratch`, kept between steps on CPU) and, for a head in a 16-bit dtype, the chunk's logits in
    that dtype before the upcast (``graftr estimate`` counts it)."""
    chunk = min(rows, max(1, CHUNK_BYTES // (4 * vocab)))
    low = 0 if dtype == torch.float32 else chunk * vocab * torch.finfo(dtype).bits // 8
    return chunk * vocab * 4 + low


class Scratch:
    """A float32 buffer reused for the logits chunks of successive calls (see the module docstring).

    One per model: calls that share a scratch must not run concurrently. It grows to the largest chunk seen. It
    keeps CPU buffers only: on CUDA, the caching allocator already reuses the memory of a freed buffer.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty((rows, cols), dtype=torch.float32, device=device)
        numel = rows * cols
        if self.buffer is None or self.buffer.numel() < numel or self.buffer.device != device:
            self.buffer = None  # free the old buffer before allocating its replacement
            self.buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self.buffer[:numel].view(rows, cols)


class LinearCrossEntropy(torch.autograd.Function):
    """``mean CE(hidden @ weight.T + bias, labels)`` over labels ≠ -100, with the gradient for ``hidden`` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scratch: Scratch | None):
        ctx.shape = hidden.shape
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
        scored = labels != IGNORE_INDEX
        count = scored.sum()
        want_grad = ctx.needs_input_grad[0]
        index = None
        if not torch.compiler.is_compiling():  # eager: no logits at all for ignored tokens (prompt, padding)
            index = scored.nonzero().squeeze(1)
            if index.numel() == labels.numel():
                index = None
        if index is not None:
            total, grad = _scored_rows(hidden.index_select(0, index), weight, bias, labels[index], None, count,
                                       want_grad, scratch)
            if grad is not None:
                grad = torch.zeros_like(hidden).index_copy_(0, index, grad)
        else:  # every row, the ignored ones masked (also the compiled path: no data-dependent shapes)
            total, grad = _scored_rows(hidden, weight, bias, labels, scored, count, want_grad, scratch)
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad.view(ctx.shape) * grad_output.to(grad.dtype) if grad is not None else None), None, None, None, None


def _scored_rows(hidden, weight, bias, labels, scored, count, want_grad, scratch):
    """(Σ over scored rows of CE, its gradient for ``hidden`` divided by ``count``); ``scored=None``: every row."""
    targets = (labels if scored is None else labels.masked_fill(~scored, 0))[:, None]
    weight_1 = torch.ones_like(labels, dtype=torch.float32) if scored is None else scored.to(torch.float32)
    row_scale = weight_1 / count  # 1/n for scored rows, 0 for ignored ones
    grad = torch.empty_like(hidden) if want_grad else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    vocab = weight.shape[0]
    chunk = max(1, CHUNK_BYTES // (4 * vocab))
    from graftr.cpu_matmul import slow_half_matmul

    # a 16-bit head on a CPU without bf16 matrix units: the products in fp32 (graftr.cpu_matmul), rounded as before
    weight32 = weight.float() if hidden.dtype != torch.float32 and slow_half_matmul(hidden.device) else None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = hidden[rows]
        size = (part.shape[0], vocab)
        z = scratch.take(*size, hidden.device) if scratch is not None else hidden.new_empty(size, dtype=torch.float32)
        if hidden.dtype == torch.float32 and bias is None:
            torch.mm(part, weight.t(), out=z)
        elif hidden.dtype == torch.float32:
            torch.addmm(bias, part, weight.t(), out=z)
        elif weight32 is not None:  # logits rounded to the model's dtype, then upcast (transformers' rounding)
            z.copy_(F.linear(part.float(), weight32, None if bias is None else bias.float()).to(hidden.dtype))
        else:  # logits in the model's dtype, then upcast (transformers' rounding)
            z.copy_(F.linear(part, weight, bias))
        z.sub_(z.amax(1, keepdim=True))  # z − max z
        picked = z.gather(1, targets[rows]).squeeze(1)
        sums = z.exp_().sum(1)  # e = exp(z − max z), in place; s = Σ e
        loss = sums.log() - picked
        total += (loss if scored is None else torch.where(scored[rows], loss, 0.0)).sum()
        if grad is not None:
            z.scatter_add_(1, targets[rows], -(sums * weight_1[rows])[:, None])  # e − s·onehot (0 on ignored rows)
            scale = (row_scale[rows] / sums)[:, None]  # softmax − onehot = (e − s·onehot) / s; then / n
            if hidden.dtype == torch.float32:  # scale the (rows, D) product: D ≪ V
                torch.mm(z, weight, out=grad[rows])
                grad[rows] *= scale
            elif weight32 is not None:
                grad[rows] = (z.mul_(scale).to(hidden.dtype).float() @ weight32).to(hidden.dtype)
            else:  # scale before rounding to the low precision, as transformers does
                torch.mm(z.mul_(scale).to(hidden.dtype), weight, out=grad[rows])
    return total, grad


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         *, shift: bool, scratch: Scratch | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels`` (``-100`` ignored).

    ``shift``: causal-LM labels, where position t predicts label t + 1 (transformers pads the labels with -100 and
    shifts them left, so the last position is scored against nothing). ``scratch``: a :class:`Scratch` to hold the
    logits chunks between calls (not used while ``torch.compile`` traces).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy computes no gradient for the head; its weight must be frozen")
    labels = labels.to(hidden.device)
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if torch.compiler.is_compiling():
        scratch = None
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, scratch)
