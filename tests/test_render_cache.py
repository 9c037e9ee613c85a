"""nqgen.rendercache (issue 14): cookiecutter's steps with one cached jinja environment per process render exactly
what ``cookiecutter()`` renders.

Every strategy, for the real Debian kernel and for header fixtures of three generations (RHEL 7 early, 5.10, 6.6,
modules compiled in their shape), is generated in one process with the cache warm from the kernels before it,
then again through ``cookiecutter()`` itself (a fresh jinja environment per call, as before the cache); the two
trees must be byte-identical, file modes included. The cache must also compile each template source once.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import DebianKernel
from nqgen import generate, probe, render, rendercache
from nqgen.errors import BuildError
from test_generations import CASES, build_module
from test_headers import FIXTURES

GENERATIONS = ("rhel7-early", "5.10", "6.6")


def cookiecutter_itself(template: Path, output_dir: Path, extra_context: dict[str, Any]) -> Path:
    """render._cookiecutter as it was before the cache: one cookiecutter() call per template."""
    from cookiecutter.main import cookiecutter

    result = cookiecutter(str(template), no_input=True, extra_context=extra_context, output_dir=str(output_dir),
                          overwrite_if_exists=False, accept_hooks=False)  # fmt: skip
    return Path(result)


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and directory under ``root``: mode and bytes (inputs.json without its date: it differs per run)."""
    out: dict[str, tuple[int, bytes]] = {}
    for p in sorted(root.rglob("*")):
        data = b""
        if p.is_file():
            data = p.read_bytes()
            if p.name == "inputs.json":
                doc = json.loads(data)
                doc.pop("date", None)
                data = json.dumps(doc, sort_keys=True).encode()
        out[str(p.relative_to(root))] = (stat.S_IMODE(p.stat().st_mode) | (stat.S_IFDIR if p.is_dir() else 0), data)
    return out


@pytest.fixture(scope="module")
def kernels(debian: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, probe.ProfileInputs]]:
    out = [("debian", probe.ProfileInputs(kdir=debian.kdir, modules=[debian.nf_conntrack]))]
    for generation in GENERATIONS:
        case = CASES[generation]
        ko = build_module(tmp_path_factory.mktemp(generation.replace(".", "_")), case.source, case.ko, case.cflags)
        out.append((generation, probe.ProfileInputs(kdir=FIXTURES / generation, modules=[ko])))
    return out


