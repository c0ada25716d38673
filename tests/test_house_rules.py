"""Issue 13, items 5 and 6: speed tricks live only in the core's named functions, and the
code keeps one implementation of each rule.

The domain code (each destination's folder, and the runtime) is written as plain
loops; the few tricks that measurably beat a loop are named, documented functions of
`outbound.destinations.bulk` (or the JSON encoders of `json_encoding`). The SQL typing
rules stated value by value are the tests' oracle (tests/sql_typing_oracle.py), not a
second implementation in the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from outbound.destinations.bulk import chars_at_places
from outbound.destinations.delivery import describe_error

REPO = Path(__file__).resolve().parent.parent
DOMAIN = sorted(
    [*REPO.glob("destinations/*/*.py"), *REPO.glob("runtime/**/*.py")],
    key=lambda path: str(path),
)
TRICKS = {
    "an iterator run to its end by a zero-length deque": re.compile(r"maxlen\s*=\s*0"),
    "itertools.compress": re.compile(r"(?:itertools\.|(?<![\w.]))compress\("),
    "the json module's private C encoder": re.compile(r"c_make_encoder|json\.encoder"),
    "setattr mapped over many objects": re.compile(r"map\(\s*setattr"),
}


def code_of(path: Path) -> str:
    """The module's code without its docstrings and comments (they may name a trick)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def strided_slices(tree: ast.AST) -> list[str]:
    """Slices with a step (`joined[place::length]`): type detection by strided slices."""
    return [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Slice)
        and node.slice.step is not None
    ]


@pytest.mark.parametrize("path", DOMAIN, ids=lambda path: str(path.relative_to(REPO)))
def test_domain_code_has_no_speed_tricks(path: Path) -> None:
    code = code_of(path)
    found = [name for name, pattern in TRICKS.items() if pattern.search(code)]
    found += strided_slices(ast.parse(code))
    assert not found, f"{path.relative_to(REPO)}: move into destinations/bulk.py: {found}"


def test_chars_at_places_checks_every_string_at_every_place() -> None:
    shape = {4: "-", 7: "-"}
    assert chars_at_places(["2024-01-02", "1999-12-31"], 10, shape)
    assert not chars_at_places(["2024-01-02", "1999/12/31"], 10, shape)
    assert not chars_at_places(["2024-01-02", "1999-12/31"], 10, shape)
    assert chars_at_places([], 10, shape)


def test_the_package_has_no_second_implementation_of_the_sql_typing_rules() -> None:
    defined = {
        node.name
        for path in REPO.glob("destinations/**/*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    assert not defined & {"infer_type", "infer_batch", "merge_types", "string_type"}


def test_one_error_description_everywhere() -> None:
    assert describe_error(ValueError("bad")) == "ValueError: bad"
    assert describe_error(TimeoutError()) == "TimeoutError"  # no dangling ": "
    assert describe_error("already text") == "already text"
    for path in [*REPO.glob("destinations/**/*.py"), *REPO.glob("runtime/**/*.py")]:
        functions = {
            node.name
            for node in ast.parse(path.read_text()).body  # module-level functions
            if isinstance(node, ast.FunctionDef)
        }
        assert not functions & {"_describe", "describe"}, path
