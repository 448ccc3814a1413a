"""What `pycnictl lab apply -f` and `lab delete -f` read (lab/manifests.py): multi-document
YAML, `kind: List`, validation of every document before anything changes, the order objects
are applied in, and the objects as the lab stores them (lab/objects.py)."""

from __future__ import annotations

import os

import pytest

from pycni.lab.manifests import (
    ManifestError,
    identify_all,
    ordered,
    read_documents,
    validate_all,
)
from pycni.lab.model import Lab
from pycni.lab.objects import normalized, pod_object

WORLD = """
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {ns: x}
---
# a comment-only document and an empty one are skipped
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {pod: a, since: 2024-01-01}
spec:
  nodeName: node1
  containers:
  - name: c
    ports: [{name: serve-80-tcp, containerPort: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
"""


def test_multi_document_yaml_reads_every_object_and_names_where_it_came_from():
    docs = read_documents(WORLD, "world.yaml")
    assert [where for where, _ in docs] == [
        "world.yaml, document 1",
        "world.yaml, document 3",
        "world.yaml, document 4",
    ]
    manifests = validate_all(docs)
    assert [m.ref for m in manifests] == [
        "namespace/x",
        "pod/x/a",
        "networkpolicy.networking.k8s.io/x/deny",
    ]
    # A date-looking label value stays the string Kubernetes would see.
    assert manifests[1].obj["metadata"]["labels"]["since"] == "2024-01-01"


def test_a_list_is_unpacked_and_json_is_yaml():
    text = (
        '{"apiVersion": "v1", "kind": "List", "items": ['
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}},'
        '{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "namespace": "y"}}]}'
    )
    docs = read_documents(text, "-")
    assert [w for w, _ in docs] == ["-, document 1, item 1", "-, document 1, item 2"]
    assert [m.ref for m in validate_all(docs)] == ["namespace/y", "pod/y/b"]
    with pytest.raises(ManifestError, match="a List needs items"):
        read_documents("kind: List\n", "-")


def test_yaml_that_does_not_parse_is_refused():
    with pytest.raises(ManifestError, match="^f.yaml: not YAML"):
        read_documents("kind: Pod\n  metadata: [\n", "f.yaml")


def test_every_invalid_document_is_named_at_once():
    text = """
apiVersion: v1
kind: Service
metadata: {name: s}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {a: 1}}
---
kind: Pod
metadata: {name: d}
---
apiVersion: v1
kind: Pod
metadata: {name: d}
---
apiVersion: extensions/v1beta1
kind: NetworkPolicy
metadata: {name: p}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: q}
spec: {podSelector: {}, ingress: [{from: [{}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: h}
spec: {hostNetwork: true}
---
apiVersion: v1
kind: Pod
metadata: {}
"""
    with pytest.raises(ManifestError) as caught:
        validate_all(read_documents(text, "f"))
    lines = str(caught.value).splitlines()
    assert lines == [
        "f, document 1: kind 'Service' is not one of Namespace, Pod, NetworkPolicy",
        "f, document 2: pod/x/c: metadata.labels: 'a': 1 is not a string pair",
        "f, document 3: pod/default/d: no apiVersion",
        "f, document 4: pod/default/d is given twice (first in f, document 3)",
        "f, document 5: networkpolicy.networking.k8s.io/default/p: apiVersion "
        "'extensions/v1beta1' is not 'networking.k8s.io/v1'",
        "f, document 6: networkpolicy.networking.k8s.io/default/q: spec.ingress[0].from[0]: "
        "must specify a peer "
        "(podSelector, namespaceSelector or ipBlock)",
        "f, document 7: pod/default/h: spec.hostNetwork: the lab networks pods; a host-network "
        "pod is its node",
        "f, document 8: a Pod needs metadata.name (a non-empty name without '/')",
    ]


def test_delete_needs_only_what_names_the_objects():
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, labels: {a: 1}}\n"
    assert [m.ref for m in identify_all(read_documents(text, "f"))] == ["pod/default/c"]
    with pytest.raises(ManifestError, match="is not one of"):
        identify_all(read_documents("kind: Service\nmetadata: {name: s}\n", "f"))


def test_namespaces_come_first_then_policies_then_pods_and_deleting_reverses_it():
    text = """
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
"""
    manifests = validate_all(read_documents(text, "f"))
    assert [m.name for m in ordered(manifests)] == ["x", "p", "a", "b"]
    assert [m.name for m in ordered(manifests, deleting=True)] == ["a", "b", "p", "x"]


def test_objects_are_stored_as_the_api_server_and_kubelet_would_have_them():
    ns = normalized({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    assert ns["metadata"] == {"name": "x", "labels": {"kubernetes.io/metadata.name": "x"}}
    policy = normalized({"kind": "NetworkPolicy", "metadata": {"name": "p", "labels": {}}})
    assert policy["metadata"] == {"name": "p", "namespace": "default"}
    lab = Lab.plan("mtest", "/nonexistent", 1, 0)
    node = lab.nodes[0]
    pod = lab.plan_pod(node, "x", "a")
    assert (pod.netns, pod.k8s_name, pod.namespace) == ("mtest-n1pod1", "a", "x")
    applied = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Pending"},
    }
    before = pod_object(applied, node, pod)
    assert before["spec"] == {"containers": [{"name": "c"}], "nodeName": "node1"}
    assert before["metadata"]["uid"] == pod.uid and "status" not in before
    pod.address = "10.244.0.5/24"
    after = pod_object(applied, node, pod)
    assert after["status"]["podIPs"] == [{"ip": "10.244.0.5"}]
    assert after["status"]["phase"] == "Running"
    assert applied["status"] == {"phase": "Pending"}  # the applied document is left alone
    # The next pod on the node takes the next free netns number.
    assert lab.plan_pod(node, avoid={"mtest-n1pod2"}).netns == "mtest-n1pod3"


def test_the_documented_example_is_valid():
    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "docs", "examples", "lab-netpol.yaml"
    )
    with open(path) as f:
        manifests = ordered(validate_all(read_documents(f.read(), path)))
    assert [m.ref for m in manifests] == [
        "namespace/shop",
        "namespace/tools",
        "networkpolicy.networking.k8s.io/shop/db-from-web",
        "networkpolicy.networking.k8s.io/shop/web-from-pods",
        "pod/shop/web",
        "pod/shop/db",
        "pod/tools/debug",
    ]
