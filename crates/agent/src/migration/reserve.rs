//! Target: room on the sandboxes file system held for incoming migrations.
//!
//! An incoming migration fills its blank disk and its RAM file while the
//! stream arrives, long after its `prepare` checked the free space. Without
//! a hold, N prepares running at once each see the same free bytes and all
//! accept, and the file system fills mid-transfer (QEMU dies of SIGBUS on
//! its RAM file, the migration fails late). So each accepted prepare holds
//! what its migration still needs (its disk and RAM less what its dir has
//! allocated so far) until it ends (committed, aborted or removed), and a new
//! prepare counts the free bytes less what the others still hold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sandbox::lock;

/// A prepare refused: the sandboxes file system cannot hold one more
/// incoming migration besides those in flight.
#[derive(Debug, thiserror::Error)]
#[error(
    "node {node} has {free} bytes free on the file system of {} ({reserved} bytes of it held for {holders} other incoming migration(s) still in flight here) but sandbox '{sandbox}' needs {need} bytes there (its disk and RAM): free space there, wait for the incoming migrations to end, or migrate it to another node",
    dir.display()
)]
pub struct NoRoom {
    pub node: String,
    pub sandbox: String,
    /// The sandboxes dir whose file system is short.
    pub dir: PathBuf,
    /// Bytes free there (`statvfs`).
    pub free: u64,
    /// Bytes the other incoming migrations still need there.
    pub reserved: u64,
    /// How many incoming migrations hold them.
    pub holders: usize,
    /// Bytes this one needs.
    pub need: u64,
}

struct Hold {
    /// Bytes the migration needs in all (disk and RAM).
    need: u64,
    /// Its incoming dir: what is allocated there is no longer held.
    dir: PathBuf,
}

#[derive(Default)]
struct Book {
    next: u64,
    holds: HashMap<u64, Hold>,
}

/// The holds of the incoming migrations in flight on this node.
#[derive(Default, Clone)]
pub(crate) struct Ledger(Arc<Mutex<Book>>);

/// One incoming migration's hold; released when dropped (its migration
/// ended, its prepare failed or panicked).
pub(crate) struct Reservation {
    book: Arc<Mutex<Book>>,
    key: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.book).holds.remove(&self.key);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", self.key)
    }
}

/// Refuses unless `free` bytes hold `reserved` (for `holders` others) and `need`.
pub(crate) fn check_room(
    node: &str,
    sandbox: &str,
    dir: &Path,
    free: u64,
    reserved: u64,
    holders: usize,
    need: u64,
) -> Result<(), NoRoom> {
    if free.saturating_sub(reserved) < need {
        return Err(NoRoom {
            node: node.to_string(),
            sandbox: sandbox.to_string(),
            dir: dir.to_path_buf(),
            free,
            reserved,
            holders,
            need,
        });
    }
    Ok(())
}

/// Bytes allocated (`st_blocks`) by the files under `dir`; what cannot be
/// read counts as nothing (its migration then holds all it needs).
pub(crate) fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path()),
            Ok(m) => m.blocks().saturating_mul(512),
            Err(_) => 0,
        })
        .fold(0u64, u64::saturating_add)
}

impl Ledger {
    /// Holds `need` bytes for the incoming migration of `sandbox` (its dir
    /// `incoming_dir`, which need not exist yet) if the file system of the
    /// sandboxes dir `fs_dir` has room for it besides what the migrations in
    /// flight still need. `free` reads the free bytes; it is called after
    /// the others' allocations are read (so their growth in between is not
    /// counted twice), and under the ledger's lock, so two prepares never
    /// both count the same bytes.
    pub(crate) fn reserve(
        &self,
        node: &str,
        sandbox: &str,
        fs_dir: &Path,
        incoming_dir: &Path,
        need: u64,
        free: impl FnOnce() -> std::io::Result<u64>,
    ) -> Result<Reservation, ReserveError> {
        let mut book = lock(&self.0);
        let holders = book.holds.len();
        let reserved = book
            .holds
            .values()
            .map(|h| h.need.saturating_sub(allocated(&h.dir)))
            .fold(0u64, u64::saturating_add);
        let free = free().map_err(|source| ReserveError::Free {
            dir: fs_dir.to_path_buf(),
            source,
        })?;
        check_room(node, sandbox, fs_dir, free, reserved, holders, need)?;
        let key = book.next;
        book.next += 1;
        book.holds.insert(
            key,
            Hold {
                need,
                dir: incoming_dir.to_path_buf(),
            },
        );
        Ok(Reservation {
            book: self.0.clone(),
            key,
        })
    }

