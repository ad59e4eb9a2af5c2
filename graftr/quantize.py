"""A quantized frozen base: the quantize pass (bitsandbytes NF4/FP4 4-bit and int8 weights).

In a graph engine quantization is one more rewrite, between trace and the adapters' rewrite: each selected frozen
linear site's ``aten.linear`` (GPT-2's ``view/addmm/view``) becomes **packed storage + one op**::

    y = linear(x, W, b)          →   y = linear_4bit(x, W_packed, absmax, b, ...)    (nf4, fp4)
                                     y = linear_int8(x, W_int8, row_scale, b, ...)   (int8)

``linear_4bit`` runs bitsandbytes' ``gemm_4bit`` op forward (on CPU: ``dequantize_4bit`` then ``linear``; on CUDA
its kernel) and, backward, ``dequantize_4bit`` again for the input's gradient, as bitsandbytes' own ``MatMul4Bit``
does: the packed weight is all that is kept between forward and backward, never a full-precision copy.
``linear_int8`` stores LLM.int8's row-wise int8 weight (``int8_vectorwise_quant``) and dequantizes it for the
matmul (``int8_vectorwise_dequant``), which is what bitsandbytes' own ``MatMul8bitFp`` does for training on CPU;
the activations stay in the compute dtype (no int8 activations, no outlier decomposition).

The site keeps its path, input and output: adapters attached afterwards (IA³ input and output scaling, InA/LoRA
branches, any user linear kind) see exactly the input and output of the quantized layer, and attention kinds that
project through a block's own ``k_proj``/``v_proj`` (gated prompts) read the dequantized weight through
:func:`dense_weight`. Only the packed storage is kept (non-persistent buffers ``weight``, ``weight_absmax`` ...
at the site's module path: outside every state dict and checkpoint, moved by ``.to(device)``, never cast by
DeepSpeed's mixed precision).

Which sites
    every linear site inside a layer stack (``model.layers.N``, ``encoder.block.N``, ``transformer.h.N``, ...)
    whose module path matches no ``skip`` glob. Heads (``lm_head``, ``score``, ``classifier``), poolers,
    projectors and embeddings are outside the stacks and never quantized; a weight tied to another tensor, or
    one the recipe trains (``trainable_modules``), is refused with an error.
Where the weights come from
    a graph traced on ``meta`` gets placeholders, and :func:`graftr.materialize.materialize` quantizes each weight
    as it is read from the checkpoint (:func:`store`): one full-precision tensor at a time, never the whole base.
    A graph with real weights is quantized in place by the pass.
Merging (``round_trip=True``)
    keeps the dense weights but replaces each by ``dequantize(quantize(W))``, the weights the adapter was trained
    against; ``graftr merge`` then folds the adapters into them and writes a 16-bit HF directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from graftr import fxmeta
from graftr.errors import GraftrError
from graftr.names import torch_dtype
from graftr.passbase import GraphPass, PassResult
from graftr.sections import QuantizeConfig

METHODS = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of the double-quantized absmax
MISSING_BNB = ("quantize needs bitsandbytes, which is not installed: pip install 'bitsandbytes>=0.46' "
               "(or pip install 'graftr[quant]')")


def bnb():
    """The bitsandbytes package, or a :class:`GraftrError` saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise GraftrError(MISSING_BNB) from None
    return bitsandbytes


def active(config: QuantizeConfig | None) -> bool:
    """Whether a recipe's ``quantize`` section quantizes anything."""
    return config is not None and config.enabled


@dataclass
class QuantizedWeight:
    """One quantized site: the weight it replaced and how it is stored."""

    path: str  # the site's module path; storage buffers live there
    weight: str  # the dense weight's name (the checkpoint key), ``<path>.weight``
    method: str
    out_features: int
    in_features: int
    layout: str  # the dense weight's layout in the checkpoint: "out_in" (nn.Linear) or "in_out" (Conv1D)
    dtype: torch.dtype  # the dense weight's dtype (what the checkpoint tensor is cast to before quantizing)
    compute_dtype: torch.dtype | None
    blocksize: int = 64
    double_quant: bool = False
    stored: bool = True  # False: kept dense, round-tripped in place (for merging)
    buffers: tuple[str, ...] = field(default=())  # storage buffer names at ``path``

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def dense_shape(self) -> tuple[int, int]:
        """Shape of the dense weight as stored in the checkpoint."""
        o, i = self.out_features, self.in_features
        return (o, i) if self.layout == "out_in" else (i, o)


