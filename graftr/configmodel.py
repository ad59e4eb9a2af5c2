"""The base of every config graftr validates: recipes, rules, selectors, adapter kinds, the train and data sections.

Three rules hold everywhere: unknown keys are errors (``extra="forbid"``), a number is finite (``inf``, ``.inf``
and ``nan`` are refused: ``allow_inf_nan=False``), and a boolean is never read as a number.
Pydantic's lax mode turns ``true`` into ``1`` for an ``int`` or ``float`` field, and YAML reads ``yes``, ``on`` and
``true`` as booleans, so ``inhibition: yes`` or ``rank: on`` would otherwise become a number without a word.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator


def _leaf_types(annotation: Any) -> set:
    """The plain types an annotation admits, through Optional/Union/Annotated/list/tuple/Literal."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[T, ...]: only T is a type
        return _leaf_types(args[0])
    return set().union(*(_leaf_types(a) for a in args if a is not Ellipsis))


class Boolean:
    """A boolean given where a number belongs. It fails the field's own number validation, so the error keeps the
    field's location (every such field is reported, with the others); its repr is what the user wrote."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{str(self.value).lower()} (a boolean; YAML reads true/false/yes/no/on/off as booleans)"


def _wants_a_number(annotation: Any) -> bool:
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # subclasses' model_config merges into this

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        marked = None
        for name, field in cls.model_fields.items():
            key = field.alias or name
            value = data.get(key)
            if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
                value = [Boolean(v) if isinstance(v, bool) else v for v in value]
            elif isinstance(value, bool):
                value = Boolean(value)
            else:
                continue
            if _wants_a_number(field.annotation):
                marked = marked if marked is not None else dict(data)
                marked[key] = value
        return data if marked is None else marked
