"""Versions an operator can see: pycnictl --version, the agent's health and /metrics, and
`pycnictl status` name the version and the commit (from $PYCNI_COMMIT, else a checkout's git)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pycni import __version__, version
from pycni.agent import metrics
from pycni.agent.server import Agent
from pycni.doctor import status

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(version.COMMIT_ENV, raising=False)
    version.commit.cache_clear()
    yield
    version.commit.cache_clear()


def test_the_version_is_the_package_metadata():
    assert version.version() == __version__  # pyproject.toml and the package agree


def test_the_stamped_commit_comes_first(monkeypatch):
    monkeypatch.setenv(version.COMMIT_ENV, " 0123456789ab ")
    assert version.commit() == "0123456789ab"
    assert version.describe() == f"{__version__} (commit 0123456789ab)"


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_a_checkout_names_its_commit(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "f").write_text("a")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "one")
    git("-c", "user.name=t", "-c", "user.email=t@e", "tag", "v9")  # tags are never named
    head = git("rev-parse", "--short=12", "HEAD")
    assert version._git_commit(str(tmp_path)) == head


def test_no_checkout_no_commit(tmp_path):
    (tmp_path / "sub").mkdir()
    assert version._git_commit(str(tmp_path / "sub")) == ""


def test_pycnictl_version_prints_it():
    env = {**os.environ, version.COMMIT_ENV: "feedc0ffee42", "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"pycnictl {__version__} (commit feedc0ffee42)\n"


def test_the_agent_reports_it_in_health_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv(version.COMMIT_ENV, "abcdef012345")
    agent = Agent(str(tmp_path / "agent.sock"))
    health = agent.health()
    assert (health["version"], health["commit"]) == (__version__, "abcdef012345")
    text = metrics.generate_latest(metrics.build_registry(agent)).decode()
    info = {
        (s.labels["version"], s.labels["commit"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "pycni_build_info"
        for s in family.samples
    }
    assert info == {(__version__, "abcdef012345"): 1.0}


def _report(agent_version: str, agent_commit: str | None, mine: dict) -> dict:
    health = {"status": "ok", "pid": 1, "version": agent_version, "uptime": 1, "inflight": 0}
    if agent_commit is not None:
        health["commit"] = agent_commit
    return {
        "pycnictl": mine,
        "agent": {"running": True, "health": health, "socket": "/s", "namedBy": None},
        "stores": [],
        "networks": [],
        "masquerade": {"backend": "nft", "expected": False, "present": None},
        "problems": [],
        "healthy": True,
    }


def test_status_names_the_agents_build_and_a_mismatch():
    mine = {"version": "0.2.0", "commit": "bbbb"}
    same = status.render(_report("0.2.0", "bbbb", mine))
    assert "version 0.2.0 (commit bbbb)," in same and "not the agent's" not in same
    older = status.render(_report("0.1.0", None, mine))  # an agent from before commits
    assert "version 0.1.0," in older
    assert "this pycnictl is version 0.2.0 (commit bbbb): not the agent's" in older
