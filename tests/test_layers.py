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



def test_the_stage_registry_is_a_whole_mapping():
    from runtime.config import STAGE_NAMES
    from stages import STAGES

    assert len(STAGES) == len(STAGE_NAMES) and list(STAGES) == list(STAGE_NAMES)
    assert dict(STAGES)["sft"].__name__ == "stages.sft" and STAGES.get("nope") is None
    try:
        STAGES["nope"]
    except KeyError as exc:
        assert "known: data, model" in str(exc)
    else:
        raise AssertionError("an unknown stage must raise KeyError")


def test_every_training_stage_declares_its_step_cost():
    """A training stage (its section is a TrainStageConfig) that forgets `step_cost` would be estimated as free."""
    from runtime.config import PipelineConfig, TrainStageConfig
    from stages import STAGES, TRAINING, StepCost

    sections = {name: f.annotation for name, f in PipelineConfig.model_fields.items()}
    assert set(TRAINING) == {n for n, t in sections.items() if isinstance(t, type) and issubclass(t, TrainStageConfig)}
    assert {"sft", "dpo", "grpo", "align"} <= set(TRAINING)
    defaults = PipelineConfig()
    for name in TRAINING:
        cost = getattr(STAGES[name], "step_cost", None)
        assert callable(cost), f"stages/{name}.py declares no step_cost(section) -> StepCost"
        declared = cost(getattr(defaults, name))
        assert isinstance(declared, StepCost) and declared.passes >= 3, (name, declared)


def test_reproduce_follows_files_the_house_moved():
    """A run recorded before the move (results/reference/dpo.json, made by the pre-runtime/ layout) is compared file
    by file under the new paths: the moved files are said once, never listed as changed under either path."""
    import json

    from harness.reproduce import LAYOUT_MOVES, code_differences

    recorded = json.loads((codeprint.PROJECT_ROOT / "results" / "reference" / "dpo.json").read_text())
    lines = code_differences(recorded)
    moved = [ln for ln in lines if "live under new paths now" in ln]
    assert len(moved) == len([s for s in recorded["stages"] if s.get("code")]), lines
    assert "harness/config.py -> runtime/config.py" in moved[0]
    for stage in (s for s in recorded["stages"] if s.get("code")):  # what it ran that moved: under neither path
        line = next((ln for ln in lines if ln.startswith(f"stage {stage['name']} ran other code")), "")
        for old in set(stage["code"]["files"]) & set(LAYOUT_MOVES):
            assert f"{old}," not in line and f"{old} " not in line, line
            assert not any(f"{new}," in line or f"{new} " in line for new in LAYOUT_MOVES[old]), line
    assert all((codeprint.PROJECT_ROOT / new).is_file() for news in LAYOUT_MOVES.values() for new in news)


if __name__ == "__main__":  # print the graph (the closing note of the house issue shows it)
    for floor, imported in import_graph().items():
        print(f"{floor:8} imports {', '.join(f for f in FLOORS if f in imported)}")
    print("violations:", violations() or "none")
