//! A small QMP client (QEMU Machine Protocol: JSON lines over a unix socket).
//!
//! After the greeting and `qmp_capabilities`, one reader task owns the read
//! half: replies carry the `id` we sent and complete that command's oneshot;
//! asynchronous events (`STOP`, `RESUME`, `SHUTDOWN`, ...) go to a broadcast
//! channel that any number of waiters subscribe to *before* issuing the command
//! that causes them, so an event is never missed. Every wait is bounded and its
//! timeout names what was awaited.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::AbortHandle;

use crate::error::VmmError;

/// Bound on one command's reply (TCG hosts can be slow and busy).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// When QEMU emitted it: microseconds since the Unix epoch on the host's
    /// clock (QMP's `timestamp`), if the event carried one.
    pub timestamp_us: Option<u64>,
}

/// When QEMU last stopped and last resumed the guest's vCPUs (its `STOP` and
/// `RESUME` events), microseconds since the Unix epoch on the host's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStateTimes {
    pub stopped_us: Option<u64>,
    pub resumed_us: Option<u64>,
    /// When QEMU last said a migration (out or in) completed (its
    /// `MIGRATION` event with status `completed`).
    pub migration_completed_us: Option<u64>,
}

type Reply = Result<Value, (String, String)>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

/// A negotiated QMP connection.
pub struct Qmp {
    vm: String,
    socket: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    events: broadcast::Sender<QmpEvent>,
    run_state: watch::Sender<RunStateTimes>,
    next_id: AtomicU64,
    reader: AbortHandle,
    /// QEMU's version from the greeting, e.g. "7.2.22".
    pub qemu_version: String,
}

impl Qmp {
    /// Reads the greeting from `stream` and negotiates capabilities.
    pub async fn handshake(
        vm: &str,
        socket: &Path,
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<Qmp, VmmError> {
        let proto = |detail: String| VmmError::QmpProtocol {
            id: vm.to_string(),
            socket: socket.to_path_buf(),
            detail,
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);

        let greeting = read_json(vm, socket, &mut rd, timeout, "the QMP greeting").await?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if v.is_null() {
            return Err(proto(format!("expected a greeting, got {greeting}")));
        }
        let qemu_version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);

        wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|e| proto(format!("writing qmp_capabilities: {e}")))?;
        loop {
            let msg = read_json(
                vm,
                socket,
                &mut rd,
                timeout,
                "the reply to qmp_capabilities",
            )
            .await?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(err) = msg.get("error") {
                return Err(qmp_error(vm, "qmp_capabilities", err));
            }
            if msg.get("return").is_some() {
                break;
            }
            return Err(proto(format!("unexpected message {msg}")));
        }

        let pending = Arc::new(Mutex::new(Pending::default()));
        let (events, _) = broadcast::channel(64);
        let run_state = watch::Sender::new(RunStateTimes::default());
        let reader = tokio::spawn(read_loop(
            rd,
            pending.clone(),
            events.clone(),
            run_state.clone(),
        ))
        .abort_handle();
        Ok(Qmp {
            vm: vm.to_string(),
            socket: socket.to_path_buf(),
            writer: tokio::sync::Mutex::new(wr),
            pending,
            events,
            run_state,
            next_id: AtomicU64::new(1),
            reader,
            qemu_version,
        })
    }

    /// When the guest last stopped and resumed, from QEMU's own events.
    pub fn run_state_times(&self) -> RunStateTimes {
        *self.run_state.borrow()
    }

    /// Changes whenever [`Qmp::run_state_times`] does (a `STOP`, `RESUME`
    /// or completed `MIGRATION` event), so a waiter learns of a stop at once.
    pub fn run_state_changes(&self) -> watch::Receiver<RunStateTimes> {
        self.run_state.subscribe()
    }

    /// Subscribes to events; subscribe before executing the command that causes them.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs `command` with `arguments` (or none when `Value::Null`) and returns its `return`.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.closed {
                return Err(self.closed(command));
            }
            p.waiters.insert(id, tx);
        }
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        if self
            .writer
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .is_err()
        {
            self.forget(id);
            return Err(self.closed(command));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(VmmError::Qmp {
                id: self.vm.clone(),
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(self.closed(command)),
            Err(_) => {
                self.forget(id);
                Err(VmmError::Timeout {
                    id: self.vm.clone(),
                    awaited: format!("the reply to QMP `{command}` on {}", self.socket.display()),
                    after: COMMAND_TIMEOUT,
                    log_tail: String::new(),
                })
            }
        }
    }

    /// Waits on `rx` for the event `name`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, VmmError> {
        let awaited = || format!("QMP event {name}");
        let fut = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.name == name => return Ok(ev),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(VmmError::QmpClosed {
                            id: self.vm.clone(),
                            awaited: awaited(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout {
                    id: self.vm.clone(),
                    awaited: awaited(),
                    after: timeout,
                    log_tail: String::new(),
                })
            })
    }

    fn forget(&self, id: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.waiters.remove(&id);
    }

    fn closed(&self, command: &str) -> VmmError {
        VmmError::QmpClosed {
            id: self.vm.clone(),
            awaited: format!("the reply to QMP `{command}`"),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // why: QEMU serves one QMP client at a time; the socket must close with the handle
        // so a later adopt can connect.
        self.reader.abort();
    }
}

