// SPDX-License-Identifier: GPL-2.0
/* pycni's eBPF fast path: tc ingress programs that carry pod traffic past the bridge and the
 * node's IP stack, for flows that need nothing from netfilter.
 *
 *   from_pod       on each pod's host veth: to a pod of this node by bpf_redirect_peer into
 *                  its namespace; to a pod of another node (a subnet in pycni_fp_remote) by a
 *                  FIB lookup and a redirect towards the underlay or the VTEP.
 *   from_underlay  on the underlay interface and the VTEP: to a pod of this node by
 *                  bpf_redirect_peer.
 *
 * A packet is only redirected when conntrack already holds its connection as ASSURED (seen
 * both ways by the stack, so the first packets of every connection went through the
 * NetworkPolicy rules) and without NAT (the stack must un-NAT a Service's or a hostPort's
 * replies). TCP SYN, FIN and RST always go through the stack, so conntrack sees connections
 * begin and end. Anything else (ARP, IPv6, ICMP, fragments, options, an unknown or vanished
 * destination) returns TC_ACT_OK: the normal path, never a drop.
 *
 * The maps are the agent's desired state (pycni.dataplane.fastpath); pycni_fp_stats counts
 * what each program did, so tests and `pycnictl doctor` can see that the fast path carries
 * traffic. Compiled at install time: clang -O2 -g -target bpf.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* Only the field read here; CO-RE finds its offset in the running kernel's BTF. */
struct nf_conn {
	unsigned long status;
} __attribute__((preserve_access_index));

/* The kfuncs' options, as the kernel (NF_BPF_CT_OPTS_SZ = 16) defines them. */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
					 struct bpf_ct_opts *, __u32) __ksym;
extern void bpf_ct_release(struct nf_conn *) __ksym;

#define IPS_ASSURED (1UL << 2)
#define IPS_NAT_MASK ((1UL << 4) | (1UL << 5)) /* IPS_SRC_NAT | IPS_DST_NAT */
#define BPF_F_CURRENT_NETNS (-1)
#define ENODEV 19

struct pod {
	__u32 ifindex;	  /* the pod's host veth: redirect_peer lands in its peer */
	__u8 mac[6];	  /* the pod's eth0 */
	__u8 gw_mac[6];	  /* the bridge's: the source of frames the node routed */
};

struct remote_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32); /* IPv4 address, network order */
	__type(value, struct pod);
} pycni_fp_pods SEC(".maps");

/* A bound, not an allocation (no prealloc): a subnet per node for far more nodes than the
 * 5,000 pycni is measured with (4,096 made every pass fail with 5,000). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct remote_key);
	__type(value, __u32);
} pycni_fp_remote SEC(".maps");

enum {
	ST_PEER,	/* redirected into a pod of this node */
	ST_ROUTED,	/* redirected towards another node */
	ST_NOT_ASSURED, /* no ASSURED conntrack entry yet: left to the stack */
	ST_NAT,		/* NATed connection: left to the stack */
	ST_GONE,	/* the destination's interface is gone: left to the stack */
	ST_OTHER,	/* no fast path for this packet */
	ST_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} pycni_fp_stats SEC(".maps");

static __always_inline int count(__u32 what, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&pycni_fp_stats, &what);

	if (n)
		*n += 1;
	return verdict;
}

/* 1 when conntrack holds the connection ASSURED and without NAT, else the stat to count. */
static __always_inline int ct_verdict(struct __sk_buff *skb, struct iphdr *ip, void *l4,
				      void *end)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_ct_opts opts = {.netns_id = BPF_F_CURRENT_NETNS, .l4proto = ip->protocol};
	struct nf_conn *ct;
	unsigned long status;

	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > end)
			return -ST_OTHER;
		if (tcp->syn || tcp->fin || tcp->rst)
			return -ST_OTHER;
		tuple.ipv4.sport = tcp->source;
		tuple.ipv4.dport = tcp->dest;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > end)
			return -ST_OTHER;
		tuple.ipv4.sport = udp->source;
		tuple.ipv4.dport = udp->dest;
	} else {
		return -ST_OTHER;
	}
	ct = bpf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));
	if (!ct)
		return -ST_NOT_ASSURED;
	status = ct->status;
	bpf_ct_release(ct);
	if (status & IPS_NAT_MASK)
		return -ST_NAT;
	if (!(status & IPS_ASSURED))
		return -ST_NOT_ASSURED;
	return 1;
}

