"""pydantic models that become pydantic classes on first use, and a quick path that checks
the simple inputs a launch gives them without pydantic (issue 16).

Why: a launch (`corral run --kernel ...`) validates one config and builds devices whose states
start at their defaults; it never saves, loads or serves state. Yet defining the config, device,
vCPU and snapshot models as pydantic classes at import cost ~40% of a launch's imports: pydantic,
pydantic-core and what they import, then building each class. Options weighed: keeping the
classes and moving them into modules imported lazily would leave MachineConfig (which every
launch validates) pydantic; rewriting the config as plain classes with hand-written checks
would fork the schema that the CLI, the API servers, snapshots and docs/openapi.json share.
So the models stay pydantic models, declared as before, and this module only changes *when*
pydantic sees them:

- A model declared on `BaseModel` from here is a plain class until something uses it as a
  model: a class attribute (`model_validate`, `model_fields`, `model_json_schema`...), an
  isinstance() check against a built one, or pydantic meeting it in another model's field. Then
  its pydantic class is built, once, from the same declaration (fields, `Field(...)` arguments,
  `model_config`, validators, methods, docstring), on the built classes of its lazy bases. Its
  validation, errors and JSON schema are pydantic's own (docs/openapi.json does not change).
- A model marked `@quick_init` checks `cls(**fields)` itself where every given value is of a
  plain kind (int, bool, str, Path, X | None, lists and tuples of those, another quick model)
  and passes its Field bounds and field validators, the same functions pydantic runs; the rest
  take their defaults. The result is a quick instance: an instance of the lazy class, fields in
  its __dict__. Anything else (another type, a failed check, an unknown field) goes to
  pydantic, which accepts it or reports it in its own words: the quick path never accepts what
  pydantic refuses, nor makes other values, which tests/unit/test_lazymodel.py holds by driving
  both with the same generated inputs. Whatever needs pydantic on a quick instance
  (`model_dump`, `model_copy`, hashing, a pydantic field of its type) converts it first.

For mypy nothing changes: under TYPE_CHECKING `BaseModel`, `Field`, `ConfigDict` and
`field_validator` are pydantic's, so the pydantic mypy plugin checks these models as before.

What a declaration may hold: string annotations (modules use `from __future__ import
annotations`, so nothing pydantic is evaluated at import), resolved in the model's module when
it is built, with `Field` meaning pydantic's; `Field(...)` as a default or inside `Annotated`
(also in module-level aliases such as `U8 = Annotated[int, Field(ge=0, le=0xFF)]`); metadata
that needs pydantic itself as `lazy_metadata(factory)`; `@field_validator` above `@classmethod`;
zero-argument `super()` in methods (its class cell is rebound to the built class). An `except`
clause names pydantic's error through `validation_error()`.
"""

from __future__ import annotations

import copy
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
else:
    ConfigDict = dict  # pydantic's ConfigDict is a TypedDict: a dict at run time

_LOCK = threading.RLock()  # one build per class, whichever thread uses it first


class FieldSpec:
    """`Field(...)` before pydantic: its arguments, replayed into pydantic's Field on build."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs

    def build(self) -> Any:
        from pydantic import Field as real_field

        return real_field(*self.args, **self.kwargs)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        """Inside `Annotated` (a constraint alias, a nested type): pydantic's Field there."""
        return handler.generate_schema(Annotated[source, self.build()])


class LazyMetadata:
    """`Annotated` metadata that needs pydantic to exist (PlainValidator...), made on first use."""

    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], tuple[Any, ...]]) -> None:
        self.factory = factory

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return handler.generate_schema(Annotated[(source, *self.factory())])


def lazy_metadata(factory: Callable[[], tuple[Any, ...]]) -> Any:
    """Metadata for `Annotated[T, lazy_metadata(lambda: (PlainValidator(f), ...))]`."""
    return LazyMetadata(factory)


class _Validator:
    """`@field_validator(...)` before pydantic: the wrapped method and the decorator's arguments."""

    __slots__ = ("fields", "func", "kwargs")

    def __init__(self, func: Any, fields: tuple[str, ...], kwargs: dict[str, Any]) -> None:
        self.func, self.fields, self.kwargs = func, fields, kwargs


_DEFINED: list[type] = []  # every lazy class, for build_all()


