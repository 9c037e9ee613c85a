"""cookiecutter's own rendering steps, run with one jinja environment per process whose compiled templates are kept.

``cookiecutter()`` builds a new jinja environment for every call (twice: one for the variables, one for the files)
and so compiles every file name, every file body and every variable of the context again: ``nqgen --strategy
all`` compiled the same shared kmod/ sources once per strategy (917 compiles, 60% of the command's time), and a
fleet compiled them again for every target. :func:`cookiecutter_no_input` runs the same steps as
``cookiecutter(template, no_input=True, extra_context=..., accept_hooks=False)`` — cookiecutter's
``generate_context``, ``render_variable``/``prompt_choice_for_config``, ``find_template`` and
``render_and_create_dir``, and ``generate_file`` step for step (its binary check kept per file) — with an
environment (cookiecutter's ``StrictEnvironment``, created the way ``create_env_with_context`` creates it) that
compiles a given template source once per process.

What it does not do, on purpose: read the user's ``~/.cookiecutterrc`` (its ``default_context`` could change
nqgen's output), write a replay file under ``~/.cookiecutter_replay``, run hooks (nqgen never accepted them),
clone or unzip template repositories, or follow nested templates; a template asking for the options it does not
handle (``_copy_without_render``) is refused rather than rendered differently.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from types import CodeType
from typing import Any

from binaryornot.check import is_binary
from cookiecutter.environment import StrictEnvironment
from cookiecutter.exceptions import CookiecutterException, UndefinedVariableInTemplate
from cookiecutter.find import find_template
from cookiecutter.generate import generate_context, render_and_create_dir
from cookiecutter.prompt import prompt_choice_for_config, render_variable
from cookiecutter.utils import rmtree, work_in
from jinja2 import FileSystemLoader, nodes
from jinja2.exceptions import TemplateSyntaxError, UndefinedError

UNSUPPORTED_KEYS = ("_copy_without_render", "template", "templates")


class CachingEnvironment(StrictEnvironment):  # type: ignore[misc]  # (cookiecutter has no type hints)
    """cookiecutter's StrictEnvironment that compiles each (source, template name) once while it stays in use.

    The cache ignores the file name a loaded template came from (nqgen renders from a fresh staging directory
    each time, so it always differs): it only names the file in tracebacks. It keeps the CACHE_SIZE sources used
    last: every target of a fleet brings its own variable values, the template files stay the same.
    """

    CACHE_SIZE = 4096

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compiled: OrderedDict[tuple[str, str | None, bool, bool], str | CodeType] = OrderedDict()
        self.compiles = 0  # sources compiled (cache misses)

    def compile(
        self,
        source: str | nodes.Template,
        name: str | None = None,
        filename: str | None = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> str | CodeType:
        if not isinstance(source, str):
            return super().compile(source, name, filename, raw, defer_init)  # type: ignore[no-any-return]
        key = (source, name, raw, defer_init)
        code = self.compiled.get(key)
        if code is None:
            code = super().compile(source, name, filename, raw, defer_init)
            self.compiles += 1
            self.compiled[key] = code
            if len(self.compiled) > self.CACHE_SIZE:
                self.compiled.popitem(last=False)
        else:
            self.compiled.move_to_end(key)
        return code


_ENVIRONMENTS: dict[str, CachingEnvironment] = {}


def environment(context: dict[str, Any]) -> CachingEnvironment:
    """The process's environment for a context (as cookiecutter's create_env_with_context makes one: its
    ``_jinja2_env_vars`` and ``_extensions`` decide the configuration, so each configuration has its own)."""
    settings = context.get("cookiecutter", {})
    envvars = settings.get("_jinja2_env_vars", {})
    key = json.dumps([envvars, settings.get("_extensions", [])], sort_keys=True, default=repr)
    env = _ENVIRONMENTS.get(key)
    if env is None:
        env = _ENVIRONMENTS[key] = CachingEnvironment(context=context, keep_trailing_newline=True, **envvars)
    return env


def compiled_count() -> int:
    """How many template sources the process has compiled so far (for the bench and the tests)."""
    return sum(env.compiles for env in _ENVIRONMENTS.values())


def _prompt_no_input(context: dict[str, Any], env: CachingEnvironment) -> OrderedDict[str, Any]:
    """cookiecutter.prompt.prompt_for_config(context, no_input=True) with ``env``: the same two passes."""
    answers: OrderedDict[str, Any] = OrderedDict()
    context["cookiecutter"].pop("__prompts__", {})
    items = context["cookiecutter"].items()
    for key, raw in items:
        if key.startswith("_") and not key.startswith("__"):
            answers[key] = raw
            continue
        if key.startswith("__"):  # (cookiecutter does not wrap these errors either)
            answers[key] = render_variable(env, raw, answers)
            continue
        try:
            if isinstance(raw, list):
                answers[key] = prompt_choice_for_config(answers, env, key, raw, True)
            elif not isinstance(raw, dict):
                answers[key] = render_variable(env, raw, answers)
        except UndefinedError as err:
            raise UndefinedVariableInTemplate(f"Unable to render variable '{key}'", err, context) from err
    for key, raw in items:
        if key.startswith("_") and not key.startswith("__"):
            continue
        try:
            if isinstance(raw, dict):
                answers[key] = render_variable(env, raw, answers)
        except UndefinedError as err:
            raise UndefinedVariableInTemplate(f"Unable to render variable '{key}'", err, context) from err
    return answers


_BINARY: dict[tuple[str, bytes], bool] = {}


def _is_binary(path: str) -> bool:
    """binaryornot's is_binary, which cookiecutter asks for every file (a fifth of a warm render's time), kept per
    file name and first 512 bytes: the name's extension and that chunk are all it looks at."""
    with open(path, "rb") as fh:
        key = (os.path.basename(path), fh.read(512))
    found = _BINARY.get(key)
    if found is None:
        if len(_BINARY) >= 1024:
            _BINARY.clear()
        found = _BINARY[key] = bool(is_binary(path))
    return found