def test_every_strategy_renders_byte_identical_to_cookiecutter(
    kernels: list[tuple[str, probe.ProfileInputs]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profiles = [(name, probe.build_profile(inputs), str(inputs.kdir)) for name, inputs in kernels]
    (tmp_path / "cached").mkdir()
    (tmp_path / "cookiecutter").mkdir()
    before = rendercache.compiled_count()
    for name, profile, kdir in profiles:
        generate.generate(profile, "all", tmp_path / "cached" / name, kdir)
    compiled = rendercache.compiled_count() - before
    monkeypatch.setattr(render, "_cookiecutter", cookiecutter_itself)
    for name, profile, kdir in profiles:
        generate.generate(profile, "all", tmp_path / "cookiecutter" / name, kdir)
    for name, _profile, _kdir in profiles:
        ours, theirs = tree(tmp_path / "cached" / name), tree(tmp_path / "cookiecutter" / name)
        assert sorted(ours) == sorted(theirs), name
        assert len([p for p in ours if p.endswith(".c")]) >= 5, name
        for path in ours:
            assert ours[path] == theirs[path], f"{name}: {path} differs"
    # every kernel renders the same template files: after the first, only their context values are new
    assert 0 < compiled < 917 * len(profiles) / 3


def test_second_render_of_the_same_kernel_compiles_nothing(
    kernels: list[tuple[str, probe.ProfileInputs]], tmp_path: Path
) -> None:
    _name, inputs = kernels[0]
    profile = probe.build_profile(inputs)
    generate.generate(profile, "all", tmp_path / "first", str(inputs.kdir))
    before = rendercache.compiled_count()
    generate.generate(profile, "all", tmp_path / "second", str(inputs.kdir))
    assert rendercache.compiled_count() == before
    assert tree(tmp_path / "first") == tree(tmp_path / "second")


def test_an_undefined_variable_is_the_same_build_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template using a variable the context lacks fails as cookiecutter() failed: one BuildError line, and no
    project directory left behind."""
    template = tmp_path / "tpl"
    (template / "{{cookiecutter.strategy}}").mkdir(parents=True)
    (template / "cookiecutter.json").write_text('{"strategy": "x", "target": {}}')
    (template / "{{cookiecutter.strategy}}" / "Kbuild").write_text("obj-m := {{ cookiecutter.target.missing }}.o\n")
    messages = []
    for impl in (render._cookiecutter, lambda t, o, c: render_with(cookiecutter_itself, t, o, c)):
        out = tmp_path / f"out{len(messages)}"
        out.mkdir()
        with pytest.raises(BuildError) as err:
            impl(template, out, {"strategy": "x", "target": {"present": "1"}})
        messages.append(str(err.value).replace(str(out), "OUT"))
        assert list(out.iterdir()) == []
    assert messages[0] == messages[1]
    assert "missing" in messages[0] and "\n" not in messages[0]


def render_with(fn: Any, template: Path, out: Path, context: dict[str, Any]) -> Path:
    from cookiecutter.exceptions import CookiecutterException
    from jinja2 import TemplateError

    try:
        return fn(template, out, context)  # type: ignore[no-any-return]
    except (CookiecutterException, TemplateError) as exc:
        raise BuildError(f"rendering template {template.name} failed: {str(exc).splitlines()[0]}") from exc


def test_an_option_the_renderer_does_not_handle_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "tpl"
    (template / "{{cookiecutter.strategy}}").mkdir(parents=True)
    (template / "cookiecutter.json").write_text('{"strategy": "x", "_copy_without_render": ["*.bin"]}')
    with pytest.raises(BuildError, match="_copy_without_render is not supported"):
        render._cookiecutter(template, tmp_path, {"strategy": "x"})


def test_cache_keys_on_source_and_name_not_file_and_keeps_the_last_used(monkeypatch: pytest.MonkeyPatch) -> None:
    env = rendercache.CachingEnvironment(context={}, keep_trailing_newline=True)
    monkeypatch.setattr(env, "CACHE_SIZE", 2)
    first = env.compile("a {{ x }}", "t.c", "/tmp/stage-1/t.c")
    assert env.compile("a {{ x }}", "t.c", "/tmp/stage-2/t.c") is first  # another staging directory: a hit
    assert env.compiles == 1
    env.compile("a {{ x }}", "u.c", "/tmp/stage-2/u.c")  # another template name: compiled
    env.compile("a {{ x }}", "t.c", "/tmp/stage-3/t.c")  # used again: now the newest
    env.compile("b", None, None)  # evicts u.c, the least recently used
    assert env.compiles == 3
    env.compile("a {{ x }}", "t.c", None)
    assert env.compiles == 3
    env.compile("a {{ x }}", "u.c", None)
    assert env.compiles == 4
    assert env.from_string("{{ 1 + 1 }}\n").render() == "2\n"  # keep_trailing_newline, as cookiecutter's


def test_binary_check_is_kept_per_name_and_first_bytes(tmp_path: Path) -> None:
    text, blob = tmp_path / "a" / "x.c", tmp_path / "b" / "x.c"
    text.parent.mkdir()
    blob.parent.mkdir()
    text.write_text("int x;\n")
    blob.write_bytes(bytes(range(256)) * 2)
    from binaryornot.check import is_binary

    assert not rendercache._is_binary(str(text)) and not is_binary(str(text))
    assert rendercache._is_binary(str(blob)) and is_binary(str(blob))  # same name, other bytes: asked again
    png = tmp_path / "a" / "x.png"
    png.write_text("int x;\n")
    assert rendercache._is_binary(str(png)) and is_binary(str(png))  # same bytes, binary extension
