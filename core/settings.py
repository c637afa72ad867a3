"""Building blocks of the typed settings: every config section is a pydantic v2 dataclass declared with them.

A section is ``@section`` (a ``pydantic.dataclasses.dataclass`` with :data:`SECTION`: unknown keys, NaN and ±inf
refused, assignments validated) whose fields carry their type, choices (``Literal``) and range
(``Field(ge=…, le=…, description=…)``) on the field. Scalars are strict (:data:`Int`, :data:`Float`,
:data:`Bool`, :data:`Text`): YAML's ``"8"`` is not an int, ``1`` is not ``true``, ``1.5`` is not an int; an int is
accepted where a float is declared; :data:`Prose` is free text (a prompt) that may hold newlines. Checks that span fields raise :func:`invalid` from a ``model_validator``,
naming the field they are about.

Pydantic dataclasses (not ``BaseModel``) keep the dataclass protocol the rest of the code and transformers use
(``dataclasses.fields``/``asdict``/``replace``, ``HfArgumentParser``); ``replace`` validates again.

:func:`located_errors` turns a ``ValidationError`` into ``(dotted field, message)`` pairs in the project's
wording (``'8bit' is not one of ['none', '4bit']``, ``must be ≥ 1 (got 0)``, ``unknown key (did you mean …)``);
``core.config`` adds the file and YAML line, :func:`settings_error` makes a ``ValueError`` of the first one for
code that builds settings directly (``trainers.causal.CausalConfig``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Iterator

from pydantic import AfterValidator, ConfigDict, Strict, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

SECTION = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


def section(cls):
    """Class decorator: ``cls`` as a pydantic dataclass with :data:`SECTION`."""
    return dataclass(config=SECTION)(cls)


def _plain_text(value: str) -> str:
    if not value.strip():  # a blank path would resolve to the working folder
        raise PydanticCustomError("blank_string", "is empty; give a value or leave the key out for the default")
    if any(ord(ch) < 32 and ch != "\t" for ch in value):  # the OS refuses such paths with a traceback
        raise PydanticCustomError("control_character", "contains a control character ({value})", {"value": repr(value)})
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict still takes an int (and stores it as a float)
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict(), AfterValidator(_plain_text)]  # not blank, no control character


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_string", "is empty; give a value or leave the key out for the default")
    return value


Prose = Annotated[str, Strict(), AfterValidator(_not_blank)]  # free text (a prompt): not blank, may hold newlines


def invalid(field: str, message: str) -> PydanticCustomError:
    """The error a cross-field check raises: ``field`` (dotted, relative to the section checked) and ``message``."""
    return PydanticCustomError("cross_field", "{message}", {"field": field, "message": message})


def section_class(annotation) -> type | None:
    """The section dataclass inside a field annotation (``GenerationSection``, ``list[DataSource]``,
    ``X | None``), or None for a plain value."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = section_class(arg)
            if found is not None:
                return found
    return None


def plain_type(annotation):
    """``annotation`` without its ``Annotated`` metadata (``Float | None`` → ``float | None``), as
    ``HfArgumentParser`` reads a field type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return plain_type(args[0])
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(plain_type(a) for a in args)]
    return annotation


def field_infos(cls) -> dict:
    """``{name: pydantic FieldInfo}`` of a section (default, description, constraints)."""
    return cls.__pydantic_fields__


_WANT = {"int_type": "int", "int_from_float": "int", "int_parsing": "int", "float_type": "float",
         "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
         "list_type": "list", "dict_type": "mapping", "dataclass_type": "mapping", "dataclass_exact_type": "mapping"}
_BOUNDS = {"greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"), "less_than_equal": ("le", "≤"),
           "less_than": ("lt", "<")}


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(owner: type | None, key) -> str | None:
    """``[0.01, 1]``, ``[0, 1)``, ``(0, 1]``: the range of field ``key`` of ``owner`` when it has two bounds."""
    info = field_infos(owner).get(key) if owner is not None and hasattr(owner, "__pydantic_fields__") else None
    if info is None:
        return None
    b = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if low is None or high is None:
        return None
    return f"{low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"


def _described(owner: type | None, key) -> str:
    info = field_infos(owner).get(key) if owner is not None and hasattr(owner, "__pydantic_fields__") else None
    return f" — {info.description}" if info is not None and info.description else ""


def _message(err: dict, owner: type | None, key) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "unexpected_keyword_argument":
        hidden = getattr(owner, "__internal__", ())
        known = sorted(f.name for f in dataclasses.fields(owner) if f.name not in hidden) if owner is not None else []
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6) or [k for k in known
                                                                                 if k.startswith(str(key)[:3])]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; known keys: {known}"
    if kind == "cross_field":
        return ctx["message"]
    if kind == "literal_error":
        choices = "[" + ctx["expected"].replace(" or ", ", ") + "]"
        return f"{value!r} is not one of {choices}"
    if kind in _WANT:
        return f"expected {_WANT[kind]}, got {type(value).__name__} ({value!r})"
    if kind in _BOUNDS:  # the range, the value, and what the setting is (its description says why the bound)
        span = _interval(owner, key)
        name, sign = _BOUNDS[kind]
        bound = f"in {span}" if span else f"{sign} {_number(ctx[name])}"
        return f"must be {bound} (got {value!r}){_described(owner, key)}"
    if kind == "finite_number":
        return f"{value} is not a finite number"
    if kind == "too_short":
        return f"must hold at least {ctx['min_length']} item(s) (got {value!r})"
    if kind == "missing":
        return "missing (required)"
    if kind in ("blank_string", "control_character"):
        return err["msg"]
    return f"{err['msg']} (got {value!r})"


def located_errors(e: ValidationError, root: type) -> Iterator[tuple[str, str]]:
    """``(dotted field, message)`` for each error of ``e`` raised while building section ``root``.

    The dotted field follows the config's keys and list indices (``sft.data.0.path``); pydantic's type tags in a
    location (``function-after[…]``) are dropped; a cross-field error adds the field it names."""
    for err in e.errors():
        parts, owner, holder, key = [], root, root, None  # holder: the section that holds key, the last name
        loc = list(err["loc"])
        for i, part in enumerate(loc):
            if isinstance(part, int):
                parts.append(str(part))
                key = part
                continue
            fields = field_infos(owner) if owner is not None and hasattr(owner, "__pydantic_fields__") else {}
            if part in fields:
                parts.append(part)
                holder, key, owner = owner, part, section_class(fields[part].annotation)
            elif i == len(loc) - 1:
                parts.append(str(part))  # an unknown key: its own name
                holder, key = owner, part
        if err["type"] == "cross_field":
            parts += str((err.get("ctx") or {})["field"]).split(".")
        yield ".".join(parts), _message(err, holder, key)


def settings_error(e: ValidationError, root: type, prefix: str = "") -> ValueError:
    """``ValueError("<prefix><field>: <message>")`` of the first error of ``e`` (building ``root``)."""
    dotted, message = next(located_errors(e, root))
    return ValueError(f"{prefix}{dotted}: {message}")


def check(cls, values: dict[str, Any], prefix: str = ""):
    """``cls(**values)``, a validation error raised as :func:`settings_error` (a ``ValueError`` naming the
    field, with ``prefix`` before it)."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise settings_error(e, cls, prefix) from None