class _LazyMeta(type):
    """The metaclass of the lazy classes: class-level use goes to the built pydantic class."""

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> None:
        super().__init__(name, bases, namespace)
        _DEFINED.append(cls)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not args and _quick_marked(cls):
            made = quick(cls, kwargs)
            if made is not None:
                return made
        return real(cls)(*args, **kwargs)

    def __getattribute__(cls, name: str) -> Any:
        if name.startswith(("__", "_lazy_")) and not name.startswith("__pydantic"):
            return type.__getattribute__(cls, name)
        if _own_method(cls, name):
            return type.__getattribute__(cls, name)
        return getattr(real(cls), name)

    def __instancecheck__(cls, obj: object) -> bool:
        if type.__instancecheck__(cls, obj):  # a quick instance
            return True
        built = _built(cls)
        return built is not None and isinstance(obj, built)

    def __subclasscheck__(cls, sub: type) -> bool:
        if type.__subclasscheck__(cls, sub):
            return True
        built = _built(cls)
        return built is not None and issubclass(sub, built)

    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Another model's field of this type: the built class's schema, which also takes a
        quick instance (converted to a pydantic one first)."""
        from pydantic_core import core_schema

        inner = handler.generate_schema(real(cls))
        out = core_schema.wrap_serializer_function_ser_schema(
            lambda v, out: out(_as_pydantic(v)), schema=inner
        )
        return core_schema.no_info_before_validator_function(_as_pydantic, inner, serialization=out)

    def __repr__(cls) -> str:
        return f"<lazy model {type.__getattribute__(cls, '__module__')}.{cls.__qualname__}>"


if not TYPE_CHECKING:

    class BaseModel(metaclass=_LazyMeta):
        """The root of the lazy models: built, it is pydantic's BaseModel. Its methods serve
        quick instances (see `quick_init`); a pydantic instance never sees them."""

        def __getattr__(self, name: str) -> Any:
            if name.startswith(("__", "_lazy_")) and not name.startswith("__pydantic"):
                raise AttributeError(name)
            return getattr(_as_pydantic(self), name)  # model_dump, model_copy...

        def __setattr__(self, name: str, value: Any) -> None:
            own = object.__getattribute__(self, "__dict__")
            if (
                name not in own
                or name.startswith("_lazy_")
                or _own(type(self)).get("model_config", {}).get("frozen")
            ):
                setattr(_as_pydantic(self), name, value)  # pydantic's refusal, in its words
                return
            own[name] = value  # as pydantic without validate_assignment: unchecked
            own["_lazy_set"] = own["_lazy_set"] | {name}
            own.pop("_lazy_twin", None)

        def __delattr__(self, name: str) -> None:
            delattr(_as_pydantic(self), name)

        def __eq__(self, other: object) -> bool:
            if real(type(self)) is not real(type(other)):
                return NotImplemented
            return _values(self) == _values(other)

        def __hash__(self) -> int:
            return hash(_as_pydantic(self))

        def __iter__(self) -> Iterator[tuple[str, Any]]:
            yield from _values(self).items()

        def __repr__(self) -> str:
            fields = ", ".join(f"{k}={v!r}" for k, v in _values(self).items())
            return f"{type(self).__name__}({fields})"

    def Field(*args: Any, **kwargs: Any) -> Any:
        return FieldSpec(args, kwargs)

    def field_validator(*fields: str, **kwargs: Any) -> Callable[[Any], Any]:
        return lambda func: _Validator(func, fields, kwargs)


def validation_error() -> type[ValidationError]:
    """pydantic's ValidationError, imported when an `except` clause first needs it (an except
    clause's class is looked up only when an exception reaches it)."""
    from pydantic import ValidationError

    return ValidationError


def _own_method(cls: type, name: str) -> bool:
    """Whether `name` is a method the declaration itself holds that can run on the lazy class
    (no zero-argument super()): `MachineConfig.build(...)` needs no pydantic class."""
    for klass in type.__getattribute__(cls, "__mro__"):
        value = _own(klass).get(name)
        if value is not None:
            func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            return isinstance(func, types.FunctionType) and "__class__" not in func.__code__.co_freevars
        if klass is BaseModel:
            break
    return False


def _own(cls: type) -> dict[str, Any]:
    return type.__getattribute__(cls, "__dict__")


def _built(cls: type) -> type | None:
    """The built class of `cls` itself (never a base's: each lazy class is built on its own)."""
    return _own(cls).get("_lazy_real")


