// SPDX-License-Identifier: GPL-2.0
// Hearth sandbox policy: TC programs attached to a sandbox's tap.
//
// `guest_out` runs on the tap's ingress hook (packets the guest sends): it drops
// packets whose source MAC or IPv4 is not the sandbox's (anti-spoof) and checks
// them against the egress rules. `guest_in` runs on the tap's egress hook
// (packets to the guest) and checks them against the ingress rules.
//
// Stateful: a flow-opening packet (TCP SYN, ICMP echo, UDP, other protocols) is
// checked against the rules of its direction; when allowed, its flow (remote
// address and port, guest port, protocol) goes into EFLOWS (opened by the
// guest) or IFLOWS (opened from outside). Two LRU maps, so a flood of inbound
// flows cannot evict the guest's own. A non-initial packet (TCP without a bare
// SYN, ICMP echo reply or error) passes only if its flow is in a map; a UDP
// datagram passes as a reply when the other direction opened its exact flow.
// A flow opened from outside lets the guest answer on that exact 5-tuple only:
// for TCP its SYN-ACK, then data once the remote completed the handshake.
// Each flow records the policy epoch that allowed it, the counter of the rule
// that allowed it (every later packet of the flow, either way, is counted
// there too, so a rule's bytes are its flows' bytes) and when it was last
// seen: a flow of an older epoch is judged again by the current rules on its
// next packet (and deleted if now denied), an idle one expires (UDP/ICMP after
// 60 s, TCP after 2 h), and a TCP RST ends it.
//
// ICMP errors (types 3, 11, 12) pass only for a flow they quote, and only when
// they travel the way the quoted packet came back: the quoted packet must have
// been received by the sender of the error, and the error must go to the
// quoted packet's source. They are capped at 576 bytes (RFC 1812).
//
// A later IP fragment passes only if its datagram's first fragment did (FRAGS).
//
// Rules: an LPM trie keyed by (slot, direction, CIDR) to an ordered list of
// (protocol, port range, action) entries, compiled on the host so the longest
// prefix carries the rules of every enclosing prefix too. Two rule slots: an
// update writes the inactive slot, then bumps CONFIG.epoch (one aligned 32-bit
// word whose low bit selects the slot; `active` only mirrors it for readers),
// so a packet sees either the whole old or the whole new policy.
//
// Sandboxes of this host (SANDBOXES_v1, shared by every agent on the host) are
// denied as egress destinations unless a rule of their pool or a CIDR inside
// it allows them, so sandboxes of agents with other pools stay apart too.
// Agents bump SBGEN_v1 after every change of SANDBOXES_v1; a flow remembers
// the generation it was judged under and is judged again when it changed, so
// a flow opened before its remote became a sandbox does not outlive that.
//
// Host addresses (HOSTS, written by the agent from the node's live addresses
// and their directed-broadcast addresses) are denied as egress destinations
// unless an entry of their own /32 allows them. As ingress sources (the
// ingress proxy) they are allowed unless an explicit ingress rule matching
// them denies them; the ingress default does not apply to them.
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
#define MAX_PREFIXES 1024
#define MAX_COUNTERS 512
#define MAX_HOSTS 256
#define MAX_FLOWS 8192
#define MAX_FRAGS 1024
#define MAX_ICMP_ERROR 576
#define NS 1000000000ULL
#define IDLE_DATAGRAM (60 * NS)
#define IDLE_TCP (2 * 3600 * NS)

// Counter slots below FIRST_RULE_COUNTER; keep in sync with src/policy/mod.rs.
#define C_SPOOF 0
#define C_OUT_DEFAULT_ALLOW 1
#define C_OUT_DEFAULT_DENY 2
#define C_NOT_IPV4 3
#define C_TO_GUEST 4
#define C_OUT_REPLY 5
#define C_OUT_NO_FLOW 6
#define C_OUT_HOST_DENY 7
#define C_IN_DEFAULT_ALLOW 8
#define C_IN_DEFAULT_DENY 9
#define C_IN_REPLY 10
#define C_IN_NO_FLOW 11
#define C_IN_FROM_HOST 12
#define C_REJUDGED_DENY 13
#define C_EXPIRED 14
#define C_OUT_SANDBOX_DENY 15

