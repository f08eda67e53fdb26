"""The house stands one way: evals <- runtime <- stages <- harness. A floor imports only the floors under it (and
itself), anywhere in a file, functions included: read with the project's own `ast` import walk
(harness/codeprint.py), which is also what the stage cache keys on."""
from __future__ import annotations

from harness import codeprint

FLOORS = ("evals", "runtime", "stages", "harness")  # bottom to top


def import_graph() -> dict[str, set[str]]:
    """Floor -> the floors its files import."""
    graph: dict[str, set[str]] = {floor: set() for floor in FLOORS}
    for floor in FLOORS:
        for path in sorted((codeprint.PROJECT_ROOT / floor).rglob("*.py")):
            graph[floor] |= {name.split(".")[0] for name in codeprint.imports(path)}
    return graph


def violations() -> list[str]:
    out = []
    for floor in FLOORS:
        allowed = set(FLOORS[: FLOORS.index(floor) + 1])
        for path in sorted((codeprint.PROJECT_ROOT / floor).rglob("*.py")):
            for name in sorted(codeprint.imports(path)):
                if name.split(".")[0] not in allowed:
                    out.append(f"{path.relative_to(codeprint.PROJECT_ROOT)} imports {name} (a floor above {floor})")
    return out


def test_no_floor_imports_a_floor_above_it():
    assert violations() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The guard cannot pass by not looking: an import hidden in a function of a runtime module is found."""
    module = codeprint.PROJECT_ROOT / "runtime" / "_layer_probe.py"
    module.write_text("def f():\n    from harness import cli\n    return cli\n")
    try:
        assert "harness.cli" in codeprint.imports(module)
        assert any(v.startswith("runtime/_layer_probe.py imports harness") for v in violations())
    finally:
        module.unlink()


if __name__ == "__main__":  # print the graph (the closing note of the house issue shows it)
    for floor, imported in import_graph().items():
        print(f"{floor:8} imports {', '.join(f for f in FLOORS if f in imported)}")
    print("violations:", violations() or "none")
