import textwrap

import pytest
from click.testing import CliRunner

from stabguard.cli import main
from stabguard.manager import AUTOLOAD_ENV, BUILTIN_PLUGINS, Plugins

THIRD_PARTY = '''
from stabguard import GuardOptions, Verdict, hookimpl

__version__ = "1.2.3"
SEEN = []


class Options(GuardOptions):
    every: int = 1


class CountingGuard:
    def __init__(self, options):
        self.options = options

    @hookimpl
    def pre_step(self, state):
        SEEN.append(state.step)
        return None


@hookimpl
def register_guards(register):
    register("counting", Options, CountingGuard)


@hookimpl
def on_alert(alert):
    SEEN.append(("alert", alert.message))
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """An installed-looking distribution `sg-thirdparty` with a `stabguard` entry point."""
    (tmp_path / "sg_thirdparty.py").write_text(THIRD_PARTY)
    dist = tmp_path / "sg_thirdparty-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sg-thirdparty\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[stabguard]\ncounting = sg_thirdparty\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    yield "counting"


def test_builtins_load_and_every_impl_has_a_spec():
    plugins = Plugins.for_recipe()
    plugins.pm.check_pending()
    assert set(BUILTIN_PLUGINS) <= set(plugins.info)
    assert {"mask", "vision_freeze", "grad_norm", "nonfinite", "optim8bit"} <= set(plugins.guards)
    assert all(plugins.info[name].source == "built-in" for name in BUILTIN_PLUGINS)


def test_enabled_guards_are_registered_and_checked():
    plugins = Plugins.for_recipe()
    options = {name: spec.options() for name, spec in plugins.guards.items()}
    options["optim8bit"] = plugins.guards["optim8bit"].options(enabled=False)
    enabled = plugins.enable_guards(options)
    plugins.pm.check_pending()
    assert "optim8bit" not in enabled and "nonfinite" in enabled
    assert plugins.pm.has_plugin("guard:nonfinite") and not plugins.pm.has_plugin("guard:optim8bit")


def test_blocked_plugin_is_not_loaded_and_its_guard_unknown():
    plugins = Plugins.for_recipe(block=["optim8bit"])
    assert "optim8bit" not in plugins.info and "optim8bit" not in plugins.guards


def test_third_party_entry_point_is_discovered_and_fires(third_party):
    import sg_thirdparty

    plugins = Plugins.for_recipe()
    assert plugins.info[third_party].source == "entry point"
    assert plugins.info[third_party].version == "sg-thirdparty 1.2.3"
    assert "counting" in plugins.guards
    plugins.enable_guards({name: spec.options(enabled=name == "counting") for name, spec in plugins.guards.items()})
    plugins.pm.check_pending()

    class State:
        step = 7

    plugins.hook.pre_step(state=State(), events=None)
    assert 7 in sg_thirdparty.SEEN


def test_autoload_switch_disables_entry_points(third_party, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert third_party not in Plugins.for_recipe().info


def test_plugins_command_lists_third_party_and_builtins(third_party):
    out = CliRunner().invoke(main, ["plugins"])
    assert out.exit_code == 0, out.output
    assert "counting sg-thirdparty 1.2.3 (entry point) guards: counting (off unless the recipe has [guards.counting])" in out.output
    assert "nonfinite 0.1.0 (built-in) guards: nonfinite" in out.output
    hooks_line = out.output.split("nonfinite 0.1.0")[1].splitlines()[1]
    assert "pre_step" in hooks_line and "register_guards" in hooks_line


def test_plugins_command_filters_by_hook():
    out = CliRunner().invoke(main, ["plugins", "--hook", "make_optimizer"])
    assert out.exit_code == 0, out.output
    assert "optim8bit" in out.output and "nonfinite" not in out.output
    bad = CliRunner().invoke(main, ["plugins", "--hook", "nope"])
    assert bad.exit_code == 2 and "pre_step" in bad.output


def test_recipe_module_plugin(tmp_path, monkeypatch):
    (tmp_path / "my_recipe_plugin.py").write_text(textwrap.dedent('''
        from stabguard import hookimpl
        @hookimpl
        def on_log(logs):
            logs["mine"] = 1
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins.for_recipe(["my_recipe_plugin"])
    assert plugins.info["my_recipe_plugin"].source == "recipe"
    logs = {}
    plugins.hook.on_log(logs=logs, state=None, events=None)
    assert logs == {"mine": 1}