#define DIR_EGRESS 0
#define DIR_INGRESS 1

// why: <linux/icmp.h> pulls in libc headers that do not build for -target bpf.
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 seq;
};

#define ACT_END 0
#define ACT_ALLOW 1
#define ACT_DENY 2
// Entry copied down from an enclosing prefix (not the prefix's own rule).
#define ACT_INHERITED 4
// Bits 3..7 of `action`: prefix length of the CIDR the rule was written for
// (capped at 31), so a sandbox of another pool is opened only by rules of
// its pool or a CIDR inside it.
#define ACT_ORIGIN_SHIFT 3
// match_rules mode: only the address's own /32 and no inherited entries.
#define OWN_ONLY 64
#define MAX_SANDBOXES 65536

struct sandbox_cfg {
	__u32 ip;	  // network byte order
	__u8 mac[6];
	__u8 active;	  // rule slot in use: 0 or 1 (== epoch & 1)
	__u8 _pad;
	__u8 egress_default_allow[2];	// per slot
	__u8 ingress_default_allow[2];
	__u32 epoch;	  // bumped by every update; its low bit is the active slot
};

struct rule {
	__u16 port_lo;	  // host byte order; 0..65535 for any
	__u16 port_hi;
	__u8 proto;	  // 0 any, else IPPROTO_*
	__u8 action;	  // ACT_* | ACT_INHERITED | origin << ACT_ORIGIN_SHIFT
	__u16 counter;	  // slot in `counters`
};

struct rule_list {
	__u32 prefixlen;  // of the CIDR this list belongs to
	__u32 _pad;
	struct rule r[RULES_PER_PREFIX];
};

struct lpm_key {
	__u32 prefixlen;  // 32 (the tag) + CIDR length
	__u32 tag;	  // htonl(slot * 2 + direction)
	__u32 addr;	  // network byte order
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct flow_key {
	__u32 remote;	  // network byte order
	__u16 remote_port;	// network byte order; ICMP: 0
	__u16 guest_port;	// network byte order; ICMP echo: the id
	__u8 proto;
	__u8 _pad[3];
};

// TCP state of a flow opened from outside (IFLOWS).
#define T_SYN 0	      // the remote's SYN passed
#define T_SYNACK 1    // the guest answered with SYN-ACK
#define T_EST 2	      // the remote acknowledged: the guest may send data

struct flow {
	__u64 last_seen;  // bpf_ktime_get_ns
	__u32 epoch;	  // policy epoch that allowed it
	__u32 gen;	  // SBGEN_v1 when it was last judged
	__u8 tcp;	  // T_* (IFLOWS only)
	__u8 _pad;
	__u16 rule;	  // counter slot of the rule that allowed it in `epoch`; 0: none
	__u8 _pad2[4];
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
} RULES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_COUNTERS);
	__type(key, __u32);
	__type(value, struct counter);
} COUNTERS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_HOSTS);
	__type(key, __u32);
	__type(value, __u8);
} HOSTS SEC(".maps");

// Every sandbox address on this host, of every agent, to the prefix length of
// its pool and the agent that added it: one map shared by all program
// instances (pinned by name under /sys/fs/bpf/hearth-host/; the suffix is the
// layout version, checked by the agent). Egress to one is decided only by
// rules of a CIDR at least as specific as its pool, else denied.
struct host_sandbox {
	__u8 pool_len;
	__u8 _pad[3];
	__u32 owner;	  // hash of the agent instance that added it
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SANDBOXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__type(key, __u32);
	__type(value, struct host_sandbox);
} SANDBOXES_v1 SEC(".maps");

// Generation of SANDBOXES_v1: bumped by an agent after each change.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__type(key, __u32);
	__type(value, __u32);
} SBGEN_v1 SEC(".maps");

// Flows the guest opened.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow);
} EFLOWS SEC(".maps");

// Flows opened from outside (kept apart so they cannot evict EFLOWS).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow);
} IFLOWS SEC(".maps");