def _generate_file(project_dir: str, infile: str, context: dict[str, Any], env: CachingEnvironment) -> None:
    """cookiecutter.generate.generate_file(project_dir, infile, context, env) step for step, with the binary check
    above: render the file name, copy a binary file, else render the body and write it with the input's first
    line ending (or ``_new_lines``) and the input's mode."""
    outfile = os.path.join(project_dir, env.from_string(infile).render(**context))
    if os.path.isdir(outfile):  # the name rendered empty
        return
    if _is_binary(infile):
        shutil.copyfile(infile, outfile)
        shutil.copymode(infile, outfile)
        return
    try:
        tmpl = env.get_template(infile.replace(os.path.sep, "/"))
    except TemplateSyntaxError as exc:
        exc.translated = False
        raise
    rendered = tmpl.render(**context)
    newline = context["cookiecutter"].get("_new_lines", False)
    if not newline:
        with open(infile, encoding="utf-8") as rd:
            rd.readline()
        newline = rd.newlines[0] if isinstance(rd.newlines, tuple) else rd.newlines
    with open(outfile, "w", encoding="utf-8", newline=newline) as fh:
        fh.write(rendered)
    shutil.copymode(infile, outfile)


def _generate_files(repo_dir: Path, context: dict[str, Any], output_dir: Path) -> str:
    """cookiecutter.generate.generate_files(repo_dir, context, output_dir, accept_hooks=False) with the process's
    environment: the project directory, then every directory and file below it in the same order."""
    env = environment(context)
    template_dir = find_template(repo_dir, env)
    unrendered_dir = os.path.split(template_dir)[1]
    try:
        project, created = render_and_create_dir(unrendered_dir, context, output_dir, env, False)
    except UndefinedError as err:
        raise UndefinedVariableInTemplate(f"Unable to create project directory '{unrendered_dir}'", err,
                                          context) from err  # fmt: skip
    project_dir = str(os.path.abspath(project))
    with work_in(template_dir):
        env.loader = FileSystemLoader([".", "../templates"])
        for root, dirs, files in os.walk("."):
            dirs[:] = sorted(dirs)
            for d in dirs:
                unrendered = os.path.join(project_dir, root, d)
                try:
                    render_and_create_dir(unrendered, context, output_dir, env, False)
                except UndefinedError as err:
                    if created:
                        rmtree(project_dir)
                    where = os.path.relpath(unrendered, output_dir)
                    raise UndefinedVariableInTemplate(f"Unable to create directory '{where}'", err, context) from err
            for f in sorted(files):
                infile = os.path.normpath(os.path.join(root, f))
                try:
                    _generate_file(project_dir, infile, context, env)
                except UndefinedError as err:
                    if created:
                        rmtree(project_dir)
                    raise UndefinedVariableInTemplate(f"Unable to create file '{infile}'", err, context) from err
    return project_dir


def cookiecutter_no_input(template: Path, extra_context: dict[str, Any], output_dir: Path) -> Path:
    """What ``cookiecutter(str(template), no_input=True, extra_context=..., output_dir=..., accept_hooks=False)``
    renders, with compiled templates kept for the process; returns the project directory."""
    context = generate_context(context_file=str(template / "cookiecutter.json"), extra_context=extra_context)
    settings = context["cookiecutter"]
    unsupported = [k for k in UNSUPPORTED_KEYS if k in settings]
    if unsupported:
        raise CookiecutterException(f"{template / 'cookiecutter.json'}: {', '.join(unsupported)} is not supported "
                                    "by nqgen's renderer")  # fmt: skip
    context["_cookiecutter"] = {k: v for k, v in settings.items() if not k.startswith("_")}
    if settings:
        settings.update(_prompt_no_input(context, environment(context)))
    settings["_template"] = str(template)
    settings["_output_dir"] = os.path.abspath(output_dir)
    settings["_repo_dir"] = str(template)
    settings["_checkout"] = None
    return Path(_generate_files(template, context, output_dir))
