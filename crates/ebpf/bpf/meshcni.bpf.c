// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * meshcni ambient redirect mode `ebpf`: tc programs that move captured pods' TCP traffic to
 * ztunnel and back without iptables rules, ipsets or policy routes in the node netns.
 *
 *   pod host veth, ingress  meshcni_pod_in    TCP from an enrolled pod IP -> ztunnel
 *                                              (bpf_redirect_peer: straight into ztunnel's eth0);
 *                                              UDP/53 too for pods with DNS capture
 *   pod host veth, egress   meshcni_pod_eg    TCP to an enrolled pod IP -> ztunnel
 *                                              (bpf_redirect to the ztunnel host veth)
 *   ztunnel host veth, in   meshcni_zt_host   TCP from ztunnel to an enrolled pod -> the pod
 *                                              (bpf_redirect_peer); ztunnel's own HBONE to a
 *                                              local enrolled pod's :15008 -> back to ztunnel
 *   ztunnel eth0, ingress   meshcni_zt_in     (inside the ztunnel netns) bpf_sk_assign to the
 *                                              connection's socket, else to ztunnel's listener
 *                                              15001 (from an enrolled pod; 15053 for DNS
 *                                              of a DNS-captured pod, TCP and UDP), 15008 /
 *                                              15006 (to one); mark 0x400 -> local delivery
 *
 * IPv4 and IPv6 (addresses are 16-byte keys, IPv4 as ::ffff:a.b.c.d); every pod IP is one map
 * entry. "Pass" is TC_ACT_UNSPEC (tcx: TCX_NEXT), so programs behind ours (another tcx program,
 * another clsact filter) still run on traffic we do not take.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MESHCNI_DEFAULT_PODS 16384
#define MESHCNI_HOST_IPS 64
#define ZT_OUTBOUND_PORT 15001
#define ZT_INBOUND_PORT 15006
#define ZT_HBONE_PORT 15008
#define ZT_DNS_PORT 15053
#define DNS_PORT 53
/* pod_info.flags */
#define POD_DNS_CAPTURE 0x1
#define MESHCNI_LOCAL_MARK 0x400

#define PASS TC_ACT_UNSPEC

struct meshcni_addr {
	__u32 a[4];
};

/* Value of meshcni_pods: one per enrolled pod IP. Layout shared with src/maps.rs. */
struct pod_info {
	__u32 ifindex; /* host-side veth of the pod, node netns */
	__u8 mac[6];   /* the pod's eth0 MAC */
	__u8 flags;    /* POD_DNS_CAPTURE */
	__u8 pad;
};

/* meshcni_zt[0]. ifindex 0 = no ztunnel: enrolled pods' TCP is dropped (fail closed). */
struct zt_info {
	__u32 ifindex;     /* ztunnel host veth, node netns */
	__u8 mac[6];       /* ztunnel eth0 MAC */
	__u8 host_mac[6];  /* ztunnel host veth MAC (packets handed back to the node) */
	__u32 flags;
	struct meshcni_addr ip4; /* ztunnel pod IPv4 (mapped), zero if none */
	struct meshcni_addr ip6; /* ztunnel pod IPv6, zero if none */
};

/* The Rust side (src/maps.rs) encodes these layouts byte by byte. */
_Static_assert(sizeof(struct pod_info) == 12, "pod_info layout changed: update src/maps.rs");
_Static_assert(sizeof(struct zt_info) == 52, "zt_info layout changed: update src/maps.rs");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MESHCNI_DEFAULT_PODS); /* the loader sets the capacity */
	__type(key, struct meshcni_addr);
	__type(value, struct pod_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshcni_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zt_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshcni_zt SEC(".maps");

/* The node's own addresses: traffic between them and pods (kubelet probes) is never steered. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MESHCNI_HOST_IPS);
	__type(key, struct meshcni_addr);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} meshcni_hostip SEC(".maps");

struct flow {
	struct meshcni_addr src;
	struct meshcni_addr dst;
	__u16 sport; /* network order; 0 when not TCP/UDP or a non-first fragment */
	__u16 dport;
	__u8 proto;
	__u8 v6;
	__u8 has_ports;
	__u8 syn; /* TCP SYN without ACK: a new connection */
};

static __always_inline int addr_eq(const struct meshcni_addr *x, const struct meshcni_addr *y)
{
	return x->a[0] == y->a[0] && x->a[1] == y->a[1] && x->a[2] == y->a[2] && x->a[3] == y->a[3];
}

static __always_inline int addr_zero(const struct meshcni_addr *x)
{
	return (x->a[0] | x->a[1] | x->a[2] | x->a[3]) == 0;
}

