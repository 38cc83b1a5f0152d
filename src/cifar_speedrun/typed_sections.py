"""How a typed config section is declared, and how its refusals read: pydantic v2, one line per mistake.

Hydra composes whatever it is given: `+optim.lrr=0.1` adds a key nothing reads, `data.cutout_size=64`
blanks every pixel, `optim.lr=nan` fails only at step 1. A run that silently trains something other
than what was asked is the worst outcome, so every section of the config is a pydantic model
(`Section`): unknown keys are refused (`extra="forbid"`), types are strict (`true` is not a number,
`"3"` is not an integer), numbers are finite (`allow_inf_nan=False`) and in the range their `Field`
states. A key's type, range and hint are written once, on its field; its default is written once, in
its yaml (sections have no defaults, so a yaml that drops a key fails loudly instead of running
on a second, hidden default).

Why pydantic rather than Hydra structured configs: the checks here are ranges, literals, unions keyed
by a value (`optim.builder`, the model's `_target_`) and cross-key rules, which pydantic states
declaratively and OmegaConf's dataclass typing does not (no ranges, no discriminated unions, no
validators); and it keeps conf/*.yaml the only place defaults live, as Hydra users expect.

`check(section_class, data, prefix)` validates and turns pydantic's error list into one UserError
naming the key, the value, what it must be and the fix (`data.cutout_size=64 must be an integer in
[1, 32]; Page: 8 (5 from the whitening row on)`), and for an unknown key the nearest known one.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from cifar_speedrun.errors import UserError

# Seeds go to torch.manual_seed and numpy: both take unsigned 32-bit (numpy) / 64-bit values.
MAX_SEED = 2**32 - 1


class Section(BaseModel):
    """A group of settings: known keys only, strict types, finite numbers, no defaults (the yaml has them)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True,
                              frozen=True, arbitrary_types_allowed=False)


S = TypeVar("S", bound=BaseModel)


def check(section: type[S], data: Any, prefix: str = "") -> S:
    """`data` as a `section`, or one UserError naming the first bad key under `prefix`."""
    try:
        return section.model_validate(data)
    except ValidationError as error:
        raise user_error(error, section, data, prefix) from None


# ------------------------------------------------------------------------------------------------
# pydantic's error -> one line
# ------------------------------------------------------------------------------------------------


def user_error(error: ValidationError, section: type[BaseModel], data: Any, prefix: str = "") -> UserError:
    """The first of pydantic's errors as the line a user needs: the key, the value, what it must be, the fix."""
    first = error.errors(include_url=False)[0]
    kind, loc = first["type"], tuple(first["loc"])
    key, field, owner, value = _walk(section, data, loc, prefix)
    if kind == "extra_forbidden":
        known = owner.model_fields if owner is not None else {}
        names = {(info.alias or name): info for name, info in known.items()}
        return unknown_key(key, key.rsplit(".", 1)[-1], names)
    if kind == "missing":
        return UserError(f"{key} is missing: the config must set it (conf/ has every key; was it deleted with ~?)")
    if kind == "literal_error":
        options = list(dict.fromkeys(str(o) for o in _literal_options(field)))  # 32 and "32" once
        hint = f" ({field.description})" if field is not None and field.description else ""
        return UserError(f"{key}={value!r} is not known; use {', '.join(options)}{hint}")
    if kind == "value_error" or kind == "assertion_error":
        message = first["msg"].removeprefix("Value error, ")
        return UserError(message if message.startswith(key + ".") or message.startswith(key + "=")
                         else f"{key}: {message}")
    if kind == "too_short":
        return UserError(f"{key}={value!r} must be a list of at least {first.get('ctx', {}).get('min_length')} items")
    if kind == "too_long":
        return UserError(f"{key}={value!r} must be a list of at most {first.get('ctx', {}).get('max_length')} items"
                         + (f"; {field.description}" if field is not None and field.description else ""))
    if kind in ("string_too_short", "string_too_long"):
        ctx = first.get("ctx", {})
        what = ("non-empty text" if kind == "string_too_short" and ctx.get("min_length") == 1 else
                f"text of at least {ctx.get('min_length')} characters" if kind == "string_too_short" else
                f"text of at most {ctx.get('max_length')} characters")
        hint = field.description if field is not None and field.description else ""
        return UserError(f"{key}={value!r} must be {what}" + (f"; {hint}" if hint else ""))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return UserError(f"{key}={value!r} must be a group of settings (key: value)")
    what = describe(field)
    if kind == "finite_number" and what.startswith("a "):
        what = "a finite " + what.split(" ", 1)[1]
    hint = field.description if field is not None and field.description else ""
    return UserError(f"{key}={value!r} must be {what}" + (f"; {hint}" if hint else ""))


def _walk(section: type[BaseModel], data: Any, loc: tuple[Any, ...], prefix: str
          ) -> tuple[str, FieldInfo | None, type[BaseModel] | None, Any]:
    """Follow pydantic's `loc` through the section classes: the dotted key, its field, its section, its value.

    Sections chosen by a value (the model by `_target_`, the optimizer by `builder`) are checked on their
    own (settings._chosen_settings), so `loc` holds only keys and list indices.
    """
    key = prefix
    owner: type[BaseModel] | None = section
    field: FieldInfo | None = None
    annotation: Any = section
    value: Any = data
    for part in loc:
        if isinstance(part, int):
            key = f"{key}[{part}]"
            value = value[part] if isinstance(value, (list, tuple)) and part < len(value) else None
            annotation = _item(annotation)
            field = _item_field(annotation, field)
            continue
        classes = _models(annotation)
        model = classes[0] if classes else None
        owner = model
        name = str(part)
        key = f"{key}.{name}" if key else name
        value = value.get(name) if isinstance(value, Mapping) else None
        field = _field(model, name) if model is not None else None
        annotation = field.annotation if field is not None else None
        if field is not None and field.metadata:
            annotation = Annotated[(annotation, *field.metadata)] if annotation is not None else None
    return key, field, owner, value


