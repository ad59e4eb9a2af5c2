"""Image-conditioned adaption prompts: LLaMA-Adapter's multi-modal reasoning (Zhang et al. 2023, "LLaMA-Adapter:
Efficient Fine-tuning of Language Models with Zero-init Attention", https://arxiv.org/abs/2303.16199, §3.3).

A frozen vision encoder (a CLIP or SigLIP vision tower from transformers) gives M global features of the image,
one per chosen encoder layer; they are concatenated and projected by a small trainable network to one global
visual vector of the language model's width::

    I_m = norm(pool(h_m))              h_m: the encoder's hidden states after layer m (``features.layers``);
                                       pool: the class token (``cls``, CLIP) or the mean over patches (``mean``);
                                       norm: the tower's own final LayerNorm (``post_layernorm``)
    I_p = MLP(concat(I_1, ..., I_M))   ``hidden: 0``: one Linear(M·C → D); else Linear(M·C → h), σ, Linear(h → D)

``I_p`` is added element-wise to the prompt of every attention block whose ``gated_prompt`` rule says
``condition: image``: ``P_l ← P_l + repeat(I_p, L)`` (:mod:`graftr.adapters.gated_prompt`). The zero-init gated
attention is unchanged, so gates at zero leave the language model's output unchanged for any image.

In the graph: the grafted model takes one more input, ``pixel_values`` (B, 3, H, W) as the encoder's image
processor makes them (:func:`image_processor`); one node calls the :class:`VisionPrompt` module installed at
``vision_prompt`` and gives ``I_p`` (B, D) in fp32 to every conditioned prompt node. The encoder runs in the base's
dtype and device, frozen, without gradients, always in eval mode; the projection is trained with the adapters and
saved with them (``vision_prompt.projection.*``). On a ``meta`` base the encoder is built on ``meta`` from its
config (a bundled snapshot is enough to count parameters); :func:`load_encoder_weights` fills it in from its own
directory before :func:`graftr.materialize.materialize` loads the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from graftr.errors import GraftrError
from graftr.passbase import GraphPass, PassResult
from graftr.sections import VisionConfig

TARGET = "vision_prompt"  # where the module is installed in the grafted model
PIXELS = "pixel_values"  # the graph input
ENCODER_TYPES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


# ---- the encoder -------------------------------------------------------------------------------------------------

def _vision_config(source):
    config = source.config
    config = getattr(config, "vision_config", None) or config  # a whole CLIP/SigLIP model: its vision tower
    if config.model_type not in ENCODER_TYPES:
        raise GraftrError(f"vision encoder {source.model_id} is a {config.model_type!r} model; graftr takes CLIP or "
                          f"SigLIP vision towers ({', '.join(ENCODER_TYPES)})")
    return config


def _has_weights(source) -> bool:
    return source.directory is not None and any(source.directory.glob("*.safetensors"))


def load_encoder(name: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The vision tower ``name`` resolves to, frozen, in eval mode: with its weights, or on ``meta`` when
    ``device`` is meta (the base is traced there and loaded later)."""
    import transformers

    from graftr.models import resolve

    source = resolve(name)
    config = _vision_config(source)
    cls = getattr(transformers, ENCODER_TYPES[config.model_type])
    if device.type == "meta":
        with torch.device("meta"):
            encoder = cls._from_config(config, dtype=dtype)
    elif not _has_weights(source):
        raise GraftrError(f"only a config is available for the vision encoder {name}; pass a directory (or a cached "
                          "hub id) with its safetensors weights")
    else:
        try:
            encoder = cls.from_pretrained(str(source.directory), local_files_only=True, dtype=dtype).to(device)
        except (OSError, ValueError) as e:
            raise GraftrError(f"cannot load the vision encoder {name}: {str(e).strip().splitlines()[0]}") from e
    return encoder.requires_grad_(False).eval()