/* Parse Ethernet + IPv4/IPv6 (+ TCP ports). Returns 0 for IP packets, -1 otherwise. IPv6
 * extension headers are not walked: such packets report the extension as `proto` and pass. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	void *l4;

	__builtin_memset(f, 0, sizeof(*f));
	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return -1;
		f->src.a[2] = bpf_htonl(0xffff);
		f->src.a[3] = ip->saddr;
		f->dst.a[2] = bpf_htonl(0xffff);
		f->dst.a[3] = ip->daddr;
		f->proto = ip->protocol;
		if (ip->frag_off & bpf_htons(0x1fff))
			return 0; /* non-first fragment: no ports */
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(&f->src, &ip6->saddr, 16);
		__builtin_memcpy(&f->dst, &ip6->daddr, 16);
		f->proto = ip6->nexthdr;
		f->v6 = 1;
		l4 = (void *)(ip6 + 1);
	} else {
		return -1;
	}
	if (f->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return 0;
		f->sport = tcp->source;
		f->dport = tcp->dest;
		f->has_ports = 1;
		f->syn = tcp->syn && !tcp->ack;
	} else if (f->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return 0;
		f->sport = udp->source;
		f->dport = udp->dest;
		f->has_ports = 1;
	}
	return 0;
}

static __always_inline struct zt_info *ztunnel(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&meshcni_zt, &zero);
}

static __always_inline int is_ztunnel_ip(const struct zt_info *zt, const struct flow *f,
					 const struct meshcni_addr *ip)
{
	const struct meshcni_addr *own = f->v6 ? &zt->ip6 : &zt->ip4;

	return !addr_zero(own) && addr_eq(own, ip);
}

static __always_inline int set_dst_mac(struct __sk_buff *skb, const __u8 *mac)
{
	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), mac, ETH_ALEN, 0);
}

static __always_inline int is_dns(const struct flow *f)
{
	return f->has_ports && f->dport == bpf_htons(DNS_PORT);
}