// IPv4 datagrams whose first fragment passed: their later fragments may too.
struct frag_key {
	__u32 remote;	  // network byte order
	__u16 id;
	__u8 proto;
	__u8 dir;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FRAGS);
	__type(key, struct frag_key);
	__type(value, __u8);
} FRAGS SEC(".maps");

// What a parsed packet is, for the flow logic.
#define K_NEW 0	     // opens a flow: check the rules
#define K_REPLY 1    // needs its flow in the map
#define K_DATAGRAM 2 // UDP: a reply if the other direction opened the flow, else new

struct pkt {
	struct flow_key key;
	__u16 port;	  // destination port for rule matching, host byte order
	__u8 kind;
	__u8 icmp_err;	  // an ICMP error (its key is the quoted flow's)
	__u8 tcp_flags;	  // TCP: byte 13 of the header
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

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

// A later fragment (no ports): passes only if its first fragment did.
static __always_inline int later_fragment(struct iphdr *ip, __u32 dir, __u32 len)
{
	struct frag_key k = {
		.remote = dir == DIR_EGRESS ? ip->daddr : ip->saddr,
		.id = ip->id,
		.proto = ip->protocol,
		.dir = dir,
	};
	if (bpf_map_lookup_elem(&FRAGS, &k))
		return TC_ACT_OK;
	count(dir == DIR_EGRESS ? C_OUT_NO_FLOW : C_IN_NO_FLOW, len);
	return TC_ACT_SHOT;
}

// Remembers a first fragment that passed.
static __always_inline int first_fragment(struct iphdr *ip, __u32 dir, int verdict)
{
	if (verdict == TC_ACT_OK && (ip->frag_off & bpf_htons(0x2000))) {
		struct frag_key k = {
			.remote = dir == DIR_EGRESS ? ip->daddr : ip->saddr,
			.id = ip->id,
			.proto = ip->protocol,
			.dir = dir,
		};
		__u8 one = 1;
		bpf_map_update_elem(&FRAGS, &k, &one, BPF_ANY);
	}
	return verdict;
}

// Rule lookup: -1 no entry matched, else (counter slot << 1) | allow (the
// matching rule's counter is counted here). `mode` OWN_ONLY skips
// inherited entries and requires the list to be the address's own /32; else
// it is the shortest CIDR whose rules count (0: all).
static __noinline int match_rules(__u32 tag, __u32 addr, __u32 proto_port, __u32 mode,
				  __u32 len)
{
	struct lpm_key key = { .prefixlen = 64, .tag = tag, .addr = addr };
	struct rule_list *list = bpf_map_lookup_elem(&RULES, &key);
	__u8 proto = proto_port >> 16;
	__u16 port = proto_port & 0xffff;
	if (!list)
		return -1;
	if (mode == OWN_ONLY && list->prefixlen != 32)
		return -1;
	if (mode != OWN_ONLY && list->prefixlen < mode)
		return -1;
#pragma unroll
	for (int i = 0; i < RULES_PER_PREFIX; i++) {
		struct rule *r = &list->r[i];
		if (r->action == ACT_END)
			break;
		if (mode == OWN_ONLY && (r->action & ACT_INHERITED))
			continue;
		if (mode != OWN_ONLY && (r->action >> ACT_ORIGIN_SHIFT) < mode)
			continue;
		if (r->proto && r->proto != proto)
			continue;
		if (port < r->port_lo || port > r->port_hi)
			continue;
		count(r->counter, len);
		return ((__u32)r->counter << 1) | ((r->action & 3) == ACT_ALLOW);
	}
	return -1;
}

// Fills the flow key from an ICMP error's quoted header. `to_guest`: the
// error travels to the guest, so it quotes a packet the guest sent (quoted
// source == guest, and the error comes from the quoted destination); else the
// guest sends it about a packet it received (quoted destination == guest, and
// the error goes to the quoted source). Anything else matches no flow.
static __always_inline int quoted_flow(struct pkt *p, struct iphdr *ip, struct icmphdr *icmp,
				       void *end, int to_guest, __u32 guest)
{
	struct iphdr *in = (void *)(icmp + 1);
	if ((void *)(in + 1) > end || in->ihl != 5)
		return -1;
	__u16 *ports = (void *)(in + 1);
	if ((void *)(ports + 2) > end)
		return -1;
	if (to_guest) {
		if (in->saddr != guest || in->daddr != ip->saddr)
			return -1;
	} else {
		if (in->daddr != guest || in->saddr != ip->daddr)
			return -1;
	}
	p->key.proto = in->protocol;
	if (in->protocol == IPPROTO_ICMP) {
		struct icmphdr *qi = (void *)(in + 1);
		if ((void *)(qi + 1) > end)
			return -1;
		p->key.remote = to_guest ? in->daddr : in->saddr;
		p->key.guest_port = qi->id;
		return 0;
	}
	if (to_guest) {
		p->key.remote = in->daddr;
		p->key.guest_port = ports[0];
		p->key.remote_port = ports[1];
	} else {
		p->key.remote = in->saddr;
		p->key.remote_port = ports[0];
		p->key.guest_port = ports[1];
	}
	return 0;
}

// Parses the L4 header at `l4`. `to_guest`: the packet travels host -> guest.
static __always_inline int parse_l4(struct pkt *p, struct iphdr *ip, void *l4, void *end,
				    int to_guest, __u32 guest)
{
	p->key.remote = to_guest ? ip->saddr : ip->daddr;
	p->key.proto = ip->protocol;
	p->kind = K_NEW;
	switch (ip->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return -1;
		p->key.remote_port = to_guest ? tcp->source : tcp->dest;
		p->key.guest_port = to_guest ? tcp->dest : tcp->source;
		p->port = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		if (!tcp->syn || tcp->ack)
			p->kind = K_REPLY;
		return 0;
	}
	case IPPROTO_UDP: {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return -1;
		p->key.remote_port = to_guest ? udp->source : udp->dest;
		p->key.guest_port = to_guest ? udp->dest : udp->source;
		p->port = bpf_ntohs(udp->dest);
		p->kind = K_DATAGRAM;
		return 0;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > end)
			return -1;
		switch (icmp->type) {
		case ICMP_ECHO:
			p->key.guest_port = icmp->id;
			return 0;
		case ICMP_ECHOREPLY:
			p->key.guest_port = icmp->id;
			p->kind = K_REPLY;
			return 0;
		case ICMP_DEST_UNREACH:
		case ICMP_TIME_EXCEEDED:
		case ICMP_PARAMETERPROB:
			p->kind = K_REPLY;
			p->icmp_err = 1;
			if (bpf_ntohs(ip->tot_len) > MAX_ICMP_ERROR ||
			    quoted_flow(p, ip, icmp, end, to_guest, guest))
				p->key.proto = 255; // matches no flow
			return 0;
		default:
			return 0;
		}
	}
	default:
		return 0;
	}
}