def image_processor(name: str):
    """The encoder's own image processor (resize, crop, normalise), from its directory."""
    from transformers import AutoImageProcessor

    from graftr.models import resolve

    source = resolve(name)
    if source.directory is None:
        raise GraftrError(f"the vision encoder {name} is only a config here; its image processor needs its directory")
    try:
        return AutoImageProcessor.from_pretrained(str(source.directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise GraftrError(f"cannot load the image processor of {name} from {source.directory}: "
                          f"{str(e).strip().splitlines()[0]}") from e


def processor_for(gm):
    """The image processor of ``gm``'s encoder when its recipe has a ``vision:`` section, else None."""
    recipe = getattr(gm, "recipe", None)
    return image_processor(recipe.vision.encoder) if getattr(recipe, "vision", None) is not None else None


def pixel_values(processor, paths: list[str | Path]) -> torch.Tensor:
    """``pixel_values`` (N, 3, H, W) for the image files ``paths``, through the encoder's ``processor``."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise GraftrError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise GraftrError(f"cannot read the image {path}: {e}") from None
    return processor(images=images, return_tensors="pt")["pixel_values"]


# ---- the module --------------------------------------------------------------------------------------------------

class VisionPrompt(nn.Module):
    """``I_p = MLP(concat_m norm(pool(h_m)))``, (B, D) in fp32, from ``pixel_values``; the encoder is frozen."""

    def __init__(self, encoder: nn.Module, config: VisionConfig, dim: int, device=None):
        super().__init__()
        self.encoder = encoder
        layers = encoder.config.num_hidden_layers
        bad = [i for i in config.features.layers if not -(layers + 1) <= i <= layers]
        if bad:
            raise GraftrError(f"vision.features.layers {bad}: the encoder has hidden states 0..{layers}")
        if config.features.pool == "cls" and encoder.config.model_type == "siglip_vision_model":
            raise GraftrError("vision.features.pool cls: SigLIP has no class token; use pool: mean")
        self.layers, self.pool = [i % (layers + 1) for i in config.features.layers], config.features.pool
        self.activation = config.activation
        width = len(self.layers) * encoder.config.hidden_size
        mlp = ([nn.Linear(width, config.hidden), nn.Linear(config.hidden, dim)] if config.hidden
               else [nn.Linear(width, dim)])
        self.projection = nn.ModuleList(mlp).to(device=device, dtype=torch.float32)

    def train(self, mode: bool = True) -> VisionPrompt:
        super().train(mode)
        self.encoder.eval()  # frozen: its dropout stays off while the adapters train
        return self

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``concat_m norm(pool(h_m))``: (B, M·C) in the encoder's dtype, without gradients."""
        param = next(self.encoder.parameters())
        with torch.no_grad():
            out = self.encoder(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
            tower = getattr(self.encoder, "vision_model", self.encoder)  # transformers 5 has no vision_model level
            norm = tower.post_layernorm
            pooled = [out.hidden_states[i][:, 0] if self.pool == "cls" else out.hidden_states[i].mean(1)
                      for i in self.layers]
            return torch.cat([norm(p) for p in pooled], dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.features(pixel_values).float()
        for i, layer in enumerate(self.projection):
            # called as a module (ZeRO-3 gathers a module's parameters around its own forward), in its dtype (fp32
            # unless an engine cast the model), the result in fp32
            x = layer(x.to(layer.weight.dtype)).float()
            if i < len(self.projection) - 1:
                x = _ACTIVATIONS[self.activation](x)
        return x

    def extra_repr(self) -> str:
        return f"layers={self.layers}, pool={self.pool}"


# ---- the graph ---------------------------------------------------------------------------------------------------

class VisionPass(GraphPass):
    """The ``vision_input`` pass: :func:`graft_vision`, between ``match`` and ``rewrite`` (whose conditioned gated
    prompts read the node it adds)."""

    name = "vision_input"

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config

    def requires(self, gm) -> None:
        if PIXELS in gm.graftr_input_names:
            raise GraftrError("this model already takes pixel_values; graft the base model")

    def call(self, gm) -> PassResult:
        graft_vision(gm, self.config)
        return PassResult(gm, True)


def graft_vision(gm, config: VisionConfig) -> None:
    """Install :class:`VisionPrompt` at ``vision_prompt`` and add the ``pixel_values`` input and the node giving
    ``I_p``; the conditioned gated prompts read that node (:func:`visual_node`)."""
    from graftr.trace import add_graph_input, install_module

    embed = gm.get_parameter(_embedding_weight(gm))
    dim = embed.shape[1]
    encoder = load_encoder(config.encoder, device=embed.device, dtype=embed.dtype)
    device = torch.device("cpu") if embed.device.type == "meta" else embed.device
    target = install_module(gm, TARGET, VisionPrompt(encoder, config, dim, device))
    pixels = add_graph_input(gm, PIXELS)
    with gm.graph.inserting_after(pixels):
        node = gm.graph.call_module(target, (pixels,))
    node.meta["graftr_vision"] = True


def with_absolute_encoder(recipe):
    """``recipe`` with its encoder directory made absolute, so a saved adapter finds it from any directory."""
    path = Path(recipe.vision.encoder).expanduser()
    if not path.exists():
        return recipe  # a hub id
    vision = recipe.vision.model_copy(update={"encoder": str(path.resolve())})
    return recipe.model_copy(update={"vision": vision})


def _embedding_weight(gm) -> str:
    """The input embedding's weight: what fixes the model width, dtype and device the vision prompt takes."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
            weight = node.args[0]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return weight.target
    raise GraftrError(f"{gm.hf_class} has no input embedding; image-conditioned prompts need a language model")


def visual_node(graph: fx.Graph) -> fx.Node:
    """The node giving ``I_p``; a recipe without ``vision:`` has none."""
    node = next((n for n in graph.nodes if n.meta.get("graftr_vision")), None)
    if node is None:
        raise GraftrError("gated_prompt with condition: image needs the recipe's vision: section (the encoder)")
    return node


def load_encoder_weights(gm, dtype: torch.dtype | None = None) -> None:
    """Replace an encoder built on ``meta`` with the real one (its own weights, the graph's dtype, on CPU)."""
    module = getattr(gm, TARGET, None)
    if not isinstance(module, VisionPrompt):
        return
    param = next(module.encoder.parameters())
    if param.device.type != "meta":
        return
    config = gm.recipe.vision
    module.encoder = load_encoder(config.encoder, device=torch.device("cpu"), dtype=dtype or param.dtype)