/* Traffic leaving an enrolled pod (ingress of its host-side veth). */
SEC("tc")
int meshcni_pod_in(struct __sk_buff *skb)
{
	struct flow f;
	struct zt_info *zt;
	struct pod_info *pod;

	if (parse(skb, &f) < 0 || (f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP))
		return PASS;
	pod = bpf_map_lookup_elem(&meshcni_pods, &f.src);
	if (!pod)
		return PASS; /* not an enrolled address */
	if (f.proto == IPPROTO_UDP && !(is_dns(&f) && (pod->flags & POD_DNS_CAPTURE)))
		return PASS; /* UDP other than captured DNS is not ztunnel's */
	if (bpf_map_lookup_elem(&meshcni_hostip, &f.dst))
		return PASS; /* to the node itself (replies to kubelet probes) */
	zt = ztunnel();
	if (!zt || zt->ifindex == 0)
		return TC_ACT_SHOT; /* no ztunnel: fail closed */
	if (is_ztunnel_ip(zt, &f, &f.dst))
		return PASS; /* to ztunnel's own address: plain routing */
	if (set_dst_mac(skb, zt->mac) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(zt->ifindex, 0);
}

/* Traffic to an enrolled pod (egress of its host-side veth), after the node routed it. */
SEC("tc")
int meshcni_pod_eg(struct __sk_buff *skb)
{
	struct flow f;
	struct zt_info *zt;

	if (parse(skb, &f) < 0 || f.proto != IPPROTO_TCP)
		return PASS;
	if (!bpf_map_lookup_elem(&meshcni_pods, &f.dst))
		return PASS;
	if (bpf_map_lookup_elem(&meshcni_hostip, &f.src))
		return PASS; /* kubelet probes */
	zt = ztunnel();
	if (!zt || zt->ifindex == 0)
		return TC_ACT_SHOT;
	if (is_ztunnel_ip(zt, &f, &f.src))
		return PASS;
	if (set_dst_mac(skb, zt->mac) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(zt->ifindex, 0);
}

/* Traffic leaving ztunnel (ingress of ztunnel's host-side veth). */
SEC("tc")
int meshcni_zt_host(struct __sk_buff *skb)
{
	struct flow f;
	struct zt_info *zt;
	struct pod_info *pod;

	if (parse(skb, &f) < 0 || f.proto != IPPROTO_TCP)
		return PASS;
	pod = bpf_map_lookup_elem(&meshcni_pods, &f.dst);
	if (!pod)
		return PASS; /* not to an enrolled pod: plain routing */
	zt = ztunnel();
	if (zt && zt->ifindex == skb->ifindex && f.has_ports &&
	    f.dport == bpf_htons(ZT_HBONE_PORT) && is_ztunnel_ip(zt, &f, &f.src)) {
		/* ztunnel's HBONE to a local enrolled pod: its inbound side is ztunnel itself. */
		if (set_dst_mac(skb, zt->mac) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0);
	}
	if (set_dst_mac(skb, pod->mac) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(pod->ifindex, 0);
}

static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, const struct flow *f,
					       __u16 dport)
{
	struct bpf_sock_tuple t = {};

	if (f->v6) {
		__builtin_memcpy(t.ipv6.saddr, &f->src, 16);
		__builtin_memcpy(t.ipv6.daddr, &f->dst, 16);
		t.ipv6.sport = f->sport;
		t.ipv6.dport = dport;
		return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	t.ipv4.saddr = f->src.a[3];
	t.ipv4.daddr = f->dst.a[3];
	t.ipv4.sport = f->sport;
	t.ipv4.dport = dport;
	return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
}

/* Captured DNS over UDP (inside the ztunnel netns): to ztunnel's DNS socket on 15053. */
static __always_inline int dns_udp(struct __sk_buff *skb, const struct flow *f)
{
	struct pod_info *pod = bpf_map_lookup_elem(&meshcni_pods, &f->src);
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long err;

	if (!pod || !(pod->flags & POD_DNS_CAPTURE) || !is_dns(f))
		return PASS;
	if (f->v6) {
		__builtin_memcpy(t.ipv6.saddr, &f->src, 16);
		__builtin_memcpy(t.ipv6.daddr, &f->dst, 16);
		t.ipv6.sport = f->sport;
		t.ipv6.dport = bpf_htons(ZT_DNS_PORT);
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	} else {
		t.ipv4.saddr = f->src.a[3];
		t.ipv4.daddr = f->dst.a[3];
		t.ipv4.sport = f->sport;
		t.ipv4.dport = bpf_htons(ZT_DNS_PORT);
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return TC_ACT_SHOT; /* ztunnel's DNS proxy is not listening: fail closed */
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return TC_ACT_SHOT;
	skb->mark = MESHCNI_LOCAL_MARK;
	return TC_ACT_OK;
}

/* Inside the ztunnel netns, ingress of its eth0: hand captured connections to ztunnel. */
SEC("tc")
int meshcni_zt_in(struct __sk_buff *skb)
{
	struct flow f;
	struct zt_info *zt;
	struct pod_info *src_pod;
	struct bpf_sock *sk;
	__u16 port;
	long err;

	if (parse(skb, &f) < 0 || !f.has_ports)
		return PASS;
	if (f.proto == IPPROTO_UDP)
		return dns_udp(skb, &f);
	if (f.proto != IPPROTO_TCP)
		return PASS;
	zt = ztunnel();
	if (!zt || is_ztunnel_ip(zt, &f, &f.dst))
		return PASS; /* to ztunnel's own address: ordinary local delivery */
	src_pod = bpf_map_lookup_elem(&meshcni_pods, &f.src);
	if (src_pod)
		port = bpf_htons(is_dns(&f) && (src_pod->flags & POD_DNS_CAPTURE) ? ZT_DNS_PORT
										   : ZT_OUTBOUND_PORT);
	else if (bpf_map_lookup_elem(&meshcni_pods, &f.dst))
		port = f.dport == bpf_htons(ZT_HBONE_PORT) ? f.dport : bpf_htons(ZT_INBOUND_PORT);
	else
		return PASS;

	/* A connection ztunnel already has (accepted, or its own spoofed-source upstream). */
	sk = lookup(skb, &f, f.dport);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			goto assign;
		bpf_sk_release(sk);
	}
	if (!f.syn) {
		/* Neither ztunnel's nor new: a connection opened before its pod was enrolled. Hand it
		 * back to the node (ztunnel's host veth), which delivers it as if never captured:
		 * meshcni_zt_host puts it into the enrolled pod, or routing takes it to the peer.
		 * ztunnel's own address never bounces (its hairpin would loop). */
		if (is_ztunnel_ip(zt, &f, &f.src) || set_dst_mac(skb, zt->host_mac) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0);
	}
	sk = lookup(skb, &f, port);
	if (!sk)
		return TC_ACT_SHOT; /* ztunnel is not listening: fail closed */
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return TC_ACT_SHOT;
	}
assign:
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return TC_ACT_SHOT;
	skb->mark = MESHCNI_LOCAL_MARK;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
