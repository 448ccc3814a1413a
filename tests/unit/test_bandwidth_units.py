"""Traffic shaping without root: parsing runtimeConfig.bandwidth and the static keys, defaults,
refusals, the tbf numbers the kernel is given, the ifb's name, and the conflist capability."""

from __future__ import annotations

import pytest

from pycni.cni import env as cnienv
from pycni.cni import netconf
from pycni.cni.errors import INVALID_NETWORK_CONFIG, CniError
from pycni.cni.netconf import Bandwidth, Shaping
from pycni.dataplane import bandwidth, names
from pycni.node_config import node_conflist

REQ = cnienv.Request("ADD", "c1", "/run/netns/p", "eth0")
BASE = {"cniVersion": "1.1.0", "name": "net", "type": "pycni", "subnet": "10.244.1.0/24"}
M = 1_000_000


def parse(**top) -> netconf.NetConf:
    return netconf.parse({**BASE, **top}, REQ)


def shaping(runtime: dict | None = None, **top) -> Bandwidth | None:
    if runtime is not None:
        top["runtimeConfig"] = {"bandwidth": runtime}
    return parse(**top).bandwidth


def refused(runtime: dict | None = None, **top) -> str:
    with pytest.raises(CniError) as info:
        shaping(runtime, **top)
    assert info.value.code == INVALID_NETWORK_CONFIG
    return info.value.msg


# --------------------------------------------------------------------------- parsing


def test_no_bandwidth_means_no_shaping():
    assert parse().bandwidth is None
    assert shaping({}) is None
    assert shaping(None, runtimeConfig={"ips": ["10.244.1.5"]}) is None


def test_runtime_config_both_directions():
    got = shaping(
        {
            "ingressRate": 10 * M,
            "ingressBurst": 80_000,
            "egressRate": 20 * M,
            "egressBurst": 160_000,
        }
    )
    assert got == Bandwidth(ingress=Shaping(10 * M, 80_000), egress=Shaping(20 * M, 160_000))


def test_containerd_capitalised_keys_and_its_zeros_for_the_unset_direction():
    # containerd (go-cni) marshals its BandWidth struct without JSON tags, all four keys,
    # with 2^32-1 as the burst of an annotated direction and zeros for the other.
    got = shaping(
        {"IngressRate": 5 * M, "IngressBurst": 2**32 - 1, "EgressRate": 0, "EgressBurst": 0}
    )
    assert got == Bandwidth(ingress=Shaping(5 * M, 2**32 - 1), egress=None)


def test_both_spellings_agreeing_are_fine_disagreeing_refused():
    assert shaping({"ingressRate": M, "IngressRate": M}).ingress.rate == M
    msg = refused({"ingressRate": M, "IngressRate": 2 * M})
    assert "ingressRate" in msg and "IngressRate" in msg and "twice" in msg


def test_static_keys_at_the_top_level():
    got = shaping(None, egressRate=3 * M, egressBurst=30_000)
    assert got == Bandwidth(egress=Shaping(3 * M, 30_000))


def test_runtime_config_wins_per_direction():
    got = shaping(
        {"ingressRate": 7 * M, "ingressBurst": 70_000},
        ingressRate=1 * M,
        ingressBurst=10_000,
        egressRate=2 * M,
        egressBurst=20_000,
    )
    assert got == Bandwidth(ingress=Shaping(7 * M, 70_000), egress=Shaping(2 * M, 20_000))


def test_rate_without_burst_gets_100ms_of_the_rate_at_least_64k():
    assert shaping({"egressRate": 100 * M}).egress == Shaping(100 * M, 10 * M)
    assert shaping({"egressRate": M}).egress == Shaping(M, 64 * 1024 * 8)
    assert shaping({"ingressRate": 100 * M, "ingressBurst": 0}).ingress.burst == 10 * M


def test_null_is_absent():
    assert shaping({"ingressRate": None, "ingressBurst": None}) is None


def test_burst_without_rate_is_refused():
    msg = refused({"egressBurst": 10_000})
    assert "runtimeConfig.bandwidth.egressBurst" in msg and "egressRate" in msg
    assert "ingressBurst" in refused(None, ingressBurst=10_000, ingressRate=0)


@pytest.mark.parametrize("value", [-1, 1.5, "10M", True, [1]])
def test_rate_and_burst_must_be_non_negative_integers(value):
    msg = refused({"ingressRate": value, "ingressBurst": 10_000})
    assert "runtimeConfig.bandwidth.ingressRate" in msg and "integer" in msg
    msg = refused({"egressRate": M, "EgressBurst": value})
    assert "runtimeConfig.bandwidth.EgressBurst" in msg


