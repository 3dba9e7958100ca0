//! The state machine: [`State`] in memory, every row persisted in redb.
//!
//! Applying a batch runs [`State::apply`] per entry, then writes the rows it
//! touched and the last applied log id and membership in one transaction, so
//! after a crash the state on disk matches exactly the log id it claims.
//! Snapshots are the whole state as JSON, kept in the `snapshot` table so a
//! restarted member can still serve one to a lagging follower.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::{Reply, Row, State};
use crate::{Entry, Node, NodeId, TypeConfig};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_nodes");
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_sandboxes");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_images");
const SLICES: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_slices");
const TOMBSTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_tombstones");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

type SErr = StorageError<NodeId>;

/// What a snapshot holds besides openraft's own metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: State,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The applied state, shared with readers.
pub type SharedState = Arc<RwLock<State>>;

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    state: SharedState,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

fn rerr(e: impl Into<redb::Error>) -> SErr {
    StorageIOError::read_state_machine(&e.into()).into()
}

fn werr(e: impl Into<redb::Error>) -> SErr {
    StorageIOError::write_state_machine(&e.into()).into()
}

fn jerr(e: serde_json::Error) -> SErr {
    StorageIOError::read_state_machine(&e).into()
}

impl StateMachine {
    /// Loads the persisted state (all rows and the applied log id).
    pub(crate) fn load(db: Arc<Database>) -> Result<StateMachine, SErr> {
        let tx = db.begin_write().map_err(werr)?;
        for t in [
            NODES, SANDBOXES, IMAGES, SLICES, TOMBSTONES, SM_META, SNAPSHOT,
        ] {
            tx.open_table(t).map_err(werr)?;
        }
        tx.commit().map_err(werr)?;

        let tx = db.begin_read().map_err(rerr)?;
        let mut state = State::default();
        fn rows<T: serde::de::DeserializeOwned>(
            tx: &redb::ReadTransaction,
            def: TableDefinition<&str, &[u8]>,
        ) -> Result<Vec<(String, T)>, SErr> {
            let t = tx.open_table(def).map_err(rerr)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(rerr)? {
                let (k, v) = row.map_err(rerr)?;
                out.push((
                    k.value().to_string(),
                    serde_json::from_slice(v.value()).map_err(jerr)?,
                ));
            }
            Ok(out)
        }
        state.nodes = rows(&tx, NODES)?.into_iter().collect();
        state.sandboxes = rows(&tx, SANDBOXES)?.into_iter().collect();
        state.images = rows(&tx, IMAGES)?.into_iter().collect();
        state.slices = rows(&tx, SLICES)?.into_iter().collect();
        state.tombstones = rows(&tx, TOMBSTONES)?.into_iter().collect();
        state.reindex();
        let meta = tx.open_table(SM_META).map_err(rerr)?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, SErr> {
            Ok(meta.get(k).map_err(rerr)?.map(|v| v.value().to_vec()))
        };
        state.cluster_id = match get("cluster_id")? {
            Some(b) => serde_json::from_slice(&b).map_err(jerr)?,
            None => None,
        };
        let last_applied = match get("last_applied")? {
            Some(b) => serde_json::from_slice(&b).map_err(jerr)?,
            None => None,
        };
        let membership = match get("membership")? {
            Some(b) => serde_json::from_slice(&b).map_err(jerr)?,
            None => StoredMembership::default(),
        };
        Ok(StateMachine {
            db,
            state: Arc::new(RwLock::new(state)),
            last_applied,
            membership,
        })
    }

    pub fn shared(&self) -> SharedState {
        self.state.clone()
    }

