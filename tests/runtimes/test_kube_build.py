"""What `./dev kube` builds: the binaries report the pinned versions, and every image archive a
lab node needs imports into a throwaway containerd under exactly its name and runs there
(agnhost's netexec answering over UDP to a `/bin/sh -c '... | nc -u'` pipeline, as the e2e
specs do). Skipped when the kube cache is empty, failed then under ./dev test
(PYCNI_REQUIRE_PEERS=1)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time

import pytest

from conftest import Namespaces, have, peer_params, unique
from pycni.harness import kube, peers
from pycni.harness.containerd import Containerd

pytestmark = [pytest.mark.kube]


def _need_kube() -> None:
    if kube.built():
        return
    why = "the Kubernetes binaries are not built: run ./dev kube"
    if peers.required():
        pytest.fail(f"{why} (PYCNI_REQUIRE_PEERS=1)", pytrace=False)
    pytest.skip(why)


def _images() -> list[kube.ImageArchive]:
    _need_kube()
    try:
        return kube.images(pycni=False)
    except kube.KubeNotBuilt as exc:
        if peers.required():
            pytest.fail(f"{exc} (PYCNI_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(str(exc))


def run(*argv: str, timeout: float = 60) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.returncode} {proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def test_kubectl_reports_the_pinned_version():
    _need_kube()
    client = json.loads(run(kube.binary("kubectl"), "version", "--client", "-o", "json"))
    version = client["clientVersion"]
    assert version["gitVersion"] == kube.VERSION
    assert (version["major"], version["minor"]) == tuple(kube.VERSION[1:].split(".")[:2])


@pytest.mark.parametrize(
    "name", ["kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"]
)
def test_component_reports_the_pinned_version(name):
    _need_kube()
    assert run(kube.binary(name), "--version").split() == ["Kubernetes", kube.VERSION]


def test_etcd_is_one_the_apiserver_supports():
    _need_kube()
    out = run(kube.binary("etcd"), "--version")
    found = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    assert found, out
    assert tuple(map(int, found.groups())) >= (3, 5, 13)  # older: watch-cache errors (reference)
    assert f"v{'.'.join(found.groups())}" == peers.pins()["etcd"].version
    assert "etcdctl version:" in run(kube.binary("etcdctl"), "version")


def test_coredns_crictl_and_e2e_are_the_pinned_ones():
    _need_kube()
    assert f"CoreDNS-{kube.COREDNS_VERSION.removeprefix('v')}" in run(
        kube.binary("coredns"), "-version"
    )
    # crictl built by `go install` says "version unknown" (its version is set by ldflags).
    assert "crictl version" in run(kube.binary("crictl"), "--version")
    assert os.access(kube.binary("e2e.test"), os.X_OK)


def test_image_names_are_those_the_pinned_e2e_suite_asks_for():
    """e2e.test --list-images prints the names of test/utils/image/manifest.go."""
    _need_kube()
    listed = set(run(kube.binary("e2e.test"), "--list-images", timeout=120).split())
    for name in (kube.AGNHOST_IMAGE, kube.BUSYBOX_IMAGE, kube.GLIBC_DNS_IMAGE, kube.PAUSE_IMAGE):
        assert name in listed


def test_missing_binary_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PYCNI_CACHE", str(tmp_path))
    with pytest.raises(kube.KubeNotBuilt, match=r"\./dev kube"):
        kube.binary("kubectl")
    with pytest.raises(kube.KubeNotBuilt, match=r"\./dev kube"):
        kube.images(str(tmp_path), pycni=False)


# ---- the images, in a throwaway containerd -------------------------------------------------


@contextlib.contextmanager
def throwaway_containerd(root: str, peer):
    """A private containerd in a netns of our own (lo up), removed whatever happens. Its CNI
    config is a lone loopback: CRI must see one to call itself ready; no pod is made."""
    spaces = Namespaces()
    containerd = None
    problems: list[str] = []
    try:
        ns = spaces.make("kubeimg")
        spaces.exec(ns, "ip", "link", "set", "lo", "up")
        conf_dir = os.path.join(root, "net.d")
        os.makedirs(conf_dir)
        with open(os.path.join(conf_dir, "10-lo.conflist"), "w") as f:
            json.dump(
                {"cniVersion": "1.0.0", "name": unique("lo"), "plugins": [{"type": "loopback"}]},
                f,
            )
        containerd = Containerd.for_peer(
            peer,
            os.path.join(root, "containerd"),
            ns,
            "/usr/lib/cni",
            conf_dir,
            sandbox_image=kube.PAUSE_IMAGE,
        )
        containerd.start()
        yield containerd
    finally:
        if containerd is not None:
            problems = containerd.cleanup()
        spaces.cleanup()
    assert not problems, f"cleanup of the throwaway containerd: {problems}"


@pytest.fixture(scope="module", params=peer_params("containerd"))
def node(request, tmp_path_factory):
    if os.geteuid() != 0 or not have("runc"):
        pytest.skip("needs root, network namespaces and runc")
    archives = _images()
    with throwaway_containerd(str(tmp_path_factory.mktemp("kubeimg")), request.param) as c:
        for archive in archives:
            c.import_image(archive.path)
        yield c, archives


def ctr_run(c: Containerd, image: str, *argv: str, detach: bool = False, timeout: float = 60):
    """A container of `image` in the containerd's netns (--net-host), its cgroup under the
    instance's parent and runc's state under its root, so cleanup() finds both."""
    cid = unique("c")
    flags = ["--net-host", "--cgroup", f"{c.cgroup_parent}/{cid}", "--runc-root", c.runc_root]
    flags += ["--detach"] if detach else ["--rm"]
    return cid, c.ctr("run", *flags, image, cid, *argv, timeout=timeout)


@pytest.mark.netns
def test_every_image_imports_under_its_exact_name(node):
    c, archives = node
    names = set(c.ctr("images", "list", "--quiet").split())
    assert {a.name for a in archives} <= names
    assert {
        kube.PAUSE_IMAGE,
        kube.AGNHOST_IMAGE,
        kube.BUSYBOX_IMAGE,
        kube.GLIBC_DNS_IMAGE,
        kube.COREDNS_IMAGE,
    } <= names


@pytest.mark.netns
def test_agnhost_netexec_answers_a_shell_pipeline_over_udp(node):
    c, _ = node
    http, udp = 18080 + os.getpid() % 1000, 19080 + os.getpid() % 1000
    cid, _ = ctr_run(
        c,
        kube.AGNHOST_IMAGE,
        "/agnhost",
        "netexec",
        f"--http-port={http}",
        f"--udp-port={udp}",
        detach=True,
    )
    try:
        script = f"echo 'echo hi' | nc -u -w1 127.0.0.1 {udp}"
        deadline = time.monotonic() + 30
        out = ""
        while time.monotonic() < deadline and out.strip() != "hi":
            _, out = ctr_run(c, kube.AGNHOST_IMAGE, "/bin/sh", "-c", script)
        assert out.strip() == "hi"
        # The Service specs' HTTP checks: wget (busybox's in upstream's image) and curl.
        url = f"http://127.0.0.1:{http}/echo?msg=hi"
        script = f"wget -T 1 -q -O - {url}; echo; curl -s {url}"
        _, out = ctr_run(c, kube.AGNHOST_IMAGE, "/bin/sh", "-c", script)
        assert out.split() == ["hi", "hi"]
    finally:
        with contextlib.suppress(Exception):
            c.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
            time.sleep(0.5)
            c.ctr("tasks", "delete", "--force", cid)
        with contextlib.suppress(Exception):
            c.ctr("containers", "delete", cid)


# What the e2e specs run inside agnhost pods (wget and conntrack for the Service specs) and
# glibc-dns-testing pods (dig, and coredns for the DNS specs that serve their own zone).
TOOLS = {
    kube.AGNHOST_IMAGE: "wget curl nc dig nslookup conntrack ip ss iperf socat ping hostname seq",
    kube.GLIBC_DNS_IMAGE: "dig nslookup hostname /coredns",
}


@pytest.mark.netns
@pytest.mark.parametrize("image", sorted(TOOLS))
def test_e2e_images_have_the_tools_the_specs_run(node, image):
    c, _ = node
    script = f"for t in {TOOLS[image]}; do command -v $t >/dev/null || echo missing $t; done"
    _, out = ctr_run(c, image, "/bin/sh", "-c", script)
    assert out.strip() == ""


@pytest.mark.netns
def test_coredns_image_runs_the_built_coredns(node):
    c, _ = node
    _, out = ctr_run(c, kube.COREDNS_IMAGE, "/coredns", "-version")
    assert f"CoreDNS-{kube.COREDNS_VERSION.removeprefix('v')}" in out


@pytest.mark.netns
def test_busybox_has_its_applets_and_pause_stops_on_sigterm(node):
    c, _ = node
    _, out = ctr_run(c, kube.BUSYBOX_IMAGE, "sh", "-c", "echo hi | nc -h 2>&1 | head -1; id -u")
    assert out.split()[-1] == "0"
    cid, _ = ctr_run(c, kube.PAUSE_IMAGE, detach=True)
    try:
        c.ctr("tasks", "kill", "--signal", "SIGTERM", cid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "STOPPED" in c.ctr("tasks", "list"):
                break
            time.sleep(0.1)
        assert "STOPPED" in c.ctr("tasks", "list")
    finally:
        with contextlib.suppress(Exception):
            c.ctr("tasks", "delete", "--force", cid)
        with contextlib.suppress(Exception):
            c.ctr("containers", "delete", cid)
