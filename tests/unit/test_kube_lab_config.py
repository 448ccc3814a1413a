"""What `lab up --kubernetes` hands the cluster, IPv4 alone and dual stack (`--ipv6`): the
ranges of the apiserver and the controller manager, and pycni's ConfigMap as an operator
edits it. The running cluster is tests/kube's."""

from __future__ import annotations

import pytest
import yaml

from pycni.lab.kube import addons
from pycni.lab.kube import controlplane as cp
from pycni.lab.model import Lab


def _lab(tmp_path, ipv6: bool) -> Lab:
    lab = Lab.plan("kc", str(tmp_path), 2, 0, backend="host-gw", ipv6=ipv6)
    lab.kubernetes = True
    return lab


@pytest.mark.parametrize("ipv6", [False, True])
def test_ranges_are_ipv4_first_and_ipv6_only_with_dual_stack(tmp_path, ipv6):
    lab = _lab(tmp_path, ipv6)
    assert cp.service_cidrs(lab)[0] == cp.SERVICE_CIDR
    assert cp.cluster_cidrs(lab)[0] == lab.network
    if ipv6:
        assert cp.service_cidrs(lab)[1] == cp.SERVICE_CIDR6
        assert cp.cluster_cidrs(lab)[1] == lab.network6
        assert [n.lan6_ip for n in lab.nodes] == ["2001:db8:1::1", "2001:db8:1::2"]
    else:
        assert len(cp.service_cidrs(lab)) == len(cp.cluster_cidrs(lab)) == 1


@pytest.mark.parametrize("ipv6", [False, True])
def test_the_configmap_names_both_cluster_cidrs_only_with_dual_stack(tmp_path, ipv6):
    lab = _lab(tmp_path, ipv6)
    docs = list(yaml.safe_load_all(addons.pycni_manifest(lab)))
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["cluster-cidr"] == lab.network
    assert data["cluster-cidr-ipv6"] == (lab.network6 if ipv6 else "")
    assert data["backend"] == "host-gw"
