//! Sandbox addresses as replicated state: every node agent gets a slice of
//! the cluster CIDR, and every sandbox address is leased from its node's
//! slice by a committed command, so two sandboxes never get the same address
//! and a restarted agent finds its slice and leases where it left them.
//!
//! Pure address arithmetic; [`crate::State::apply`] calls it at apply time.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The range node slices are carved from when an agent does not ask for one.
pub const CLUSTER_CIDR: Cidr = Cidr {
    base: u32::from_be_bytes([10, 88, 0, 0]),
    prefix: 16,
};
/// Size of an allocated node slice (254 sandbox addresses).
pub const SLICE_PREFIX: u8 = 24;
/// Where a slice an agent asks for (`--net-pool`) must lie: the private
/// 10.0.0.0/8, which holds [`CLUSTER_CIDR`].
pub const WANT_RANGE: Cidr = Cidr {
    base: u32::from_be_bytes([10, 0, 0, 0]),
    prefix: 8,
};
/// Smallest slice an agent may ask for (two host addresses).
pub const MAX_WANT_PREFIX: u8 = 30;
/// Largest slice an agent may ask for (65,534 sandbox addresses), checked
/// where a request comes in ([`check_want`]); the apply-time check keeps the
/// older, wider bound so a replayed log decides as it did when written.
pub const MIN_WANT_PREFIX: u8 = 16;

/// Why a requested slice (`--net-pool`) is refused before it is proposed,
/// `None` when it is fine: it must be a /16 to a /30 inside 10.0.0.0/8 and
/// must not hold the whole cluster range. (Overlap with another node's slice
/// is decided at apply time, against the committed slices.)
pub fn check_want(node: &str, want: Cidr) -> Option<String> {
    if want.prefix < MIN_WANT_PREFIX
        || want.prefix > MAX_WANT_PREFIX
        || !WANT_RANGE.contains(Ipv4Addr::from(want.base))
    {
        return Some(format!(
            "node {node}: the requested address slice {want} (--net-pool, or when it is not given the pool recorded in the node's <data>/net/leases.json) is refused: a node's address slice must be a /{MIN_WANT_PREFIX} to a /{MAX_WANT_PREFIX} inside {WANT_RANGE} (e.g. 10.77.0.0/24); give another --net-pool"
        ));
    }
    if want.overlaps(CLUSTER_CIDR) && want.prefix <= CLUSTER_CIDR.prefix {
        return Some(format!(
            "node {node}: the requested address slice {want} (--net-pool, or when it is not given the pool recorded in the node's <data>/net/leases.json) would take the whole cluster range {CLUSTER_CIDR} that other nodes get their slices from; give a smaller --net-pool (e.g. 10.88.200.0/24) or one outside it"
        ));
    }
    None
}

/// Why a node id or a requested slice is refused, `None` when both are fine.
pub fn check_join(node: &str, instance: &str, want: Option<Cidr>) -> Option<String> {
    if node.is_empty()
        || node.len() > 64
        || !node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Some(format!(
            "node id '{}' must be 1 to 64 characters of a-z, 0-9, '.', '_' and '-'",
            node.chars().take(80).collect::<String>()
        ));
    }
    if instance.is_empty() {
        return Some(format!(
            "node {node}: the agent instance is empty; the agent sends the id from its node-instance file"
        ));
    }
    if let Some(w) = want {
        if w.prefix > MAX_WANT_PREFIX
            || !WANT_RANGE.contains(Ipv4Addr::from(w.base))
            || w.prefix < WANT_RANGE.prefix
        {
            return Some(format!(
                "node {node}: address slice {w} must lie inside {WANT_RANGE} and be at most a /{MAX_WANT_PREFIX}; give another --net-pool"
            ));
        }
    }
    None
}

/// An IPv4 network, `a.b.c.d/n`, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

/// A CIDR string that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an IPv4 network a.b.c.d/n with zero host bits")]
pub struct BadCidr(pub String);

impl Cidr {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Number of addresses it spans.
    pub fn size(self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.base
    }

    pub fn overlaps(self, other: Cidr) -> bool {
        self.contains(Ipv4Addr::from(other.base)) || other.contains(Ipv4Addr::from(self.base))
    }

    /// The `i`-th address of the network.
    fn nth(self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(self.base + i as u32))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let c = Cidr {
            base: u32::from(ip),
            prefix,
        };
        if c.base & !c.mask() != 0 {
            return Err(bad());
        }
        Ok(c)
    }
}

impl TryFrom<String> for Cidr {
    type Error = BadCidr;
    fn try_from(s: String) -> Result<Cidr, BadCidr> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

/// A node's slice of the cluster CIDR and the addresses leased from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSlice {
    pub node: String,
    /// The agent instance that holds it (see `NodeRecord::instance`).
    pub instance: String,
    pub cidr: Cidr,
    /// Sandbox id (the agent's) -> address.
    #[serde(default)]
    pub leases: BTreeMap<String, Ipv4Addr>,
    /// The node was removed (`hearth node rm`) while its agent instance still
    /// held leases: the slice stays taken (no other node gets it) and leases
    /// nothing new until that instance joins again or releases them all.
    #[serde(default)]
    pub retired: bool,
}

