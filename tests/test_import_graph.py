"""The package's import graph has no circle and no arrow running back up (docs/design-notes.md, "Layers").

A module may import from its own layer or the layers below it. A new module must be placed in a layer here;
an import that climbs fails with the importing file, its line and the module it reached.
"""

import support_import_graph as graph

# Bottom to top. A package name covers its modules (``stabguard.cli`` is every command).
LAYERS = [
    # words every layer uses: no stabguard import above this line
    ["stabguard.seams", "stabguard.options", "stabguard.verdict", "stabguard.events", "stabguard.metrics",
     "stabguard.progress", "stabguard.training_types", "stabguard.where", "stabguard.engine_check",
     "stabguard.qwen", "stabguard.scoring", "stabguard.trainer_state", "stabguard.findings",
     "stabguard.checkpoint_formats", "stabguard.checkpoints"],
    # the package's own names (IGNORE_INDEX, hookimpl, __version__) and what it imports eagerly
    ["stabguard"],
    # data, models, the engines' adapters, reading a run's history
    ["stabguard.data", "stabguard.models", "stabguard.collate", "stabguard.engine", "stabguard.zero",
     "stabguard.diagnosis", "stabguard.hints", "stabguard.console"],
    # what a recipe is; the step and the recovery it drives
    ["stabguard.recipe_schema", "stabguard.replay", "stabguard.recovery", "stabguard.step"],
    # the contract with plugins: every hook, in terms of the objects above
    ["stabguard.hookspecs"],
    # loading plugins, then loading a recipe (its guard tables against the plugins it names)
    ["stabguard.manager"],
    ["stabguard.recipe", "stabguard.memory", "stabguard.eval"],
    # the Trainer, a run, and the readouts that run one: check, probe, a plain HF run's folder
    ["stabguard.trainer", "stabguard.runner"],
    ["stabguard.check", "stabguard.probe", "stabguard.run_dir"],
    # the ways in, and the guards: nothing in the core imports them
    ["stabguard.cli", "stabguard.integrations", "stabguard.testing", "stabguard.plugins", "stabguard.faults"],
]


def test_every_module_is_in_a_layer():
    for module in graph.modules():
        graph.layer_of(module, LAYERS)  # raises naming the module


def test_no_circle():
    found = graph.circles(graph.arrows())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_arrow_runs_back_up():
    up = graph.upward(graph.arrows(), LAYERS)
    assert not up, "imports from a higher layer (tests/test_import_graph.py LAYERS):\n" + "\n".join(map(str, up))


def test_the_reader_counts_annotation_and_local_imports():
    """The arrows the review found came from ``TYPE_CHECKING`` blocks and function bodies: both must count."""
    kinds = {a.kind for a in graph.arrows()}
    assert {"top", "type-checking", "local"} <= kinds
