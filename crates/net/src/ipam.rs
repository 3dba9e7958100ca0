//! Address management: a pure allocator of /32s from the node's slice of the
//! cluster CIDR, and a persistence seam (`LeaseStore`). In a cluster (and in
//! `hearthd dev`) the control plane leases the addresses through Raft and this
//! node-local record only follows it ([`Ipam::adopt`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Leases: sandbox id -> address. Versioned on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    pub version: u32,
    pub pool: Option<Cidr>,
    pub leases: BTreeMap<String, Ipv4Addr>,
}

/// Allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every usable address is leased.
    #[error("address pool {pool} is exhausted ({leased} addresses leased); remove sandboxes or give the node a larger slice")]
    Exhausted { pool: Cidr, leased: usize },
    /// The pool is too small to hold any sandbox.
    #[error("address pool {0} is too small: it needs at least a /30")]
    PoolTooSmall(Cidr),
    /// The node's recorded leases are from another pool than the one it got.
    #[error("this node's sandboxes hold {count} addresses of the pool {recorded}, but it was given {pool}; start it with --net-pool {recorded} (or remove its sandboxes first)")]
    PoolChanged {
        recorded: Cidr,
        pool: Cidr,
        count: usize,
    },
    /// The control plane granted an address this node cannot use.
    #[error("address {ip} granted to sandbox '{sandbox}' {why}; the node's leases disagree with the control plane's")]
    Rejected {
        sandbox: String,
        ip: Ipv4Addr,
        why: String,
    },
    /// Reading or writing the leases failed.
    #[error("lease store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where leases are kept between runs.
pub trait LeaseStore: Send + Sync {
    fn load(&self) -> Result<Leases, IpamError>;
    /// Must be atomic: after a crash either the old or the new leases are read.
    fn save(&self, leases: &Leases) -> Result<(), IpamError>;
}

/// Leases in one JSON file, replaced atomically (write, fsync, rename).
pub struct FileLeaseStore {
    path: PathBuf,
}

impl FileLeaseStore {
    pub fn new(path: PathBuf) -> FileLeaseStore {
        FileLeaseStore { path }
    }
}

