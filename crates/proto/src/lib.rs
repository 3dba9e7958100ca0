//! The host↔guest protocol spoken between a node agent and `hearth-guest`.
//!
//! One byte stream (virtio-serial on QEMU, vsock on Firecracker) carries many
//! sessions. Every frame is
//!
//! ```text
//! u32 LE  length of what follows (kind + id + payload), at most MAX_FRAME + 5
//! u8      kind   (see [`Kind`])
//! u32 LE  session id (0 = the connection itself: Hello, Shutdown, Ping/Pong)
//! bytes   payload: raw bytes for Stdout/Stderr/Stdin, JSON for everything else
//! ```
//!
//! Flow control: a sender of stream data (the guest for Stdout/Stderr, the host
//! for Stdin) may have at most [`INITIAL_WINDOW`] unacknowledged bytes in flight
//! per session; the receiver returns [`Kind::Credit`] frames as it consumes data.
//! So a guest printing 50 MB never makes the host buffer more than a window.
//!
//! Resumable output: Credit also means "persisted". The guest keeps each
//! session's Stdout/Stderr frames (and its Exit) in a replay buffer until the
//! host credits them (so the buffer is bounded by the window, plus one Exit).
//! A host that restarts connects again and sends [`Kind::Resume`] with the
//! stream offset it has persisted per session; the guest answers with the
//! host's random nonce (raw bytes, so the host can skip whatever torn frames
//! the previous connection left in the channel), then [`Kind::Resumed`], then
//! replays every kept frame past the host's offset, in order, before any new
//! one. Sessions the host does not name are killed and forgotten. The guest
//! forgets an ended session when the host sends [`Kind::ExitAck`].

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Protocol version carried in [`Hello`]; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest payload in one frame.
pub const MAX_FRAME: usize = 256 * 1024;
/// Largest encoded frame (length prefix included) the guest writes: Linux's
/// virtio_console takes at most 32 KiB per `write()` and puts it in one
/// virtqueue element, so a frame no larger is one element, never cut in two
/// by a VM stopped between writes (a migration's switch-over; review13 F1:
/// a 64 KiB frame's head reached the source and its tail the target, whose
/// reader then started mid-frame).
pub const MAX_GUEST_WRITE: usize = 32 * 1024;
/// What a frame adds to its payload on the wire (length, kind, id).
pub const FRAME_OVERHEAD: usize = 4 + HEADER_LEN;
/// Bytes of stream data a sender may have unacknowledged per session.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;
/// Session id of connection-level messages.
pub const CONTROL_ID: u32 = 0;

const HEADER_LEN: usize = 5;

/// Marker in [`Hello::agent_version`] of an agent that guards restores: after a
/// [`Restored`] it could not apply (RNG not reseeded, a given network not taken,
/// the message unreadable) it refuses every exec and keeps the snapshot's frozen
/// processes stopped, and it acknowledges even an unreadable `Restored`. Only
/// for such a guest may a host queue an exec right behind `Restored`. (In the
/// version string, not a new field, so hosts and guests of any age still parse
/// each other's `Hello`.)
pub const RESTORE_GUARD: &str = "+restore-guard";

/// Whether the agent that sent `agent_version` in its [`Hello`] guards restores
/// (see [`RESTORE_GUARD`]).
pub fn guards_restores(agent_version: &str) -> bool {
    agent_version.contains(RESTORE_GUARD)
}

/// Marker in [`Hello::agent_version`] of an agent that counts an output frame
/// as sent before it writes it (so a host's credit can never overtake the
/// count and leave its acknowledged offset behind; a [`Resume`] recomputes
/// the window from that offset). A live migration takes the guest channel
/// over with a [`Resume`], so only such a guest is moved: an older one could
/// come out of it with a window too large by the frames its count missed,
/// and the host would refuse its output. [`RestoredAck::sent_first`] says the
/// same for a guest restored from a snapshot.
pub const SENT_FIRST: &str = "+sent-first";

/// Whether the agent that sent `agent_version` counts output before it
/// writes it (see [`SENT_FIRST`]).
pub fn counts_sent_first(agent_version: &str) -> bool {
    agent_version.contains(SENT_FIRST)
}

/// First frame id of [`Kind::Freeze`] requests: each gets its own id from here
/// up (the guest answers [`Kind::Frozen`] on the request's id, guests of any
/// age), far above session ids, so a late answer never satisfies a later freeze.
pub const FREEZE_ID_BASE: u32 = 0x8000_0000;

