"""The documentation's code blocks (rules in docs/contributing.md).

Every ```python block of README.md and docs/*.md runs as a test (pytest-markdown-docs, collected
by the root conftest.py). Shell blocks (```bash) launch jobs of minutes or hours, so here every
command line in them is parsed and checked against the code instead: the script or module
exists, every flag it passes is one the entry point accepts (from its ``--help``), its
``--config`` file exists and every ``--config.x.y=`` override names a field of that config;
``pip install '.[extra]'`` names extras of pyproject.toml. Blocks without a language are text
(formulas, messages) and are not run.
"""

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_PAGES = sorted([_ROOT / "README.md", *(_ROOT / "docs").glob("*.md")])
_LANGUAGES = {"python", "bash", ""}
# External tools whose own flags are not checked here (pip's extras are).
_EXTERNAL_MODULES = {"pytest"}


def _fences(path: Path) -> list[tuple[int, str, str]]:
  """(line, info string, body) of every fenced block of a markdown page."""
  from markdown_it import MarkdownIt

  tokens = MarkdownIt("commonmark").parse(path.read_text())
  return [(t.map[0] + 1, t.info.strip(), t.content) for t in tokens if t.type == "fence"]


def _commands(body: str) -> list[list[str]]:
  """The simple commands of a shell block: continuations joined, ``NAME=value`` assignments
  (alone on a line, or ``export``-ed) substituted into later lines, ``&&`` lists split,
  leading ``eval``, ``nice [-n N]`` and per-command environment assignments dropped."""
  variables: dict[str, str] = {}
  out = []
  for line in body.replace("\\\n", " ").splitlines():
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)
    tokens = shlex.split(line, comments=True)
    if tokens[:1] == ["export"]:
      tokens = tokens[1:]
    if tokens and all(re.match(r"^\w+=", t) for t in tokens):
      variables.update(t.split("=", 1) for t in tokens)
      continue
    command: list[str] = []
    for token in [*tokens, "&&"]:
      if token in ("&&", "||", ";"):
        while command and (command[0] == "eval" or re.match(r"^\w+=", command[0])):
          command = command[1:]
        if command[:1] == ["nice"]:  # nice [-n N] COMMAND
          command = command[3:] if command[1:2] == ["-n"] else command[1:]
        if command:
          out.append(command)
        command = []
      else:
        command.append(token)
  return out


def _shell_commands() -> list[tuple[str, list[str]]]:
  return [(f"{path.relative_to(_ROOT)}:{line}", cmd)
          for path in _PAGES for line, info, body in _fences(path)
          if info.split()[:1] == ["bash"] for cmd in _commands(body)]


