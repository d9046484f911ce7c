"""Imports run one way: decorators -> policy -> {config, registry, patterns} -> leaf modules.

Every ``import`` statement of every module under ``src/buttress`` is read with :mod:`ast`
(function-level lazy imports and ``TYPE_CHECKING`` blocks included: a lazy import is still a
dependency) and each arrow is checked against the layers drawn in ``docs/internals.md``:

* leaf modules (``events``, ``exceptions`` and the private top-level modules such as ``_clock``,
  ``_context``, ``_values``) import only leaf modules;
* patterns import only leaf modules and the modules of ``patterns/`` that are not patterns
  (``_base``, ``_transient``, ``_pybreaker_compat``, the breaker's state storage): not config,
  registry, policy, decorators, instrumentation, health, nor another pattern;
* everything else imports only its own layer or the layers below it (so nothing below the
  decorators imports them, and config never imports policy).

Arrows are compared per component: a subpackage counts as its parent (``buttress.config.*`` is
``buttress.config``; ``buttress.patterns.circuit_breaker.*`` is that pattern), so splitting a
module keeps its arrows. Each arrow that still runs back up today is in :data:`KNOWN_VIOLATIONS`
with the work that removes it; the list may only shrink: a new violation fails, and so does an
entry whose arrow no longer exists.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "buttress"

LEAF = 0
PATTERNS = 1
# The layers above the patterns, lowest first; a module may import its own layer and below.
RANKS = {
    "buttress.config": 2,
    "buttress.registry": 2,
    "buttress.policy": 3,
    "buttress.health_app": 3,
    "buttress.instrumentation": 4,
    "buttress.decorators": 5,
    "buttress": 6,
    "buttress.integrations": 6,
    "buttress.__main__": 6,
    "buttress.testing": 6,
    "buttress.pytest_plugin": 6,
}
LEAF_MODULES = frozenset({"buttress.events", "buttress.exceptions"})

# (importing component, imported component): why it is still there and what removes it.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

# Where the canonical pattern list (``PATTERNS = (...)``) lives: with the patterns it names.
PATTERN_LIST_HOME = "buttress.patterns"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def component(module: str) -> str:
    """The unit arrows are compared by: a pattern, else the first level below the package."""
    parts = module.split(".")
    if parts[:2] == [PACKAGE, "patterns"]:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def imported(module: str) -> Iterator[str]:
    """Every buttress module ``module`` imports, at any depth of its code."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in MODULES else base


def canonical_pattern_list() -> tuple[str, tuple[str, ...]]:
    """Where ``PATTERNS = (...)`` is assigned, and the names it lists."""
    found = []
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "PATTERNS":
                assert isinstance(node.value, ast.Tuple | ast.List), f"{module}.PATTERNS"
                names = tuple(ast.literal_eval(element) for element in node.value.elts)
                found.append((module, names))
    assert len(found) == 1, f"one canonical pattern list expected, found {found}"
    return found[0]


PATTERN_NAMES = frozenset(canonical_pattern_list()[1])


def layer(comp: str) -> int:
    name = comp.split(".")
    if comp in LEAF_MODULES or (len(name) == 2 and name[1].startswith("_") and comp not in RANKS):
        return LEAF
    if name[:2] == [PACKAGE, "patterns"]:
        return PATTERNS
    assert comp in RANKS, f"{comp} has no layer: add it to RANKS (and to docs/internals.md)"
    return RANKS[comp]


def is_pattern(comp: str) -> bool:
    name = comp.split(".")
    return name[:2] == [PACKAGE, "patterns"] and len(name) == 3 and name[2] in PATTERN_NAMES


def runs_back_up(source: str, target: str) -> bool:
    """Whether the arrow ``source -> target`` (two different components) breaks the layers."""
    if layer(source) == LEAF:
        return layer(target) != LEAF
    if layer(source) == PATTERNS:
        return not (layer(target) == LEAF or (layer(target) == PATTERNS and not is_pattern(target)))
    return layer(target) > layer(source)


def arrows() -> set[tuple[str, str]]:
    found = set()
    for module in MODULES:
        source = component(module)
        for target in map(component, imported(module)):
            if target != source:
                found.add((source, target))
    return found


def violations() -> set[tuple[str, str]]:
    return {arrow for arrow in arrows() if runs_back_up(*arrow)}


def test_no_import_runs_back_up_the_layers():
    new = sorted(violations() - set(KNOWN_VIOLATIONS))
    assert not new, "imports that run back up the layers (see docs/internals.md): " + ", ".join(
        f"{source} -> {target}" for source, target in new
    )


def test_every_known_violation_still_exists():
    # The allowlist only shrinks: once an arrow is gone, its entry must go too.
    gone = sorted(set(KNOWN_VIOLATIONS) - violations())
    assert not gone, "remove from KNOWN_VIOLATIONS: " + ", ".join(f"{s} -> {t}" for s, t in gone)


def test_the_pattern_list_lives_in_patterns():
    home, names = canonical_pattern_list()
    assert {f"{PACKAGE}.patterns.{name}" for name in names} <= set(MODULES)
    assert component(home) == PATTERN_LIST_HOME, f"the list moved to {home}: update the test"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(component(module))


@pytest.mark.parametrize(
    ("source", "target", "up"),
    [
        ("buttress.patterns.retry", "buttress._clock", False),
        ("buttress.patterns.retry", "buttress.patterns._base", False),
        ("buttress.patterns.retry", "buttress.config", True),
        ("buttress.patterns.retry", "buttress.patterns.timeout", True),
        ("buttress.patterns._base", "buttress.registry", True),
        ("buttress._clock", "buttress.config", True),
        ("buttress.config", "buttress.patterns.retry", False),
        ("buttress.config", "buttress.policy", True),
        ("buttress.policy", "buttress.decorators", True),
        ("buttress.instrumentation", "buttress.health_app", False),
        ("buttress", "buttress.decorators", False),
    ],
)
def test_the_rule_itself(source, target, up):
    assert runs_back_up(source, target) is up


def test_the_reader_sees_lazy_imports():
    # testing.py imports the health module inside a function: that arrow must be seen.
    assert any(target.startswith("buttress.health") for target in imported("buttress.testing"))
