"""A key/value cache for generation, as a rewrite of the graph's attention sites.

Without a cache every generated token re-runs the whole sequence. With one, a step runs the graph on the new
tokens only: each attention site appends the step's keys and values to its own buffer and attends over the
whole buffer. The keys are the ones SDPA receives, so rotary embeddings are already applied; positions come from
the graph's ``position_ids`` input, one row per sequence, so left padding is respected.

:func:`enable_kv_cache` swaps every :class:`graftr.trace.SDPA` module for a :class:`CachedSDPA` at the same path
(the graph, the parameters and the outputs stay the same). With no cache active it computes exactly what SDPA
did; inside ``with cache.step(mask):`` it ignores the mask the graph built for the new tokens alone and builds the
one HF builds for the whole sequence: a key is visible if it is not padding, not in the future and, for a
sliding-window layer, less than ``sliding_window`` positions back (sequence indices, as in HF's masks).

Adapters on projections (IA³, InA) act per token and adapters adding a branch to the attention output from the
query (gated prompts) leave SDPA's inputs alone, so they stay exact under caching. The cache applies only to the
decoder families in :data:`CACHE_FAMILIES` whose every layer attends through one SDPA call, see
:func:`kv_cache_support`; an adapter that changes what SDPA attends over (prefix keys) is detected at the first
step and raises :class:`CacheUnsupported`.

:class:`ExplicitKV` is the same cache as values, for ``torch.export`` (``graftr deploy``): the past keys and values
come in as tensors and the extended ones go out, so an exported step writes no buffer. It also attends over keys an
adapter prepends to the tokens' (prefix prompts) without caching them.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from graftr.errors import GraftrError
from graftr.passbase import GraphPass, PassResult, run_passes
from graftr.trace import SDPA

# Decoder families whose attention mask is "causal + key padding (+ sliding window)", whose positions all come from
# position_ids and whose every layer attends through one SDPA call (checked again on the graph).
CACHE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt"})

_ACTIVE: contextvars.ContextVar[KVCache | None] = contextvars.ContextVar("graftr_kv_cache", default=None)


class CacheUnsupported(GraftrError):
    """The graph's attention cannot be served from a KV cache (the reason is the message)."""


def kv_cache_support(gm) -> str | None:
    """``None`` if :func:`enable_kv_cache` applies to ``gm``, else why not (one line)."""
    config = gm.hf_config
    family = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return f"{family} is an encoder-decoder model"
    if gm.task != "causal_lm":
        return f"the model is a {gm.task} model, not a causal LM"
    if family not in CACHE_FAMILIES:
        return f"graftr does not know the attention masks of {family} models"
    if getattr(gm, "graftr_position_ids", None) is None:
        return "the traced graph takes no position_ids"
    sdpa = {name for name, m in gm.named_modules() if isinstance(m, SDPA)}
    layers = getattr(config, "num_hidden_layers", None)
    sites = {s.node.target for s in gm.site_index.attention}
    if not sdpa or len(sdpa) != layers or sites != sdpa:
        return (f"its attention is not one SDPA call per layer ({len(sdpa)} SDPA calls for {layers} layers; "
                "eager attention or an unusual attention module)")
    return None


