//! Sandbox policy: the user's egress and ingress rules, their validation, and
//! their compilation to the BPF maps' shape (pure; `maps.rs` does the I/O).
//!
//! Semantics, per direction: the most specific CIDR that contains the remote
//! address (destination for egress, source for ingress) decides; within it,
//! rules are tried in order (its own rules first, then the rules of every
//! enclosing CIDR, most specific first); if none matches, the direction's
//! default applies. Loopback, link-local (incl. metadata 169.254.169.254) and
//! the sandbox pools carry implicit egress deny rules, so they stay blocked
//! unless a rule for an equal or more specific CIDR allows them. The node's own
//! addresses are not compiled in: the program reads them from a map the agent
//! keeps current (see `maps::set_host_addresses`).

pub mod maps;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cidr::{Cidr, CidrError};

/// Rules (entries) one CIDR may hold in the map, implicit ones included.
pub const RULES_PER_PREFIX: usize = 16;
/// Distinct CIDRs per direction (the map holds 2 slots x 2 directions of them).
pub const MAX_PREFIXES: usize = 256;
/// User rules per sandbox and direction.
pub const MAX_RULES: usize = 64;
/// Counter slots reserved before the rules' (see bpf/policy.c).
pub const FIRST_RULE_COUNTER: u16 = 16;
/// Counter slots in the map.
pub const MAX_COUNTERS: u16 = 512;
/// Rule counter slots per policy slot (two slots share the map, see `maps`).
pub const RULE_COUNTERS_PER_SLOT: u16 = (MAX_COUNTERS - FIRST_RULE_COUNTER) / 2;

/// Which way a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Packets the sandbox sends; rules match the destination.
    Egress,
    /// Packets to the sandbox; rules match the source.
    Ingress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Transport protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Any => 0,
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
        }
    }
}

/// One rule, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub cidr: Cidr,
    pub proto: Proto,
    /// Inclusive destination port range (for ingress: the sandbox's port);
    /// `None` means every port.
    pub ports: Option<(u16, u16)>,
}

/// The rules of one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub default: Action,
    pub rules: Vec<Rule>,
}

impl Default for RuleSet {
    fn default() -> RuleSet {
        RuleSet {
            default: Action::Allow,
            rules: Vec::new(),
        }
    }
}

/// A sandbox's policy. On disk the egress fields sit at the top level (the
/// format from before ingress rules existed) and `ingress` is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(flatten)]
    pub egress: RuleSet,
    #[serde(default)]
    pub ingress: RuleSet,
}

impl Policy {
    /// A policy with these egress rules and everything allowed inbound.
    pub fn egress(default: Action, rules: Vec<Rule>) -> Policy {
        Policy {
            egress: RuleSet { default, rules },
            ingress: RuleSet::default(),
        }
    }
}

/// A policy could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule '{rule}': {source}")]
    Cidr {
        rule: String,
        #[source]
        source: CidrError,
    },
    /// Ports out of 1..=65535 or lo > hi.
    #[error("rule '{0}': port range must be N or LO-HI within 1..=65535 with LO <= HI")]
    BadPorts(String),
    #[error("rule '{0}': protocol must be tcp, udp, icmp or any")]
    BadProto(String),
    #[error("rule '{0}': icmp has no ports")]
    IcmpPorts(String),
    #[error("rule '{0}': expected CIDR[:PORTS[:PROTO]], e.g. 10.0.0.0/8:443:tcp")]
    Malformed(String),
    /// Same CIDR, overlapping protocol and ports, so the order would decide.
    #[error("rules '{a}' and '{b}' overlap (same CIDR, overlapping ports and protocol); merge or split them")]
    Overlap { a: String, b: String },
    #[error("too many rules: {given} given, at most {max} per sandbox and direction")]
    TooManyRules { given: usize, max: usize },
    #[error("too many rules for {cidr}: {given} entries including inherited and implicit ones, the map holds {max}")]
    TooManyForPrefix {
        cidr: Cidr,
        given: usize,
        max: usize,
    },
    #[error("too many distinct CIDRs: {given}, the map holds {max}")]
    TooManyPrefixes { given: usize, max: usize },
    #[error("default must be allow or deny, not '{0}'")]
    BadDefault(String),
    #[error("too many counters: the policy needs {given}, the map holds {max} per update slot; use fewer rules")]
    TooManyCounters { given: usize, max: usize },
}