impl NodeSlice {
    /// A host address of the slice (not its network or broadcast address).
    pub fn usable(&self, ip: Ipv4Addr) -> bool {
        let i = u64::from(u32::from(ip).wrapping_sub(self.cidr.base));
        self.cidr.prefix <= 30 && self.cidr.contains(ip) && i >= 1 && i < self.cidr.size() - 1
    }

    /// The lowest free host address (network and broadcast addresses are
    /// never handed out), or `None` when every one is leased.
    pub fn free_address(&self) -> Option<Ipv4Addr> {
        if self.cidr.prefix > 30 {
            return None;
        }
        let used: std::collections::BTreeSet<Ipv4Addr> = self.leases.values().copied().collect();
        (1..self.cidr.size() - 1)
            .filter_map(|i| self.cidr.nth(i))
            .find(|ip| !used.contains(ip))
    }
}

/// The first `SLICE_PREFIX` slice of [`CLUSTER_CIDR`] that overlaps none of `taken`.
pub fn free_slice<'a>(taken: impl Iterator<Item = &'a Cidr> + Clone) -> Option<Cidr> {
    let step = 1u64 << (32 - u32::from(SLICE_PREFIX));
    (0..CLUSTER_CIDR.size() / step)
        .map(|k| Cidr {
            base: CLUSTER_CIDR.base + (k * step) as u32,
            prefix: SLICE_PREFIX,
        })
        .find(|c| taken.clone().all(|t| !t.overlaps(*c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_print_and_overlap() {
        let a: Cidr = "10.88.0.0/24".parse().unwrap();
        assert_eq!(a.to_string(), "10.88.0.0/24");
        assert!("10.88.0.1/24".parse::<Cidr>().is_err(), "host bits set");
        assert!("10.88.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        assert!(a.overlaps(CLUSTER_CIDR) && CLUSTER_CIDR.overlaps(a));
        assert!(!a.overlaps("10.88.1.0/24".parse().unwrap()));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            "\"10.88.0.0/24\"",
            "stored as text"
        );
    }

    #[test]
    fn free_slice_skips_taken_ranges_of_any_size() {
        let taken: Vec<Cidr> = vec!["10.88.0.0/23".parse().unwrap()];
        assert_eq!(
            free_slice(taken.iter()).unwrap().to_string(),
            "10.88.2.0/24"
        );
        let all = [CLUSTER_CIDR];
        assert_eq!(free_slice(all.iter()), None);
    }

    #[test]
    fn join_requests_are_validated() {
        let c = |s: &str| Some(s.parse::<Cidr>().unwrap());
        assert_eq!(check_join("node-1.a_b", "i", c("10.77.0.0/24")), None);
        assert_eq!(check_join("n", "i", None), None);
        assert!(check_join("n", "", None).unwrap().contains("instance"));
        assert!(check_join("N", "i", None).is_some(), "upper case");
        assert!(check_join("a/b", "i", None).is_some());
        assert!(check_join("", "i", None).is_some());
        assert!(check_join(&"a".repeat(65), "i", None).is_some());
        assert!(check_join("n", "i", c("10.9.0.0/31"))
            .unwrap()
            .contains("/30"));
        assert!(check_join("n", "i", c("192.168.0.0/24")).is_some());
        assert!(check_join("n", "i", c("0.0.0.0/0")).is_some());
        assert!(check_join("n", "i", c("10.0.0.0/8")).is_none());
    }

    #[test]
    fn requested_slices_are_sensible_sizes_and_never_the_whole_cluster_range() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        for ok in [
            "10.77.0.0/24",
            "10.77.0.0/16",
            "10.77.0.0/30",
            "10.88.200.0/24",
            "10.88.0.0/17",
        ] {
            assert_eq!(check_want("n", c(ok)), None, "{ok}");
        }
        for (bad, why) in [
            ("10.0.0.0/8", "/16 to a /30"),
            ("10.64.0.0/10", "/16 to a /30"),
            ("10.76.0.0/15", "/16 to a /30"),
            ("10.77.0.0/31", "/16 to a /30"),
            ("192.168.0.0/24", "inside 10.0.0.0/8"),
            ("10.88.0.0/16", "whole cluster range"),
        ] {
            let e = check_want("n", c(bad)).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains(why) && e.contains("--net-pool"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_slice_hands_out_host_addresses_only() {
        let mut s = NodeSlice {
            node: "n".into(),
            instance: "i".into(),
            cidr: "10.9.0.0/30".parse().unwrap(),
            leases: BTreeMap::new(),
            retired: false,
        };
        let a = s.free_address().unwrap();
        s.leases.insert("a".into(), a);
        let b = s.free_address().unwrap();
        s.leases.insert("b".into(), b);
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.9.0.1".into(), "10.9.0.2".into())
        );
        assert_eq!(s.free_address(), None);
    }
}
