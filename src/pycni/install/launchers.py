"""The files `pycnictl install` writes (the seed system's manual set-up, done right): the
launchers runtimes exec, and how a file is written only when it is pycni's.

The executable is a small launcher rather than a console-script wrapper. Two kinds:
- the default one runs this interpreter with -IS (no site import, no user paths; measured as
  the cheapest start-up) and puts exactly pycni's and its dependencies' directories on
  sys.path: it forwards to the agent or, without one, does the work in-process;
- the standalone one (--standalone) is for hosts without pycni's packages, where the pycni
  DaemonSet copies it: one self-contained file for the system python3, generated from
  pycni/shim.py, that only forwards to the agent and answers CNI error 11 when none listens.
--native compiles pycni/native/shim.c instead (pycni.install.native): the same forwarding without
Python's start-up, and for hosts without python3; without --standalone it execs the default
launcher, written hidden beside it, when no agent listens.

All carry a marker (MARKER, or the native one), so uninstall removes only files pycni wrote.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import NoReturn

from .. import shim
from ..node_config import atomic_write

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
PLUGIN_NAME = "pycni"  # the config's "type": the executable's file name in the bin dir
MARKER = "# pycni CNI plugin launcher, written by `pycnictl install`."
MARKER_BYTES = 512  # the marker stands within the first lines of every launcher
STANDALONE_PYTHON = "/usr/bin/python3"
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")  # what runtimes read in the conf dir

LAUNCHER = """#!{python} -IS
{marker} Runtimes exec this file.
import sys
sys.path[:0] = {paths!r}
from pycni.shim import main
main()
"""

STANDALONE_HEAD = """#!{python} -IS
{marker} Runtimes exec this file.
# Standalone: Python's standard library only (python3 3.6 or later), for nodes without pycni's
# packages. It forwards every CNI call to the node's pycni agent (`pycnictl agent`, e.g. the
# pycni DaemonSet's pod) and cannot do the work itself: without an agent it answers CNI error
# 11 ("try again later"). Generated from pycni {version}'s pycni/shim.py; do not edit.
"""

# Replaces the shim's main(), whose fallback (the core, in-process) is not in this file.
STANDALONE_MAIN = """

def main() -> None:
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
    path = socket_path(stdin)
    reply = call_agent(path, stdin) if path else None
    if reply is None:
        where = f"at {path}" if path else '(the config sets "agentSocket": "")'
        reply = 1, try_again(stdin, f"no pycni agent is listening {where}: this node's pycni "
                             "executable is the standalone launcher, which needs the node "
                             "agent (is the pycni pod running on this node?)")
    status, out = reply
    if out:
        os.write(1, out)
    sys.exit(status)


main()
"""


def launcher_text() -> str:
    import pyroute2

    import pycni

    paths = []
    for mod in (pycni, pyroute2):
        root = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
        if root not in paths:
            paths.append(root)
    return LAUNCHER.format(python=sys.executable, marker=MARKER, paths=paths)


def standalone_text(python: str = STANDALONE_PYTHON) -> str:
    """The self-contained launcher: shim.py as it is, less its docstring and main(), with
    what it imports from pycni inlined as literals (constants, and a namespace class for a
    module such as cni.versions), and a main() without the in-process fallback."""
    import ast
    import inspect

    from .. import __version__

    source = inspect.getsource(shim)
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()  # 0-based line numbers left out
    inlined: list[str] = []
    for top in tree.body:
        is_docstring = isinstance(top, ast.Expr) and isinstance(top.value, ast.Constant)
        if is_docstring or (isinstance(top, ast.FunctionDef) and top.name == "main"):
            drop.update(range(top.lineno - 1, top.end_lineno))
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.level:
                drop.update(range(node.lineno - 1, node.end_lineno))
                if node is not top and not lines[node.end_lineno].strip():
                    drop.add(node.end_lineno)  # and the blank line after it in a function
                inlined.extend(_inline(node, tree))
    # The inlined definitions stand right after the shim's own imports.
    after_imports = max(n.end_lineno for n in tree.body if isinstance(n, ast.Import))
    kept = [line for i, line in enumerate(lines[:after_imports]) if i not in drop]
    kept += ["\n", *inlined]
    kept += [line for i, line in enumerate(lines) if i >= after_imports and i not in drop]
    body = re.sub(r"\n{4,}", "\n\n\n", "".join(kept)).strip("\n")
    head = STANDALONE_HEAD.format(python=python, marker=MARKER, version=__version__)
    return head + body + "\n" + STANDALONE_MAIN


def _inline(node, tree) -> list[str]:
    """`from .x import a` as literal definitions: `a = <value>`, or for a module, a class
    holding the attributes the shim reads from it."""
    import ast
    import importlib
    import types

    module = importlib.import_module("pycni" + ("." + node.module if node.module else ""))
    out = []
    for alias in node.names:
        name = alias.asname or alias.name
        try:
            value = getattr(module, alias.name)
        except AttributeError:  # a submodule nobody imported yet
            value = importlib.import_module(f"{module.__name__}.{alias.name}")
        if isinstance(value, types.ModuleType):
            used = sorted(
                {
                    n.attr
                    for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == name
                }
            )
            attrs = "".join(f"    {a} = {_literal(getattr(value, a), a)}\n" for a in used)
            out.append(
                f"\n\nclass {name}:  # pycni.{value.__name__.removeprefix('pycni.')}\n{attrs}"
            )
        else:
            out.append(f"{name} = {_literal(value, name)}\n")
    return out


def _literal(value, name: str) -> str:
    import ast

    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):  # a function, an object: no literal
        same = False
    if not same:
        raise RuntimeError(
            f"the shim imports {name} from pycni, which is not a literal: the "
            "standalone launcher cannot carry it"
        )
    return text


def is_pycni_launcher(path: str) -> bool:
    """Whether `path` is a file `pycnictl install` wrote (never touch anything else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(MARKER_BYTES)
    except OSError:
        return False
    if MARKER.encode() in head:
        return True
    from ..native.build import marker_of

    return head.startswith(b"\x7fELF") and marker_of(path) is not None


def write_launcher(path: str, standalone: bool = False) -> str:
    atomic_write(path, standalone_text() if standalone else launcher_text(), 0o755)
    return path


def is_pycni_conflist(path: str) -> bool:
    """Whether the config at `path` is one of pycni's (a plugin of type pycni)."""
    try:
        with open(path) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return False
    plugins = conf.get("plugins") if isinstance(conf, dict) else None
    return isinstance(plugins, list) and any(
        isinstance(p, dict) and p.get("type") == PLUGIN_NAME for p in plugins
    )


def write_owned(path: str, text: str, mode: int, force: bool, ours, what: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text and os.stat(path).st_mode & 0o777 == mode:
                print(f"{path} is up to date")
                return
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):
        pass  # unreadable or binary: decided below
    if os.path.lexists(path) and not force and not ours(path):
        refuse(
            f"{path} exists and was not written by pycnictl install; remove it or give "
            f"--force to replace it"
        )
    try:
        atomic_write(path, text, mode)
    except OSError as exc:
        refuse(f"cannot write the {what} {path}: {exc.strerror or exc}")
    print(f"installed {path}")


def configs_before(conf_dir: str, name: str) -> list[str]:
    """Other network configs in `conf_dir` that runtimes would pick before `name`."""
    try:
        entries = os.listdir(conf_dir)
    except OSError:
        return []
    return sorted(
        e for e in entries if e < name and e.endswith(CONFIG_SUFFIXES) and not e.startswith(".")
    )


def refuse(msg: str) -> NoReturn:
    raise SystemExit(f"pycnictl install: {msg}")