impl FromStr for Action {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Action, PolicyError> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            o => Err(PolicyError::BadDefault(o.into())),
        }
    }
}

impl Rule {
    /// Parses `CIDR[:PORTS[:PROTO]]`; PORTS is `N`, `LO-HI` or `*`. Without a
    /// protocol, a rule with ports matches tcp and udp, one without ports any.
    pub fn parse(action: Action, s: &str) -> Result<Rule, PolicyError> {
        let mut parts = s.split(':');
        let cidr_s = parts.next().unwrap_or("");
        let ports_s = parts.next();
        let proto_s = parts.next();
        if parts.next().is_some() {
            return Err(PolicyError::Malformed(s.into()));
        }
        let cidr: Cidr = cidr_s.parse().map_err(|source| PolicyError::Cidr {
            rule: s.into(),
            source,
        })?;
        let ports = match ports_s {
            None | Some("*") => None,
            Some(p) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let lo: u16 = lo.parse().map_err(|_| PolicyError::BadPorts(s.into()))?;
                let hi: u16 = hi.parse().map_err(|_| PolicyError::BadPorts(s.into()))?;
                if lo == 0 || lo > hi {
                    return Err(PolicyError::BadPorts(s.into()));
                }
                Some((lo, hi))
            }
        };
        let proto = match proto_s {
            None | Some("any") => Proto::Any,
            Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            Some("icmp") => Proto::Icmp,
            Some(_) => return Err(PolicyError::BadProto(s.into())),
        };
        if proto == Proto::Icmp && ports.is_some() {
            return Err(PolicyError::IcmpPorts(s.into()));
        }
        Ok(Rule {
            action,
            cidr,
            proto,
            ports,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{a} {}", self.cidr)?;
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}")?,
            Some((lo, hi)) => write!(f, ":{lo}-{hi}")?,
            None if self.proto != Proto::Any => write!(f, ":*")?,
            None => {}
        }
        match self.proto {
            Proto::Any => Ok(()),
            p => write!(f, ":{}", format!("{p:?}").to_lowercase()),
        }
    }
}

/// One map entry of a compiled prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub proto: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub allow: bool,
    /// Copied down from an enclosing prefix (host addresses skip these).
    pub inherited: bool,
    /// Counter slot relative to the policy slot (see `maps`).
    pub counter: u16,
}

/// What a counter slot counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterLabel {
    pub slot: u16,
    pub label: String,
}

/// A policy in the maps' shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub egress_default_allow: bool,
    pub ingress_default_allow: bool,
    pub egress: BTreeMap<Cidr, Vec<Entry>>,
    pub ingress: BTreeMap<Cidr, Vec<Entry>>,
    /// Labels of every counter slot in use, fixed slots first.
    pub counters: Vec<CounterLabel>,
}

impl Compiled {
    pub fn prefixes(&self, dir: Direction) -> &BTreeMap<Cidr, Vec<Entry>> {
        match dir {
            Direction::Egress => &self.egress,
            Direction::Ingress => &self.ingress,
        }
    }
}

/// Fixed counter slots (bpf/policy.c).
pub const FIXED_COUNTERS: [(u16, &str); 15] = [
    (0, "spoofed source dropped"),
    (1, "egress default allow"),
    (2, "egress default deny"),
    (3, "non-IPv4 dropped"),
    (4, "packets to the sandbox"),
    (5, "egress replies/established passed"),
    (6, "egress non-initial packets without a flow dropped"),
    (7, "egress to a host address denied"),
    (8, "ingress default allow"),
    (9, "ingress default deny"),
    (10, "ingress replies/established passed"),
    (11, "ingress non-initial packets without a flow dropped"),
    (12, "ingress from the host (ingress proxy) allowed"),
    (13, "established flows denied after a policy change"),
    (14, "idle flows expired"),
];

