//! The Raft log, vote and committed index in redb.
//!
//! One row per entry (`index → JSON entry`) in the `log` table; the vote, the
//! committed log id and the last purged log id in `raft_meta`. Every append is
//! one write transaction committed with redb's default durability (fsync)
//! before openraft is told the entries are flushed.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableTable, TableDefinition};

use crate::{Entry, NodeId, TypeConfig};

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

type SErr = StorageError<NodeId>;

/// The log store; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn rerr(e: impl Into<redb::Error>) -> SErr {
    StorageIOError::read_logs(&e.into()).into()
}

fn werr(e: impl Into<redb::Error>) -> SErr {
    StorageIOError::write_logs(&e.into()).into()
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Result<LogStore, redb::Error> {
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(RAFT_META)?;
        tx.commit()?;
        Ok(LogStore { db })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SErr> {
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(RAFT_META).map_err(rerr)?;
        match t.get(key).map_err(rerr)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| StorageIOError::read_logs(&e).into()),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(v).map_err(|e| StorageIOError::write_logs(&e))?;
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut t = tx.open_table(RAFT_META).map_err(werr)?;
            t.insert(key, bytes.as_slice()).map_err(werr)?;
        }
        tx.commit().map_err(werr)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, SErr> {
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOG).map_err(rerr)?;
        let mut out = Vec::new();
        for row in t.range(range).map_err(rerr)? {
            let (_, v) = row.map_err(rerr)?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let tx = self.db.begin_read().map_err(rerr)?;
        let t = tx.open_table(LOG).map_err(rerr)?;
        let last = match t.last().map_err(rerr)? {
            Some((_, v)) => {
                let e: Entry =
                    serde_json::from_slice(v.value()).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut t = tx.open_table(LOG).map_err(werr)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(&e))?;
                t.insert(e.log_id.index, bytes.as_slice()).map_err(werr)?;
            }
        }
        let res = tx
            .commit()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let failed = res.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(res);
        match failed {
            Some(m) => Err(StorageIOError::write_logs(&std::io::Error::other(m)).into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut t = tx.open_table(LOG).map_err(werr)?;
            t.retain_in(log_id.index.., |_, _| false).map_err(werr)?;
        }
        tx.commit().map_err(werr)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let bytes =
            serde_json::to_vec(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        let tx = self.db.begin_write().map_err(werr)?;
        {
            let mut m = tx.open_table(RAFT_META).map_err(werr)?;
            m.insert("last_purged", bytes.as_slice()).map_err(werr)?;
            let mut t = tx.open_table(LOG).map_err(werr)?;
            t.retain_in(..=log_id.index, |_, _| false).map_err(werr)?;
        }
        tx.commit().map_err(werr)
    }
}
