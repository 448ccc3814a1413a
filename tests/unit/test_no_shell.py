"""No input ever reaches a shell: pycni runs programs (ip, nft, etcd...) only with argv lists,
never through /bin/sh, so a container ID, interface name or config value cannot become a
command. Checked on the source itself, so new code is held to it too."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "pycni"
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
# Functions that always go through a shell.
SHELL_FUNCTIONS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}


def sources() -> list[pathlib.Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50, files  # the walk found the package
    return files


def dotted(node: ast.AST) -> tuple[str, ...]:
    """("subprocess", "run") for subprocess.run; () for anything that is not a plain name."""
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return (*inner, node.attr) if inner else ()
    return ()


def is_string_command(node: ast.AST) -> bool:
    """A command given as one string (what a shell would parse), not as an argv list."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str | bytes)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return is_string_command(node.left) or is_string_command(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join") and is_string_command(node.func.value)
    return False


def problems(source: str, label: str) -> list[str]:
    tree = ast.parse(source, label)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{label}:{node.lineno}"
        for kw in node.keywords:
            if kw.arg == "shell" and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is False
            ):
                found.append(f"{where}: shell={ast.unparse(kw.value)}")
        name = dotted(node.func)
        if name[-2:] in SHELL_FUNCTIONS:
            found.append(f"{where}: {'.'.join(name)} runs a shell")
        if len(name) >= 2 and name[-2] == "subprocess" and name[-1] in SUBPROCESS_CALLS:
            command = (
                node.args[0]
                if node.args
                else next((kw.value for kw in node.keywords if kw.arg == "args"), None)
            )
            if command is not None and is_string_command(command):
                found.append(f"{where}: {'.'.join(name)}({ast.unparse(command)}) is a string")
    return found


def test_no_shell_anywhere_in_the_product():
    found = [
        p
        for path in sources()
        for p in problems(path.read_text(), str(path.relative_to(SRC.parent)))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "subprocess.run('ip link', shell=True)",
        "subprocess.run(cmd, shell=flag)",
        "os.system('ip link del ' + name)",
        "subprocess.check_output(f'ip netns exec {ns} true')",
        "subprocess.Popen('nft -f %s' % path)",
        "subprocess.run(args=' '.join(argv))",
        "os.popen('ls')",
    ],
)
def test_the_check_catches_shell_use(code):
    assert problems(f"import os, subprocess\n{code}\n", "probe")


@pytest.mark.parametrize(
    "code",
    [
        "subprocess.run(['ip', 'link', 'del', name], check=True)",
        "subprocess.run(argv, shell=False)",
        "subprocess.Popen(['ip', 'netns', 'exec', ns, *argv])",
    ],
)
def test_argv_lists_pass(code):
    assert not problems(f"import subprocess\n{code}\n", "probe")
