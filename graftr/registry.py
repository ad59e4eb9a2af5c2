"""The one registry of adapter kinds.

An adapter kind is a pydantic config class (``extra="forbid"``, with a ``kind: Literal["name"]`` field) plus the
``nn.Module`` class it builds and the site ops it can attach to (``"linear"``, ``"attention"``, ``"experts"``). The recipe
schema is a discriminated union over the registered config classes, so a kind registered from a user's own
package (imported by the recipe's ``imports:`` list or through the ``graftr.adapters`` entry-point group) is usable
from YAML like a built-in one::

    from typing import Literal
    import graftr

    class MyConfig(graftr.AdapterConfig):
        kind: Literal["my_scale"] = "my_scale"
        init: float = 1.0

    @graftr.register_adapter(MyConfig, ops=("linear",))
    class MyScale(graftr.LinearAdapter):
        ...
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Union, get_args

from pydantic import ConfigDict, Field

from graftr.configmodel import ConfigModel
from graftr.errors import GraftrError

SITE_OPS = ("linear", "attention", "experts")


@dataclass(frozen=True)
class TrainingDefaults:
    """How a kind's paper or official code trains it: what ``graftr train`` uses for the ``train:`` fields a recipe
    leaves unset (``lr``, ``lr_schedule``, warmup, ``weight_decay``). ``source`` cites where the values come from.

    ``per_batch`` makes ``lr`` a base rate scaled by the global batch (LLaMA-Adapter's
    ``lr = blr × batch / 256``): the run's lr is ``lr × global batch / per_batch``.
    """

    lr: float
    source: str
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    per_batch: int | None = None
    paper: str | None = None  # where the defaults depart from the paper: the override that restores it, and why

    def lr_for(self, global_batch: int) -> float:
        return self.lr * global_batch / self.per_batch if self.per_batch else self.lr

    def describe(self, global_batch: int, *, lr: bool = True) -> str:
        """``lr 0.003, linear, warmup 0.06 of the steps, weight decay 0: <source>`` (``lr=False``: without the
        rate, when the recipe set its own)."""
        rate = f"{self.lr:g} × batch {global_batch} / {self.per_batch}" if self.per_batch else f"{self.lr:g}"
        text = f"{self.lr_schedule}, warmup {self.warmup_ratio:g} of the steps, weight decay {self.weight_decay:g}: " \
               f"{self.source}"
        if lr:
            text = f"lr {rate}, {text}" + (f"; the paper's setting: {self.paper}" if self.paper else "")
        return text


class AdapterConfig(ConfigModel):
    """Base of every adapter kind's config. Subclasses add ``kind: Literal["..."]`` and their options.

    A kind may set ``training_defaults`` (a :class:`TrainingDefaults`) so recipes using it train without ``lr``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    training_defaults: ClassVar[TrainingDefaults | None] = None


@dataclass(frozen=True)
class AdapterKind:
    name: str
    config_cls: type[AdapterConfig]
    module_cls: type
    ops: tuple[str, ...]


_KINDS: dict[type[AdapterConfig], AdapterKind] = {}  # keyed by config class; each class has its own `kind` name
_VERSION = [0]  # bumped on every registration; the recipe model is rebuilt when it changes


def _kind_name(config_cls: type[AdapterConfig]) -> str:
    field = config_cls.model_fields.get("kind")
    args = get_args(field.annotation) if field is not None else ()
    if field is None or len(args) != 1 or not isinstance(args[0], str):
        raise TypeError(f"{config_cls.__name__} needs a field `kind: Literal['<name>']`")
    return args[0]