# ---- storage -------------------------------------------------------------------------------------------------
def storage_shapes(method: str, out_features: int, in_features: int, *, blocksize: int = 64,
                   double_quant: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of the buffers storing one (out, in) weight (what bitsandbytes makes)."""
    n = out_features * in_features
    if method == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), torch.float32)}
    blocks = -(-n // blocksize)
    shapes = {"weight": (((n + 1) // 2, 1), torch.uint8)}
    if double_quant:
        shapes.update(weight_absmax=((blocks,), torch.uint8),
                      weight_absmax2=((-(-blocks // NESTED_BLOCKSIZE),), torch.float32),
                      weight_code2=((256,), torch.float32), weight_offset=((), torch.float32))
    else:
        shapes["weight_absmax"] = ((blocks,), torch.float32)
    return shapes


def storage_bytes(method: str, out_features: int, in_features: int, *, blocksize: int = 64,
                  double_quant: bool = False) -> int:
    """Bytes one (out, in) weight takes quantized (packed weight and its statistics). ``graftr estimate`` can call
    this for every quantized linear to size a quantized base."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in storage_shapes(
        method, out_features, in_features, blocksize=blocksize, double_quant=double_quant).values())


def quantize_tensor(dense: torch.Tensor, spec: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The storage buffers of ``dense`` (the (out, in) weight), made by bitsandbytes."""
    functional = bnb().functional
    if spec.method == "int8":
        weight, scale, _ = functional.int8_vectorwise_quant(dense.contiguous(), threshold=0.0)
        return {"weight": weight, "weight_scale": scale}
    packed, state = functional.quantize_4bit(dense.contiguous(), blocksize=spec.blocksize, quant_type=spec.method,
                                             compress_statistics=spec.double_quant, quant_storage=torch.uint8)
    out = {"weight": packed, "weight_absmax": state.absmax}
    if spec.double_quant:
        out.update(weight_absmax2=state.state2.absmax, weight_code2=state.state2.code,
                   weight_offset=torch.as_tensor(state.offset, dtype=torch.float32).reshape(()))
    return out


def round_trip(dense: torch.Tensor, spec: QuantizedWeight) -> torch.Tensor:
    """``dequantize(quantize(dense))`` in ``dense``'s layout and dtype: the weight the quantized site computes with."""
    outin = dense.t() if spec.layout == "in_out" else dense
    s = quantize_tensor(outin, spec)
    w = _dequantize(spec.method, s["weight"], s.get("weight_absmax", s.get("weight_scale")), s.get("weight_absmax2"),
                    s.get("weight_code2"), s.get("weight_offset"), [spec.out_features, spec.in_features],
                    spec.blocksize, dense.dtype)
    return (w.t() if spec.layout == "in_out" else w).contiguous()


def store(gm: torch.nn.Module, spec: QuantizedWeight, dense: torch.Tensor) -> None:
    """Quantize ``dense`` (the checkpoint's tensor, in its own layout) into ``spec``'s storage buffers of ``gm``."""
    if tuple(dense.shape) != spec.dense_shape:
        raise GraftrError(f"{spec.weight}: expected shape {spec.dense_shape}, got {tuple(dense.shape)}")
    with torch.no_grad():
        tensors = quantize_tensor(dense.t() if spec.layout == "in_out" else dense, spec)
    holder = gm.get_submodule(spec.path)
    for name, value in tensors.items():
        old = holder._buffers[name]
        holder._buffers[name] = value.to(old.device if not old.is_meta else "cpu")


# ---- the ops in the graph ------------------------------------------------------------------------------------
def _dequantize(method, weight, stats, absmax2, code2, offset, shape, blocksize, dtype) -> torch.Tensor:
    if method == "int8":
        return torch.ops.bitsandbytes.int8_vectorwise_dequant(weight, stats).to(dtype)
    if absmax2 is not None:  # double quantization: the absmax is itself blockwise 8-bit
        stats = torch.ops.bitsandbytes.dequantize_blockwise(stats, absmax2, code2, NESTED_BLOCKSIZE,
                                                            torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit(weight, stats, blocksize, method, shape, dtype)


class _QuantizedLinear(torch.autograd.Function):
    """``linear(x, dequantize(W), b)``: forward through bitsandbytes' op, backward dequantizes again (the packed
    weight is saved, not the dense one). The weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, weight, stats, bias, absmax2, code2, offset, method, shape, blocksize, compute_dtype):
        dtype = compute_dtype or x.dtype
        xc = x.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        if method == "int8" or xc.numel() == 0:
            out = F.linear(xc, _dequantize(method, weight, stats, absmax2, code2, offset, shape, blocksize, dtype), bc)
        elif absmax2 is not None:
            out = torch.ops.bitsandbytes.gemm_4bit(xc, weight, shape, absmax2, blocksize, method, bias=bc,
                                                   absmax_8bit=stats, absmax_code=code2, absmax_offset=offset)
        else:
            out = torch.ops.bitsandbytes.gemm_4bit(xc, weight, shape, stats, blocksize, method, bias=bc)
        ctx.save_for_backward(weight, stats, absmax2, code2, offset)
        ctx.meta = (method, shape, blocksize, dtype, x.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        method, shape, blocksize, dtype, x_dtype, bias_dtype = ctx.meta
        weight, stats, absmax2, code2, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            from graftr.cpu_matmul import slow_half_matmul

            # g @ W in 16 bits on a CPU is a plain loop (graftr.cpu_matmul): dequantize to fp32 there
            dtype = torch.float32 if dtype != torch.float32 and slow_half_matmul(grad.device) else dtype
            w = _dequantize(method, weight, stats, absmax2, code2, offset, shape, blocksize, dtype)
            grad_x = (grad.to(dtype) @ w).to(x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
        return grad_x, None, None, grad_bias, None, None, None, None, None, None, None


def linear_4bit(x, weight, absmax, bias, absmax2, code2, offset, quant_type: str, shape: list[int],
                blocksize: int, compute_dtype: torch.dtype | None):
    """The graph op of an nf4/fp4 site: ``x @ dequantize_4bit(weight).T + bias``."""
    return _QuantizedLinear.apply(x, weight, absmax, bias, absmax2, code2, offset, quant_type, shape, blocksize,
                                  compute_dtype)


def linear_int8(x, weight, scale, bias, compute_dtype: torch.dtype | None):
    """The graph op of an int8 site: ``x @ (weight · scale / 127).T + bias``."""
    return _QuantizedLinear.apply(x, weight, scale, bias, None, None, None, "int8", list(weight.shape), 0,
                                  compute_dtype)


def dequantize_4bit(weight, absmax, absmax2, code2, offset, quant_type: str, shape: list[int], blocksize: int,
                    dtype: torch.dtype):
    """The dense (out, in) weight of an nf4/fp4 site (for adapters that project through it)."""
    return _dequantize(quant_type, weight, absmax, absmax2, code2, offset, shape, blocksize, dtype)


def dequantize_int8(weight, scale, dtype: torch.dtype):
    """The dense (out, in) weight of an int8 site."""
    return _dequantize("int8", weight, scale, None, None, None, list(weight.shape), 0, dtype)


OPS = (linear_4bit, linear_int8)  # graph targets of a quantized linear site: x, weight, stats, bias, ...


def site_shape(gm, node: fx.Node) -> tuple[int, int]:
    """(out_features, in_features) of a quantized linear op node."""
    if node.target is linear_4bit:
        out_f, in_f = node.args[8]
        return int(out_f), int(in_f)
    out_f, in_f = gm.get_buffer(node.args[1].target).shape
    return int(out_f), int(in_f)


def _storage_nodes(graph: fx.Graph, spec: QuantizedWeight) -> dict[str, fx.Node]:
    nodes = {}
    for name in spec.buffers:
        nodes[name] = graph.get_attr(f"{spec.path}.{name}")
    return nodes


def dense_weight(graph: fx.Graph, path: str, weight: str) -> fx.Node:
    """A node giving the weight of the linear site at ``path``: its ``get_attr`` (``weight``, in the site's layout)
    when the site is not quantized, else its dequantized (out, in) weight in fp32 (a quantized site's layout is
    "out_in"). Attention kinds that project through a block's own projections use this
    (:mod:`graftr.adapters.gated_prompt`)."""
    spec = stored(graph.owning_module).get(path) if graph.owning_module is not None else None
    if spec is None:
        return graph.get_attr(weight)
    s = _storage_nodes(graph, spec)
    if spec.method == "int8":
        return graph.call_function(dequantize_int8, (s["weight"], s["weight_scale"], torch.float32))
    return graph.call_function(dequantize_4bit, (s["weight"], s["weight_absmax"], s.get("weight_absmax2"),
                                                 s.get("weight_code2"), s.get("weight_offset"), spec.method,
                                                 [spec.out_features, spec.in_features], spec.blocksize,
                                                 torch.float32))


# ---- the pass ------------------------------------------------------------------------------------------------
def tied_names(gm: torch.nn.Module) -> set[str]:
    """Every parameter name that shares its tensor with another name (HF's tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied |= {name, seen[id(p)]}
        seen.setdefault(id(p), name)
    return tied


def select(gm, config: QuantizeConfig, trainable: list[str] = ()) -> list:
    """The linear sites ``config`` quantizes (refusing tied and trained weights among them)."""
    from graftr.selectors import compile_glob

    skip = [compile_glob(g) for g in config.skip]
    trained = [compile_glob(g) for g in trainable]
    tied = tied_names(gm)
    chosen = []
    dense_experts = [s.path for s in gm.site_index.experts if not any(rx.fullmatch(s.path) for rx in skip)]
    if dense_experts:
        raise GraftrError(f"quantize ({config.method}): {dense_experts[0]} and {len(dense_experts) - 1} more fused "
                          "expert weights (3-D) cannot be stored packed: bitsandbytes' 4-bit and int8 products take a "
                          "2-D weight and graftr has no grouped quantized product; keep the experts dense with "
                          "quantize.skip: ['**.mlp.experts.*'] (the attention is still quantized)")
    for site in gm.site_index.linear:
        if site.layer is None or site.layer[0] not in gm.site_index.stack_sizes:
            continue  # heads, poolers, projectors: outside every layer stack
        if site.role == "router":
            continue  # a Mixture-of-Experts router stays in full precision (as transformers' quantizers keep it)
        if any(rx.fullmatch(site.path) for rx in skip) or site.quant:
            continue
        owners = [site.path.rsplit(".", k)[0] for k in range(site.path.count(".") + 1)]
        if any(rx.fullmatch(o) for rx in trained for o in owners):
            raise GraftrError(f"trainable_modules trains {site.path}, which quantize.method {config.method} would "
                              f"store packed and frozen; add it to quantize.skip")
        if site.weight in tied:
            raise GraftrError(f"{site.path}: its weight {site.weight} is tied to another tensor and cannot be "
                              "quantized alone; add it to quantize.skip")
        chosen.append(site)
    if not chosen:
        raise GraftrError(f"quantize ({config.method}) selects no linear site of {gm.hf_class}: every linear "
                          "inside the layer stacks is skipped" if gm.site_index.linear else
                          f"quantize: {gm.hf_class} has no linear sites")
    return chosen


class QuantizePass(GraphPass):
    """Replace each selected frozen linear site by quantized storage and the bitsandbytes op (see the module
    docstring). It runs between tracing (:func:`graftr.grafted.prepare`) and the adapters' match and rewrite
    passes, records each site in ``gm.graftr_quantized`` and updates ``gm.site_index`` in place, so the sites keep
    their paths and adapters attach to them as before. ``round_trip=True`` changes no graph: each selected weight
    becomes ``dequantize(quantize(W))`` in place (dense, for merging)."""

    name = "quantize"

    def __init__(self, config: QuantizeConfig, *, trainable: list[str] = (), round_trip: bool = False):
        super().__init__()
        self.config, self.trainable, self.round_trip = config, list(trainable), round_trip

    def requires(self, gm) -> None:
        bnb()  # a clear error before touching the graph
        if gm.graftr_outlined:
            raise GraftrError("quantize runs on the flat graph, before the layers are outlined")

    def call(self, gm) -> PassResult:
        config = self.config
        compute = torch_dtype(config.compute_dtype) if config.compute_dtype else None
        for site in select(gm, config, self.trainable):
            weight = gm.get_parameter(site.weight)
            spec = QuantizedWeight(site.path, site.weight, config.method, site.out_features, site.in_features,
                                   site.layout, weight.dtype, compute, config.blocksize, config.double_quant,
                                   stored=not self.round_trip)
            spec.buffers = tuple(storage_shapes(spec.method, spec.out_features, spec.in_features,
                                                blocksize=spec.blocksize, double_quant=spec.double_quant))
            if self.round_trip:
                if weight.is_meta:
                    raise GraftrError("quantize round trip needs the real weights (the base was built on meta)")
                with torch.no_grad():
                    weight.copy_(round_trip(weight.detach(), spec))
            else:
                self._replace(gm, site, spec, weight)
            gm.graftr_quantized[site.path] = spec
        return PassResult(gm, not self.round_trip)

    @staticmethod
    def _replace(gm, site, spec: QuantizedWeight, weight: torch.Tensor) -> None:
        holder = gm.get_submodule(site.path)
        owner, _, local = site.weight.rpartition(".")
        if owner != site.path or local != "weight":
            raise GraftrError(f"{site.path}: its weight is {site.weight}, not {site.path}.weight; add it to "
                              "quantize.skip")
        if weight.is_meta:
            tensors = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in
                       storage_shapes(spec.method, spec.out_features, spec.in_features, blocksize=spec.blocksize,
                                      double_quant=spec.double_quant).items()}
        else:
            with torch.no_grad():
                tensors = quantize_tensor(weight.detach().t() if site.layout == "in_out" else weight.detach(), spec)
        del holder._parameters["weight"]
        for name, value in tensors.items():
            holder.register_buffer(name, value, persistent=False)

        graph = gm.graph
        with graph.inserting_before(site.output.next):
            s = _storage_nodes(graph, spec)
            b = graph.get_attr(site.bias) if site.bias else None
            if spec.method == "int8":
                new = graph.call_function(linear_int8, (site.input, s["weight"], s["weight_scale"], b,
                                                        spec.compute_dtype))
            else:
                new = graph.call_function(linear_4bit, (
                    site.input, s["weight"], s["weight_absmax"], b, s.get("weight_absmax2"), s.get("weight_code2"),
                    s.get("weight_offset"), spec.method, [spec.out_features, spec.in_features], spec.blocksize,
                    spec.compute_dtype))
        fxmeta.copy_meta(site.output, new, graftr_quantize=spec.method)
        site.output.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        old_attrs = {a for n in site.nodes for a in n.all_input_nodes if a.op == "get_attr"}
        for node in reversed(site.nodes):
            if node.users:
                raise GraftrError(f"{site.path}: its node {node.name} is used outside the layer; cannot quantize it")
            graph.erase_node(node)
        for node in old_attrs:
            if not node.users:
                graph.erase_node(node)
        site.nodes = [new]
        site.output = new
        site.layout = "out_in"  # the op computes with the (out, in) weight whatever the checkpoint's layout
        site.quant = spec.method


def stored(gm) -> dict[str, QuantizedWeight]:
    """The sites whose weights ``gm`` stores quantized, by path (empty for a dense or round-tripped model)."""
    return {path: spec for path, spec in (getattr(gm, "graftr_quantized", None) or {}).items() if spec.stored}


def summary(gm) -> str | None:
    """``quantized 224 linear sites (nf4): 12.06 GiB of weights stored in 3.39 GiB``, or None."""
    specs = list((getattr(gm, "graftr_quantized", None) or {}).values())
    if not specs:
        return None
    dense = sum(s.numel * s.dtype.itemsize for s in specs)
    packed = sum(storage_bytes(s.method, s.out_features, s.in_features, blocksize=s.blocksize,
                               double_quant=s.double_quant) for s in specs)
    return (f"quantized {len(specs)} linear sites ({specs[0].method}): {human_bytes(dense)} of weights "
            f"stored in {human_bytes(packed)}")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} bytes"


def stored_numel(gm) -> int:
    """Parameters of the dense weights stored quantized (for parameter counts)."""
    return sum(spec.numel for spec in stored(gm).values())


def stored_bytes(gm) -> int:
    """Bytes of the packed storage of every quantized weight of ``gm``."""
    return sum(storage_bytes(s.method, s.out_features, s.in_features, blocksize=s.blocksize,
                             double_quant=s.double_quant) for s in stored(gm).values())


def storage_names(gm) -> set[str]:
    """Names of every quantized storage buffer of ``gm``."""
    return {f"{spec.path}.{name}" for spec in stored(gm).values() for name in spec.buffers}
