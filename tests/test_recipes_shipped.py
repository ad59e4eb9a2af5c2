"""Every shipped recipe validates and matches exactly the expected sites on tiny models of its architectures."""

from pathlib import Path

import pytest
from zoo import tiny_config, tiny_model

from graftr import graft
from graftr.models import build_model
from graftr.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# recipe file -> {architecture: {rule: number of sites}} on the 2-layer tiny models of tests/zoo.py
EXPECTED = {
    "ia3_llama.yaml": {a: {"ia3_attn": 4, "ia3_ff": 2} for a in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe",
                                                                 "mixtral", "olmoe")},
    "ina_moe.yaml": {a: {"ina_attn": 4, "ina_experts": 4} for a in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")},
    "ia3_encoder.yaml": {a: {"ia3_attn": 4, "ia3_ff": 2} for a in ("bert", "roberta")},
    "ia3_t5.yaml": {"t5": {"ia3_attn": 12, "ia3_ff": 4}},
    "ina_llama.yaml": {a: {"ina_qk": 4} for a in ("llama", "mistral", "qwen2", "qwen3")},
    "ina_llama_nf4.yaml": {a: {"ina_qv": 4} for a in ("llama", "mistral", "qwen2")},
    "ina_roberta.yaml": {"roberta": {"ina_qkv": 6}},
    # op: attention needs no module paths: the LLaMA-Adapter recipes fit every decoder family (32-layer tiny models)
    "llama_adapter.yaml": {a: {"llama_adapter": 30} for a in ("llama", "qwen2", "gemma2")},
    "llama_adapter_nonlinear.yaml": {"llama": {"llama_adapter_nl": 30}},
    "llama_adapter_v2.yaml": {a: {"llama_adapter": 30, "scale_bias": 7 * 32} for a in ("llama", "qwen2")},
    "llama_adapter_multimodal.yaml": {a: {"llama_adapter": 30} for a in ("llama", "qwen2")},
    "minilm_sst2_ia3.yaml": {"bert": {"ia3_attn": 4, "ia3_ff": 2}},
}
# recipes that select layers by count ("last 30") run on tiny models with Llama-2-7B's depth
LAYERS = {"llama_adapter.yaml": 32, "llama_adapter_nonlinear.yaml": 32, "llama_adapter_v2.yaml": 32,
          "llama_adapter_multimodal.yaml": 32}


def test_every_shipped_recipe_validates_and_is_covered():
    found = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml"))
    assert found == sorted(EXPECTED), "add match counts for new recipes to EXPECTED"
    for name in found:
        recipe = load_recipe(RECIPES / name)
        assert recipe.rules
        first = (RECIPES / name).read_text().splitlines()[0]
        assert first.startswith("# graftr ") and f"recipes/{name}" in first, f"{name}: opens with its command"


@pytest.mark.parametrize("name,arch", [(n, a) for n, archs in EXPECTED.items() for a in archs])
def test_exact_match_counts(name, arch):
    recipe = load_recipe(RECIPES / name)
    depth = {"num_hidden_layers": LAYERS[name]} if name in LAYERS else {}
    if recipe.vision is None:
        model = tiny_model(arch, task=recipe.task, num_labels=recipe.num_labels, **depth)
    else:  # the encoder is a bundled config snapshot (no weights): build on meta, where it needs none
        model = build_model(tiny_config(arch, **depth), recipe.task, device="meta")
    gm = graft(model, recipe)
    assert {p.name: len(p.sites) for p in gm.plans} == EXPECTED[name][arch]