def register_adapter(config_cls: type[AdapterConfig], *, ops: tuple[str, ...] | list[str]) -> Callable[[type], type]:
    """Class decorator registering ``module_cls`` as the adapter kind configured by ``config_cls``.

    Rejects a config class that does not forbid extra keys, an unknown op and a name already taken.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, AdapterConfig)):
        raise TypeError("register_adapter needs a subclass of graftr.AdapterConfig")
    if config_cls.model_config.get("extra") != "forbid":
        raise TypeError(f"{config_cls.__name__} must keep extra='forbid' so unknown recipe keys are rejected")
    name = _kind_name(config_cls)
    bad = [op for op in ops if op not in SITE_OPS]
    if not ops or bad:
        raise TypeError(f"adapter kind {name!r}: ops must be a non-empty subset of {SITE_OPS}, got {tuple(ops)}")

    builtin = _builtin_configs().get(name)
    if builtin is not None and builtin is not config_cls:
        raise ValueError(f"adapter kind {name!r} is a built-in kind of graftr; choose another name")

    def decorator(module_cls: type) -> type:
        taken = next((k for k in _KINDS.values() if k.name == name), None)
        if taken is not None and taken.module_cls is not module_cls:
            raise ValueError(f"adapter kind {name!r} is already registered by {taken.module_cls.__qualname__}")
        if taken is not None:  # the same module registered again (a reloaded module): its new config class wins
            del _KINDS[taken.config_cls]
        _KINDS[config_cls] = AdapterKind(name, config_cls, module_cls, tuple(ops))
        module_cls.config_cls = config_cls
        module_cls.kind = name
        _VERSION[0] += 1
        return module_cls

    return decorator


def _builtin_configs() -> dict[str, type[AdapterConfig]]:
    from graftr.adapters.config import BUILTIN  # torch-free: the built-in kinds' configs without their modules

    return {_kind_name(c): c for c in BUILTIN}


def _load_builtin() -> None:
    for name in _builtin_configs():  # a built-in kind's module is graftr/adapters/<kind>.py; importing it registers it
        importlib.import_module(f"graftr.adapters.{name}")


_ENTRY_POINTS_LOADED = [False]


def _load_entry_points() -> None:
    if _ENTRY_POINTS_LOADED[0]:
        return
    _ENTRY_POINTS_LOADED[0] = True
    for ep in importlib.metadata.entry_points(group="graftr.adapters"):
        ep.load()


def kinds() -> dict[str, AdapterKind]:
    """All registered kinds by name, built-in ones and those from installed entry points."""
    _load_builtin()
    _load_entry_points()
    return {k.name: k for k in _KINDS.values()}


def kind_of(config: AdapterConfig) -> AdapterKind:
    """The kind a validated adapter config belongs to, looked up by its class."""
    kinds()
    kind = _KINDS.get(type(config))
    if kind is None:
        raise GraftrError(f"{type(config).__qualname__} is not a registered adapter config class")
    return kind


def get_kind(name: str) -> AdapterKind:
    known = kinds()
    if name not in known:
        raise GraftrError(f"unknown adapter kind {name!r}; registered kinds: {', '.join(sorted(known))}")
    return known[name]


def configs() -> dict[str, type[AdapterConfig]]:
    """Every kind's config class by name: what a recipe validates against. Unlike :func:`kinds` it does not import
    the built-in kinds' modules (nor torch), so ``graftr validate`` and ``graftr schema`` start at once."""
    _load_entry_points()
    return {**_builtin_configs(), **{k.name: k.config_cls for k in _KINDS.values()}}


def registry_version() -> int:
    _load_entry_points()
    return _VERSION[0]


def adapter_union() -> Any:
    """The discriminated union over every kind's config class (the type of a rule's ``adapter`` field)."""
    classes = tuple(configs().values())
    if len(classes) == 1:
        return Annotated[classes[0], Field(discriminator="kind")]
    return Annotated[Union[classes], Field(discriminator="kind")]  # type: ignore[valid-type]


def import_modules(names: list[str], search: list[str] | None = None, *, local: bool = True) -> None:
    """Import user modules named by a recipe's ``imports:`` so their kinds register.

    ``search`` (the recipe's folder) and the working directory are tried after ``sys.path``, so a module file
    sitting next to the recipe works without installing it. ``local=False`` (the recipe saved in an adapter
    directory, which is data) imports only what is installed: a module file planted next to an adapter never runs
    unless its user trusts it (``load_adapter(..., trust_code=True)``, ``--trust-code``), which loads with ``local``.
    """
    extra = [d for d in [*(search or []), os.getcwd()] if d not in sys.path] if local else []
    sys.path.extend(extra)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as e:
                beside = [] if local else [d for d in (search or []) if (Path(d) / f"{name}.py").is_file()]
                if beside:
                    raise GraftrError(f"the adapter's kind comes from {Path(beside[0]) / (name + '.py')}, code that "
                                      "graftr runs only when you trust it: pass --trust-code (Python: "
                                      "trust_code=True)") from None
                raise GraftrError(f"cannot import {name!r} (listed in the recipe's imports): {e}") from None
            except Exception as e:  # the user's module raised while registering its kinds
                raise GraftrError(f"importing {name!r} failed: {type(e).__name__}: {e}") from None
    finally:
        for d in extra:
            sys.path.remove(d)