/// Frame kinds. Unknown kinds are a protocol error (the peer is newer or hostile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// guest → host, id 0, [`Hello`]: the agent is up and ready for work.
    Hello = 1,
    /// host → guest, [`ExecRequest`]: start a process as session `id`.
    Exec = 2,
    /// guest → host, [`Started`]: the process of session `id` runs.
    Started = 3,
    /// guest → host, raw bytes the process wrote to stdout.
    Stdout = 4,
    /// guest → host, raw bytes the process wrote to stderr.
    Stderr = 5,
    /// host → guest, raw bytes for the process's stdin; empty payload = EOF.
    Stdin = 6,
    /// guest → host, [`ExitStatus`]: the process ended and all its output was sent.
    Exit = 7,
    /// host → guest, [`SignalRequest`]: deliver a signal to the session's process.
    Signal = 8,
    /// either way, [`Credit`]: the receiver consumed that many stream bytes.
    Credit = 9,
    /// guest → host, [`ErrorMsg`]: a request for session `id` failed.
    Error = 10,
    /// host → guest, id 0, [`Empty`]: sync filesystems and power off.
    Shutdown = 11,
    /// host → guest, id 0, [`Empty`]: liveness probe.
    Ping = 12,
    /// guest → host, id 0, [`Empty`]: answer to Ping.
    Pong = 13,
    /// host → guest, id 0, [`Restored`]: this VM was restored from a snapshot;
    /// take this identity, clock and entropy before running anything else.
    Restored = 14,
    /// guest → host, id 0, [`RestoredAck`]: the restore message was applied.
    RestoredAck = 15,
    /// host → guest, id 0, [`Resume`]: a host (re)connected to a running agent.
    Resume = 16,
    /// guest → host, id 0, [`Resumed`]: sent right after the Resume nonce.
    Resumed = 17,
    /// host → guest, [`Empty`]: the session's Exit is recorded; forget the session.
    ExitAck = 18,
    /// host → guest, id 0 or a request id from [`FREEZE_ID_BASE`] up, [`Empty`]:
    /// a snapshot is about to be saved; stop the process group of every session
    /// (SIGSTOP) and answer [`Kind::Frozen`] on the same id. They continue on
    /// [`Kind::Thaw`] (the source), on [`Kind::Resume`] (a new host took over),
    /// after a guest-side bound, or once a [`Kind::Restored`] was applied
    /// (every restore), so no snapshot process runs before the reseed.
    Freeze = 19,
    /// guest → host, the Freeze's id, [`Frozen`]: the sessions are stopped.
    Frozen = 20,
    /// host → guest, id 0, [`Empty`]: continue the sessions stopped by Freeze.
    Thaw = 21,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Exec,
            3 => Started,
            4 => Stdout,
            5 => Stderr,
            6 => Stdin,
            7 => Exit,
            8 => Signal,
            9 => Credit,
            10 => Error,
            11 => Shutdown,
            12 => Ping,
            13 => Pong,
            14 => Restored,
            15 => RestoredAck,
            16 => Resume,
            17 => Resumed,
            18 => ExitAck,
            19 => Freeze,
            20 => Frozen,
            21 => Thaw,
            _ => return None,
        })
    }
}

/// Errors of framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The channel failed or closed.
    #[error("guest channel I/O: {0}")]
    Io(#[from] io::Error),
    /// A frame announced more bytes than the protocol allows.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    /// A frame shorter than its header.
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// A frame kind this side does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control payload that is not the expected JSON.
    #[error("malformed {kind:?} payload: {source}")]
    BadPayload {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub id: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with raw payload bytes.
    pub fn data(kind: Kind, id: u32, payload: Vec<u8>) -> Frame {
        Frame { kind, id, payload }
    }

    /// A frame whose payload is `msg` as JSON.
    pub fn json<T: Serialize>(kind: Kind, id: u32, msg: &T) -> Frame {
        // why: serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(msg).unwrap_or_default();
        Frame { kind, id, payload }
    }

    /// Decodes the JSON payload.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::BadPayload {
            kind: self.kind,
            source,
        })
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + HEADER_LEN + self.payload.len());
        out.extend_from_slice(&((HEADER_LEN + self.payload.len()) as u32).to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    fn decode_body(len: usize, body: Vec<u8>) -> Result<Frame, ProtoError> {
        debug_assert_eq!(len, body.len());
        let kind = Kind::from_u8(body[0]).ok_or(ProtoError::UnknownKind(body[0]))?;
        let id = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
        let payload = body[HEADER_LEN..].to_vec();
        Ok(Frame { kind, id, payload })
    }
}

fn check_len(len: usize) -> Result<(), ProtoError> {
    if len < HEADER_LEN {
        return Err(ProtoError::TooShort(len));
    }
    if len > HEADER_LEN + MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len_buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len_buf) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Frame::decode_body(len, body).map(Some)
}

/// Writes one frame with a single `write_all`, so concurrent writers that
/// share a lock never interleave frames.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtoError> {
    w.write_all(&frame.encode())?;
    Ok(())
}