/// An event's `timestamp: {seconds, microseconds}` (host clock) in µs since
/// the epoch; QEMU sends `-1` for both when it could not read the clock.
fn event_timestamp_us(msg: &Value) -> Option<u64> {
    let t = msg.get("timestamp")?;
    let s = u64::try_from(t.get("seconds")?.as_i64()?).ok()?;
    let us = u64::try_from(t.get("microseconds")?.as_i64()?).ok()?;
    s.checked_mul(1_000_000)?.checked_add(us)
}

async fn read_loop(
    mut rd: BufReader<OwnedReadHalf>,
    pending: Arc<Mutex<Pending>>,
    events: broadcast::Sender<QmpEvent>,
    run_state: watch::Sender<RunStateTimes>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = line.trim(), "unparseable QMP message");
            continue;
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            let timestamp_us = event_timestamp_us(&msg);
            tracing::debug!(event = name, %data, ?timestamp_us, "QMP event");
            if let Some(t) = timestamp_us {
                run_state.send_if_modified(|rs| {
                    match name {
                        "STOP" => rs.stopped_us = Some(t),
                        "RESUME" => rs.resumed_us = Some(t),
                        "MIGRATION" if data["status"].as_str() == Some("completed") => {
                            rs.migration_completed_us = Some(t)
                        }
                        _ => return false,
                    }
                    true
                });
            }
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data,
                timestamp_us,
            });
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let reply = match msg.get("error") {
            Some(e) => Err((str_field(e, "class"), str_field(e, "desc"))),
            None => Ok(msg.get("return").cloned().unwrap_or(Value::Null)),
        };
        let waiter = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiters
            .remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(reply);
        }
    }
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    p.closed = true;
    // why: dropping the senders wakes every waiting command with "connection closed".
    p.waiters.clear();
}

async fn read_json(
    vm: &str,
    socket: &Path,
    rd: &mut BufReader<OwnedReadHalf>,
    timeout: Duration,
    awaited: &str,
) -> Result<Value, VmmError> {
    let mut line = String::new();
    match tokio::time::timeout(timeout, rd.read_line(&mut line)).await {
        Err(_) => Err(VmmError::Timeout {
            id: vm.to_string(),
            awaited: format!("{awaited} on {}", socket.display()),
            after: timeout,
            log_tail: String::new(),
        }),
        Ok(Ok(0)) | Ok(Err(_)) => Err(VmmError::QmpClosed {
            id: vm.to_string(),
            awaited: awaited.to_string(),
        }),
        Ok(Ok(_)) => serde_json::from_str(&line).map_err(|e| VmmError::QmpProtocol {
            id: vm.to_string(),
            socket: socket.to_path_buf(),
            detail: format!("{e} in {:?}", line.trim()),
        }),
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn qmp_error(vm: &str, command: &str, err: &Value) -> VmmError {
    VmmError::Qmp {
        id: vm.to_string(),
        command: command.to_string(),
        class: str_field(err, "class"),
        desc: str_field(err, "desc"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_timestamp_is_read_in_microseconds_and_minus_one_is_none() {
        let ev = json!({"event": "STOP", "timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456}});
        assert_eq!(event_timestamp_us(&ev), Some(1_700_000_000_123_456));
        let unknown = json!({"event": "STOP", "timestamp": {"seconds": -1, "microseconds": -1}});
        assert_eq!(event_timestamp_us(&unknown), None);
        assert_eq!(event_timestamp_us(&json!({"event": "STOP"})), None);
    }
}