impl LeaseStore for FileLeaseStore {
    fn load(&self) -> Result<Leases, IpamError> {
        let err = |source| IpamError::Store {
            path: self.path.display().to_string(),
            source,
        };
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Leases::default()),
            Err(e) => Err(err(e)),
        }
    }

    fn save(&self, leases: &Leases) -> Result<(), IpamError> {
        let err = |source| IpamError::Store {
            path: self.path.display().to_string(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(leases).map_err(|e| err(std::io::Error::other(e)))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&data).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// The pool recorded in `<state_dir>/leases.json` and how many leases it
/// holds; `None` when there is no readable record.
pub fn recorded_pool(state_dir: &std::path::Path) -> Option<(Cidr, usize)> {
    let l = FileLeaseStore::new(state_dir.join("leases.json"))
        .load()
        .ok()?;
    l.pool.map(|p| (p, l.leases.len()))
}

/// [`pick`], skipping the addresses in `avoid` (routed to a device of
/// another agent, or a manual route) while another one is free; when only
/// avoided ones are left, the lowest of them (its setup then fails naming the
/// route). Pure.
pub fn pick_avoiding(
    pool: Cidr,
    leases: &Leases,
    avoid: &std::collections::HashSet<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let lowest = pick(pool, leases)?;
    let used: std::collections::HashSet<Ipv4Addr> = leases.leases.values().copied().collect();
    Ok((1..pool.size() - 1)
        .filter_map(|i| pool.nth(i))
        .find(|ip| !used.contains(ip) && !avoid.contains(ip))
        .unwrap_or(lowest))
}

/// Picks a free address: the lowest unleased host address of `pool`, skipping
/// the network and broadcast addresses. Pure.
pub fn pick(pool: Cidr, leases: &Leases) -> Result<Ipv4Addr, IpamError> {
    if pool.prefix_len() > 30 {
        return Err(IpamError::PoolTooSmall(pool));
    }
    let used: std::collections::HashSet<Ipv4Addr> = leases.leases.values().copied().collect();
    (1..pool.size() - 1)
        .filter_map(|i| pool.nth(i))
        .find(|ip| !used.contains(ip))
        .ok_or(IpamError::Exhausted {
            pool,
            leased: used.len(),
        })
}

/// The allocator with its store; every change is saved before it is returned.
pub struct Ipam {
    pool: Cidr,
    store: Box<dyn LeaseStore>,
    leases: Mutex<Leases>,
}

impl Ipam {
    /// Refused when the recorded leases are from another pool (their
    /// addresses would be outside the new one, and may be another node's).
    pub fn open(pool: Cidr, store: Box<dyn LeaseStore>) -> Result<Ipam, IpamError> {
        let mut leases = store.load()?;
        if let Some(recorded) = leases
            .pool
            .filter(|r| *r != pool && !leases.leases.is_empty())
        {
            return Err(IpamError::PoolChanged {
                recorded,
                pool,
                count: leases.leases.len(),
            });
        }
        leases.version = 1;
        leases.pool = Some(pool);
        Ok(Ipam {
            pool,
            store,
            leases: Mutex::new(leases),
        })
    }

    pub fn pool(&self) -> Cidr {
        self.pool
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sandbox's address: its existing lease, or a new one.
    pub fn lease(&self, sandbox: &str) -> Result<Ipv4Addr, IpamError> {
        self.lease_avoiding(sandbox, &std::collections::HashSet::new())
    }

    /// [`Ipam::lease`] picking with [`pick_avoiding`].
    pub fn lease_avoiding(
        &self,
        sandbox: &str,
        avoid: &std::collections::HashSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        let mut l = self.locked();
        if let Some(ip) = l.leases.get(sandbox) {
            return Ok(*ip);
        }
        let ip = pick_avoiding(self.pool, &l, avoid)?;
        let mut next = l.clone();
        next.leases.insert(sandbox.to_string(), ip);
        self.store.save(&next)?;
        *l = next;
        Ok(ip)
    }

    /// Records an address leased elsewhere (the control plane) for the
    /// sandbox. Refused when it lies outside the pool or another sandbox of
    /// this node holds it: never a duplicate, even if the two disagree.
    pub fn adopt(&self, sandbox: &str, ip: Ipv4Addr) -> Result<Ipv4Addr, IpamError> {
        if !self.pool.contains(ip) {
            return Err(IpamError::Rejected {
                sandbox: sandbox.to_string(),
                ip,
                why: format!("is outside this node's pool {}", self.pool),
            });
        }
        self.adopt_any(sandbox, ip)
    }

    /// Records the address of a sandbox that migrated here: it stays leased
    /// from the slice of the node it was started on, so it may lie outside
    /// this node's pool. Refused when another sandbox of this node holds it.
    pub fn adopt_moved(&self, sandbox: &str, ip: Ipv4Addr) -> Result<Ipv4Addr, IpamError> {
        self.adopt_any(sandbox, ip)
    }

    fn adopt_any(&self, sandbox: &str, ip: Ipv4Addr) -> Result<Ipv4Addr, IpamError> {
        let mut l = self.locked();
        let reject = |why: String| IpamError::Rejected {
            sandbox: sandbox.to_string(),
            ip,
            why,
        };
        match l.leases.get(sandbox) {
            Some(have) if *have == ip => return Ok(ip),
            Some(have) => return Err(reject(format!("but it holds {have} here"))),
            None => {}
        }
        if let Some((other, _)) = l.leases.iter().find(|(_, v)| **v == ip) {
            return Err(reject(format!("but sandbox '{other}' holds it here")));
        }
        let mut next = l.clone();
        next.leases.insert(sandbox.to_string(), ip);
        self.store.save(&next)?;
        *l = next;
        Ok(ip)
    }

    /// Frees the sandbox's address (no-op when it has none).
    pub fn release(&self, sandbox: &str) -> Result<(), IpamError> {
        let mut l = self.locked();
        if !l.leases.contains_key(sandbox) {
            return Ok(());
        }
        let mut next = l.clone();
        next.leases.remove(sandbox);
        self.store.save(&next)?;
        *l = next;
        Ok(())
    }

    pub fn get(&self, sandbox: &str) -> Option<Ipv4Addr> {
        self.locked().leases.get(sandbox).copied()
    }

    pub fn all(&self) -> BTreeMap<String, Ipv4Addr> {
        self.locked().leases.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses routed elsewhere are skipped while another is free; when
    /// only they are left, the lowest is picked (its setup names the route).
    #[test]
    fn addresses_routed_elsewhere_are_skipped_while_another_is_free() {
        let pool: Cidr = "10.9.0.0/29".parse().unwrap();
        let ip = |n: u8| Ipv4Addr::new(10, 9, 0, n);
        let mut l = Leases::default();
        l.leases.insert("a".into(), ip(1));
        let avoid = std::collections::HashSet::from([ip(2), ip(3)]);
        assert_eq!(pick_avoiding(pool, &l, &avoid).unwrap(), ip(4));
        for n in 4..=6 {
            l.leases.insert(format!("s{n}"), ip(n));
        }
        assert_eq!(pick_avoiding(pool, &l, &avoid).unwrap(), ip(2));
        l.leases.insert("b".into(), ip(2));
        l.leases.insert("c".into(), ip(3));
        assert!(pick_avoiding(pool, &l, &avoid).is_err(), "exhausted");
    }

    fn ipam(pool: &str, dir: &std::path::Path) -> Ipam {
        Ipam::open(
            pool.parse().unwrap(),
            Box::new(FileLeaseStore::new(dir.join("leases.json"))),
        )
        .unwrap()
    }

    #[test]
    fn addresses_are_never_handed_out_twice_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam("10.77.0.0/29", d.path());
        let ips: Vec<_> = (0..6).map(|i| a.lease(&format!("s{i}")).unwrap()).collect();
        let set: std::collections::HashSet<_> = ips.iter().collect();
        assert_eq!(set.len(), 6);
        assert_eq!(ips[0], "10.77.0.1".parse::<Ipv4Addr>().unwrap());
        assert!(matches!(a.lease("s6"), Err(IpamError::Exhausted { .. })));
        assert_eq!(a.lease("s2").unwrap(), ips[2], "a lease is stable");
        drop(a);
        let b = ipam("10.77.0.0/29", d.path());
        assert!(matches!(b.lease("s6"), Err(IpamError::Exhausted { .. })));
        b.release("s3").unwrap();
        assert_eq!(b.lease("s6").unwrap(), ips[3]);
    }

    #[test]
    fn a_pool_change_is_refused_while_leases_are_held() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam("10.77.0.0/29", d.path());
        a.adopt("s1", "10.77.0.3".parse().unwrap()).unwrap();
        drop(a);
        assert_eq!(
            recorded_pool(d.path()).map(|(p, n)| (p.to_string(), n)),
            Some(("10.77.0.0/29".into(), 1))
        );
        let open = |pool: &str| {
            Ipam::open(
                pool.parse().unwrap(),
                Box::new(FileLeaseStore::new(d.path().join("leases.json"))),
            )
        };
        match open("10.78.0.0/29") {
            Err(e @ IpamError::PoolChanged { .. }) => {
                assert!(e.to_string().contains("--net-pool 10.77.0.0/29"), "{e}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        let a = open("10.77.0.0/29").unwrap();
        a.release("s1").unwrap();
        drop(a);
        assert!(
            open("10.78.0.0/29").is_ok(),
            "no leases: the pool may change"
        );
    }

    #[test]
    fn adopted_addresses_are_checked_against_the_pool_and_local_leases() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam("10.77.0.0/29", d.path());
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(a.adopt("s1", ip("10.77.0.3")).unwrap(), ip("10.77.0.3"));
        assert_eq!(a.adopt("s1", ip("10.77.0.3")).unwrap(), ip("10.77.0.3"));
        assert!(matches!(
            a.adopt("s2", ip("10.77.0.3")),
            Err(IpamError::Rejected { .. })
        ));
        assert!(matches!(
            a.adopt("s2", ip("10.78.0.3")),
            Err(IpamError::Rejected { .. })
        ));
        assert!(matches!(
            a.adopt("s1", ip("10.77.0.4")),
            Err(IpamError::Rejected { .. })
        ));
        assert_eq!(a.get("s1"), Some(ip("10.77.0.3")));
    }

    #[test]
    fn a_migrated_sandbox_keeps_an_address_outside_the_pool_but_never_a_taken_one() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam("10.77.0.0/29", d.path());
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            a.adopt_moved("m", ip("10.78.0.5")).unwrap(),
            ip("10.78.0.5")
        );
        assert_eq!(
            a.adopt_moved("m", ip("10.78.0.5")).unwrap(),
            ip("10.78.0.5")
        );
        assert!(matches!(
            a.adopt_moved("n", ip("10.78.0.5")),
            Err(IpamError::Rejected { .. })
        ));
        a.adopt("s1", ip("10.77.0.3")).unwrap();
        assert!(matches!(
            a.adopt_moved("n", ip("10.77.0.3")),
            Err(IpamError::Rejected { .. })
        ));
        drop(a);
        let b = ipam("10.77.0.0/29", d.path());
        assert_eq!(b.get("m"), Some(ip("10.78.0.5")), "kept across a reopen");
        b.release("m").unwrap();
        assert_eq!(b.get("m"), None);
    }

    #[test]
    fn tiny_pools_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam("10.77.0.0/31", d.path());
        assert!(matches!(a.lease("x"), Err(IpamError::PoolTooSmall(_))));
    }
}
