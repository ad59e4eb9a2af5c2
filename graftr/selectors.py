"""The two selector building blocks of a recipe rule: module-path globs and layer selection.

A glob matches a whole dotted module path such as ``model.layers.3.self_attn.k_proj``:

=========  ==========================================================================
``*``      any run of characters except ``.`` (one component or part of one)
``?``      one character except ``.``
``**``     any number of whole components, zero included (``**.lm_head`` matches ``lm_head``)
``{a,b}``  one of the alternatives (which may hold wildcards; no nesting)
=========  ==========================================================================

Everything else is literal, dots included.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import string

from pydantic import ConfigDict, Field, model_serializer, model_validator

from graftr.configmodel import ConfigModel

_ALLOWED = frozenset(string.ascii_letters + string.digits + "_.*?{},-")


# Work bounds: matching costs the number of sites times the size of the regex, never the product of the brace groups.
MAX_GLOB_LENGTH = 4096
MAX_EXPANSIONS = 64  # brace groups whose alternatives hold '.' or '**' (they change the path's components)


@functools.lru_cache(maxsize=None)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a module-path glob into a regex matching whole paths; a bad glob raises ``ValueError``.

    A ``{a,b}`` group inside one path component becomes a regex alternation (``(?:a|b)``), so ``{a,b}.`` repeated
    22 times is a regex of 22 alternations, not 4 million patterns. Only groups whose alternatives hold ``.`` or
    ``**`` change the path's components; they are expanded into separate patterns, at most
    :data:`MAX_EXPANSIONS`. Runs of ``*`` and ``?`` become one quantifier (``*?*?`` is ``[^.]{2,}``), which keeps
    the regex from backtracking through every split of a component.
    """

    def bad(reason: str) -> ValueError:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        return ValueError(f"bad glob {shown!r}: {reason}")

    if not pattern:
        raise ValueError("bad glob: the pattern is empty")
    if len(pattern) > MAX_GLOB_LENGTH:
        raise bad(f"it is {len(pattern):,} characters long (at most {MAX_GLOB_LENGTH:,}); give a list of globs")
    if any(c.isspace() for c in pattern):
        raise bad("it contains whitespace")
    others = sorted(set(pattern) - _ALLOWED)
    if others:
        raise bad(f"character {others[0]!r} is not allowed (use letters, digits, _ - . * ? and {{a,b}})")
    if "***" in pattern:
        raise bad("'***' is not a wildcard; use '*' within a component or '**' for any number of components")
    _check_braces(pattern, bad)
    pieces = re.split(r"\{([^{}]*)\}", pattern)  # odd pieces are the bodies of {...} groups
    groups = [piece.split(",") for piece in pieces[1::2]]
    if any("" in alternatives for alternatives in groups):
        raise bad("empty alternative in '{...}'")
    structural = [any("." in a or "**" in a for a in alternatives) for alternatives in groups]
    expansions = math.prod(len(g) for g, s in zip(groups, structural) if s)
    if expansions > MAX_EXPANSIONS:
        raise bad(f"its '{{...}}' groups holding '.' or '**' expand to {expansions:,} patterns (at most "
                  f"{MAX_EXPANSIONS}); give a list of globs")
    choices = [[piece] if k % 2 == 0 else groups[k // 2] if structural[k // 2] else ["{" + piece + "}"]
               for k, piece in enumerate(pieces)]
    regexes = [_translate("".join(expansion), bad) for expansion in itertools.product(*choices)]
    return re.compile(r"\A(?:" + "|".join(regexes) + r")\Z")


def _check_braces(pattern: str, bad) -> None:
    """Braces must pair up without nesting, and commas only separate alternatives inside them."""
    inside = False
    for c in pattern:
        if c == "{":
            if inside:
                raise bad("nested braces are not supported")
            inside = True
        elif c == "}":
            if not inside:
                raise bad("'}' without a matching '{'")
            inside = False
        elif c == "," and not inside:
            raise bad("',' outside braces; write {a,b} or give a list of globs")
    if inside:
        raise bad("unclosed '{'")


def _translate(glob: str, bad) -> str:
    """Regex for one glob whose remaining ``{...}`` groups lie within components."""
    components = glob.split(".")
    if "" in components:
        raise bad("leading, trailing or double '.'")
    # '**.**' means the same as '**'
    components = [c for k, c in enumerate(components) if not (c == "**" and k and components[k - 1] == "**")]
    last = len(components) - 1
    out = ""
    for k, component in enumerate(components):
        if component == "**":  # it carries the separators around it, so the next component adds none
            out += ".*" if last == 0 else r"(?:.*\.)?" if k == 0 else r"(?:\..*)?" if k == last else r"\.(?:.*\.)?"
        elif "**" in component:
            raise bad("'**' must be a whole path component, as in 'model.**.k_proj'")
        else:
            sep = "" if k == 0 or components[k - 1] == "**" else r"\."
            out += sep + "".join("(?:" + "|".join(map(_wildcards, piece[1:-1].split(","))) + ")"
                                 if piece.startswith("{") else _wildcards(piece)
                                 for piece in re.split(r"(\{[^{}]*\})", component) if piece)
    return out


def _wildcards(text: str) -> str:
    """Regex for brace-free text within one component: a run of ``*``/``?`` is one quantifier."""
    out = ""
    for run in re.findall(r"[*?]+|[^*?]+", text):
        if run[0] not in "*?":
            out += re.escape(run)
        elif "*" in run:
            out += f"[^.]{{{run.count('?')},}}" if "?" in run else "[^.]*"
        else:
            out += "[^.]" if len(run) == 1 else f"[^.]{{{len(run)}}}"
    return out


class LayerSelect(ConfigModel):
    """Which layers of each layer stack a rule applies to: exactly one of ``first``, ``last``, ``last_fraction``,
    ``indices``, ``range``.

    Selection is per stack, so ``last: 2`` on T5 picks the last two encoder blocks and the last two decoder blocks.
    ``last_fraction`` is the relative form: the same share of the layers on any depth (``0.9375`` is 30 of 32).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"minProperties": 1, "maxProperties": 1})

    first: int | None = Field(None, ge=1, description="the first N layers")
    last: int | None = Field(None, ge=1, description="the last N layers")
    last_fraction: float | None = Field(None, gt=0, le=1, description="the last round(F × layers) layers (at least "
                                        "one), for any depth: 0.9375 is 30 of 32")
    indices: list[int] | None = Field(None, min_length=1, description="layer indices; negative ones count from the end")
    range: tuple[int, int] | None = Field(None, description="[start, stop): layers start, ..., stop - 1")

    @model_validator(mode="after")
    def _exactly_one(self) -> LayerSelect:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            given_text = ", ".join(given) or "none"
            raise ValueError(f"layers takes exactly one of first, last, last_fraction, indices, range; got "
                             f"{given_text}")
        if self.range is not None and not 0 <= self.range[0] < self.range[1]:
            raise ValueError(f"layers range [start, stop) needs 0 <= start < stop, got {list(self.range)}")
        return self

    @model_serializer(mode="wrap")
    def _only_the_given_form(self, handler) -> dict:
        """Dump the one form given (``{last: 2}``), as a user writes it."""
        return {name: value for name, value in handler(self).items() if value is not None}

    def describe(self) -> str:
        """``last 30``, ``indices [0, 3, -1]``, ``range [2, 5)``, ..."""
        if self.range is not None:
            return f"range [{self.range[0]}, {self.range[1]})"
        name = next(name for name in type(self).model_fields if getattr(self, name) is not None)
        return f"{name} {getattr(self, name)}"

    def resolve(self, n_layers: int) -> set[int]:
        """The selected indices of a stack of ``n_layers`` layers; ``ValueError`` if the stack is too short."""
        if self.indices is not None:
            for i in self.indices:
                if not -n_layers <= i < n_layers:
                    raise ValueError(f"layer index {i} is out of range for a stack of {n_layers} layers")
            return {i % n_layers for i in self.indices}
        if self.last_fraction is not None:
            return set(range(n_layers - max(1, round(self.last_fraction * n_layers)), n_layers))
        start, stop = self.range or ((0, self.first) if self.first else (n_layers - self.last, n_layers))
        if start < 0 or stop > n_layers:
            raise ValueError(f"{self.describe()} but the stack has only {n_layers} layers")
        return set(range(start, stop))
