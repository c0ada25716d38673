"""Typed payloads made fast: `quick_init` for the frozen dataclasses `ctx.send` builds.

Owns `quick_init`, one documented speed trick. Every `ctx.send.<kind>(...)`
call builds one payload, a frozen dataclass with slots (`HttpRequest`,
`SqlRow`, ...). The `__init__` that `dataclasses` writes for a frozen class
sets each field through `object.__setattr__` (to get past the class's own
`__setattr__`, which refuses): for three fields that is about 1 µs (measured
here), as much as the rest of an S3 or SSE send. `quick_init` replaces it with
an `__init__` of the same signature that sets each slot through the slot's own
descriptor, about half the cost; the class stays a frozen dataclass in every
other way (`replace`, `fields`, equality, repr, no assignment afterwards). No
I/O; imports no destination and not the runtime.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

T = TypeVar("T")

_NO_VALUE = object()  # an argument not given: its field's default_factory makes it


def quick_init(cls: type[T]) -> type[T]:
    """Give a `@dataclass(frozen=True, slots=True)` class an `__init__` that sets its slots.

    Same parameters, defaults and default factories as the generated one. A
    class with `__post_init__`, `InitVar`s or fields left out of `__init__` is
    refused (TypeError): those need the generated `__init__`.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: quick_init takes a frozen dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: quick_init cannot run __post_init__")
    fields = dataclasses.fields(cls)
    generated = list(inspect.signature(cls.__init__).parameters)[1:]  # InitVars show here
    if generated != [field.name for field in fields]:  # fields with init=False do not
        raise TypeError(
            f"{cls.__name__}: quick_init needs every field, and only fields, in __init__"
        )
    namespace: dict[str, Any] = {"_NO_VALUE": _NO_VALUE}
    declared, body = ["self"], []
    for field in fields:
        name = field.name
        namespace[f"_set_{name}"] = getattr(cls, name).__set__  # the slot's descriptor
        value = name
        if field.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = field.default
            declared.append(f"{name}=_default_{name}")
        elif field.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = field.default_factory
            declared.append(f"{name}=_NO_VALUE")
            value = f"_factory_{name}() if {name} is _NO_VALUE else {name}"
        else:
            declared.append(name)
        body.append(f"    _set_{name}(self, {value})\n")
    source = f"def __init__({', '.join(declared)}):\n" + ("".join(body) or "    pass\n")
    exec(source, namespace)  # noqa: S102 (our own text, made from the dataclass's fields)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[misc]
    return cls