    /// Bytes held now, and by how many migrations (for tests and logs).
    #[cfg(test)]
    pub(crate) fn held(&self) -> (u64, usize) {
        let book = lock(&self.0);
        let bytes = book
            .holds
            .values()
            .map(|h| h.need.saturating_sub(allocated(&h.dir)))
            .sum();
        (bytes, book.holds.len())
    }
}

/// Why a hold was not granted.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
    #[error("cannot read the free space of {}: {source}", dir.display())]
    Free {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve(
        l: &Ledger,
        sb: &str,
        dir: &Path,
        need: u64,
        free: u64,
    ) -> Result<Reservation, ReserveError> {
        l.reserve(
            "node-b",
            sb,
            Path::new("/data/sandboxes"),
            dir,
            need,
            || Ok(free),
        )
    }

    /// R1: prepares racing on threads each see the same free bytes; the
    /// ledger lets exactly as many in as the room holds, and the refusal
    /// names the node, the free, held and needed bytes.
    #[test]
    fn concurrent_prepares_never_share_the_same_free_bytes() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::default();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let (l, b, dir) = (l.clone(), barrier.clone(), d.path().join(format!("sb{n}")));
                std::thread::spawn(move || {
                    b.wait();
                    reserve(&l, &format!("sb{n}"), &dir, 30, 100)
                })
            })
            .collect();
        let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let ok: Vec<_> = got.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(ok.len(), 3, "100 bytes free hold three migrations of 30");
        assert_eq!(l.held(), (90, 3));
        let e = got.into_iter().find_map(|r| r.err()).unwrap().to_string();
        assert!(
            e.contains("node node-b has 100 bytes free on the file system of /data/sandboxes")
                && e.contains("90 bytes of it held for 3 other incoming migration(s)")
                && e.contains("needs 30 bytes")
                && e.contains("migrate it to another node"),
            "{e}"
        );
    }

    /// R1: a hold ends on every way out: dropped (the migration ended or its
    /// prepare failed), and when the thread holding it panics.
    #[test]
    fn a_hold_is_released_when_dropped_and_when_its_holder_panics() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::default();
        let a = reserve(&l, "a", &d.path().join("a"), 60, 100).unwrap();
        assert!(matches!(
            reserve(&l, "b", &d.path().join("b"), 60, 100),
            Err(ReserveError::NoRoom(NoRoom {
                reserved: 60,
                holders: 1,
                need: 60,
                ..
            }))
        ));
        drop(a);
        assert_eq!(l.held(), (0, 0));
        let l2 = l.clone();
        let dir = d.path().join("c");
        let panicked = std::thread::spawn(move || {
            let _held = reserve(&l2, "c", &dir, 60, 100).unwrap();
            panic!("a prepare that panics midway");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(l.held(), (0, 0), "a panicking holder left its hold");
        let _b = reserve(&l, "b", &d.path().join("b"), 60, 100).unwrap();
    }

    /// R1: what an incoming migration has already written is counted in
    /// the free bytes (used), so it is no longer held: not counted twice.
    #[test]
    fn what_a_migration_has_written_is_no_longer_held() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::default();
        let dir = d.path().join("a");
        let _a = reserve(&l, "a", &dir, 4 << 20, u64::MAX).unwrap();
        assert_eq!(l.held(), (4 << 20, 1));
        std::fs::create_dir_all(dir.join("vm")).unwrap();
        std::fs::write(dir.join("vm").join("ram"), vec![1u8; 1 << 20]).unwrap();
        let (held, _) = l.held();
        assert!(
            ((3 << 20) - (64 << 10)..=3 << 20).contains(&held),
            "1 MiB written of 4 MiB: {held} bytes held"
        );
        // A failure to read the free space is said as such.
        let e = l
            .reserve("n", "b", Path::new("/x"), &d.path().join("b"), 1, || {
                Err(std::io::Error::other("boom"))
            })
            .unwrap_err();
        assert!(e.to_string().contains("free space of /x: boom"), "{e}");
    }
}
