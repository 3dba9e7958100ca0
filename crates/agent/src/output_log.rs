//! A sandbox's main-workload output on disk, in the API's stream record format
//! (`hearth_api::stream`), so `logs` replays it byte-exact and followers stream
//! the file as it grows. Writing goes to disk at guest speed; readers never hold
//! the guest back and never make the host buffer output in memory.

use std::path::{Path, PathBuf};

use std::io::Write;

use hearth_api::stream::Record;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

/// The writing end; one per sandbox.
///
/// why: records are written with a plain (blocking) write(2) into the page
/// cache, not tokio's background writes: a record must be in the file before
/// its output is credited to the guest, which then drops it from its replay
/// buffer, so a hearthd killed at any point finds it on restart.
pub struct OutputLog {
    file: std::fs::File,
    /// Created when the size limit is reached (see [`truncated_marker`]).
    marker: PathBuf,
    written: u64,
    notify: watch::Sender<u64>,
    /// Output beyond this many bytes is discarded (after one notice).
    limit: u64,
    truncated: bool,
}

impl OutputLog {
    /// Creates (truncating) the log at `path`.
    pub async fn create(
        path: &Path,
        notify: watch::Sender<u64>,
        limit: u64,
    ) -> std::io::Result<OutputLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        let marker = truncated_marker(path);
        if let Err(e) = std::fs::remove_file(&marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        Ok(OutputLog {
            file,
            marker,
            written: 0,
            notify,
            limit,
            truncated: false,
        })
    }

    /// Opens an existing log to append after what it holds (a sandbox that
    /// migrated here brings its log along).
    pub async fn open_append(
        path: &Path,
        notify: watch::Sender<u64>,
        limit: u64,
    ) -> std::io::Result<OutputLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        notify.send_replace(written);
        let marker = truncated_marker(path);
        let truncated = written >= limit || marker.exists();
        Ok(OutputLog {
            file,
            marker,
            written,
            notify,
            limit,
            truncated,
        })
    }

    /// Appends one record and wakes followers. Past the size limit, output is
    /// dropped and a single notice on stderr says so: a guest cannot fill the
    /// host's disk.
    pub async fn append(&mut self, rec: &Record) -> std::io::Result<()> {
        if self.truncated {
            return Ok(());
        }
        let mut bytes = rec.encode();
        if self.written + bytes.len() as u64 > self.limit {
            self.truncated = true;
            // why: a restarted hearthd must know the log stopped on purpose; the
            // notice text alone could be printed by the workload itself.
            // Once per sandbox: the marker and its name are made durable before
            // the notice is written (a crash must not leave the notice without it).
            std::fs::File::create(&self.marker)?.sync_all()?;
            if let Some(dir) = self.marker.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            bytes = Record::Stderr(
                format!(
                    "\nhearth: output log limit of {} bytes reached; further output of this sandbox is discarded\n",
                    self.limit
                )
                .into_bytes(),
            )
            .encode();
        }
        self.file.write_all(&bytes)?;
        self.written += bytes.len() as u64;
        self.notify.send_replace(self.written);
        Ok(())
    }

    /// Syncs the log to disk.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        let file = self.file.try_clone()?;
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)?
    }
}

/// The file whose existence says the log at `log` reached its size limit
/// (`output.truncated` beside `output.log`).
pub fn truncated_marker(log: &Path) -> PathBuf {
    log.with_extension("truncated")
}

/// A reader that follows the log: yields chunks of raw record bytes.
pub struct LogFollower {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    written: watch::Receiver<u64>,
    finished: watch::Receiver<bool>,
}

impl LogFollower {
    /// `written` counts bytes appended; `finished` turns true once nothing more
    /// will be appended.
    pub fn new(
        path: PathBuf,
        written: watch::Receiver<u64>,
        finished: watch::Receiver<bool>,
    ) -> LogFollower {
        LogFollower {
            path,
            file: None,
            offset: 0,
            written,
            finished,
        }
    }

    /// The next chunk of bytes; `None` at the end (when not following: at the
    /// current end of the file; when following: once the writer has finished
    /// and everything was read).
    pub async fn next_chunk(&mut self, follow: bool) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            // why: read `finished` before the file, so output written before the
            // workload ended is never missed.
            let finished = *self.finished.borrow_and_update();
            let seen = *self.written.borrow_and_update();
            if self.file.is_none() {
                match File::open(&self.path).await {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(f) = self.file.as_mut() {
                f.seek(std::io::SeekFrom::Start(self.offset)).await?;
                let mut buf = vec![0u8; 256 * 1024];
                let n = f.read(&mut buf).await?;
                if n > 0 {
                    buf.truncate(n);
                    self.offset += n as u64;
                    return Ok(Some(buf));
                }
            }
            if finished || !follow {
                return Ok(None);
            }
            if seen > self.offset {
                continue;
            }
            if self.written.has_changed().is_err() {
                // The writer is gone; only `finished` can still change.
                if self.finished.changed().await.is_err() {
                    return Ok(None);
                }
                continue;
            }
            tokio::select! {
                _ = self.written.changed() => {},
                r = self.finished.changed() => if r.is_err() {
                    return Ok(None);
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reaching_the_limit_leaves_a_marker_a_new_log_clears() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("output.log");
        let (tx, _rx) = watch::channel(0);
        let mut log = OutputLog::create(&p, tx.clone(), 64).await.unwrap();
        log.append(&Record::Stdout(b"small".to_vec()))
            .await
            .unwrap();
        assert!(!truncated_marker(&p).exists());
        log.append(&Record::Stdout(vec![b'x'; 100])).await.unwrap();
        assert!(truncated_marker(&p).exists(), "the limit was reached");
        drop(log);
        let mut again = OutputLog::open_append(&p, tx.clone(), 64).await.unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        again
            .append(&Record::Stdout(b"more".to_vec()))
            .await
            .unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            len,
            "a reopened truncated log stays closed"
        );
        OutputLog::create(&p, tx, 64).await.unwrap();
        assert!(
            !truncated_marker(&p).exists(),
            "a new log starts untruncated"
        );
    }
}
