// SPDX-License-Identifier: GPL-2.0
// Hearth sandbox policy: TC programs attached to a sandbox's tap.
//
// `guest_out` runs on the tap's ingress hook (packets the guest sends): it drops
// packets whose source MAC or IPv4 is not the sandbox's (anti-spoof) and checks
// new flows (TCP SYN, UDP, ICMP echo, other IP protocols) against the egress
// rules: an LPM trie from destination CIDR to an ordered list of (protocol, port
// range, action) entries, compiled on the host so the longest prefix carries the
// rules of every enclosing prefix too. `guest_in` runs on the tap's egress hook
// (packets to the guest) and only counts. Every decision bumps a counter.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define RULES_PER_PREFIX 16
#define MAX_PREFIXES 256
#define MAX_COUNTERS 512

// Counter slots below FIRST_RULE_COUNTER; keep in sync with src/policy/maps.rs.
#define C_SPOOF 0
#define C_DEFAULT_ALLOW 1
#define C_DEFAULT_DENY 2
#define C_NOT_IPV4 3
#define C_TO_GUEST 4
#define C_ESTABLISHED 5

// why: <linux/icmp.h> pulls in libc headers that do not build for -target bpf.
#define ICMP_ECHO 8
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 rest;
};

#define ACT_END 0
#define ACT_ALLOW 1
#define ACT_DENY 2

struct sandbox_cfg {
	__u32 ip;	  // network byte order
	__u8 mac[6];
	__u8 default_allow;
	__u8 _pad;
};

struct rule {
	__u16 port_lo;	  // host byte order; 0..65535 for any
	__u16 port_hi;
	__u8 proto;	  // 0 any, else IPPROTO_*
	__u8 action;	  // ACT_*
	__u16 counter;	  // slot in `counters`
};

struct rule_list {
	struct rule r[RULES_PER_PREFIX];
};

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;	  // network byte order
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sandbox_cfg);
} CONFIG SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, struct rule_list);
} EGRESS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_COUNTERS);
	__type(key, __u32);
	__type(value, struct counter);
} COUNTERS SEC(".maps");

static __always_inline void count(__u32 slot, __u32 len)
{
	struct counter *c = bpf_map_lookup_elem(&COUNTERS, &slot);
	if (c) {
		__sync_fetch_and_add(&c->packets, 1);
		__sync_fetch_and_add(&c->bytes, len);
	}
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int verdict(__u8 allow)
{
	return allow ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int check_flow(struct sandbox_cfg *cfg, __u32 daddr, __u8 proto,
				      __u16 port, __u32 len)
{
	struct lpm_key key = { .prefixlen = 32, .addr = daddr };
	struct rule_list *list = bpf_map_lookup_elem(&EGRESS, &key);
	if (list) {
#pragma unroll
		for (int i = 0; i < RULES_PER_PREFIX; i++) {
			struct rule *r = &list->r[i];
			if (r->action == ACT_END)
				break;
			if (r->proto && r->proto != proto)
				continue;
			if (port < r->port_lo || port > r->port_hi)
				continue;
			count(r->counter, len);
			return verdict(r->action == ACT_ALLOW);
		}
	}
	count(cfg->default_allow ? C_DEFAULT_ALLOW : C_DEFAULT_DENY, len);
	return verdict(cfg->default_allow);
}

SEC("classifier")
int guest_out(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct sandbox_cfg *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	if (!cfg)
		return TC_ACT_SHOT;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_SHOT;
	if (!mac_eq(eth->h_source, cfg->mac)) {
		count(C_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}

	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		// Ethernet/IPv4 ARP: sender MAC at +8, sender IP at +14 of the ARP header.
		__u8 *arp = (void *)(eth + 1);
		if ((void *)(arp + 28) > end)
			return TC_ACT_SHOT;
		__u32 sip;
		__builtin_memcpy(&sip, arp + 14, 4);
		if (!mac_eq(arp + 8, cfg->mac) || sip != cfg->ip) {
			count(C_SPOOF, skb->len);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(C_NOT_IPV4, skb->len);
		return TC_ACT_SHOT;
	}

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_SHOT;
	if (ip->saddr != cfg->ip) {
		count(C_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return TC_ACT_SHOT;
	void *l4 = (void *)ip + ihl;
	// why: later fragments carry no ports; their first fragment was checked.
	if (ip->frag_off & bpf_htons(0x1fff))
		return TC_ACT_OK;

	switch (ip->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return TC_ACT_SHOT;
		// why: stateless; only a bare SYN opens a connection. Replies to
		// inbound connections and later segments of allowed ones pass.
		if (!tcp->syn || tcp->ack) {
			count(C_ESTABLISHED, skb->len);
			return TC_ACT_OK;
		}
		return check_flow(cfg, ip->daddr, IPPROTO_TCP, bpf_ntohs(tcp->dest), skb->len);
	}
	case IPPROTO_UDP: {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return TC_ACT_SHOT;
		return check_flow(cfg, ip->daddr, IPPROTO_UDP, bpf_ntohs(udp->dest), skb->len);
	}
	case IPPROTO_ICMP: {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > end)
			return TC_ACT_SHOT;
		if (icmp->type != ICMP_ECHO) {
			count(C_ESTABLISHED, skb->len);
			return TC_ACT_OK;
		}
		return check_flow(cfg, ip->daddr, IPPROTO_ICMP, 0, skb->len);
	}
	default:
		return check_flow(cfg, ip->daddr, ip->protocol, 0, skb->len);
	}
}

SEC("classifier")
int guest_in(struct __sk_buff *skb)
{
	count(C_TO_GUEST, skb->len);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