/* The IPv4 header of a plain (no options, not fragmented) TCP or UDP packet, else NULL. */
static __always_inline struct iphdr *ipv4(struct __sk_buff *skb, struct ethhdr **eth)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip;

	*eth = data;
	if ((void *)(*eth + 1) > end || (*eth)->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	ip = (void *)(*eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->ttl <= 1)
		return NULL;
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset */
		return NULL;
	return ip;
}

static __always_inline void decrement_ttl(struct iphdr *ip)
{
	/* RFC 1624 incremental checksum update, as the kernel's ip_decrease_ttl. */
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* Into the namespace of the local pod `pod`, or the stack when its interface is gone. */
static __always_inline int to_pod(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
				  struct pod *pod, int routed)
{
	__u32 mtu = 0;

	/* An index that no longer exists (the pod was deleted before the agent caught up):
	 * redirecting would drop, the stack finds the way or answers. */
	if (bpf_check_mtu(skb, pod->ifindex, &mtu, 0, 0) == -ENODEV)
		return count(ST_GONE, TC_ACT_OK);
	if (routed) {
		decrement_ttl(ip);
		__builtin_memcpy(eth->h_source, pod->gw_mac, ETH_ALEN);
	}
	__builtin_memcpy(eth->h_dest, pod->mac, ETH_ALEN);
	return count(ST_PEER, bpf_redirect_peer(pod->ifindex, 0));
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct bpf_fib_lookup fib = {};
	struct remote_key key;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct pod *pod;
	int verdict, rc;

	ip = ipv4(skb, &eth);
	if (!ip)
		return count(ST_OTHER, TC_ACT_OK);
	pod = bpf_map_lookup_elem(&pycni_fp_pods, &ip->daddr);
	key.prefixlen = 32;
	key.addr = ip->daddr;
	if (!pod && !bpf_map_lookup_elem(&pycni_fp_remote, &key))
		return count(ST_OTHER, TC_ACT_OK);
	verdict = ct_verdict(skb, ip, ip + 1, end);
	if (verdict < 0)
		return count(-verdict, TC_ACT_OK);
	/* The helpers below may move the packet: look the headers up again. */
	ip = ipv4(skb, &eth);
	if (!ip)
		return count(ST_OTHER, TC_ACT_OK);
	if (pod) /* same node: the frame already carries the pod's MAC (one L2 subnet) */
		return to_pod(skb, eth, ip, pod, 0);

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	/* tot_len 0: the kernel checks the skb against the MTU itself, GSO aware (the IP
	 * header's length of a GSO packet is the whole 64 KiB, not what goes on the wire). */
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		decrement_ttl(ip);
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
		return count(ST_ROUTED, bpf_redirect(fib.ifindex, 0));
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst};

		decrement_ttl(ip);
		return count(ST_ROUTED, bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0));
	}
	/* Not forwarded, too big (the stack sends the ICMP), blackholed, ...: the stack. */
	return count(ST_OTHER, TC_ACT_OK);
}

SEC("tc")
int from_underlay(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct pod *pod;
	int verdict;

	ip = ipv4(skb, &eth);
	if (!ip)
		return TC_ACT_OK; /* not counted: the underlay carries the node's own traffic too */
	pod = bpf_map_lookup_elem(&pycni_fp_pods, &ip->daddr);
	if (!pod)
		return TC_ACT_OK;
	verdict = ct_verdict(skb, ip, ip + 1, end);
	if (verdict < 0)
		return count(-verdict, TC_ACT_OK);
	ip = ipv4(skb, &eth);
	if (!ip)
		return count(ST_OTHER, TC_ACT_OK);
	return to_pod(skb, eth, ip, pod, 1);
}

char _license[] SEC("license") = "GPL";