def _recipe(tmp_path, assets_free_extra: str = "") -> "Path":
    """A recipe whose guard tables are all that matters here (validated, never run)."""
    path = tmp_path / "recipes" / "r.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent('''
        %s
        [model]
        name_or_path = "m"
        [data]
        train = "t.jsonl"
        [training]
        output_dir = "out"
    ''') % assets_free_extra)
    return path


@pytest.mark.parametrize("extra, on", [
    ("", False),  # installed, not named: loaded and listed, but off
    ("[guards.counting]\nevery = 2", True),  # its table turns it on
    ('plugins = ["sg_thirdparty"]', True),  # so does naming its module
])
def test_an_entry_point_guard_is_off_unless_the_recipe_names_it(third_party, tmp_path, extra, on):
    from stabguard.recipe import load_recipe

    if extra.startswith("["):
        extra = "\n" + extra  # a table goes after the top-level keys
        path = _recipe(tmp_path)
        path.write_text(path.read_text() + extra + "\n")
    else:
        path = _recipe(tmp_path, extra)
    recipe = load_recipe(path)
    assert recipe.guards["counting"].enabled is on, path.read_text()
    assert recipe.guards["nonfinite"].enabled, "built-in guards stay on by default"


def test_a_plugin_module_beside_the_recipe_or_in_the_current_folder_loads(tmp_path, monkeypatch):
    path = _recipe(tmp_path, 'plugins = ["beside_recipe", "in_cwd"]')
    (path.parent / "beside_recipe.py").write_text("from stabguard import hookimpl\n@hookimpl\ndef on_log(logs):\n    logs['a'] = 1\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "in_cwd.py").write_text("from stabguard import hookimpl\n@hookimpl\ndef on_log(logs):\n    logs['b'] = 2\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    plugins = Plugins.for_recipe(["beside_recipe", "in_cwd"], near=[path.parent])
    logs = {}
    plugins.hook.on_log(logs=logs, state=None, events=None)
    assert logs == {"a": 1, "b": 2} and plugins.info["beside_recipe"].source == "recipe"
    with pytest.raises(ImportError, match="'nowhere_module' .*also looked in"):
        Plugins.for_recipe(["nowhere_module"], near=[path.parent])


def test_entry_point_plugins_are_announced_with_package_and_version(third_party, capsys):
    from stabguard.runner import announce_entry_points

    plugins = Plugins.for_recipe()
    found = announce_entry_points(plugins, enabled=["nonfinite"])
    ours = [f for f in found if f["plugin"] == "counting"]  # the environment may hold others (the example)
    assert ours == [{"plugin": "counting", "package": "sg-thirdparty 1.2.3", "guards": {"counting": False}}]
    assert ("stabguard: plugin counting from sg-thirdparty 1.2.3 (entry point); guards: counting off "
            "(no [guards.counting] in the recipe)") in capsys.readouterr().err


def test_the_docs_guard_table_names_every_hook_each_built_in_guard_implements():
    """docs/guards.md's table of the built-in guards is checked against the guards themselves (bookkeeping
    hooks aside)."""
    import re
    from pathlib import Path

    plugins = Plugins.for_recipe(autoload=False)
    plugins.enable_guards({name: spec.options() for name, spec in plugins.guards.items()})
    page = (Path(__file__).parents[1] / "docs" / "guards.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([\w, ]+) \|", page, flags=re.M))
    assert set(table) == set(plugins.guards), "one row per built-in guard"
    bookkeeping = {"register_guards", "state_dict", "load_state_dict"}
    for name, spec in plugins.guards.items():
        hooks = set(plugins.hooks_of(f"guard:{name}")) | set(plugins.hooks_of(spec.provided_by))
        assert set(table[name].split(", ")) == hooks - bookkeeping, name