    /// Writes the touched rows (or, with `all`, every row, replacing the
    /// tables) and the applied log id, in one transaction.
    fn persist(&self, state: &State, dirty: Vec<Row>, all: bool) -> Result<(), SErr> {
        let mut tx = self.db.begin_write().map_err(werr)?;
        if !all {
            // why: the Raft log (fsynced on every append) is the source of truth.
            // A crash may lose the last applies; the state machine then reports an
            // older last-applied id and openraft re-applies those entries from the
            // log (apply is deterministic). Nothing is purged from the log before a
            // snapshot is saved with an fsyncing commit, which also makes every
            // earlier commit durable. So one fsync per write, not two.
            tx.set_durability(redb::Durability::Eventual);
        }
        {
            let mut nodes = tx.open_table(NODES).map_err(werr)?;
            let mut sbs = tx.open_table(SANDBOXES).map_err(werr)?;
            let mut imgs = tx.open_table(IMAGES).map_err(werr)?;
            let mut slices = tx.open_table(SLICES).map_err(werr)?;
            let mut tombs = tx.open_table(TOMBSTONES).map_err(werr)?;
            let put = |t: &mut redb::Table<&str, &[u8]>,
                       k: &str,
                       v: Option<Vec<u8>>|
             -> Result<(), SErr> {
                match v {
                    Some(b) => t.insert(k, b.as_slice()).map(|_| ()).map_err(werr),
                    None => t.remove(k).map(|_| ()).map_err(werr),
                }
            };
            let enc = |v: &dyn erased::Ser| v.json();
            if all {
                nodes.retain(|_, _| false).map_err(werr)?;
                sbs.retain(|_, _| false).map_err(werr)?;
                imgs.retain(|_, _| false).map_err(werr)?;
                slices.retain(|_, _| false).map_err(werr)?;
                tombs.retain(|_, _| false).map_err(werr)?;
                for (k, v) in &state.nodes {
                    put(&mut nodes, k, Some(enc(v)?))?;
                }
                for (k, v) in &state.sandboxes {
                    put(&mut sbs, k, Some(enc(v)?))?;
                }
                for (k, v) in &state.images {
                    put(&mut imgs, k, Some(enc(v)?))?;
                }
                for (k, v) in &state.slices {
                    put(&mut slices, k, Some(enc(v)?))?;
                }
                for (k, v) in &state.tombstones {
                    put(&mut tombs, k, Some(enc(v)?))?;
                }
            }
            for row in dirty {
                match row {
                    Row::Node(k) => {
                        let v = state.nodes.get(&k).map(|v| enc(v)).transpose()?;
                        put(&mut nodes, &k, v)?
                    }
                    Row::Sandbox(k) => {
                        let v = state.sandboxes.get(&k).map(|v| enc(v)).transpose()?;
                        put(&mut sbs, &k, v)?
                    }
                    Row::Image(k) => {
                        let v = state.images.get(&k).map(|v| enc(v)).transpose()?;
                        put(&mut imgs, &k, v)?
                    }
                    Row::Slice(k) => {
                        let v = state.slices.get(&k).map(|v| enc(v)).transpose()?;
                        put(&mut slices, &k, v)?
                    }
                    Row::Tombstone(k) => {
                        let v = state.tombstones.get(&k).map(|v| enc(v)).transpose()?;
                        put(&mut tombs, &k, v)?
                    }
                    Row::Meta => {}
                }
            }
            let mut meta = tx.open_table(SM_META).map_err(werr)?;
            let cid = serde_json::to_vec(&state.cluster_id).map_err(jerr)?;
            meta.insert("cluster_id", cid.as_slice()).map_err(werr)?;
            let la = serde_json::to_vec(&self.last_applied).map_err(jerr)?;
            meta.insert("last_applied", la.as_slice()).map_err(werr)?;
            let mb = serde_json::to_vec(&self.membership).map_err(jerr)?;
            meta.insert("membership", mb.as_slice()).map_err(werr)?;
        }
        tx.commit().map_err(werr)
    }

    fn save_snapshot(&self, s: &StoredSnapshot) -> Result<(), SErr> {
        let b = serde_json::to_vec(s).map_err(jerr)?;
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut t = tx.open_table(SNAPSHOT).map_err(werr)?;
            t.insert("current", b.as_slice()).map_err(werr)?;
        }
        tx.commit().map_err(werr)
    }
}

/// JSON encoding of any row type, without generics in the closure above.
mod erased {
    use super::{jerr, SErr};

    pub trait Ser {
        fn json(&self) -> Result<Vec<u8>, SErr>;
    }

    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> Result<Vec<u8>, SErr> {
            serde_json::to_vec(self).map_err(jerr)
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let data = {
            let st = self.state.read().expect("state lock");
            serde_json::to_vec(&SnapshotBody { state: st.clone() }).map_err(jerr)?
        };
        let id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.save_snapshot(&stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), SErr> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, SErr>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut st = self.state.write().expect("state lock");
        for e in entries {
            self.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => replies.push(Reply::Ok),
                EntryPayload::Normal(cmd) => replies.push(st.apply(&cmd)),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    replies.push(Reply::Ok);
                }
            }
        }
        let dirty: Vec<Row> = st.take_dirty().into_iter().collect();
        self.persist(&st, dirty, false)?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut st = body.state;
        st.reindex();
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.persist(&st, Vec::new(), true)?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        *self.state.write().expect("state lock") = st;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(SNAPSHOT).map_err(rerr)?;
        let Some(v) = t.get("current").map_err(rerr)? else {
            return Ok(None);
        };
        let s: StoredSnapshot = serde_json::from_slice(v.value()).map_err(jerr)?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