def _field(model: type[BaseModel], name: str) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [_strip(member) for member in typing.get_args(annotation)]
    return [annotation]


def _annotated_members(annotation: Any) -> list[list[Any]]:
    """The constraints inside each `Annotated[...]` member of a union (FieldInfo metadata flattened)."""
    out = []
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else []
    for member in members:
        if typing.get_origin(member) is Annotated:
            flat: list[Any] = []
            for item in typing.get_args(member)[1:]:
                flat += list(item.metadata) if isinstance(item, FieldInfo) else [item]
            out.append(flat)
    return out


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _union_members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _item(annotation: Any) -> Any:
    for member in _union_members(annotation):
        if typing.get_origin(member) in (list, tuple):
            return typing.get_args(member)[0]
    return None


def _item_field(annotation: Any, parent: FieldInfo | None) -> FieldInfo | None:
    if annotation is None:
        return None
    metadata = list(typing.get_args(annotation)[1:]) if typing.get_origin(annotation) is Annotated else []
    flat: list[Any] = []
    for item in metadata:
        flat += list(item.metadata) if isinstance(item, FieldInfo) else [item]
    info = FieldInfo(annotation=_strip(annotation))
    info.metadata = flat
    return info


def _literal_options(field: FieldInfo | None) -> list[Any]:
    if field is None:
        return []
    options: list[Any] = []
    for member in _union_members(field.annotation):
        if typing.get_origin(member) is Literal:
            options += list(typing.get_args(member))
        elif member is type(None):
            options.append(None)
    return options


def describe(field: FieldInfo | None) -> str:
    """What a field accepts, in words: 'an integer in [1, 32]', 'a number >= 0', 'true or false'."""
    if field is None:
        return "a valid value"
    members = _union_members(field.annotation)
    nullable = type(None) in members
    members = [m for m in members if m is not type(None)]
    suffix = " (or null)" if nullable else ""
    kinds = {typing.get_origin(m) or m for m in members}
    if kinds <= {bool}:
        return "true or false" + suffix
    if kinds <= {str}:
        return "a string" + suffix
    if kinds & {list, tuple}:
        return "a list, e.g. '[a,b]' (quoted on the command line)"
    integer = kinds <= {int}
    low = high = None
    low_open = high_open = False
    constraints = list(field.metadata)
    for member in _annotated_members(field.annotation):  # `Annotated[int, Field(ge=1)] | None`
        constraints += member
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Ge):
            low = constraint.ge
        elif isinstance(constraint, annotated_types.Gt):
            low, low_open = constraint.gt, True
        elif isinstance(constraint, annotated_types.Le):
            high = constraint.le
        elif isinstance(constraint, annotated_types.Lt):
            high, high_open = constraint.lt, True
    if not kinds <= {int, float}:
        return "a valid value" + suffix
    if integer and low == 1 and not low_open and high is None:
        return "a positive integer" + suffix
    noun = "an integer" if integer else "a number"

    def shown(bound: float) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        text = f"{noun} in {left}{shown(low)}, {shown(high)}{right}"
    elif low is not None:
        text = f"{noun} {'>' if low_open else '>='} {shown(low)}"
    elif high is not None:
        text = f"{noun} {'<' if high_open else '<='} {shown(high)}"
    else:
        text = noun
    return text + suffix


def unknown_key(key: str, name: str, known: Mapping[str, Any], reason: str = "") -> UserError:
    """A key nothing reads: the nearest known key of its section, what the section has, where it came from."""
    section = key.rsplit(".", 1)[0] if "." in key else "the config"
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    guess = f"did you mean {section}.{close[0]}? " if close and section != "the config" else (
        f"did you mean {close[0]}? " if close else "")
    listed = ", ".join(sorted(k for k in known if not (k.startswith("_") and k.endswith("_"))))
    return UserError(f"unknown key {key}{f' ({reason})' if reason else ''}: {guess}nothing reads it ({section} has: "
                     f"{listed}). It came from a `+key=value` override (Hydra adds keys without checking them: "
                     "drop the `+` to override an existing key) or from a trick meant for another model or optimizer")


def plain(node: Any, prefix: str = "") -> Any:
    """A config node as plain dicts and lists, for validation.

    A value that cannot be resolved yet (`${hydra:runtime.output_dir}/checkpoints` before the job
    starts) stays as its text: it is a string, and its real value is checked where it is used. Any
    other interpolation that does not resolve (a missing key, an unset variable) is one UserError.
    """
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, (DictConfig, ListConfig)):
        out: dict[Any, Any] = {}
        for key in list(node.keys()) if isinstance(node, DictConfig) else range(len(node)):
            where = f"{prefix}.{key}" if prefix and isinstance(node, DictConfig) else (
                f"{prefix}[{key}]" if prefix else str(key))
            try:
                out[key] = plain(node[key], where)
            except (OmegaConfBaseException, ValueError, TypeError, ArithmeticError) as error:
                text = str(node._get_node(key)._value())  # type: ignore[union-attr]
                if "hydra" not in f"{text} {error}".lower():  # only the running job resolves ${hydra:...}
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    raise UserError(f"{where}={text} cannot be resolved ({reason}): fix the key it refers to") \
                        from None
                out[key] = text
        return out if isinstance(node, DictConfig) else [out[i] for i in range(len(out))]
    if isinstance(node, Mapping):
        return {key: plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(item) for item in node]
    return node
