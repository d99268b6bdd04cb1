"""The one plug-in mechanism: module:attr strings, entry points, built-ins, options, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from strategies.plugins import PluginError, Registry, check_options, load_object

USER_MODULE = """
def factory(input_shape, num_classes, seed, hidden=8):
    return ("built", input_shape, num_classes, seed, hidden)

class Holder:
    class Inner:
        value = 42
"""


@pytest.fixture
def user_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_plugins_mod.py").write_text(USER_MODULE)
    dist = tmp_path / "leanfed_demo_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: leanfed-demo-plugins\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """
            [leanfed.models]
            demo-net = my_plugins_mod:factory
            broken = my_plugins_mod:nothing_here
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_attr_and_dotted_attr(user_pkg: Path) -> None:
    assert load_object("my_plugins_mod:factory", "model")((1,), 2, 0)[0] == "built"
    assert load_object("my_plugins_mod:Holder.Inner.value", "model") == 42


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            "no_such_pkg_xyz.sub:f",
            "model = 'no_such_pkg_xyz.sub:f': no module named 'no_such_pkg_xyz'",
        ),
        ("my_plugins_mod:missing", "module 'my_plugins_mod' has no attribute 'missing'"),
        ("my_plugins_mod:", "expected 'package.module:attribute'"),
    ],
)
def test_errors_name_the_missing_module_or_attribute(
    user_pkg: Path, spec: str, fragment: str
) -> None:
    with pytest.raises(PluginError) as err:
        load_object(spec, "model")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_entry_points_builtins_and_unknown(user_pkg: Path) -> None:
    reg: Registry[object] = Registry("model", "leanfed.models", "model")
    reg.register("tiny", "builtin-object")
    assert reg.resolve("tiny") == "builtin-object"
    assert reg.resolve("demo-net")((3,), 2, 0)[-1] == 8  # found through the entry point
    assert reg.names()[0] == "tiny" and "demo-net" in reg.names()
    with pytest.raises(PluginError, match="entry point 'my_plugins_mod:nothing_here'"):
        reg.resolve("broken")
    with pytest.raises(PluginError, match="model = 'nope': unknown model.*tiny.*demo-net"):
        reg.resolve("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("tiny", "other")
    with pytest.raises(ValueError, match="unknown entry-point group"):
        Registry("x", "leanfed.nope", "x")


def test_check_options_binds_and_types() -> None:
    def f(a: int, b: int, *, width: int = 4, rate: float = 0.1, name: str = "x") -> None: ...

    check_options(f, 2, {"width": 8, "rate": 1, "name": "y"}, "model.options")
    with pytest.raises(PluginError, match=r"does not accept options \['depth'\].*width"):
        check_options(f, 2, {"depth": 3}, "model.options")
    with pytest.raises(PluginError, match=r"model.options.width = 'wide': expected int"):
        check_options(f, 2, {"width": "wide"}, "model.options")
    with pytest.raises(PluginError, match="expected int"):
        check_options(f, 2, {"width": True}, "model.options")