// The verdict of a match_rules result (>= 0); sets `rule` to its counter.
static __always_inline int matched(int m, __u16 *rule)
{
	*rule = m >> 1;
	return m & 1;
}

// Judges a flow by the rules of `dir` in policy `epoch`: 1 allow, 0 deny.
// `port` is the rule port (the destination for egress, the guest's for ingress).
// `rule`: the counter slot of the rule that decided, 0 when none did.
static __always_inline int judge(struct sandbox_cfg *cfg, __u32 epoch, __u32 remote, __u32 proto_port,
			    __u32 dir, __u32 len, __u16 *rule)
{
	__u32 slot = epoch & 1;
	__u32 tag = bpf_htonl(slot * 2 + dir);
	int allow;
	*rule = 0;
	if (bpf_map_lookup_elem(&HOSTS, &remote)) {
		if (dir == DIR_INGRESS) {
			// The node (ingress proxy): any explicit rule decides, else allowed.
			allow = match_rules(tag, remote, proto_port, 0, len);
			if (allow < 0) {
				count(C_IN_FROM_HOST, len);
				return 1;
			}
		} else {
			allow = match_rules(tag, remote, proto_port, OWN_ONLY, len);
			if (allow < 0) {
				count(C_OUT_HOST_DENY, len);
				return 0;
			}
		}
		return matched(allow, rule);
	}
	if (dir == DIR_EGRESS) {
		struct host_sandbox *sb = bpf_map_lookup_elem(&SANDBOXES_v1, &remote);
		if (sb) {
			__u32 min = sb->pool_len;
			if (min > 31)
				min = 31;
			if (min == 0)
				min = 1;
			allow = match_rules(tag, remote, proto_port, min, len);
			if (allow < 0) {
				count(C_OUT_SANDBOX_DENY, len);
				return 0;
			}
			return matched(allow, rule);
		}
	}
	allow = match_rules(tag, remote, proto_port, 0, len);
	if (allow >= 0)
		return matched(allow, rule);
	if (dir == DIR_EGRESS) {
		allow = slot ? cfg->egress_default_allow[1] : cfg->egress_default_allow[0];
		count(allow ? C_OUT_DEFAULT_ALLOW : C_OUT_DEFAULT_DENY, len);
	} else {
		allow = slot ? cfg->ingress_default_allow[1] : cfg->ingress_default_allow[0];
		count(allow ? C_IN_DEFAULT_ALLOW : C_IN_DEFAULT_DENY, len);
	}
	return allow;
}