def real(cls: Any) -> Any:
    """The pydantic class of lazy model `cls` (built on first call); anything else as it is."""
    if not isinstance(cls, _LazyMeta):
        return cls
    built = _built(cls)
    if built is None:
        with _LOCK:
            built = _built(cls)
            if built is None:
                built = _build(cls)
                type.__setattr__(cls, "_lazy_real", built)
    return built


def build_all() -> int:
    """Build the pydantic class of every lazy model defined so far (importing pydantic): for a
    process whose children fork from it (corral.forkserver), so that they share the classes
    instead of each building its own. Returns how many lazy models there are."""
    for cls in list(_DEFINED):
        real(cls)
    return len(_DEFINED)


class _Names(Mapping[str, Any]):
    """The names an annotation is evaluated with: the model's module, with `Field` pydantic's.
    A lazy model stays itself: its schema hook takes quick instances too."""

    def __init__(self, module: dict[str, Any], field: Any) -> None:
        self.module, self.field = module, field

    def __getitem__(self, name: str) -> Any:
        value = self.module[name]
        return self.field if value is Field else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.module)

    def __len__(self) -> int:
        return len(self.module)


def _rebind(func: Any, old: type, cell: types.CellType) -> Any:
    """`func` with its zero-argument-super class cell `cell` (the built class) instead of `old`."""
    if isinstance(func, (classmethod, staticmethod)):
        return type(func)(_rebind(func.__func__, old, cell))
    if not isinstance(func, types.FunctionType) or "__class__" not in func.__code__.co_freevars:
        return func
    cells = tuple(
        cell if name == "__class__" and c.cell_contents is old else c
        for name, c in zip(func.__code__.co_freevars, func.__closure__ or (), strict=True)
    )
    out = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, cells)
    out.__kwdefaults__, out.__qualname__, out.__doc__ = func.__kwdefaults__, func.__qualname__, func.__doc__
    out.__dict__.update(func.__dict__)
    return out


_SKIP = {"__dict__", "__weakref__", "__annotations__", "_lazy_real", "_lazy_quick", "_lazy_plan"}


def _build(cls: _LazyMeta) -> type:
    import pydantic

    if cls is BaseModel:
        return pydantic.BaseModel
    bases = tuple(real(b) for b in cls.__bases__)
    module = sys.modules[cls.__module__].__dict__
    names = _Names(module, pydantic.Field)
    own = _own(cls)
    annotations = {
        name: eval(ann, module, names) if isinstance(ann, str) else ann
        for name, ann in own.get("__annotations__", {}).items()
    }
    cell = types.CellType()  # the built class, for methods' zero-argument super()
    body: dict[str, Any] = {"__annotations__": annotations}
    for name, value in own.items():
        if name in _SKIP:
            continue
        if isinstance(value, FieldSpec):
            value = value.build()
        elif isinstance(value, _Validator):
            value = pydantic.field_validator(*value.fields, **value.kwargs)(_rebind(value.func, cls, cell))
        else:
            value = _rebind(value, cls, cell)
        body[name] = value
    built = types.new_class(cls.__name__, bases, {}, lambda ns: ns.update(body))
    built.__qualname__ = cls.__qualname__
    cell.cell_contents = built
    return built


# Quick instances (the module docstring says why and what they promise).

_T = TypeVar("_T")


def quick_init(cls: _T) -> _T:
    """Class decorator (inherited): `cls(**fields)` makes a quick instance where the quick path
    decides the input: fields of int, bool, str, Path, X | None, tuple[X, ...] or another quick
    model given, with Field bounds and before/after field validators, the rest left at their
    defaults (which pydantic does not validate either)."""
    type.__setattr__(cls, "_lazy_quick", True)
    return cls


_UNPLANNED = object()


def prepare_quick(cls: Any) -> None:
    """Make the quick path's plan for `cls` now, where it has one (made on its first instance
    otherwise: ~0.1 ms a model, which a migration's first save would pay in the downtime)."""
    if isinstance(cls, _LazyMeta) and _quick_marked(cls):
        _quick_plan(cls)