/// Async reading for the host side.
#[cfg(feature = "tokio")]
pub async fn read_frame_async<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Frame>, ProtoError> {
    use tokio::io::AsyncReadExt;
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ProtoError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let len = u32::from_le_bytes(len_buf) as usize;
    check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Frame::decode_body(len, body).map(Some)
}

/// Async writing for the host side.
#[cfg(feature = "tokio")]
pub async fn write_frame_async<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), ProtoError> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&frame.encode()).await?;
    Ok(())
}

/// guest → host: the agent is ready.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
}

/// host → guest: run a process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` of `env`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, the complete environment.
    pub env: Vec<String>,
    /// Working directory inside the root filesystem ("" = "/").
    pub workdir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty = root.
    pub user: String,
    /// Keep stdin open for [`Kind::Stdin`] frames; otherwise stdin is /dev/null.
    pub stdin: bool,
}

/// guest → host: the process runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
}

/// guest → host: how the process ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// host → guest: send a signal to the session's process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalRequest {
    pub signal: i32,
}

/// Either way: `bytes` more stream bytes may be sent for the session.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credit {
    pub bytes: u32,
}

/// guest → host: a request failed before a process existed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorMsg {
    pub message: String,
}

/// host → guest after a snapshot restore. A restored guest's memory is a copy of
/// another VM's, so its RNG state, clock and identity are stale until this arrives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restored {
    /// Fresh randomness to mix into the guest kernel's pool (then reseed).
    pub seed: Vec<u8>,
    /// Wall-clock time on the host, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub hostname: String,
    pub sandbox_id: String,
    /// The sandbox's network (added after protocol 1 shipped; absent from older
    /// hosts). `Some`: eth0 takes this MAC, address and routes; `None` from a host
    /// that sets [`Restored::net_given`]: the sandbox has no network, eth0 goes down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<GuestNet>,
    /// Whether this host speaks about the network at all (false from older hosts,
    /// whose guests keep whatever eth0 had).
    #[serde(default)]
    pub net_given: bool,
    /// `net` is the network this guest took from the previous `Restored` of the
    /// same VM, with nothing but the host's own warm-up run since (a warm-pool
    /// VM whose network was applied at fill time): a guest that still holds
    /// exactly that identity leaves eth0 as it is instead of reconfiguring it.
    /// Absent from older hosts; older guests ignore it and reconfigure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub net_kept: bool,
}

/// The network identity a restored guest takes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestNet {
    /// IPv4 address (dotted quad).
    pub ip: String,
    /// Prefix length of the address (32 for Hearth's routed /32s).
    pub prefix: u8,
    /// On-link gateway (dotted quad).
    pub gateway: String,
    /// `aa:bb:cc:dd:ee:ff`: the MAC the host's tap expects (anti-spoofing checks it).
    pub mac: String,
    /// Nameservers for /etc/resolv.conf (dotted quads); empty leaves it alone.
    pub dns: Vec<String>,
}

/// guest → host: [`Restored`] was applied; `warnings` lists what could not be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RestoredAck {
    pub warnings: Vec<String>,
    /// Stream bytes each live session had sent when this ack was written (the
    /// ack and output frames share one writer, so this is exact): a restored
    /// host subtracts what it received before the ack to learn at which stream
    /// offset its output log starts, for a later [`Resume`].
    #[serde(default)]
    pub sessions: Vec<SessionSent>,
    /// The guest applied [`Restored::net`] (or took eth0 down for `None`). False
    /// from a guest built before network restores: it kept the network it had.
    #[serde(default)]
    pub net_applied: bool,
    /// The guest guards restores (see [`RESTORE_GUARD`]); false from older guests.
    #[serde(default)]
    pub restore_guard: bool,
    /// The guest counts output before it writes it (see [`SENT_FIRST`]);
    /// false from older guests.
    #[serde(default)]
    pub sent_first: bool,
}

/// A session's stream offset in a [`RestoredAck`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSent {
    pub id: u32,
    /// Output bytes (Stdout and Stderr payloads together) sent so far.
    pub sent: u64,
}

/// Length of the nonce of [`Resume`].
pub const RESUME_NONCE_LEN: usize = 16;

/// host → guest: a host took over this guest's channel (after a restart).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resume {
    /// [`RESUME_NONCE_LEN`] random bytes the guest writes raw before [`Resumed`].
    pub nonce: Vec<u8>,
    /// Sessions the host still serves; every other session is killed.
    pub sessions: Vec<ResumeSession>,
}

/// One session the host takes over, and how far it has persisted its output.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumeSession {
    pub id: u32,
    /// Output bytes (Stdout and Stderr payloads together) the host holds.
    pub persisted: u64,
}