// Checks a flow found in `map` (opened by `origin`) before a packet may use
// it: expired -> deleted; older epoch or SANDBOXES generation -> judged again
// (deleted if denied now; the packet is then counted by the judging).
// Returns the flow, or NULL if it is gone.
static __always_inline struct flow *live_flow(struct sandbox_cfg *cfg, void *map, struct flow_key *key,
					 __u32 origin, __u32 epoch, __u32 gen, __u64 now, __u32 len,
					 __u8 *judged)
{
	struct flow *f = bpf_map_lookup_elem(map, key);
	if (!f)
		return 0;
	__u64 idle = key->proto == IPPROTO_TCP ? IDLE_TCP : IDLE_DATAGRAM;
	if (now - f->last_seen > idle) {
		count(C_EXPIRED, len);
		bpf_map_delete_elem(map, key);
		return 0;
	}
	if (f->epoch != epoch || f->gen != gen) {
		__u16 port = origin == DIR_EGRESS ? key->remote_port : key->guest_port;
		if (key->proto == IPPROTO_ICMP)
			port = 0;
		__u32 pp = ((__u32)key->proto << 16) | bpf_ntohs(port);
		__u16 rule;
		if (!judge(cfg, epoch, key->remote, pp, origin, len, &rule)) {
			count(C_REJUDGED_DENY, len);
			bpf_map_delete_elem(map, key);
			return 0;
		}
		f->epoch = epoch;
		f->gen = gen;
		f->rule = rule;
		*judged = 1;
	}
	// why: one write a second per flow, not one per packet.
	if (now - f->last_seen > NS)
		f->last_seen = now;
	return f;
}

