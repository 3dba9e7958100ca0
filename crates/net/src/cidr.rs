//! IPv4 CIDR blocks: parsing and containment.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network `addr/len` with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: Ipv4Addr,
    len: u8,
}

/// The range node slices are cut from when an agent does not ask for one
/// (`hearth_store::leases::CLUSTER_CIDR`, which must stay equal). Sandboxes
/// deny it as an egress destination unless a rule allows it.
pub const CLUSTER_CIDR: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 88, 0, 0),
    len: 16,
};

/// A CIDR string could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `A.B.C.D/LEN`.
    #[error("'{0}' is not an IPv4 CIDR like 10.0.0.0/8")]
    Malformed(String),
    /// Prefix length over 32.
    #[error("'{0}': prefix length must be 0..=32")]
    BadLength(String),
    /// Bits set after the prefix.
    #[error("'{given}' has host bits set; did you mean {suggest}?")]
    HostBits { given: String, suggest: Cidr },
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl Cidr {
    /// A network from an address and prefix length; host bits are cleared.
    pub fn new(addr: Ipv4Addr, len: u8) -> Cidr {
        let len = len.min(32);
        Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        }
    }

    /// The /32 of one address.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr::new(addr, 32)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// True when `other` lies inside `self` (or is equal to it).
    pub fn covers(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// The `i`th address of the block, if it has one.
    pub fn nth(&self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + i as u32))
    }

    /// Offset of `ip` inside the block.
    pub fn offset(&self, ip: Ipv4Addr) -> Option<u64> {
        self.contains(ip)
            .then(|| u64::from(u32::from(ip) - u32::from(self.addr)))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Malformed(s.into()))?;
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 2 {
            return Err(CidrError::Malformed(s.into()));
        }
        let len: u8 = l.parse().map_err(|_| CidrError::Malformed(s.into()))?;
        if len > 32 {
            return Err(CidrError::BadLength(s.into()));
        }
        let c = Cidr::new(addr, len);
        if c.addr != addr {
            return Err(CidrError::HostBits {
                given: s.into(),
                suggest: c,
            });
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_host_bits() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.0".parse().unwrap()));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().prefix_len(), 32);
        assert!(matches!(
            "10.1.0.1/16".parse::<Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "::1/128",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().size(), 1 << 32);
    }

    #[test]
    fn covers_is_nesting() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.9.0.0/16".parse().unwrap();
        assert!(a.covers(&b) && !b.covers(&a) && a.covers(&a));
    }
}