def _quick_plan(cls: Any) -> Any:
    plan = _own(cls).get("_lazy_plan", _UNPLANNED)
    if plan is _UNPLANNED:
        with _LOCK:
            plan = _own(cls).get("_lazy_plan", _UNPLANNED)
            if plan is _UNPLANNED:
                plan = _plan(cls)
                type.__setattr__(cls, "_lazy_plan", plan)
    return plan


def quick(cls: Any, fields: dict[str, Any]) -> Any:
    """A quick instance of `cls` from `fields`, or None where pydantic must decide."""
    plan = _quick_plan(cls)
    if plan is None or not fields.keys() <= plan.keys():
        return None
    values: dict[str, Any] = {}
    try:
        for name, (default, before, check, after) in plan.items():
            if name in fields:
                value = fields[name]
                for f in before:
                    value = f(cls, value)
                value = check(value)
                for f in after:
                    value = f(cls, value)
            elif default is _REQUIRED:
                return None
            elif isinstance(default, _Factory):
                value = default.make()
            else:
                value = default if type(default) in _IMMUTABLE else copy.deepcopy(default)
            values[name] = value
    except Exception:  # noqa: BLE001 (whatever it was, pydantic says it in its words)
        return None
    obj = object.__new__(cls)
    own = object.__getattribute__(obj, "__dict__")
    own.update(values)
    own["_lazy_set"] = frozenset(fields)
    return obj


# defaults pydantic hands over as they are (it deep-copies the others for each instance)
_IMMUTABLE = {type(None), int, float, bool, str, bytes}


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def _values(obj: Any) -> dict[str, Any]:
    own = object.__getattribute__(obj, "__dict__")
    return {k: v for k, v in own.items() if not k.startswith("_lazy_")}


def _as_pydantic(obj: Any) -> Any:
    """A quick instance as an instance of its pydantic class (once); anything else as it is."""
    if not isinstance(type(obj), _LazyMeta):
        if type(obj) in (tuple, list):
            return type(obj)(_as_pydantic(v) for v in obj)
        return obj
    own = object.__getattribute__(obj, "__dict__")
    made = own.get("_lazy_twin")
    if made is None:
        values = {k: _as_pydantic(v) for k, v in _values(obj).items()}
        made = real(type(obj)).model_construct(set(own["_lazy_set"]), **values)
        own["_lazy_twin"] = made
    return made


def _plan(cls: Any) -> dict[str, tuple[Any, tuple[Any, ...], Check, tuple[Any, ...]]] | None:
    """Per field: default, before validators, the type check, after validators; None where the
    model holds anything the quick path cannot decide."""
    mro = type.__getattribute__(cls, "__mro__")
    chain = mro[: mro.index(BaseModel)]
    if any(not isinstance(k, _LazyMeta) for k in chain) or mro[mro.index(BaseModel) :] != (BaseModel, object):
        return None
    config: dict[str, Any] = {}
    for klass in reversed(chain):
        config.update(_own(klass).get("model_config", {}))
        if any(k in _own(klass) for k in ("__init__", "model_post_init")):
            return None
    if set(config) - {"extra", "frozen", "defer_build"} or config.get("extra", "ignore") not in (
        "forbid",
        "ignore",
    ):
        return None  # (an unknown field is declined whatever `extra` says)
    validators: dict[str, tuple[list[Any], list[Any]]] = {}
    fields: dict[str, tuple[Any, Any, dict[str, Any]]] = {}  # name -> (type, default, bounds)
    for klass in reversed(chain):
        own = _own(klass)
        module = sys.modules[klass.__module__].__dict__
        for value in own.values():
            if isinstance(value, _Validator):
                mode = value.kwargs.get("mode", "after")
                func = value.func.__func__ if isinstance(value.func, classmethod) else None
                if set(value.kwargs) - {"mode"} or mode not in ("before", "after") or func is None:
                    return None
                if func.__code__.co_argcount != 2:  # (cls, value): no ValidationInfo
                    return None
                for name in value.fields:
                    validators.setdefault(name, ([], []))[mode == "after"].append(func)
        for name, ann in own.get("__annotations__", {}).items():
            if name.startswith("_") or "ClassVar" in str(ann):
                return None
            spec = next((_own(k)[name] for k in chain if name in _own(k)), _REQUIRED)
            if spec is not _REQUIRED and not isinstance(spec, FieldSpec):
                spec = FieldSpec((spec,), {})
            args: dict[str, Any] = {}
            if isinstance(spec, FieldSpec):
                if len(spec.args) > 1 or set(spec.kwargs) - _FIELD_ARGS:
                    return None
                args = dict(spec.kwargs)
                if spec.args:
                    args["default"] = spec.args[0]
            args.pop("description", None)
            if "default_factory" in args:
                default: Any = _Factory(args.pop("default_factory"))
            else:
                default = args.pop("default", _REQUIRED)
            try:
                tp = eval(ann, module) if isinstance(ann, str) else ann
            except Exception:  # noqa: BLE001
                return None
            fields[name] = (tp, default, args)
    plan = {}
    for name, (tp, default, bounds) in fields.items():
        before, after = validators.pop(name, ([], []))
        if len(before) > 1 or len(after) > 1:  # several: their order is pydantic's business
            return None
        try:
            check = _check(tp, bounds)
        except _Decline:
            check = _decline  # given, pydantic checks it; left out, its default serves
        plan[name] = (default, tuple(before), check, tuple(after))
    return None if validators else plan