// The flow decision shared by both hooks, after parsing.
static __always_inline int decide(struct sandbox_cfg *cfg, struct pkt *p, __u32 dir, __u32 len)
{
	// Read once, so the whole decision uses one policy.
	__u32 epoch = *(volatile __u32 *)&cfg->epoch;
	// why: read before any SANDBOXES lookup, so a flow judged while an agent
	// changes the map carries the old generation and is judged again.
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&SBGEN_v1, &zero);
	__u32 gen = genp ? *(volatile __u32 *)genp : 0;
	__u64 now = bpf_ktime_get_ns();
	__u32 c_reply = dir == DIR_EGRESS ? C_OUT_REPLY : C_IN_REPLY;
	void *own = dir == DIR_EGRESS ? (void *)&EFLOWS : (void *)&IFLOWS;
	void *other = dir == DIR_EGRESS ? (void *)&IFLOWS : (void *)&EFLOWS;
	__u32 other_dir = dir ^ 1;
	__u8 rst = p->key.proto == IPPROTO_TCP && (p->tcp_flags & TCP_RST);
	// Set when live_flow judged the flow again (the rule counted the packet).
	__u8 judged = 0;

	if (p->kind != K_NEW) {
		// A flow the other side opened: this packet answers it.
		struct flow *f = live_flow(cfg, other, &p->key, other_dir, epoch, gen, now, len, &judged);
		if (f) {
			if (p->key.proto == IPPROTO_TCP && !p->icmp_err && dir == DIR_EGRESS) {
				// Opened from outside: the guest answers the SYN, then
				// sends data once the remote completed the handshake.
				__u8 fl = p->tcp_flags;
				if ((fl & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)) {
					if (f->tcp == T_SYN)
						f->tcp = T_SYNACK;
				} else if (!rst && f->tcp != T_EST) {
					count(C_OUT_NO_FLOW, len);
					return TC_ACT_SHOT;
				}
			}
			count(c_reply, len);
			if (f->rule && !judged)
				count(f->rule, len);
			if (rst)
				bpf_map_delete_elem(other, &p->key);
			return TC_ACT_OK;
		}
		if (p->kind == K_REPLY) {
			// A later packet of a flow this side opened.
			f = live_flow(cfg, own, &p->key, dir, epoch, gen, now, len, &judged);
			if (f) {
				if (p->key.proto == IPPROTO_TCP && !p->icmp_err && dir == DIR_INGRESS &&
				    f->tcp == T_SYNACK && (p->tcp_flags & TCP_ACK) &&
				    !(p->tcp_flags & (TCP_SYN | TCP_RST)))
					f->tcp = T_EST;
				count(c_reply, len);
				if (f->rule && !judged)
					count(f->rule, len);
				if (rst)
					bpf_map_delete_elem(own, &p->key);
				return TC_ACT_OK;
			}
			count(dir == DIR_EGRESS ? C_OUT_NO_FLOW : C_IN_NO_FLOW, len);
			return TC_ACT_SHOT;
		}
		// A datagram no flow of the other side explains: a new one of this side.
		f = live_flow(cfg, own, &p->key, dir, epoch, gen, now, len, &judged);
		if (f) {
			count(c_reply, len);
			if (f->rule && !judged)
				count(f->rule, len);
			return TC_ACT_OK;
		}
	}

	__u32 proto_port = ((__u32)p->key.proto << 16) | p->port;
	__u16 rule;
	if (!judge(cfg, epoch, p->key.remote, proto_port, dir, len, &rule))
		return TC_ACT_SHOT;
	// why: a repeated SYN (retransmitted, or spoofed by an allowed sender)
	// must not reset the state of a flow opened from outside.
	struct flow *old = bpf_map_lookup_elem(own, &p->key);
	if (old) {
		old->epoch = epoch;
		old->gen = gen;
		old->rule = rule;
		old->last_seen = now;
		return TC_ACT_OK;
	}
	struct flow nf = { .last_seen = now, .epoch = epoch, .gen = gen, .tcp = T_SYN, .rule = rule };
	bpf_map_update_elem(own, &p->key, &nf, BPF_ANY);
	return TC_ACT_OK;
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
	// why: later fragments carry no ports; they follow their first fragment.
	if (ip->frag_off & bpf_htons(0x1fff))
		return later_fragment(ip, DIR_EGRESS, skb->len);

	struct pkt p = {};
	if (parse_l4(&p, ip, (void *)ip + ihl, end, 0, cfg->ip))
		return TC_ACT_SHOT;
	return first_fragment(ip, DIR_EGRESS, decide(cfg, &p, DIR_EGRESS, skb->len));
}

SEC("classifier")
int guest_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	count(C_TO_GUEST, skb->len);
	struct sandbox_cfg *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	if (!cfg)
		return TC_ACT_SHOT;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_SHOT;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(C_NOT_IPV4, skb->len);
		return TC_ACT_SHOT;
	}
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_SHOT;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return TC_ACT_SHOT;
	if (ip->frag_off & bpf_htons(0x1fff))
		return later_fragment(ip, DIR_INGRESS, skb->len);

	struct pkt p = {};
	if (parse_l4(&p, ip, (void *)ip + ihl, end, 1, cfg->ip))
		return TC_ACT_SHOT;
	return first_fragment(ip, DIR_INGRESS, decide(cfg, &p, DIR_INGRESS, skb->len));
}

char LICENSE[] SEC("license") = "GPL";