def _window(config, layer: tuple[str, int] | None) -> int | None:
    """The sliding window of a layer (HF: ``layer_types`` picks the sliding layers, else all layers slide)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return None
    if types is not None:
        return window if layer is not None and types[layer[1]] == "sliding_attention" else None
    return window


class CachedSDPA(SDPA):
    """:class:`graftr.trace.SDPA` that reads and extends the active :class:`KVCache` when there is one."""

    def __init__(self, sdpa: SDPA, path: str, kv_heads: int, window: int | None):
        super().__init__(sdpa.dropout_p, sdpa.is_causal, sdpa.scale, sdpa.enable_gqa)
        self.train(sdpa.training)
        self.path, self.kv_heads, self.window = path, kv_heads, window

    def forward(self, q, k, v, attn_mask=None):
        cache = _ACTIVE.get()
        if cache is None:
            return super().forward(q, k, v, attn_mask)
        return cache.attend(self, q, k, v)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kv_heads={self.kv_heads}, window={self.window}"


def enable_kv_cache(gm) -> None:
    """Swap ``gm``'s SDPA modules for :class:`CachedSDPA` (in place, idempotent); raises if the cache cannot apply:
    the :class:`EnableKVCache` pass."""
    run_passes(gm, EnableKVCache())


class EnableKVCache(GraphPass):
    """Swap every attention site's SDPA module for a :class:`CachedSDPA` at the same path (the graph's code does not
    change); a model :func:`kv_cache_support` refuses raises :class:`CacheUnsupported`."""

    name = "enable_kv_cache"

    def requires(self, gm) -> None:
        reason = kv_cache_support(gm)
        if reason is not None:
            raise CacheUnsupported(f"no KV cache for {gm.hf_class}: {reason}")

    def call(self, gm) -> PassResult:
        for site in gm.site_index.attention:
            module = gm.get_submodule(site.node.target)
            if isinstance(module, CachedSDPA):
                continue
            parent, _, name = site.node.target.rpartition(".")
            cached = CachedSDPA(module, site.path, site.num_kv_heads, _window(gm.hf_config, site.layer))
            setattr(gm.get_submodule(parent) if parent else gm, name, cached)
        return PassResult(gm, False)  # modules swapped in place: the graph and its code are the same


class KVCache:
    """Keys and values of every attention site for ``batch`` sequences of up to ``capacity`` tokens.

    Slot ``j`` of a row holds the token at sequence index ``j`` (left padding included); ``valid`` marks the slots
    holding real tokens. Run each forward of the model inside ``with cache.step(attention_mask):`` with the new
    tokens' mask; the step's tokens take the next ``attention_mask.shape[1]`` slots.
    """

    def __init__(self, batch: int, capacity: int, device: torch.device | str = "cpu"):
        self.batch, self.capacity = batch, capacity
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self._buffers: dict[CachedSDPA, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._span: tuple[int, int] | None = None
        self._masks: dict[int | None, torch.Tensor] = {}
        self._seen: set[CachedSDPA] = set()

    @contextlib.contextmanager
    def step(self, attention_mask: torch.Tensor):
        """Make this cache active for one forward of the tokens ``attention_mask`` (B, T) describes."""
        rows, count = attention_mask.shape
        start, stop = self.length, self.length + count
        if rows != self.batch or stop > self.capacity:
            raise GraftrError(f"the KV cache holds {self.batch} rows of {self.capacity} tokens; a step of "
                              f"{rows} rows × {count} tokens at {start} does not fit")
        self.valid[:, start:stop] = attention_mask.bool()
        self._span, self._masks, self._seen = (start, stop), {}, set()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self._span = None
        if self._buffers and len(self._seen) != len(self._buffers):
            raise CacheUnsupported(f"{len(self._buffers) - len(self._seen)} attention sites did not run in this step")
        self.length = stop

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of ``len(rows)`` rows, row ``i`` a copy of this cache's row ``rows[i]`` (one prompt continued in
        several ways: the choices of a multiple-choice question)."""
        if self._span is not None:
            raise GraftrError("a KV cache cannot be re-batched inside a step")
        new = KVCache(len(rows), self.capacity, device=self.valid.device)
        new.valid, new.length = self.valid[rows], self.length
        new._buffers = {m: (k[rows], v[rows], group) for m, (k, v, group) in self._buffers.items()}
        return new

    def _mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            start, stop = self._span
            self._masks[window] = visible(self.valid[:, :stop], start, window)
        return self._masks[window]

    def attend(self, module: CachedSDPA, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, stop = self._span
        if not q.shape[-2] == k.shape[-2] == stop - start:
            raise CacheUnsupported(f"the attention at {module.path} attends over {k.shape[-2]} keys for "
                                   f"{q.shape[-2]} queries of a {stop - start}-token step (an adapter adds keys?)")
        if module in self._seen:
            raise CacheUnsupported(f"the attention at {module.path} ran twice in one step")
        self._seen.add(module)
        if module not in self._buffers:
            self._buffers[module] = self._allocate(k, v, module.kv_heads)
        keys, values, group = self._buffers[module]
        keys[:, :, start:stop] = k[:, ::group]
        values[:, :, start:stop] = v[:, ::group]
        return F.scaled_dot_product_attention(
            q, keys[:, :, :stop], values[:, :, :stop], attn_mask=self._mask(module.window),
            dropout_p=module.dropout_p if module.training else 0.0, scale=module.scale,
            enable_gqa=group > 1 or module.enable_gqa)

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Buffers for one site. Keys repeated from ``kv_heads`` groups (HF's repeat_kv) are stored once per group
        and regrouped by SDPA's ``enable_gqa``; the repetition is checked on the first step's keys and values."""
        group = key_group(k, v, kv_heads)
        heads = k.shape[1] // group
        keys = k.new_zeros(self.batch, heads, self.capacity, k.shape[-1])
        values = v.new_zeros(self.batch, heads, self.capacity, v.shape[-1])
        return keys, values, group


def key_group(k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> int:
    """How many adjacent heads of ``k`` and ``v`` (B, heads, T, ·) repeat one key head (HF's ``repeat_kv``); 1 if
    they do not, or the attention keeps its ``kv_heads`` heads itself (SDPA's ``enable_gqa``)."""
    group = k.shape[1] // kv_heads if kv_heads and k.shape[1] % kv_heads == 0 else 1
    if group > 1 and not all(torch.equal(t, t[:, ::group].repeat_interleave(group, dim=1)) for t in (k, v)):
        group = 1
    return group


def visible(valid: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool: which of the ``S`` keys (sequence slots ``0..S-1``, ``valid`` (B, S) marking real tokens)
    each query at slots ``start..S-1`` sees: not padding, not in the future, within a sliding ``window``."""
    stop = valid.shape[1]
    query = torch.arange(start, stop, device=valid.device)[:, None]
    key = torch.arange(stop, device=valid.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return valid[:, None, None, :] & allowed


class ExplicitKV:
    """The cache as values, for an exported program: each site's past keys and values come in as tensors and the
    extended ones go out (no buffer is written). Active like a :class:`KVCache` (``with cache.active():``) while the
    graph runs one step; ``valid`` (B, P + T) marks the real tokens of the past and of the step.

    ``past``: one ``(keys, values)`` pair (B, heads, P, head_dim) per attention site, in ``sites`` order; ``groups``:
    each site's key-head grouping, as :meth:`KVCache._allocate` found it on an eager step (:func:`kv_groups`).
    ``present`` holds the pairs of P + T slots after the step. Keys an adapter prepends to the tokens' (prefix
    prompts: ``prefix`` of them at the front, the same at every step) are attended over, visible to every query, and
    not cached."""

    def __init__(self, sites: list[CachedSDPA], past: list[tuple[torch.Tensor, torch.Tensor] | None],
                 valid: torch.Tensor, groups: list[int | None]):
        self.index = {module: i for i, module in enumerate(sites)}
        self.past, self.valid, self.groups = past, valid, groups
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(sites)

    @contextlib.contextmanager
    def active(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
        if any(p is None for p in self.present):
            raise CacheUnsupported(f"{self.present.count(None)} attention sites did not run in this step")

    def attend(self, module: CachedSDPA, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        i = self.index[module]
        prefix = k.shape[-2] - q.shape[-2]  # keys an adapter put before the step's tokens
        if self.groups[i] is None:  # a probe (kv_groups): no past yet
            self.groups[i] = key_group(k[..., prefix:, :], v[..., prefix:, :], module.kv_heads)
            heads = k.shape[1] // self.groups[i]
            empty = k.new_zeros(k.shape[0], heads, 0, k.shape[-1])
            self.past[i] = (empty, v.new_zeros(v.shape[0], heads, 0, v.shape[-1]))
        group, (past_k, past_v) = self.groups[i], self.past[i]
        keys = torch.cat([past_k, k[:, ::group, prefix:]], dim=2)
        values = torch.cat([past_v, v[:, ::group, prefix:]], dim=2)
        self.present[i] = (keys, values)
        mask = visible(self.valid, keys.shape[2] - q.shape[-2], module.window)
        if prefix:
            keys = torch.cat([k[:, ::group, :prefix], keys], dim=2)
            values = torch.cat([v[:, ::group, :prefix], values], dim=2)
            mask = torch.cat([mask.new_ones(*mask.shape[:3], prefix), mask], dim=3)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=module.scale,
                                              enable_gqa=group > 1 or module.enable_gqa)


def cached_sites(gm) -> list[CachedSDPA]:
    """The :class:`CachedSDPA` module of every attention site of ``gm``, in graph order (after :func:`enable_kv_cache`)."""
    return [gm.get_submodule(site.node.target) for site in gm.site_index.attention]


def kv_groups(gm, sites: list[CachedSDPA], example: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """``(group, heads, head_dim)`` of each site's cached keys (:func:`key_group`), from one eager step of
    ``example`` (the graph's keyword inputs, ``attention_mask`` included) with an empty :class:`ExplicitKV`."""
    mask = example["attention_mask"]
    probe = ExplicitKV(sites, [None] * len(sites), mask.bool(), [None] * len(sites))
    with torch.no_grad(), probe.active():
        gm(**example)
    return [(probe.groups[i], keys.shape[1], keys.shape[3]) for i, (keys, _) in enumerate(probe.present)]
