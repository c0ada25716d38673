"""Each destination in one place: `destinations/<kind>/`, all of the same shape.

A destination's folder holds its settings (`settings.py`), its `ctx.send.<kind>`
validation and typed payload (`send.py`) and its actor (`actor.py`), and
imports neither another destination nor the runtime; the registry
(`destinations/registry.py`) is the one list the runtime and `ctx.send` read.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest

import outbound
from outbound import Config
from outbound.destinations.registry import DESTINATION_KINDS
from outbound.send import RunInfo, SendCollector

DESTINATIONS = Path(importlib.import_module("outbound.destinations").__file__).parent
KINDS = {kind.name: kind for kind in DESTINATION_KINDS}
FOLDERS = sorted(path.parent.name for path in DESTINATIONS.glob("*/__init__.py"))
#: `outbound.<name>` modules that are not the runtime layer.
NOT_RUNTIME = {"actors", "destinations"}

# One valid call of each kind: what a workflow would write.
CALLS: dict[str, Any] = {
    "http": lambda send: send.http("http://127.0.0.1:9/hook", data={"n": 1}),
    "email": lambda send: send.email("Hello", text="Hi", to="jane@example.org"),
    "s3": lambda send: send.s3(bucket="events", prefix="orders/", payload={"n": 1}),
    "sql": lambda send: send.sql(table="orders", payload={"n": 1}),
    "sse": lambda send: send.sse(channel="orders", payload={"n": 1}),
    "emit": lambda send: send.emit({"n": 1}),
}


def test_every_folder_is_a_registered_destination_of_the_same_shape() -> None:
    assert FOLDERS == sorted(KINDS) == sorted(["http", "email", "s3", "sql", "sse", "emit"])
    for name in FOLDERS:
        files = {path.name for path in (DESTINATIONS / name).glob("*.py")}
        assert {"__init__.py", "settings.py", "send.py", "actor.py"} <= files, name
        settings = importlib.import_module(f"outbound.destinations.{name}.settings")
        send = importlib.import_module(f"outbound.destinations.{name}.send")
        actor = importlib.import_module(f"outbound.destinations.{name}.actor")
        kind = KINDS[name]
        assert kind.validate is getattr(send, f"validate_{name}")
        assert kind.is_enabled is settings.is_enabled
        assert kind.how_to_enable == settings.HOW_TO_ENABLE
        assert callable(actor.starter)
        assert kind.settings.__module__ == settings.__name__


def test_each_destinations_settings_are_composed_into_config() -> None:
    variables = {variable for variable, _default, _doc in Config.describe()}
    for kind in DESTINATION_KINDS:
        assert issubclass(Config, kind.settings), kind.name
        fields = dataclasses.fields(kind.settings)
        assert fields, kind.name
        for field in fields:
            assert field.metadata["env"].startswith("OUTBOUND_") and field.metadata["doc"]
            assert field.metadata["env"] in variables
        # A settings class stands alone too, with its defaults and rules.
        assert kind.settings() is not None


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_send_becomes_a_typed_payload_of_its_own_destination(name: str) -> None:
    collector = SendCollector(RunInfo("r", "w"), Config(), lambda _name: True)
    CALLS[name](collector)
    [send] = collector.outbox
    payload = send.payload
    assert send.destination == name
    assert dataclasses.is_dataclass(payload) and not isinstance(payload, tuple)
    assert type(payload).__module__ == f"outbound.destinations.{name}.send"
    assert type(payload).__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert hasattr(type(payload), "__slots__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(payload, dataclasses.fields(payload)[0].name, None)


def test_the_registry_says_which_destinations_are_batched() -> None:
    config = Config(smtp_url="smtp://127.0.0.1:2525", email_from="app@example.org")
    parts = {"subscriptions": None, "emit_log": None, "sse_hub": None}
    for kind in DESTINATION_KINDS:
        start = kind.starter(config, **parts)
        actor_class = getattr(start, "func", start).__self__
        assert kind.batched == getattr(actor_class, "batched", False), kind.name


def _imports(path: Path, type_checking: bool = True) -> list[str]:
    """Every module `path` imports (relative ones resolved); `if TYPE_CHECKING:` ones too?"""
    package = "outbound.destinations" + "".join(
        f".{part}" for part in path.parent.relative_to(DESTINATIONS).parts
    )
    tree = ast.parse(path.read_text())
    if not type_checking:
        tree.body = [node for node in tree.body if not _is_type_checking_block(node)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.append(module)
            if node.module is None:  # from . import x
                found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def _is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_layer(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "outbound" and (len(parts) == 1 or parts[1] not in NOT_RUNTIME)


def _destination_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["outbound", "destinations"] and len(parts) > 2 and parts[2] in KINDS:
        return parts[2]
    return None


@pytest.mark.parametrize("name", FOLDERS)
def test_a_destination_imports_no_other_destination_and_not_the_runtime(name: str) -> None:
    for path in sorted((DESTINATIONS / name).glob("*.py")):
        for module in _imports(path):
            assert not _runtime_layer(module), f"{path.name} imports {module}"
            other = _destination_of(module)
            assert other in (None, name), f"{name}/{path.name} imports {module}"


def test_the_delivery_core_imports_no_destination_and_not_the_runtime() -> None:
    for path in sorted(DESTINATIONS.glob("*.py")):
        for module in _imports(path, type_checking=False):
            assert not _runtime_layer(module), f"{path.name} imports {module}"
        if path.name == "registry.py":  # the one list of the destinations
            continue
        for module in _imports(path):
            assert _destination_of(module) is None, f"{path.name} imports {module}"


def test_the_public_send_error_is_the_destinations_one() -> None:
    from outbound.destinations.validation import SendError

    assert outbound.SendError is SendError


def test_ctx_send_methods_have_the_calls_own_signature() -> None:
    import inspect

    collector = SendCollector(RunInfo("r", "w"), Config(), lambda _name: True)
    for kind in DESTINATION_KINDS:
        method = getattr(collector, kind.name)
        wanted = list(inspect.signature(kind.validate).parameters)[2:]  # after config, max_bytes
        assert list(inspect.signature(method).parameters) == wanted, kind.name
    with pytest.raises(TypeError, match=r"http\(\) got an unexpected keyword argument 'colour'"):
        collector.http("http://127.0.0.1:9/", colour=True)
    assert collector.outbox == []


def test_quick_init_makes_the_same_frozen_dataclass() -> None:
    from outbound.destinations.payloads import quick_init

    @dataclasses.dataclass(frozen=True, slots=True)
    class Generated:
        name: str
        tags: list[str] = dataclasses.field(default_factory=list)
        size: int = 0

    @quick_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Quick:
        name: str
        tags: list[str] = dataclasses.field(default_factory=list)
        size: int = 0

    for args, kwargs in [(("a",), {}), (("a", ["x"], 3), {}), (("a",), {"size": 2})]:
        generated, quick = Generated(*args, **kwargs), Quick(*args, **kwargs)
        assert dataclasses.astuple(generated) == dataclasses.astuple(quick)
    assert Quick("a").tags is not Quick("a").tags  # a new list each time, as the factory says
    with pytest.raises(dataclasses.FrozenInstanceError):
        Quick("a").size = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        Quick()  # type: ignore[call-arg]

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        name: str

        def __post_init__(self) -> None:
            pass

    with pytest.raises(TypeError, match="__post_init__"):
        quick_init(Checked)