fn ranges_overlap(a: Option<(u16, u16)>, b: Option<(u16, u16)>) -> bool {
    let (a, b) = (a.unwrap_or((0, u16::MAX)), b.unwrap_or((0, u16::MAX)));
    a.0 <= b.1 && b.0 <= a.1
}

fn protos_overlap(a: Proto, b: Proto) -> bool {
    a == Proto::Any || b == Proto::Any || a == b
}

/// Checks one direction's rules; the node's own addresses are not needed for that.
pub fn validate_rules(rules: &[Rule]) -> Result<(), PolicyError> {
    if rules.len() > MAX_RULES {
        return Err(PolicyError::TooManyRules {
            given: rules.len(),
            max: MAX_RULES,
        });
    }
    for (i, a) in rules.iter().enumerate() {
        for b in &rules[..i] {
            if a.cidr == b.cidr
                && protos_overlap(a.proto, b.proto)
                && ranges_overlap(a.ports, b.ports)
            {
                return Err(PolicyError::Overlap {
                    a: b.to_string(),
                    b: a.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Checks both directions of a policy.
pub fn validate(p: &Policy) -> Result<(), PolicyError> {
    validate_rules(&p.egress.rules)?;
    validate_rules(&p.ingress.rules)
}

fn entries_for(r: &Rule, counter: u16) -> Vec<Entry> {
    let (lo, hi) = r.ports.unwrap_or((0, u16::MAX));
    let protos: &[Proto] = match (r.proto, r.ports) {
        (Proto::Any, Some(_)) => &[Proto::Tcp, Proto::Udp],
        (p, _) => match p {
            Proto::Any => &[Proto::Any],
            Proto::Tcp => &[Proto::Tcp],
            Proto::Udp => &[Proto::Udp],
            Proto::Icmp => &[Proto::Icmp],
        },
    };
    protos
        .iter()
        .map(|p| Entry {
            proto: p.number(),
            port_lo: lo,
            port_hi: hi,
            allow: r.action == Action::Allow,
            inherited: false,
            counter,
        })
        .collect()
}

/// The implicit egress deny rules: link-local (metadata), loopback, 0.0.0.0/8,
/// multicast, the limited broadcast and the sandbox address pools (sandboxes
/// do not reach each other unless a rule allows it). The node's own addresses
/// and their directed-broadcast addresses are handled by the program (HOSTS map).
pub fn implicit_denies(pools: &[Cidr]) -> Vec<(Cidr, &'static str)> {
    let mut v = vec![
        (
            Cidr::new(Ipv4Addr::new(169, 254, 0, 0), 16),
            "link-local and metadata",
        ),
        (Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8), "loopback"),
        (Cidr::new(Ipv4Addr::new(0, 0, 0, 0), 8), "this network"),
        (Cidr::new(Ipv4Addr::new(224, 0, 0, 0), 4), "multicast"),
        (Cidr::new(Ipv4Addr::BROADCAST, 32), "broadcast"),
    ];
    for c in pools {
        if !v.iter().any(|(x, _)| x == c) {
            v.push((*c, "other sandboxes"));
        }
    }
    v
}

/// Each prefix's own entries followed by those of every enclosing prefix,
/// nearest first, because the LPM lookup returns only the longest match.
fn flatten(own: BTreeMap<Cidr, Vec<Entry>>) -> Result<BTreeMap<Cidr, Vec<Entry>>, PolicyError> {
    if own.len() > MAX_PREFIXES {
        return Err(PolicyError::TooManyPrefixes {
            given: own.len(),
            max: MAX_PREFIXES,
        });
    }
    let mut prefixes = BTreeMap::new();
    for c in own.keys() {
        let mut parents: Vec<&Cidr> = own.keys().filter(|o| *o != c && o.covers(c)).collect();
        parents.sort_by_key(|o| std::cmp::Reverse(o.prefix_len()));
        let mut list = own[c].clone();
        for par in parents {
            list.extend(own[par].iter().map(|e| Entry {
                inherited: true,
                ..*e
            }));
        }
        // Entries after one that matches everything are never reached (an
        // implicit deny-all CIDR under many 0.0.0.0/0:PORT rules stays small).
        if let Some(i) = list
            .iter()
            .position(|e| e.proto == 0 && e.port_lo == 0 && e.port_hi == u16::MAX)
        {
            list.truncate(i + 1);
        }
        if list.len() > RULES_PER_PREFIX {
            return Err(PolicyError::TooManyForPrefix {
                cidr: *c,
                given: list.len(),
                max: RULES_PER_PREFIX,
            });
        }
        prefixes.insert(*c, list);
    }
    Ok(prefixes)
}

/// Compiles a policy; `pools` (the sandbox address pools) are denied as
/// egress destinations unless a rule allows them.
pub fn compile(p: &Policy, pools: &[Cidr]) -> Result<Compiled, PolicyError> {
    validate(p)?;
    let mut counters: Vec<CounterLabel> = FIXED_COUNTERS
        .iter()
        .map(|(slot, l)| CounterLabel {
            slot: *slot,
            label: l.to_string(),
        })
        .collect();
    let mut slot = FIRST_RULE_COUNTER;
    let mut own_by_dir = Vec::new();
    for (dir, set) in [
        (Direction::Egress, &p.egress),
        (Direction::Ingress, &p.ingress),
    ] {
        // Own entries of each CIDR, in rule order, then implicit denies.
        let mut own: BTreeMap<Cidr, Vec<Entry>> = BTreeMap::new();
        for r in &set.rules {
            own.entry(r.cidr).or_default().extend(entries_for(r, slot));
            counters.push(CounterLabel {
                slot,
                label: format!("{} {r}", dir.name()),
            });
            slot += 1;
        }
        if dir == Direction::Egress {
            for (c, why) in implicit_denies(pools) {
                let rule = Rule {
                    action: Action::Deny,
                    cidr: c,
                    proto: Proto::Any,
                    ports: None,
                };
                own.entry(c).or_default().extend(entries_for(&rule, slot));
                counters.push(CounterLabel {
                    slot,
                    label: format!("egress implicit deny {c} ({why})"),
                });
                slot += 1;
            }
        }
        own_by_dir.push(flatten(own)?);
    }
    let used = usize::from(slot - FIRST_RULE_COUNTER);
    if used > usize::from(RULE_COUNTERS_PER_SLOT) {
        return Err(PolicyError::TooManyCounters {
            given: used,
            max: usize::from(RULE_COUNTERS_PER_SLOT),
        });
    }
    let ingress = own_by_dir.pop().unwrap_or_default();
    let egress = own_by_dir.pop().unwrap_or_default();
    Ok(Compiled {
        egress_default_allow: p.egress.default == Action::Allow,
        ingress_default_allow: p.ingress.default == Action::Allow,
        egress,
        ingress,
        counters,
    })
}

/// What the compiled maps decide for one new flow (the BPF lookup, in Rust):
/// the counter slot hit and whether it is allowed. `remote` is the destination
/// (egress) or source (ingress); `hosts` the node's addresses. Used by tests.
pub fn decide(
    c: &Compiled,
    dir: Direction,
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
    hosts: &[Ipv4Addr],
) -> (u16, bool) {
    let is_host = hosts.contains(&remote);
    // The node as an ingress source: every explicit rule counts (inherited
    // ones too), but not the default.
    let own_only = is_host && dir == Direction::Egress;
    let best = c
        .prefixes(dir)
        .iter()
        .filter(|(k, _)| k.contains(remote))
        .max_by_key(|(k, _)| k.prefix_len());
    if let Some((k, list)) = best {
        if !own_only || k.prefix_len() == 32 {
            for e in list {
                if own_only && e.inherited {
                    continue;
                }
                if (e.proto == 0 || e.proto == proto) && port >= e.port_lo && port <= e.port_hi {
                    return (e.counter, e.allow);
                }
            }
        }
    }
    match (dir, is_host) {
        (Direction::Ingress, true) => (12, true),
        (Direction::Egress, true) => (7, false),
        (Direction::Egress, _) if c.egress_default_allow => (1, true),
        (Direction::Egress, _) => (2, false),
        (Direction::Ingress, _) if c.ingress_default_allow => (8, true),
        (Direction::Ingress, _) => (9, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(allow: &[&str], deny: &[&str], default: Action) -> RuleSet {
        let mut r: Vec<Rule> = allow
            .iter()
            .map(|s| Rule::parse(Action::Allow, s).unwrap())
            .collect();
        r.extend(deny.iter().map(|s| Rule::parse(Action::Deny, s).unwrap()));
        RuleSet { default, rules: r }
    }

    fn rules(allow: &[&str], deny: &[&str], default: Action) -> Policy {
        Policy {
            egress: set(allow, deny, default),
            ingress: RuleSet::default(),
        }
    }

    fn ingress(allow: &[&str], deny: &[&str], default: Action) -> Policy {
        Policy {
            egress: RuleSet::default(),
            ingress: set(allow, deny, default),
        }
    }

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const E: Direction = Direction::Egress;
    const I: Direction = Direction::Ingress;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn rule_syntax() {
        let r = Rule::parse(Action::Allow, "10.0.0.0/8:80-443:tcp").unwrap();
        assert_eq!((r.proto, r.ports), (Proto::Tcp, Some((80, 443))));
        assert_eq!(r.to_string(), "allow 10.0.0.0/8:80-443:tcp");
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/8:0",
            "10.0.0.0/8:70000",
            "10.0.0.0/8:90-80",
            "10.0.0.0/8:80:sctp",
            "10.0.0.0/8:80:icmp",
            "10.0.0.0/8:80:tcp:x",
            "",
        ] {
            assert!(Rule::parse(Action::Deny, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlapping_rules_are_rejected_nested_cidrs_are_not() {
        for mk in [rules, ingress] {
            let p = mk(&["10.0.0.0/8:80-90"], &["10.0.0.0/8:85"], Action::Allow);
            assert!(matches!(validate(&p), Err(PolicyError::Overlap { .. })));
            let p = mk(
                &["10.0.0.0/8:80:tcp"],
                &["10.0.0.0/8:80:udp"],
                Action::Allow,
            );
            assert!(validate(&p).is_ok());
            let p = mk(&["10.1.0.0/16"], &["10.0.0.0/8"], Action::Allow);
            assert!(validate(&p).is_ok());
        }
        // The same rule in both directions is not an overlap.
        let mut p = rules(&["10.0.0.0/8:80"], &[], Action::Allow);
        p.ingress = set(&["10.0.0.0/8:80"], &[], Action::Allow);
        assert!(validate(&p).is_ok());
    }

    #[test]
    fn most_specific_cidr_decides_and_inherits_enclosing_rules() {
        let p = rules(&["10.1.0.0/16:80"], &["10.0.0.0/8"], Action::Allow);
        let c = compile(&p, &[]).unwrap();
        assert!(decide(&c, E, ip("10.1.2.3"), TCP, 80, &[]).1);
        assert!(
            !decide(&c, E, ip("10.1.2.3"), TCP, 22, &[]).1,
            "inherits the /8 deny"
        );
        assert!(!decide(&c, E, ip("10.9.2.3"), TCP, 80, &[]).1);
        assert!(
            decide(&c, E, ip("192.168.1.1"), UDP, 53, &[]).1,
            "default allow"
        );
        assert!(
            decide(&c, I, ip("10.9.2.3"), TCP, 80, &[]).1,
            "ingress untouched"
        );
    }

    #[test]
    fn ingress_rules_match_the_source_and_have_their_own_default() {
        let p = ingress(&["192.168.7.0/24:8080"], &["192.168.7.9/32"], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        assert!(decide(&c, I, ip("192.168.7.2"), TCP, 8080, &[]).1);
        assert!(!decide(&c, I, ip("192.168.7.2"), TCP, 8081, &[]).1);
        assert!(
            !decide(&c, I, ip("192.168.7.9"), TCP, 8080, &[]).1,
            "/32 deny wins"
        );
        assert_eq!(decide(&c, I, ip("8.8.8.8"), UDP, 53, &[]), (9, false));
        assert!(
            decide(&c, E, ip("8.8.8.8"), UDP, 53, &[]).1,
            "egress untouched"
        );
        // The node itself (the ingress proxy) always gets in.
        assert_eq!(
            decide(&c, I, ip("192.0.2.2"), TCP, 8081, &[ip("192.0.2.2")]),
            (12, true)
        );
        let e = c
            .counters
            .iter()
            .find(|l| l.label == "ingress allow 192.168.7.0/24:8080")
            .expect("labelled ingress counter");
        assert_eq!(decide(&c, I, ip("192.168.7.2"), TCP, 8080, &[]).0, e.slot);
    }

    #[test]
    fn metadata_and_host_are_blocked_unless_allowed_specifically() {
        let host = [ip("192.0.2.2")];
        let p = rules(&["0.0.0.0/0"], &[], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        assert!(!decide(&c, E, ip("169.254.169.254"), TCP, 80, &host).1);
        assert_eq!(decide(&c, E, ip("192.0.2.2"), TCP, 22, &host), (7, false));
        assert!(!decide(&c, E, ip("127.0.0.1"), TCP, 22, &host).1);
        assert!(decide(&c, E, ip("8.8.8.8"), UDP, 53, &host).1);
        let p = rules(&["169.254.169.254/32:80"], &[], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        assert!(decide(&c, E, ip("169.254.169.254"), TCP, 80, &host).1);
        assert!(!decide(&c, E, ip("169.254.169.254"), TCP, 81, &host).1);
        // A host address opens only through its own /32, never an inherited rule.
        let p = rules(&["192.0.2.2/32:22", "0.0.0.0/0"], &[], Action::Allow);
        let c = compile(&p, &[]).unwrap();
        assert!(decide(&c, E, ip("192.0.2.2"), TCP, 22, &host).1);
        assert!(!decide(&c, E, ip("192.0.2.2"), TCP, 80, &host).1);
        let p = rules(&["192.0.2.0/24"], &[], Action::Allow);
        let c = compile(&p, &[]).unwrap();
        assert!(!decide(&c, E, ip("192.0.2.2"), TCP, 80, &host).1);
        assert!(decide(&c, E, ip("192.0.2.3"), TCP, 80, &host).1);
    }

    #[test]
    fn broadcast_multicast_and_this_network_are_denied_unless_allowed() {
        let p = rules(&["0.0.0.0/0"], &[], Action::Allow);
        let c = compile(&p, &[]).unwrap();
        for d in ["255.255.255.255", "224.0.0.251", "239.1.2.3", "0.0.0.1"] {
            assert!(!decide(&c, E, ip(d), UDP, 5353, &[]).1, "{d}");
        }
        let p = rules(&["224.0.0.251/32:5353:udp"], &[], Action::Allow);
        let c = compile(&p, &[]).unwrap();
        assert!(decide(&c, E, ip("224.0.0.251"), UDP, 5353, &[]).1);
        assert!(!decide(&c, E, ip("224.0.0.252"), UDP, 5353, &[]).1);
    }

    #[test]
    fn many_port_rules_under_a_catch_all_fit_the_implicit_denies() {
        let allows: Vec<String> = (1..=8).map(|i| format!("0.0.0.0/0:{i}")).collect();
        let refs: Vec<&str> = allows.iter().map(|s| s.as_str()).collect();
        let p = rules(&refs, &[], Action::Deny);
        let c = compile(&p, &[Cidr::new(ip("10.88.0.0"), 24)]).unwrap();
        assert!(decide(&c, E, ip("8.8.8.8"), TCP, 3, &[]).1);
        assert!(!decide(&c, E, ip("169.254.169.254"), TCP, 3, &[]).1);
        assert!(!decide(&c, E, ip("10.88.0.7"), TCP, 3, &[]).1);
    }

    #[test]
    fn host_sources_obey_explicit_ingress_rules_but_not_the_default() {
        let host = [ip("192.0.2.2")];
        let p = ingress(&[], &["192.0.2.2/32"], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        assert!(!decide(&c, I, ip("192.0.2.2"), TCP, 8080, &host).1);
        let p = ingress(&[], &["192.0.2.0/24:22"], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        assert!(!decide(&c, I, ip("192.0.2.2"), TCP, 22, &host).1);
        assert_eq!(decide(&c, I, ip("192.0.2.2"), TCP, 8080, &host), (12, true));
    }

    #[test]
    fn other_sandboxes_are_unreachable_unless_allowed_specifically() {
        let pool = [Cidr::new(ip("10.88.0.0"), 24)];
        let p = rules(&[], &[], Action::Allow);
        let c = compile(&p, &pool).unwrap();
        assert!(
            !decide(&c, E, ip("10.88.0.7"), TCP, 8000, &[]).1,
            "pool denied under default allow"
        );
        assert!(decide(&c, E, ip("10.89.0.7"), TCP, 8000, &[]).1);
        let p = rules(&["10.88.0.7/32:8000"], &[], Action::Allow);
        let c = compile(&p, &pool).unwrap();
        assert!(
            decide(&c, E, ip("10.88.0.7"), TCP, 8000, &[]).1,
            "a /32 allow wins"
        );
        assert!(!decide(&c, E, ip("10.88.0.8"), TCP, 8000, &[]).1);
    }

    #[test]
    fn limits_give_clear_errors() {
        for mk in [rules, ingress] {
            let many: Vec<String> = (0..=MAX_RULES).map(|i| format!("10.{i}.0.0/16")).collect();
            let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            let p = mk(&refs, &[], Action::Deny);
            let e = compile(&p, &[]).unwrap_err();
            assert!(e.to_string().contains("at most 64"), "{e}");
            let ports: Vec<String> = (1..=9).map(|i| format!("10.0.0.0/8:{i}")).collect();
            let refs: Vec<&str> = ports.iter().map(|s| s.as_str()).collect();
            let p = mk(&refs, &[], Action::Deny);
            assert!(matches!(
                compile(&p, &[]),
                Err(PolicyError::TooManyForPrefix { .. })
            ));
        }
        // 64 rules in each direction still fit the counters of one slot.
        let many: Vec<String> = (0..MAX_RULES).map(|i| format!("10.{i}.0.0/16")).collect();
        let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        let mut p = rules(&refs, &[], Action::Deny);
        p.ingress = set(&refs, &[], Action::Deny);
        let c = compile(&p, &[Cidr::new(ip("10.88.0.0"), 24)]).unwrap();
        let max = c.counters.iter().map(|l| l.slot).max().unwrap();
        assert!(max < FIRST_RULE_COUNTER + RULE_COUNTERS_PER_SLOT);
    }

    #[test]
    fn every_rule_has_its_own_counter() {
        let p = rules(&["10.0.0.0/8:80", "10.0.0.0/8:81"], &[], Action::Deny);
        let c = compile(&p, &[]).unwrap();
        let (a, _) = decide(&c, E, ip("10.0.0.1"), TCP, 80, &[]);
        let (b, _) = decide(&c, E, ip("10.0.0.1"), UDP, 81, &[]);
        assert_ne!(a, b);
        assert!(c
            .counters
            .iter()
            .any(|l| l.slot == a && l.label.contains(":80")));
        let slots: std::collections::HashSet<u16> = c.counters.iter().map(|l| l.slot).collect();
        assert_eq!(slots.len(), c.counters.len(), "no slot is shared");
    }

    #[test]
    fn records_from_before_ingress_rules_still_parse() {
        let old = r#"{"default":"deny","rules":[{"action":"allow","cidr":"10.0.0.0/8","proto":"any","ports":null}]}"#;
        let p: Policy = serde_json::from_str(old).unwrap();
        assert_eq!(p.egress.default, Action::Deny);
        assert_eq!(p.egress.rules.len(), 1);
        assert_eq!(p.ingress, RuleSet::default());
        let back: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
