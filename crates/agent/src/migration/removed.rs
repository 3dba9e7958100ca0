//! Target side: the ids of incoming VMs removed before any commit, kept on
//! disk (`DATA_DIR/migrations-removed.json`, written atomically and
//! fsynced), so the answer to a source's abort ("removed uncommitted": resume
//! your VM) survives a restart of this agent. Without it a target restarted
//! between a failed commit and the source's abort answered "knows nothing",
//! which leaves the source paused for good (issue 7). Bounded: the oldest
//! ids go first beyond [`REMOVED_MAX`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sandbox::lock;

/// The file in the data dir.
pub(crate) const REMOVED_FILE: &str = "migrations-removed.json";

/// The file of the control plane's migration attempts this target gave up
/// (answered "never committed" to the leader's question): a prepare or a
/// commit of one of them is refused, so that answer stays true. The same
/// bounded, durable set of ids, of attempts instead of sandboxes.
pub(crate) const GIVEN_UP_FILE: &str = "migrations-given-up.json";

/// How many ids are kept (a source asks about its migration within minutes;
/// an id past the bound reads as unknown, which keeps a source paused, the
/// safe side).
pub(crate) const REMOVED_MAX: usize = 1024;

/// The set, in memory and (with a data dir) on disk.
#[derive(Default)]
pub(crate) struct RemovedUncommitted {
    path: Option<PathBuf>,
    ids: Mutex<VecDeque<String>>,
}

impl RemovedUncommitted {
    /// The set kept in `data_dir` (empty if the file is missing; an
    /// unreadable file is reported and starts empty).
    pub(crate) fn load(data_dir: &Path) -> RemovedUncommitted {
        Self::load_file(data_dir, REMOVED_FILE)
    }

    /// The set kept in `data_dir/file`.
    pub(crate) fn load_file(data_dir: &Path, file: &str) -> RemovedUncommitted {
        let path = data_dir.join(file);
        let ids = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<VecDeque<String>>(&b) {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(
                        "ignoring {} ({e}): aborts of migrations removed before a restart will be answered as unknown",
                        path.display()
                    );
                    VecDeque::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => {
                // why: a file that exists but cannot be read is not an empty
                // set; writing over it would lose its ids. Keep it aside.
                let aside = path.with_extension("unreadable");
                tracing::error!(
                    "cannot read {} ({e}); moved aside to {}: aborts of migrations removed before a restart will be answered as unknown",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, &aside);
                VecDeque::new()
            }
        };
        RemovedUncommitted {
            path: Some(path),
            ids: Mutex::new(ids),
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        lock(&self.ids).iter().any(|x| x == id)
    }

    /// Records that the incoming VM of `id` was removed uncommitted; durable
    /// when this returns Ok.
    pub(crate) fn insert(&self, id: &str) -> std::io::Result<()> {
        self.add(id);
        self.save()
    }

    /// Adds `id` in memory only (visible to [`Self::contains`] at once);
    /// [`Self::save`] makes it durable.
    pub(crate) fn add(&self, id: &str) {
        let mut ids = lock(&self.ids);
        if !ids.iter().any(|x| x == id) {
            ids.push_back(id.to_string());
            while ids.len() > REMOVED_MAX {
                ids.pop_front();
            }
        }
    }

    /// Writes the set as it is now; durable when this returns Ok.
    pub(crate) fn save(&self) -> std::io::Result<()> {
        let ids = lock(&self.ids);
        self.store(&ids)
    }

    /// Forgets `id` (a new incoming migration of it is prepared).
    pub(crate) fn remove(&self, id: &str) -> std::io::Result<()> {
        let mut ids = lock(&self.ids);
        let before = ids.len();
        ids.retain(|x| x != id);
        if ids.len() == before {
            return Ok(());
        }
        self.store(&ids)
    }

    /// Writes the set atomically (temp file, fsync, rename, fsync of the dir).
    fn store(&self, ids: &VecDeque<String>) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(ids).map_err(std::io::Error::other)?;
        crate::durable::write(
            path,
            &bytes,
            crate::durable::MODE_DEFAULT,
            crate::durable::DirSync::Now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 7, finding 4: what a target removed uncommitted is still known
    /// after a restart (a fresh load of the data dir), forgotten when the id
    /// is prepared again, and the set is bounded.
    #[test]
    fn removed_uncommitted_ids_survive_a_restart_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let set = RemovedUncommitted::load(dir.path());
        assert!(!set.contains("sb1"));
        set.insert("sb1").unwrap();
        set.insert("sb2").unwrap();
        set.insert("sb1").unwrap();
        let after = RemovedUncommitted::load(dir.path());
        assert!(after.contains("sb1") && after.contains("sb2"));
        after.remove("sb1").unwrap();
        let again = RemovedUncommitted::load(dir.path());
        assert!(!again.contains("sb1") && again.contains("sb2"));

        for i in 0..REMOVED_MAX + 10 {
            again.insert(&format!("x{i}")).unwrap();
        }
        let bounded = RemovedUncommitted::load(dir.path());
        assert_eq!(lock(&bounded.ids).len(), REMOVED_MAX);
        assert!(!bounded.contains("sb2") && !bounded.contains("x0"));
        assert!(bounded.contains(&format!("x{}", REMOVED_MAX + 9)));

        // A damaged file starts empty (aborts then read as unknown: the
        // source stays paused, the safe side) and is rewritten on the next insert.
        std::fs::write(dir.path().join(REMOVED_FILE), b"{not json").unwrap();
        let damaged = RemovedUncommitted::load(dir.path());
        assert!(!damaged.contains("x1000"));
        damaged.insert("y").unwrap();
        assert!(RemovedUncommitted::load(dir.path()).contains("y"));
    }
}
