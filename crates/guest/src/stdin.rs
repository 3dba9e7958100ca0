//! Per-session stdin writer: a thread that owns the process's stdin, writes the
//! host's `Stdin` payloads in order and returns `Credit` as bytes are consumed.
//! An empty payload (or the session ending) closes stdin.

use std::io::Write;
use std::process::ChildStdin;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use hearth_proto::{Credit, Frame, Kind};

use crate::channel::Writer;

/// Starts the writer thread; send payloads into the returned queue.
pub fn spawn_writer(
    id: u32,
    stdin: ChildStdin,
    writer: Arc<Writer>,
) -> std::io::Result<Sender<Vec<u8>>> {
    let (tx, rx) = channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name(format!("stdin-{id}"))
        .spawn(move || {
            let mut stdin = Some(stdin);
            for chunk in rx {
                if chunk.is_empty() {
                    break;
                }
                if let Some(pipe) = stdin.as_mut() {
                    // why: a process that closed its stdin just loses the input (EPIPE);
                    // the host still gets its credit back so it never stalls.
                    if pipe.write_all(&chunk).is_err() {
                        stdin = None;
                    }
                }
                let bytes = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                writer.send_or_log(&Frame::json(Kind::Credit, id, &Credit { bytes }));
            }
        })?;
    Ok(tx)
}
