"""`pycnictl cleanup` removes the masquerade rules; the next ADD puts them back."""

import os
import sys

import pytest

pytestmark = pytest.mark.netns


def tables(node) -> str:
    return node.exec("nft", "list", "tables").stdout


def test_cleanup_removes_rules_and_add_restores_them(node):
    conf = node.conf(ipMasq=True)
    node.add(node.pod(), "c1", conf)
    assert "inet pycni" in tables(node)
    pycnictl = os.path.join(os.path.dirname(sys.executable), "pycnictl")
    node.exec(pycnictl, "cleanup", "--data-dir", conf["dataDir"])
    assert "inet pycni" not in tables(node)
    node.add(node.pod(), "c2", conf)
    assert "inet pycni" in tables(node)
    for cid in ("c1", "c2"):
        assert node.run("DEL", conf, container_id=cid).rc == 0
    assert "inet pycni" not in tables(node)
