"""The one place that reads and writes ``node.meta``.

``nn_module_stack`` and ``val`` differ in shape across tracers and torch versions (paths like
``L['self'].model.layers[0]`` under dynamo, plain FQNs under non-strict export; classes as types or as dotted
strings), so every pass goes through these helpers, and graftr's own provenance tags (``graftr_matched``, ``graftr_rule``)
are written and read here too.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

_DYNAMO_PATH = re.compile(r"^L\['self'\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")
_GETATTR = re.compile(r"getattr\(\s*([^,]+?)\s*,\s*['\"]?(\w+)['\"]?\s*\)")


def _clean_path(path: str) -> str:
    path = _DYNAMO_PATH.sub("", path)
    while "getattr(" in path:
        path = _GETATTR.sub(r"\1.\2", path)
    return _INDEX.sub(r".\1", path).strip(".")


def _class_name(cls: Any) -> str:
    if isinstance(cls, type):
        return cls.__name__
    return str(cls).rsplit(".", 1)[-1].strip("'>")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(module_path, class_name), ...]`` from the outermost to the innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, "")
        out.append((_clean_path(str(path)), _class_name(cls)))
    return out


def innermost(node: fx.Node) -> tuple[str, str] | None:
    stack = module_stack(node)
    return stack[-1] if stack else None


def module_path(node: fx.Node) -> str | None:
    inner = innermost(node)
    return inner[0] if inner else None


def val(node: fx.Node) -> Any:
    """The traced example value (a FakeTensor for tensor nodes), or None."""
    return node.meta.get("val", node.meta.get("example_value"))


def shape(node: fx.Node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: fx.Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def last_dim(node: fx.Node) -> int | None:
    s = shape(node)
    if not s:
        return None
    d = s[-1]
    return int(d) if not isinstance(d, torch.SymInt) else None


def stack_down_to(node: fx.Node, path: str) -> dict | None:
    """``node``'s raw ``nn_module_stack`` cut after the entry of module ``path`` (the stack of a call to that module),
    or None if ``node`` was not traced inside it."""
    entries = list((node.meta.get("nn_module_stack") or {}).items())
    paths = [p for p, _ in module_stack(node)]
    return dict(entries[: paths.index(path) + 1]) if path in paths else None


def set_stack(node: fx.Node, stack: dict) -> None:
    node.meta["nn_module_stack"] = stack


def copy_meta_inside(src: fx.Node, dst: fx.Node, path: str, class_name: str) -> None:
    """:func:`copy_meta`, then put ``dst`` inside one more module: the one installed at ``path`` (an adapter)."""
    copy_meta(src, dst)
    stack = dict(src.meta.get("nn_module_stack") or {})
    stack[path] = (path, class_name)
    dst.meta["nn_module_stack"] = stack


def drop_value(node: fx.Node) -> None:
    """Forget the traced example value of ``node`` (a created node whose output differs, e.g. a tuple)."""
    for key in ("val", "tensor_meta"):
        node.meta.pop(key, None)


def copy_meta(src: fx.Node, dst: fx.Node, **extra: Any) -> None:
    """Give a created node the module stack of the node it stands in for, plus graftr provenance keys."""
    for key in ("nn_module_stack", "stack_trace", "val", "tensor_meta"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    dst.meta.update(extra)


# provenance keys set by graftr's passes
MATCHED = "graftr_matched"  # on a site's anchor node: list of rule names that matched it (set by the match pass)
RULE = "graftr_rule"  # on every node a rewrite inserted: the rule that made it


def tag_rule(node: fx.Node, rule: str) -> None:
    """Provenance of a node the rewrite pass inserted: the rule that made it (``<rule>@<adapter>`` for a named
    adapter's, :func:`graftr.named.qualified`)."""
    node.meta[RULE] = rule


def rule_of(node: fx.Node) -> str | None:
    """The rule that inserted ``node`` (:func:`tag_rule`), or None for a node of the traced model."""
    return node.meta.get(RULE)


def matched(node: fx.Node) -> list[str]:
    """The rules the match pass tagged ``node`` (a site's anchor) with, in recipe order."""
    return list(node.meta.get(MATCHED, ()))


def tag_matched(node: fx.Node, rule: str) -> None:
    node.meta.setdefault(MATCHED, []).append(rule)


def untag_matched(node: fx.Node) -> None:
    node.meta.pop(MATCHED, None)
