"""The extension points other features are written in: the pass protocol and its manager, a kind's own PEFT mapping,
the grafted model's record."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from safetensors.torch import save_file
from torch import fx, nn
from zoo import tiny_model

from graftr import AdapterConfig, LinearAdapter, graft, register_adapter
from graftr.errors import GraftrError
from graftr.formats.peft import export_peft, import_peft, peft_adapters
from graftr.outline import outline_layers
from graftr.passbase import GraphPass, PassResult, run_passes
from graftr.recipe import parse_recipe


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(self.lin(x))


class ReluToTanh(GraphPass):
    name = "relu_to_tanh"

    def call(self, gm):
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.tanh
                changed = True
        return PassResult(gm, changed)


class BreakTheGraph(GraphPass):
    name = "break_the_graph"

    def call(self, gm):
        lin = next(n for n in gm.graph.nodes if n.op == "call_module")
        last = list(lin.users)[0]
        with gm.graph.inserting_after(last):
            late = gm.graph.call_function(torch.neg, (last,))
        lin.args = (late,)  # lin now reads a value computed after it: lint refuses the graph
        return PassResult(gm, True)


class Fails(GraphPass):
    name = "fails"

    def __init__(self, error: Exception):
        self.error = error

    def call(self, gm):
        raise self.error


def test_a_pass_that_changed_the_graph_is_recompiled():
    gm = fx.symbolic_trace(Small())
    x = torch.randn(2, 3)
    result = run_passes(gm, ReluToTanh())
    assert result.modified and result.graph_module is gm
    torch.testing.assert_close(gm(x), torch.tanh(gm.lin(x)))  # the generated code follows the edited graph
    assert not run_passes(gm, ReluToTanh()).modified  # nothing left to change


def test_the_manager_names_the_failing_pass():
    gm = fx.symbolic_trace(Small())
    with pytest.raises(RuntimeError, match="the break_the_graph pass produced an invalid graph"):
        run_passes(gm, ReluToTanh(), BreakTheGraph())
    with pytest.raises(ValueError, match="boom") as caught:
        run_passes(fx.symbolic_trace(Small()), ReluToTanh(), Fails(ValueError("boom")))
    assert caught.value.__notes__ == ["in graftr's fails pass (passes run before it: relu_to_tanh)"]
    with pytest.raises(GraftrError, match="^user input$") as caught:  # a user error passes through as it is
        run_passes(fx.symbolic_trace(Small()), Fails(GraftrError("user input")))
    assert not getattr(caught.value, "__notes__", None)


class PeftTestConfig(AdapterConfig):
    kind: Literal["test_peft_owner"] = "test_peft_owner"


@register_adapter(PeftTestConfig, ops=("linear",))
class PeftTestKind(LinearAdapter):
    """A kind that owns a (made-up) PEFT type: import_peft and export_peft find it through the registry."""

    peft_type = "TEST_OWNED_TYPE"
    seen: list = []

    @classmethod
    def from_site(cls, config, site, *, device):
        return cls()

    def forward(self, x, y):
        return y

    @classmethod
    def from_peft(cls, model, config, tensors, where):
        cls.seen.append((config["peft_type"], sorted(tensors), where))
        return "imported"

    @classmethod
    def to_peft(cls, gm):
        return {"peft_type": cls.peft_type}, {"w": torch.zeros(1)}

    @classmethod
    def peft_adapters(cls, config):
        return [{"kind": cls.kind, "from": config["peft_type"]}]


def test_a_kind_owns_its_peft_mapping(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "TEST_OWNED_TYPE"}))
    save_file({"base_model.model.x": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    assert import_peft(tiny_model("llama"), tmp_path) == "imported"
    assert PeftTestKind.seen == [("TEST_OWNED_TYPE", ["base_model.model.x"], str(tmp_path))]
    assert peft_adapters({"peft_type": "TEST_OWNED_TYPE"}) == [{"kind": "test_peft_owner", "from": "TEST_OWNED_TYPE"}]
    with pytest.raises(GraftrError, match="graftr reads ADAPTION_PROMPT, IA3, LORA, TEST_OWNED_TYPE$"):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OTHER"}))
        import_peft(tiny_model("llama"), tmp_path)


def test_the_grafted_model_keeps_one_record(tmp_path):
    gm = graft(tiny_model("llama"), parse_recipe("""
name: r
rules: [{name: ia3, match: {path: "model.layers.*.self_attn.v_proj"}, adapter: {kind: ia3}}]
"""))
    record = gm.grafting
    assert (record.task, record.hf_class, record.input_names) == (
        "causal_lm", "LlamaForCausalLM", ["input_ids", "attention_mask", "position_ids"])
    assert gm.site_index is record.site_index and list(record.adapters) == ["default"]  # graft's adapter
    assert gm.plans == record.adapters["default"].plans and gm.recipe is record.adapters["default"].recipe
    gm.model_id = "elsewhere"  # the attributes read and set the record
    assert record.model_id == "elsewhere"
    outline_layers(gm)
    assert record.outlined == gm.graftr_outlined == ["model.layers.0", "model.layers.1"]
    with pytest.raises(RuntimeError, match="the layers are outlined; its site index describes the flat graph"):
        gm.site_index
    export_peft(graft(tiny_model("llama"), parse_recipe("""
name: r
rules: [{name: t, match: {path: "model.layers.0.mlp.up_proj"}, adapter: {kind: test_peft_owner}}]
""")), tmp_path / "out")  # export finds the kind's to_peft through the registry (keyed by its config class)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == {"peft_type": "TEST_OWNED_TYPE"}