_REQUIRED = object()
_FIELD_ARGS = {
    "default",
    "default_factory",
    "description",
    "ge",
    "gt",
    "le",
    "lt",
    "max_length",
    "min_length",
}


class _Decline(Exception):
    """The quick path does not decide this input: pydantic does."""


Check = Callable[[Any], Any]


def _check(tp: Any, bounds: dict[str, Any]) -> Check:
    """A check for values of type `tp` (with Field bounds) that raises where pydantic must look."""
    import types as _t
    from pathlib import Path, PosixPath
    from typing import Union, get_args, get_origin

    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, _t.UnionType) and len(args) == 2 and type(None) in args:
        inner = _check(next(a for a in args if a is not type(None)), bounds)
        return lambda v: None if v is None else inner(v)
    if origin is Annotated:  # Annotated[int, Field(ge=0, le=0xFF)]: those bounds too
        specs = tp.__metadata__
        if not all(isinstance(m, FieldSpec) and not m.args for m in specs):
            raise _Decline
        return _check(tp.__origin__, {**bounds, **{k: v for m in specs for k, v in m.kwargs.items()}})
    if origin is list and len(args) == 1:
        item = _check(args[0], {})
        return _bounded(lambda v: [item(x) for x in _exact(v, (list, tuple))], bounds, len)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _check(args[0], {})
        return _bounded(lambda v: tuple(item(x) for x in _exact(v, (tuple, list))), bounds, len)
    if bounds.keys() - {"ge", "gt", "le", "lt", "max_length", "min_length"}:
        raise _Decline
    if tp is int:
        return _bounded(lambda v: _exact(v, (int,)), bounds, None)
    if tp is str:
        return _bounded(lambda v: _exact(v, (str,)), bounds, len)
    if tp is bool and not bounds:
        return lambda v: _exact(v, (bool,))
    if tp is Path and not bounds:
        return lambda v: v if type(v) is PosixPath else Path(_exact(v, (str,)))
    if isinstance(tp, _LazyMeta) and not bounds and _quick_marked(tp):
        return lambda v: v if type(v) is tp else _decline()
    raise _Decline


def _quick_marked(cls: Any) -> bool:
    try:
        return bool(type.__getattribute__(cls, "_lazy_quick"))
    except AttributeError:
        return False


def _exact(v: Any, kinds: tuple[type, ...]) -> Any:
    if type(v) not in kinds:
        raise _Decline
    return v


def _decline(_: Any = None) -> Any:
    raise _Decline


def _bounded(check: Check, bounds: dict[str, Any], size: Callable[[Any], int] | None) -> Check:
    if not bounds:
        return check
    lo, lo_open = (bounds["gt"], True) if "gt" in bounds else (bounds.get("ge"), False)
    hi, hi_open = (bounds["lt"], True) if "lt" in bounds else (bounds.get("le"), False)
    if (lo is not None or hi is not None) and size is not None:
        raise _Decline  # numeric bounds on a sized value: not this path's
    if ("max_length" in bounds or "min_length" in bounds) and size is None:
        raise _Decline
    most, least = bounds.get("max_length"), bounds.get("min_length")

    def bounded(v: Any) -> Any:
        v = check(v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _Decline
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise _Decline
        if size is not None and (
            (most is not None and size(v) > most) or (least is not None and size(v) < least)
        ):
            raise _Decline
        return v

    return bounded