def test_limits():
    top = netconf.MAX_RATE_BITS
    assert shaping({"ingressRate": top, "ingressBurst": 8}).ingress == Shaping(top, 8)
    assert "34359738360" in refused({"ingressRate": top + 1, "ingressBurst": 10_000})
    assert "outside" in refused({"ingressRate": 4 * 10**12})  # 4 Tbit/s
    assert "ingressRate" in refused({"ingressRate": 7})
    assert "egressBurst" in refused({"egressRate": M, "egressBurst": 7})
    burst = netconf.MAX_BURST_BITS
    assert shaping({"egressRate": M, "egressBurst": burst}).egress.burst == burst
    assert "2^32-1 bytes" in refused({"egressRate": M, "egressBurst": burst + 1})


def test_bandwidth_must_be_an_object_and_subnet_filters_are_refused():
    with pytest.raises(CniError) as info:
        parse(runtimeConfig={"bandwidth": [1, 2]})
    assert info.value.code == INVALID_NETWORK_CONFIG
    assert "runtimeConfig.bandwidth" in info.value.msg
    msg = refused({"ingressRate": M, "unshapedSubnets": ["10.0.0.0/8"]})
    assert "unshapedSubnets" in msg and "not supported" in msg
    # An empty list asks for nothing pycni lacks.
    assert shaping({"ingressRate": M, "shapedSubnets": []}).ingress.rate == M


def test_delete_proceeds_on_a_bad_bandwidth_config():
    conf = {**BASE, "runtimeConfig": {"bandwidth": {"ingressBurst": 5}}}
    nc = netconf.parse_for_delete(conf, cnienv.Request("DEL", "c1", "", "eth0"))
    assert nc.name == "net" and "ingressBurst" in nc.config_problem


# --------------------------------------------------------------------------- tbf numbers


def test_tbf_in_bytes_with_a_25ms_queue():
    tbf = bandwidth.tbf_for(Shaping(rate=10 * M, burst=80_000))
    assert tbf == bandwidth.Tbf(rate=1_250_000, burst=10_000, limit=31_250 + 10_000)


def test_tbf_bucket_cut_to_what_the_kernel_keeps():
    # containerd's "no burst": 2^32-1 bits at 10 Mbit/s would be 429 s; the kernel keeps 4.29.
    tbf = bandwidth.tbf_for(Shaping(rate=10 * M, burst=2**32 - 1))
    assert tbf.burst == int(1_250_000 * bandwidth.MAX_BURST_SECONDS)
    # The queue holds at most one 64 KiB burst beyond the 25 ms.
    assert tbf.limit == 31_250 + 64 * 1024


def test_tbf_fits_the_kernels_32_bit_fields_at_the_limits():
    for rate in (netconf.MIN_BANDWIDTH_BITS, M, netconf.MAX_RATE_BITS):
        for burst in (netconf.MIN_BANDWIDTH_BITS, 2**32 - 1, netconf.MAX_BURST_BITS):
            tbf = bandwidth.tbf_for(Shaping(rate, burst))
            assert 1 <= tbf.rate < 2**32 and 1 <= tbf.burst < 2**32 and tbf.limit < 2**32
            # pyroute2 sends the bucket as time in 1/15.625 us ticks, a 32-bit field too;
            # the kernel keeps it as nanoseconds in 32 bits.
            assert tbf.burst / tbf.rate * 1e9 < 2**32


# --------------------------------------------------------------------------- names


def test_ifb_name_is_deterministic_short_and_pairs_with_the_veth():
    ifb = names.ifb_name("net", "c1", "eth0")
    veth = names.host_veth_name("net", "c1", "eth0")
    assert ifb == names.ifb_name("net", "c1", "eth0")
    assert len(ifb) <= 15 and ifb.startswith("ifb") and ifb[3:] == veth[4:]
    assert ifb != names.ifb_name("net", "c1", "eth1")
    assert ifb != names.ifb_name("net", "c2", "eth0")
    assert ifb != names.ifb_name("net2", "c1", "eth0")


def test_ifb_alias_is_found_by_its_network_prefix_and_never_taken_for_a_veth():
    alias = names.ifb_alias("net", "c1", "eth0")
    assert alias.startswith(names.ifb_alias_prefix("net"))
    assert not alias.startswith(names.ifb_alias_prefix("ne"))
    assert not alias.startswith(names.alias_prefix("net"))  # GC's veth sweep must skip it
    assert len(names.ifb_alias("net", "c" * 300, "eth0")) <= 127


# --------------------------------------------------------------------------- conflist


def test_conflist_advertises_bandwidth():
    plugin = node_conflist("pycni", "10.244.1.0/24", "10.244.0.0/16")["plugins"][0]
    assert plugin["capabilities"]["bandwidth"] is True