@functools.cache
def _accepted_flags(entry: tuple[str, ...]) -> frozenset[str]:
  """Flag names an entry point lists in its --help (absl and argparse alike)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_ROOT)}
  run = subprocess.run([sys.executable, *entry, "--help"], cwd=_ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
  names = re.findall(r"--(?:\[no\])?([A-Za-z][\w.-]*)", run.stdout + run.stderr)
  assert names, f"`python {' '.join(entry)} --help` listed no flags:\n{run.stderr[-2000:]}"
  return frozenset(names)


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  assert (_ROOT / path).is_file(), f"config file {path} does not exist"
  loader = importlib.util.spec_from_file_location(f"_doc_config_{abs(hash(path))}", _ROOT / path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _split_flag(token: str, following: list[str]) -> tuple[str, str | None]:
  name, eq, value = token[2:].partition("=")
  if not eq and following and not following[0].startswith("-"):
    value = following[0]
  return name, (value if (eq or value) else None)


def _check(where: str, argv: list[str]) -> list[str]:
  """Problems of one shell command line (empty when it matches the code)."""
  problems = []
  args = argv[1:]
  if argv[0] == "pip" or args[:2] == ["-m", "pip"]:
    extras = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for token in args:
      for extra in re.findall(r"^\.\[([\w,-]+)\]$", token)[:1]:
        problems += [f"{where}: pip extra [{e}] is not in pyproject.toml"
                     for e in extra.split(",") if e not in extras]
    return problems
  if not re.fullmatch(r"python3?", argv[0]):
    return [f"{where}: `{argv[0]}` is neither python nor pip; document it as text or extend "
            "tests/test_docs.py"]
  if args[:1] == ["-m"]:
    module, rest = args[1], args[2:]
    if module in _EXTERNAL_MODULES:
      return []
    if (not module.startswith(("tbgc_jax", "benchmarks."))
        or importlib.util.find_spec(module) is None):
      return [f"{where}: module {module} is neither in the package nor in benchmarks/"]
    entry = ("-m", module)
  else:
    script, rest = args[0], args[1:]
    if not (_ROOT / script).is_file():
      return [f"{where}: script {script} does not exist"]
    entry = (script,)
  if rest and not rest[0].startswith("-"):  # an argparse sub-command
    entry, rest = (*entry, rest[0]), rest[1:]
  accepted = _accepted_flags(entry)
  config = None
  for k, token in enumerate(rest):
    if not token.startswith("--"):
      continue
    name, value = _split_flag(token, rest[k + 1:])
    if name == "config" and value is not None:
      try:
        config = _load_config(value)
      except Exception as e:  # noqa: BLE001 - reported with where it came from
        problems.append(f"{where}: --config {value}: {type(e).__name__}: {e}")
    if name.startswith("config."):
      continue
    if name not in accepted:
      problems.append(f"{where}: `{' '.join(entry)}` has no flag --{name}")
  for token in rest:
    if token.startswith("--config."):
      if config is None:
        problems.append(f"{where}: {token} overrides a config, but no --config file is given")
        continue
      node = config
      for part in token[len("--config."):].split("=")[0].split("."):
        if part not in node:
          problems.append(f"{where}: {token.split('=')[0]}: the config has no field {part!r}")
          break
        node = node[part]
  return problems


def test_every_fence_is_python_bash_or_text():
  bad = [f"{path.relative_to(_ROOT)}:{line}: ```{info}" for path in _PAGES
         for line, info, _ in _fences(path)
         if (info.split() or [""])[0] not in _LANGUAGES or "notest" in info.split()]
  assert not bad, ("fences must be ```python (run), ```bash (checked) or ``` (text); "
                   f"`notest` is not allowed: {bad}")


def test_every_page_has_its_python_blocks_collected():
  # The collection hook in the root conftest.py must see every page with python blocks.
  with_python = {str(p.relative_to(_ROOT)) for p in _PAGES
                 if any(info.split()[:1] == ["python"] for _, info, _ in _fences(p))}
  assert {"README.md", "docs/methods.md", "docs/tbgc.md"} <= with_python
  run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-o", "addopts=", *sorted(with_python)],
                       cwd=_ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(_ROOT)})
  collected = {line.split("::")[0] for line in run.stdout.splitlines() if "::" in line}
  assert collected == with_python, run.stdout[-3000:] + run.stderr[-3000:]


def test_shell_commands_match_the_code():
  commands = _shell_commands()
  assert len(commands) >= 15, commands  # README's quickstart, trainer, data, comparison, ...
  # Entry points' --help in parallel (each a short subprocess), then every command line.
  entries = set()
  for _, argv in commands:
    args = argv[1:]
    if re.fullmatch(r"python3?", argv[0]) and args[:2] != ["-m", "pip"]:
      if args[:1] == ["-m"] and args[1] in _EXTERNAL_MODULES:
        continue
      entry = tuple(args[:2]) if args[:1] == ["-m"] else tuple(args[:1])
      rest = args[len(entry):]
      entries.add((*entry, rest[0]) if rest and not rest[0].startswith("-") else entry)
  def warm(entry):
    try:
      _accepted_flags(entry)
    except Exception:  # noqa: BLE001 - `_check` below reports it with the page and line
      pass

  with ThreadPoolExecutor(2) as pool:
    list(pool.map(warm, sorted(entries)))
  problems = [p for where, argv in commands for p in _check(where, argv)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("body, expected", [
    ("python a.py --x=1 \\\n  --y 2  # comment", [["python", "a.py", "--x=1", "--y", "2"]]),
    ('R=/d\nS="--a=1 \\\n --b=2"\neval python t.py --c $R $S',
     [["python", "t.py", "--c", "/d", "--a=1", "--b=2"]]),
    ("A=1 nice -n 10 python -m m run && pip install -e '.[x]'",
     [["python", "-m", "m", "run"], ["pip", "install", "-e", ".[x]"]]),
])
def test_shell_command_parsing(body, expected):
  assert _commands(body) == expected


def test_the_checker_finds_drift(tmp_path):
  problems = _check("x", ["python", "train.py", "--config", "configs/tiny.py", "--workdir", "w",
                          "--config.grad.no_such_field=1", "--no_such_flag=2"])
  assert any("no_such_field" in p for p in problems), problems
  assert any("--no_such_flag" in p for p in problems), problems
  assert _check("x", ["python", "train.py", "--config", "configs/nope.py"])
  assert _check("x", ["pip", "install", "-e", ".[no_such_extra]"])
  assert _check("x", ["python", "-m", "tbgc_jax.no_such_module"])


def test_every_public_name_is_on_one_api_page():
  # Read statically, as the site's build does: tbgc_jax/__init__.py's re-exports.
  import ast

  tree = ast.parse((_ROOT / "tbgc_jax" / "__init__.py").read_text())
  public = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
            for alias in node.names if not (alias.asname or alias.name).startswith("_")}
  documented: dict[str, list[str]] = {}
  for page in sorted((_ROOT / "docs" / "api").glob("*.md")):
    for name in re.findall(r"^::: tbgc_jax\.(\w+)$", page.read_text(), re.M):
      documented.setdefault(name, []).append(page.name)
  missing = sorted(public - set(documented))
  assert not missing, (f"public names without an API entry: {missing}; add `::: tbgc_jax.NAME` "
                       "to the page of their family in docs/api/ (and its table in "
                       "docs/api/index.md)")
  twice = {n: p for n, p in documented.items() if len(p) > 1}
  assert not twice, f"names documented on several API pages: {twice}"
  assert not set(documented) - public, "API pages name objects tbgc_jax does not export"


def test_docstring_example_sections_are_named_examples():
  # Google style, as the API reference's parser reads it: `Examples:` is a section of code;
  # `Example:` becomes a note whose `>>>` lines render as text (and break the strict build).
  bad = [f"{path.relative_to(_ROOT)}:{k}" for path in sorted((_ROOT / "tbgc_jax").rglob("*.py"))
         for k, line in enumerate(path.read_text().splitlines(), 1)
         if re.fullmatch(r"\s+Example:", line)]
  assert not bad, f"name these docstring sections `Examples:`: {bad}"