/// guest → host: the answer to [`Resume`]; the replay follows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resumed {
    /// What the agent said in its Hello at boot.
    pub hello: Hello,
    /// Session ids below this one were used; new sessions must start here.
    pub next_session: u32,
    /// The named sessions the guest still has (an unknown one is missing).
    pub sessions: Vec<ResumedSession>,
}

/// A session the guest resumes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumedSession {
    pub id: u32,
    /// Offset of the first replayed byte (the host's `persisted`, unless the
    /// guest had already been credited further).
    pub replay_from: u64,
    /// Output bytes the guest has sent in total.
    pub sent: u64,
    /// The process has ended; its Exit is part of the replay.
    pub exited: bool,
}

/// Where `nonce` ends in `buf`, if it occurs.
pub fn find_nonce(buf: &[u8], nonce: &[u8]) -> Option<usize> {
    if nonce.is_empty() || buf.len() < nonce.len() {
        return None;
    }
    buf.windows(nonce.len())
        .position(|w| w == nonce)
        .map(|p| p + nonce.len())
}

/// guest → host: answer to [`Kind::Freeze`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Frozen {
    /// Process groups stopped.
    pub sessions: u32,
}

/// An empty JSON object, for messages without fields.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_byte_stream() {
        let frames = vec![
            Frame::json(
                Kind::Hello,
                0,
                &Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: "x".into(),
                    kernel_release: "6.1".into(),
                },
            ),
            Frame::data(Kind::Stdout, 7, b"hello\n".to_vec()),
            Frame::data(Kind::Stdin, 7, Vec::new()),
            Frame::json(Kind::Credit, 7, &Credit { bytes: 5 }),
            Frame::json(
                Kind::Restored,
                0,
                &Restored {
                    seed: vec![1, 2, 3],
                    unix_ms: 1,
                    hostname: "h".into(),
                    sandbox_id: "s".into(),
                    net: Some(GuestNet {
                        ip: "10.88.0.2".into(),
                        prefix: 32,
                        gateway: "169.254.1.1".into(),
                        mac: "02:68:0a:58:00:02".into(),
                        dns: vec!["10.0.0.53".into()],
                    }),
                    net_given: true,
                    net_kept: true,
                },
            ),
            Frame::json(Kind::RestoredAck, 0, &RestoredAck::default()),
            Frame::json(
                Kind::Resume,
                0,
                &Resume {
                    nonce: vec![7; RESUME_NONCE_LEN],
                    sessions: vec![ResumeSession {
                        id: 1,
                        persisted: 9,
                    }],
                },
            ),
            Frame::json(Kind::ExitAck, 1, &Empty {}),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).unwrap();
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn restored_from_an_older_host_carries_no_network() {
        let old = r#"{"seed":[1],"unix_ms":1,"hostname":"h","sandbox_id":"s"}"#;
        let r: Restored = serde_json::from_str(old).unwrap();
        assert!(r.net.is_none() && !r.net_given && !r.net_kept);
        let ack: RestoredAck = serde_json::from_str(r#"{"warnings":[]}"#).unwrap();
        assert!(!ack.net_applied);
    }

    #[test]
    fn oversized_frame_is_rejected_before_allocation() {
        let mut wire = ((MAX_FRAME + HEADER_LEN + 1) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[4, 0, 0, 0, 0]);
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn unknown_kind_and_short_frames_are_errors() {
        let wire = [5u8, 0, 0, 0, 99, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(ProtoError::UnknownKind(99))
        ));
        let wire = [2u8, 0, 0, 0, 4, 0];
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(ProtoError::TooShort(2))
        ));
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_clean_end() {
        let mut wire = Frame::data(Kind::Stdout, 1, vec![1, 2, 3]).encode();
        wire.truncate(wire.len() - 1);
        assert!(read_frame(&mut &wire[..]).is_err());
    }

    #[test]
    fn nonce_is_found_after_torn_bytes() {
        let nonce = [9u8; RESUME_NONCE_LEN];
        let mut wire = vec![1, 2, 3];
        wire.extend_from_slice(&nonce);
        wire.push(42);
        assert_eq!(find_nonce(&wire, &nonce), Some(3 + RESUME_NONCE_LEN));
        assert_eq!(find_nonce(&wire[..10], &nonce), None);
    }

    #[test]
    fn shell_code_follows_shell_conventions() {
        let st = |code, signal| ExitStatus { code, signal };
        assert_eq!(st(Some(3), None).shell_code(), 3);
        assert_eq!(st(None, Some(9)).shell_code(), 137);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_and_sync_codecs_agree() {
        let f = Frame::data(Kind::Stderr, 42, vec![0xff; 1000]);
        let wire = f.encode();
        let mut r = &wire[..];
        assert_eq!(read_frame_async(&mut r).await.unwrap(), Some(f));
    }
}
