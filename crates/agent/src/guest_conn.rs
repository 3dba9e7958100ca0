//! One connection to a guest agent: a reader task routes incoming frames to
//! sessions by id, a writer task serializes outgoing frames.
//!
//! Flow control (see `hearth_proto`): output credit is returned to the guest
//! when a session's consumer takes a chunk out, so a slow consumer stalls the
//! guest process instead of growing host memory. Stdin is sent only against
//! credit the guest returned.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hearth_proto::{
    read_frame_async, write_frame_async, Credit, Empty, ErrorMsg, ExecRequest, ExitStatus, Frame,
    Frozen, Hello, Kind, Restored, RestoredAck, Resume, ResumeSession, Resumed, SignalRequest,
    Started, CONTROL_ID, FREEZE_ID_BASE, INITIAL_WINDOW, MAX_FRAME, PROTOCOL_VERSION,
    RESUME_NONCE_LEN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Errors of the guest channel.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest did not say hello in time.
    #[error("guest agent did not become ready within {0:?} (see the VM's console.log)")]
    HelloTimeout(Duration),
    /// The guest closed the channel.
    #[error("guest channel closed")]
    Closed,
    /// Framing or decoding failed; the guest is broken or hostile.
    #[error(transparent)]
    Proto(#[from] hearth_proto::ProtoError),
    /// The guest speaks another protocol version.
    #[error("guest agent speaks protocol {got}, this host speaks {PROTOCOL_VERSION}; rebuild the initramfs with scripts/setup")]
    Version { got: u32 },
    /// The first frame was not a hello.
    #[error("guest sent {0:?} before Hello")]
    NoHello(Kind),
    /// The guest refused the request.
    #[error("guest refused the request: {0}")]
    Refused(String),
    /// The guest sent more output than its flow-control window allows.
    #[error("guest broke flow control: session {session} has {in_flight} unacknowledged bytes (window {INITIAL_WINDOW})")]
    WindowExceeded { session: u32, in_flight: u64 },
    /// The guest did not answer a ping in time.
    #[error("guest agent did not answer a ping within {0:?}")]
    NoPong(Duration),
    /// The channel is frozen for a migration's switch-over.
    #[error("the guest channel is paused for a live migration")]
    Frozen,
    /// The guest stopped reading its channel.
    #[error("guest is not reading its channel (a send waited {0:?})")]
    Stalled(Duration),
    /// A restored guest did not acknowledge its new identity in time.
    #[error(
        "restored guest did not acknowledge the restore within {0:?} (see the VM's console.log)"
    )]
    RestoreTimeout(Duration),
    /// A running guest did not answer a resume in time.
    #[error("guest agent did not answer the resume within {0:?} (see the VM's console.log)")]
    ResumeTimeout(Duration),
    /// The guest sent too much before answering a resume.
    #[error("guest sent {0} bytes without answering the resume; its channel is broken")]
    ResumeGarbage(usize),
    /// The guest did not confirm it stopped its sessions for a snapshot.
    #[error("guest did not confirm stopping its processes for the snapshot within {0:?} (a guest built before freeze support ignores the request)")]
    FreezeTimeout(Duration),
}

/// Most stale bytes skipped while waiting for the answer to a resume: frames
/// torn by the previous connection, and frames the guest had already queued.
const MAX_RESUME_SKIP: usize = 16 << 20;

/// Output credit is returned in batches of at least this many bytes (and at
/// the Exit): a Credit frame per output chunk would flood the guest's receive
/// ring with tiny frames, and a ring the guest cannot drain (its vCPU throttled
/// or paused during a live migration) refuses the switch-over. A quarter of the
/// window keeps the guest at least three quarters of a window ahead.
const CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;

/// How often a Thaw that could not be sent is tried again.
const THAW_RETRY: Duration = Duration::from_secs(1);

/// Frames [`GuestConn::try_send`] holds for a full queue at most; beyond
/// that they are dropped (the guest is not reading its channel).
const MAX_OVERFLOW: u64 = 256;

/// Gives one overflow place back when a held frame is sent or given up.
struct OverflowSlot(Arc<AtomicU64>);

impl Drop for OverflowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a frame to the guest may wait for room before the guest counts as stalled.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session's consumer sees.
#[derive(Debug)]
pub enum SessionEvent {
    Started(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    /// The request failed in the guest, or the channel died.
    Failed(String),
}

struct SessionSink {
    events: mpsc::UnboundedSender<SessionEvent>,
    stdin_credit: Arc<Semaphore>,
    /// Output bytes received and not yet credited back; a compliant guest keeps
    /// this within [`INITIAL_WINDOW`], so the unbounded `events` channel is bounded.
    in_flight: Arc<AtomicU64>,
    /// Output bytes routed to this session on this connection.
    routed: u64,
}

type Sessions = Arc<Mutex<HashMap<u32, SessionSink>>>;

/// Credit a session owes the guest: output its consumer took that the guest
/// has not been credited for yet. Shared by the session and its connection,
/// so a released [`GuestConn::hold_credit`] returns it without waiting for
/// the session's consumer (who may wait in `next` for output that a guest at
/// a full window will not send before it gets credit).
struct OwedCredit {
    /// Consumed and not yet credited. Taken whole (`swap`) by whoever sends
    /// the Credit, and added back if it is not sent.
    pending: AtomicU32,
    /// The session's output bytes the guest counts against its window.
    in_flight: Arc<AtomicU64>,
}

impl OwedCredit {
    /// Takes what is owed off both counts, for a Credit about to be sent
    /// (taken first, so the guest's answer to it cannot find it still
    /// counted: a false WindowExceeded); 0 when nothing is owed.
    fn take(&self) -> u32 {
        let bytes = self.pending.swap(0, Ordering::SeqCst);
        if bytes > 0 {
            self.in_flight.fetch_sub(u64::from(bytes), Ordering::AcqRel);
        }
        bytes
    }

    /// Puts back what [`OwedCredit::take`] took, the Credit not sent.
    fn put_back(&self, bytes: u32) {
        if bytes > 0 {
            self.in_flight.fetch_add(u64::from(bytes), Ordering::AcqRel);
            self.pending.fetch_add(bytes, Ordering::SeqCst);
        }
    }

    /// Counts `n` output bytes handed to the consumer.
    fn consumed(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        // why: `fetch_update` saturates as the field did before it was shared.
        let _ = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(p.saturating_add(n))
            });
    }
}

/// Where the answer to a freeze goes: the guest's `Frozen`, or its refusal.
type FrozenWaiter = oneshot::Sender<Result<Frozen, String>>;

/// A live connection to one guest agent.
pub struct GuestConn {
    tx: mpsc::Sender<Frame>,
    sessions: Sessions,
    next_id: AtomicU32,
    /// None for a connection made after a restore (Hello is sent once per boot).
    hello: Option<Hello>,
    pong: Mutex<Option<oneshot::Sender<()>>>,
    /// The pending `Restored`'s waiter; an `Error` on the control id fails it.
    restored_ack: Mutex<Option<oneshot::Sender<Result<RestoredAck, String>>>>,
    /// The pending freeze: its request id and waiter.
    frozen_ack: Mutex<Option<(u32, FrozenWaiter)>>,
    /// Freeze requests sent (their ids count up from `FREEZE_ID_BASE`).
    freezes: AtomicU32,
    /// The guest guards restores (its Hello or a RestoredAck said so; see
    /// [`hearth_proto::RESTORE_GUARD`]).
    guards_restores: std::sync::atomic::AtomicBool,
    /// The guest counts output before it writes it (its Hello, a Resumed's
    /// Hello or a RestoredAck said so; see [`hearth_proto::SENT_FIRST`]).
    sent_first: AtomicBool,
    closed: tokio::sync::watch::Receiver<bool>,
    /// Set during a migration's switch-over: nothing more goes to the guest.
    frozen: std::sync::atomic::AtomicBool,
    /// Set while the VM is stopped for a migration: no session returns
    /// credit (see [`GuestConn::hold_credit`]).
    credit_held: AtomicBool,
    /// A release could not queue every session's credit: the next release or
    /// thaw sweeps again (review22 F1).
    sweep_due: AtomicBool,
    /// What each live session owes the guest, by session id (see [`OwedCredit`]).
    owed: Mutex<HashMap<u32, Arc<OwedCredit>>>,
    /// Frames handed to the writer task, and frames it has written.
    queued: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    /// Frames waiting for room in a full queue (see [`GuestConn::try_send`]).
    overflow: Arc<AtomicU64>,
    /// What the reader task has taken in (see [`GuestConn::input_settled`]).
    input: Arc<InputMark>,
}

/// The reader task's progress through the guest's stream, for a barrier that
/// needs no time window ([`GuestConn::input_settled`]).
#[derive(Default)]
struct InputMark {
    /// Bytes the reader took from the stream.
    read: AtomicU64,
    /// `read` at the end of the last frame routed: all bytes up to here are
    /// in their sessions' channels.
    routed: AtomicU64,
    /// The reader's last poll found the stream empty and no poll runs now.
    parked: AtomicBool,
}

/// The reader's stream, counted into an [`InputMark`]. `parked` is cleared
/// before every poll of the stream and set only when one found nothing, so a
/// byte taken from the stream is never unaccounted for while `parked` reads true.
struct Counted<R> {
    inner: R,
    mark: Arc<InputMark>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        self.mark.parked.store(false, Ordering::SeqCst);
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {
                self.mark.parked.store(true, Ordering::SeqCst);
                Poll::Pending
            }
            Poll::Ready(r) => {
                let n = buf.filled().len().saturating_sub(before) as u64;
                self.mark.read.fetch_add(n, Ordering::SeqCst);
                Poll::Ready(r)
            }
        }
    }
}

impl GuestConn {
    /// Waits for the guest's Hello on `stream`, then starts routing frames.
    pub async fn handshake<S>(stream: S, timeout: Duration) -> Result<Arc<GuestConn>, GuestError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let first = tokio::time::timeout(timeout, read_frame_async(&mut rd))
            .await
            .map_err(|_| GuestError::HelloTimeout(timeout))??
            .ok_or(GuestError::Closed)?;
        if first.kind != Kind::Hello {
            return Err(GuestError::NoHello(first.kind));
        }
        let hello: Hello = first.parse()?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(GuestError::Version {
                got: hello.protocol_version,
            });
        }
        Ok(Self::serve(rd, wr, Some(hello), 1))
    }

    /// Takes over the channel of a running guest after a host restart: sends
    /// [`Resume`] naming the sessions this host serves and how much of their
    /// output it has persisted, skips whatever the channel still held from the
    /// previous connection up to the guest's answer, and starts routing. The
    /// guest then replays each named session's output past `persisted` (and its
    /// Exit, if it ended) to the returned sessions, one per session it still has.
    pub async fn resume<S>(
        stream: S,
        sessions: &[ResumeSession],
        timeout: Duration,
    ) -> Result<(Arc<GuestConn>, Resumed, Vec<Session>), GuestError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        use tokio::io::AsyncReadExt;
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = tokio::io::BufReader::new(rd);
        let mut nonce = vec![0u8; RESUME_NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| {
            GuestError::Proto(hearth_proto::ProtoError::Io(std::io::Error::other(
                e.to_string(),
            )))
        })?;
        let msg = Resume {
            nonce: nonce.clone(),
            sessions: sessions.to_vec(),
        };
        let answer = async {
            write_frame_async(&mut wr, &Frame::json(Kind::Resume, CONTROL_ID, &msg)).await?;
            // why: the previous host may have died mid-frame, and frames the guest
            // queued before it saw the resume still arrive first; the nonce marks
            // where the resumed stream starts.
            let mut tail: Vec<u8> = Vec::with_capacity(RESUME_NONCE_LEN);
            let mut skipped = 0usize;
            loop {
                let b = rd.read_u8().await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        GuestError::Closed
                    } else {
                        GuestError::Proto(e.into())
                    }
                })?;
                if tail.len() == RESUME_NONCE_LEN {
                    tail.remove(0);
                }
                tail.push(b);
                if tail == nonce {
                    break;
                }
                skipped += 1;
                if skipped > MAX_RESUME_SKIP {
                    return Err(GuestError::ResumeGarbage(skipped));
                }
            }
            let f = read_frame_async(&mut rd).await?.ok_or(GuestError::Closed)?;
            if f.kind != Kind::Resumed {
                return Err(GuestError::Refused(format!(
                    "guest answered the resume with {:?}",
                    f.kind
                )));
            }
            Ok::<Resumed, GuestError>(f.parse()?)
        };
        let resumed = tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| GuestError::ResumeTimeout(timeout))??;
        if resumed.hello.protocol_version != PROTOCOL_VERSION {
            return Err(GuestError::Version {
                got: resumed.hello.protocol_version,
            });
        }
        let ids: Vec<u32> = resumed.sessions.iter().map(|s| s.id).collect();
        let (conn, attached) = Self::serve_with(
            rd,
            wr,
            Some(resumed.hello.clone()),
            resumed.next_session.max(1),
            |conn| ids.iter().map(|id| conn.attach(*id)).collect(),
        );
        Ok((conn, resumed, attached))
    }

    /// Re-attaches to a guest agent that is already serving (after a live
    /// migration): the guest sends Hello only once per boot, so the one it sent
    /// the previous host is passed in. New sessions get ids from `next_id` on,
    /// so they never collide with sessions the guest still runs.
    pub fn reattach<S>(stream: S, hello: Hello, next_id: u32) -> Arc<GuestConn>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Self::serve(rd, wr, Some(hello), next_id.max(1))
    }

    /// Connects to a guest restored from a snapshot, whose agent is already up,
    /// and queues [`Restored`] (fresh RNG seed, clock, identity) as the first frame.
    /// Session ids start at `next_session`, past any the snapshot's guest still has.
    /// Resume the VM, then wait on the returned [`PendingAck`].
    pub async fn after_restore<S>(
        stream: S,
        msg: &Restored,
        next_session: u32,
    ) -> Result<(Arc<GuestConn>, PendingAck), GuestError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let conn = Self::serve(rd, wr, None, next_session.max(1));
        let (tx, rx) = oneshot::channel();
        *conn.restored_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        conn.send(Frame::json(Kind::Restored, CONTROL_ID, msg))
            .await?;
        Ok((conn, PendingAck(rx)))
    }

    /// Sends [`Restored`] again on a live connection (a warm-pool VM, woken up
    /// at fill time, gets its final identity and fresh entropy when taken).
    pub async fn restored_again(&self, msg: &Restored) -> Result<PendingAck, GuestError> {
        let (tx, rx) = oneshot::channel();
        *self.restored_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.send(Frame::json(Kind::Restored, CONTROL_ID, msg))
            .await?;
        Ok(PendingAck(rx))
    }

    fn serve<R, W>(rd: R, wr: W, hello: Option<Hello>, first_id: u32) -> Arc<GuestConn>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::serve_with(rd, wr, hello, first_id, |_| ()).0
    }

    /// Like `serve`; `before` runs before the first frame is routed (to attach
    /// sessions whose frames may already be waiting in the stream).
    fn serve_with<R, W, T>(
        rd: R,
        mut wr: W,
        hello: Option<Hello>,
        first_id: u32,
        before: impl FnOnce(&Arc<GuestConn>) -> T,
    ) -> (Arc<GuestConn>, T)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Frame>(64);
        let input = Arc::new(InputMark::default());
        let mut rd = Counted {
            inner: rd,
            mark: input.clone(),
        };
        let written = Arc::new(AtomicU64::new(0));
        let w2 = written.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let ok = write_frame_async(&mut wr, &f).await.is_ok();
                w2.fetch_add(1, Ordering::AcqRel);
                if !ok {
                    break;
                }
            }
        });
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let guards = hello
            .as_ref()
            .is_some_and(|h| hearth_proto::guards_restores(&h.agent_version));
        let sent_first = hello
            .as_ref()
            .is_some_and(|h| hearth_proto::counts_sent_first(&h.agent_version));
        let conn = Arc::new(GuestConn {
            tx,
            sessions: Arc::default(),
            next_id: AtomicU32::new(first_id),
            hello,
            pong: Mutex::new(None),
            restored_ack: Mutex::new(None),
            frozen_ack: Mutex::new(None),
            freezes: AtomicU32::new(0),
            guards_restores: std::sync::atomic::AtomicBool::new(guards),
            sent_first: AtomicBool::new(sent_first),
            closed,
            frozen: std::sync::atomic::AtomicBool::new(false),
            credit_held: AtomicBool::new(false),
            sweep_due: AtomicBool::new(false),
            owed: Mutex::default(),
            queued: Arc::new(AtomicU64::new(0)),
            overflow: Arc::new(AtomicU64::new(0)),
            written,
            input: input.clone(),
        });
        let early = before(&conn);
        let weak = Arc::downgrade(&conn);
        let sessions = conn.sessions.clone();
        tokio::spawn(async move {
            let reason = loop {
                match read_frame_async(&mut rd).await {
                    Ok(Some(f)) => {
                        let Some(conn) = weak.upgrade() else {
                            break "connection dropped".to_string();
                        };
                        if let Err(e) = conn.route(f) {
                            break format!("guest sent a bad frame: {e}");
                        }
                        // why: the frame is in its session's channel; the
                        // reader reads frame by frame, so `read` is at its end.
                        input
                            .routed
                            .store(input.read.load(Ordering::SeqCst), Ordering::SeqCst);
                    }
                    Ok(None) => break "guest channel closed".to_string(),
                    Err(e) => break format!("guest channel failed: {e}"),
                }
            };
            let _ = closed_tx.send(true);
            let mut map = sessions.lock().unwrap_or_else(|e| e.into_inner());
            for (_, sink) in map.drain() {
                let _ = sink.events.send(SessionEvent::Failed(reason.clone()));
                sink.stdin_credit.close();
            }
        });
        (conn, early)
    }

    /// Stops sending to the guest (sends fail at once, credit stays owed) and
    /// returns once every frame queued before has been written to the stream.
    /// Used at a migration's switch-over, so nothing is in flight to a VM
    /// whose memory has already been copied.
    pub async fn freeze(&self, timeout: Duration) -> Result<(), GuestError> {
        self.frozen.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        // why: `SeqCst` against `count_unless_frozen`'s count-then-check.
        while self.written.load(Ordering::Acquire) < self.queued.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                return Err(GuestError::Stalled(timeout));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Whether every byte the guest's stream held has been taken in and routed
    /// to its session: the reader waits on an empty stream at a frame boundary
    /// and `unread()` (the socket's `FIONREAD`) is 0. A barrier for a stopped
    /// VM's output (it sends nothing new), with no quiet window to wait out.
    /// Bytes that arrive after it answers are not covered.
    pub fn input_settled(&self, unread: impl Fn() -> usize) -> bool {
        let m = &self.input;
        // why: the order matters: a poll that took bytes before `unread()`
        // ran either still had `parked` cleared at the second look, or had
        // counted them in `read` before it could set `parked` again.
        let read = m.read.load(Ordering::SeqCst);
        let parked = m.parked.load(Ordering::SeqCst);
        let empty = unread() == 0;
        let still_parked = m.parked.load(Ordering::SeqCst);
        let read_again = m.read.load(Ordering::SeqCst);
        let routed = m.routed.load(Ordering::SeqCst);
        parked && empty && still_parked && read == read_again && routed == read
    }

    /// Whether the reader waits with part of a frame taken in (its rest not
    /// on the socket): a frame the guest's side cut in two.
    pub fn input_cut(&self) -> bool {
        let m = &self.input;
        m.parked.load(Ordering::SeqCst)
            && m.read.load(Ordering::SeqCst) > m.routed.load(Ordering::SeqCst)
    }

    /// Undoes [`GuestConn::freeze`] (the migration did not happen).
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        // why: credit a release could not queue while the channel was frozen
        // goes now, unless the connection is held again (review22 F1).
        if !self.credit_held.load(Ordering::SeqCst) && self.sweep_due.load(Ordering::SeqCst) {
            self.sweep_owed();
        }
    }

    /// Holds (`true`) or releases (`false`) every session's credit. A VM
    /// stopped for a migration takes nothing from its channel (QEMU's
    /// virtio-serial port stops reading its chardev), so a Credit written
    /// then stays on the socket and refuses the switch-over at the gate.
    /// Held, consumed output stays owed (in each session's `unacked`),
    /// whichever task consumes it: the main session's lifecycle task or an
    /// exec's stream (review17 F3). Released, the connection returns what
    /// every session owes at once, not at each consumer's next `next`: a
    /// consumer may already wait there for output a guest at a full window
    /// sends only once it has credit (review19). Credit that cannot be
    /// queued now (the channel frozen, or its queue and overflow full) stays
    /// owed and goes with the session's next `next`, or the next release or
    /// [`GuestConn::thaw`], whichever comes first (review22 F1). Releasing a
    /// connection that is neither held nor owing such a sweep does nothing.
    pub fn hold_credit(&self, on: bool) {
        if on {
            self.credit_held.store(true, Ordering::SeqCst);
            return;
        }
        // why: `SeqCst` against `return_credit`'s check of the flag: a
        // consumer that saw it set had counted its bytes before, so the
        // sweep below finds them; one that sees it clear sends its own.
        // why: a release whose credit could not all be queued (the channel
        // frozen or its queue full) sweeps again at the next release or thaw
        // (review22 F1: a consumer already waiting in `next` never gets to
        // send it itself).
        let was_held = self.credit_held.swap(false, Ordering::SeqCst);
        if !was_held && !self.sweep_due.load(Ordering::SeqCst) {
            return;
        }
        self.sweep_owed();
    }

    /// Queues a Credit for what every session owes; marks a sweep due again
    /// when some could not be queued.
    fn sweep_owed(&self) {
        self.sweep_due.store(false, Ordering::SeqCst);
        let owed: Vec<(u32, Arc<OwedCredit>)> = self
            .owed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, o)| (*id, o.clone()))
            .collect();
        for (id, o) in owed {
            let bytes = o.take();
            if bytes > 0 && !self.try_send(Frame::json(Kind::Credit, id, &Credit { bytes })) {
                o.put_back(bytes);
                // why: a closed channel takes nothing ever again; a sweep due
                // for it would walk the map at every release (review23 F4).
                if !*self.closed.borrow() {
                    self.sweep_due.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Whether [`GuestConn::hold_credit`] holds the credit now.
    pub fn credit_held(&self) -> bool {
        self.credit_held.load(Ordering::SeqCst)
    }

    /// Registers what a new session owes (nothing yet but `pending`).
    fn owe(&self, id: u32, pending: u32, in_flight: &Arc<AtomicU64>) -> Arc<OwedCredit> {
        let o = Arc::new(OwedCredit {
            pending: AtomicU32::new(pending),
            in_flight: in_flight.clone(),
        });
        self.owed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, o.clone());
        o
    }

    /// Forgets what session `id` owes (the session is dropped or handed over).
    fn forget_owed(&self, id: u32, which: &Arc<OwedCredit>) {
        let mut map = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&id).is_some_and(|o| Arc::ptr_eq(o, which)) {
            map.remove(&id);
        }
    }

    /// The id the next session will get (recorded in snapshots and migrations).
    pub fn next_session_id(&self) -> u32 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Ids of the sessions still running in the guest.
    pub fn live_sessions(&self) -> Vec<u32> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().copied().collect()
    }

    /// Takes over session `id` that a previous host started, with `unacked`
    /// output bytes the guest still counts against its window. Those bytes were
    /// consumed by the previous host, so their credit goes back first thing.
    pub fn adopt_session(self: &Arc<Self>, id: u32, unacked: u64) -> Session {
        let unacked = unacked.min(u64::from(INITIAL_WINDOW));
        let (events_tx, events) = mpsc::unbounded_channel();
        let stdin_credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let in_flight = Arc::new(AtomicU64::new(unacked));
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                SessionSink {
                    events: events_tx,
                    stdin_credit: stdin_credit.clone(),
                    in_flight: in_flight.clone(),
                    routed: 0,
                },
            );
        Session {
            id,
            conn: self.clone(),
            events,
            stdin_credit,
            owed: self.owe(id, unacked as u32, &in_flight),
            in_flight,
            ended: false,
            ack_exit: true,
        }
    }

    /// SIGKILLs the process of a session this host does not serve.
    pub async fn kill_session(&self, id: u32) -> Result<(), GuestError> {
        self.send(Frame::json(
            Kind::Signal,
            id,
            &SignalRequest {
                signal: libc::SIGKILL,
            },
        ))
        .await?;
        self.send(Frame::json(
            Kind::Credit,
            id,
            &Credit {
                bytes: INITIAL_WINDOW,
            },
        ))
        .await
    }

    /// The guest's Hello; None when connected after a restore.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Takes over session `id`, whose process already runs in a restored guest:
    /// its further output and exit come to the returned session.
    pub fn attach(self: &Arc<Self>, id: u32) -> Session {
        self.adopt_session(id, 0)
    }

    /// Resolves when the channel is gone.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|v| *v).await;
    }

    /// Hands the answer to the freeze with request id `id` to its waiter; an
    /// answer to an earlier (timed-out) freeze is dropped.
    fn answer_freeze(&self, id: u32, answer: Result<Frozen, String>) {
        let mut pending = self.frozen_ack.lock().unwrap_or_else(|e| e.into_inner());
        if pending.as_ref().is_some_and(|(want, _)| *want == id) {
            if let Some((_, tx)) = pending.take() {
                let _ = tx.send(answer);
            }
        }
    }

    fn route(&self, f: Frame) -> Result<(), GuestError> {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if f.id >= FREEZE_ID_BASE {
            match f.kind {
                Kind::Frozen => self.answer_freeze(f.id, Ok(f.parse()?)),
                // why: a guest without freeze support answers "unexpected Freeze".
                Kind::Error => self.answer_freeze(f.id, Err(f.parse::<ErrorMsg>()?.message)),
                _ => {}
            }
            return Ok(());
        }
        if f.id == CONTROL_ID {
            if f.kind == Kind::Pong {
                if let Some(tx) = self.pong.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = tx.send(());
                }
            }
            if f.kind == Kind::Error {
                // why: an older guest answers a control request it cannot read
                // (a `Restored` it cannot parse) with an Error on id 0; whatever
                // waits for an answer fails now instead of at its timeout.
                let m: ErrorMsg = f.parse()?;
                let restored = self
                    .restored_ack
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(tx) = restored {
                    let _ = tx.send(Err(m.message.clone()));
                }
                let frozen = self
                    .frozen_ack
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some((_, tx)) = frozen {
                    let _ = tx.send(Err(m.message));
                }
            }
            if f.kind == Kind::RestoredAck {
                let mut ack: RestoredAck = f.parse()?;
                if ack.restore_guard {
                    self.guards_restores.store(true, Ordering::Relaxed);
                }
                if ack.sent_first {
                    self.sent_first.store(true, Ordering::Relaxed);
                }
                // why: frames are routed in order, so what a session got before
                // the ack is exact; see `PendingAck`.
                ack.sessions.retain_mut(|s| match map.get(&s.id) {
                    Some(sink) => {
                        s.sent = s.sent.saturating_sub(sink.routed);
                        true
                    }
                    None => false,
                });
                let waiter = self
                    .restored_ack
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok(ack));
                }
            }
            return Ok(());
        }
        // why: frames for unknown sessions are ignored; a hostile guest gains nothing.
        let Some(sink) = map.get_mut(&f.id) else {
            if f.kind == Kind::Exit {
                // A session this host gave up (its client went away): let the guest forget it.
                self.try_send(Frame::json(Kind::ExitAck, f.id, &Empty {}));
            }
            return Ok(());
        };
        let ev = match f.kind {
            Kind::Started => SessionEvent::Started(f.parse::<Started>()?.pid),
            Kind::Stdout | Kind::Stderr => {
                let n = f.payload.len() as u64;
                sink.routed += n;
                let in_flight = sink.in_flight.fetch_add(n, Ordering::AcqRel) + n;
                if in_flight > u64::from(INITIAL_WINDOW) {
                    return Err(GuestError::WindowExceeded {
                        session: f.id,
                        in_flight,
                    });
                }
                if f.kind == Kind::Stdout {
                    SessionEvent::Stdout(f.payload)
                } else {
                    SessionEvent::Stderr(f.payload)
                }
            }
            Kind::Credit => {
                let c: Credit = f.parse()?;
                let room = INITIAL_WINDOW as usize - sink.stdin_credit.available_permits();
                sink.stdin_credit.add_permits((c.bytes as usize).min(room));
                return Ok(());
            }
            Kind::Exit => {
                let st: ExitStatus = f.parse()?;
                let sink = map.remove(&f.id);
                if let Some(s) = sink {
                    let _ = s.events.send(SessionEvent::Exit(st));
                    s.stdin_credit.close();
                }
                return Ok(());
            }
            Kind::Error => {
                let m: ErrorMsg = f.parse()?;
                if let Some(s) = map.remove(&f.id) {
                    let _ = s.events.send(SessionEvent::Failed(m.message));
                    s.stdin_credit.close();
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let _ = sink.events.send(ev);
        Ok(())
    }

    /// Counts a frame about to be handed to the writer, unless the channel
    /// is frozen. Counted first, checked after (both `SeqCst`, as `freeze`
    /// stores the flag first and reads the count after): either `freeze` sees
    /// this frame counted and waits for it to be written, or this sees the
    /// flag (review18 F1: checked first, a frame could pass the check, then
    /// `freeze` find it uncounted and return, then the frame reach a stopped
    /// VM's channel).
    fn count_unless_frozen(&self) -> bool {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Hands `f` to the writer task. Cancel-safe: dropped before the frame
    /// was handed over (the writer's queue full; tokio's `send` may also
    /// yield for its budget), the frame is not sent and not counted.
    async fn send(&self, f: Frame) -> Result<(), GuestError> {
        if !self.count_unless_frozen() {
            return Err(GuestError::Frozen);
        }
        // why: a frame that never reached the writer must not hold up
        // `freeze` — also when this future is dropped mid-send (review17 F1:
        // the count stayed one too high for good, and every later migration
        // of the sandbox was refused, "the writer did not flush").
        let uncount = OnDrop::new(|| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        });
        let r = match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(f)).await {
            Ok(r) => r.map_err(|_| GuestError::Closed),
            Err(_) => Err(GuestError::Stalled(SEND_TIMEOUT)),
        };
        if r.is_ok() {
            uncount.disarm();
        }
        r
    }

    /// Queues a frame without waiting (for Drop and the reader task). A full
    /// queue does not lose it: a task sends it once there is room (an ExitAck
    /// or credit dropped there left an ended session in the guest forever, or
    /// its output stalled). At most [`MAX_OVERFLOW`] frames are held so; beyond
    /// that the guest is not reading its channel and frames are dropped with a
    /// warning (host memory stays bounded whatever the guest sends). False
    /// when the frame is dropped (frozen, closed, or that bound reached); true
    /// when handed to the writer or held for it (a held one may still be
    /// dropped after `SEND_TIMEOUT`).
    fn try_send(&self, f: Frame) -> bool {
        if !self.count_unless_frozen() {
            return false;
        }
        match self.tx.try_send(f) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(f)) => {
                // why: bounded, so a guest that stops reading and floods frames
                // that are answered this way cannot grow host memory.
                let runtime = tokio::runtime::Handle::try_current().ok().filter(|_| {
                    let room = self.overflow.fetch_add(1, Ordering::AcqRel) < MAX_OVERFLOW;
                    if !room {
                        self.overflow.fetch_sub(1, Ordering::AcqRel);
                    }
                    room
                });
                let Some(rt) = runtime else {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(kind = ?f.kind, "dropping a frame to a guest that does not read its channel");
                    return false;
                };
                let (tx, queued, overflow) =
                    (self.tx.clone(), self.queued.clone(), self.overflow.clone());
                rt.spawn(async move {
                    let _done = OverflowSlot(overflow);
                    if tokio::time::timeout(SEND_TIMEOUT, tx.send(f))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        queued.fetch_sub(1, Ordering::AcqRel);
                    }
                });
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// Starts a process in the guest.
    pub async fn exec(self: &Arc<Self>, req: &ExecRequest) -> Result<Session, GuestError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::unbounded_channel();
        let stdin_credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let in_flight = Arc::new(AtomicU64::new(0));
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                SessionSink {
                    events: events_tx,
                    stdin_credit: stdin_credit.clone(),
                    in_flight: in_flight.clone(),
                    routed: 0,
                },
            );
        if let Err(e) = self.send(Frame::json(Kind::Exec, id, req)).await {
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(e);
        }
        Ok(Session {
            id,
            conn: self.clone(),
            events,
            stdin_credit,
            owed: self.owe(id, 0, &in_flight),
            in_flight,
            ended: false,
            ack_exit: true,
        })
    }

    /// Asks the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<(), GuestError> {
        self.send(Frame::json(Kind::Shutdown, CONTROL_ID, &Empty {}))
            .await
    }

    /// Round trip to the guest agent.
    pub async fn ping(&self, timeout: Duration) -> Result<(), GuestError> {
        let (tx, rx) = oneshot::channel();
        *self.pong.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.send(Frame::json(Kind::Ping, CONTROL_ID, &Empty {}))
            .await?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| GuestError::NoPong(timeout))?
            .map_err(|_| GuestError::Closed)
    }

    /// Asks the guest to stop every session's processes (before a snapshot is
    /// saved) and waits for its answer: how many process groups it stopped.
    /// Each request has its own frame id (the guest answers on it), so a late
    /// answer to a freeze that timed out never counts for a later one.
    pub async fn freeze_processes(&self, timeout: Duration) -> Result<u32, GuestError> {
        let n = self.freezes.fetch_add(1, Ordering::Relaxed);
        let id = FREEZE_ID_BASE + n % FREEZE_ID_BASE;
        let (tx, rx) = oneshot::channel();
        *self.frozen_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, tx));
        let clear = || {
            let mut pending = self.frozen_ack.lock().unwrap_or_else(|e| e.into_inner());
            if pending.as_ref().is_some_and(|(want, _)| *want == id) {
                *pending = None;
            }
        };
        if let Err(e) = self.send(Frame::json(Kind::Freeze, id, &Empty {})).await {
            clear();
            return Err(e);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        clear();
        let ack = answer
            .map_err(|_| GuestError::FreezeTimeout(timeout))?
            .map_err(|_| GuestError::Closed)?
            .map_err(GuestError::Refused)?;
        Ok(ack.sessions)
    }

    /// The guest guards restores (see [`hearth_proto::RESTORE_GUARD`]): an exec
    /// may be queued right behind a `Restored`.
    pub fn guards_restores(&self) -> bool {
        self.guards_restores.load(Ordering::Relaxed)
    }

    /// The guest counts output before it writes it (see
    /// [`hearth_proto::SENT_FIRST`]): its channel can be taken over with a
    /// `Resume` (a live migration) without its window coming out too large.
    pub fn counts_sent_first(&self) -> bool {
        self.sent_first.load(Ordering::Relaxed)
    }

    /// [`GuestConn::freeze_processes`] for a snapshot: when the guest does not
    /// confirm in time, it is told to thaw (a late `Frozen` stopped them all the
    /// same) and the error is returned, so no snapshot is saved from a guest
    /// whose processes may be running.
    pub async fn freeze_for_snapshot(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<u32, GuestError> {
        match self.freeze_processes(timeout).await {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = self.thaw_processes().await;
                Err(e)
            }
        }
    }

    /// Lets the processes stopped by [`GuestConn::freeze_processes`] continue.
    /// When the Thaw cannot be queued now (the channel is full, or paused for a
    /// migration), it is retried every [`THAW_RETRY`] in the background until
    /// it is, or the connection closes or is dropped; the error says why the
    /// first try failed. (The guest also thaws on its own after a bound.)
    pub async fn thaw_processes(self: &Arc<Self>) -> Result<(), GuestError> {
        let thaw = || Frame::json(Kind::Thaw, CONTROL_ID, &Empty {});
        let err = match self.send(thaw()).await {
            Ok(()) => return Ok(()),
            Err(GuestError::Closed) => return Err(GuestError::Closed),
            Err(e) => e,
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(THAW_RETRY).await;
                let Some(conn) = weak.upgrade() else { return };
                if *conn.closed.borrow() {
                    return;
                }
                match conn.send(thaw()).await {
                    Ok(()) => {
                        tracing::info!("the guest's Thaw was sent on a retry");
                        return;
                    }
                    Err(GuestError::Closed) => return,
                    Err(_) => {}
                }
            }
        });
        Err(err)
    }
}

/// The guest's answer to [`Kind::Restored`], still to come. In the ack it
/// yields, each of `sessions` is a session attached on this connection and its
/// `sent` is the stream offset of the first output byte this connection
/// delivered to it (where a new output log of that session starts).
pub struct PendingAck(oneshot::Receiver<Result<RestoredAck, String>>);

impl PendingAck {
    /// The ack; an `Error` the guest sent on the control id instead (an older
    /// guest that could not read the `Restored`) fails it at once.
    pub async fn wait(self, timeout: Duration) -> Result<RestoredAck, GuestError> {
        tokio::time::timeout(timeout, self.0)
            .await
            .map_err(|_| GuestError::RestoreTimeout(timeout))?
            .map_err(|_| GuestError::Closed)?
            .map_err(GuestError::Refused)
    }
}

/// One process in the guest. Dropping a session whose process still runs
/// kills that process (its client went away).
pub struct Session {
    id: u32,
    conn: Arc<GuestConn>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    stdin_credit: Arc<Semaphore>,
    in_flight: Arc<AtomicU64>,
    /// Output bytes handed to the consumer and not yet credited to the guest
    /// (shared with the connection, which returns them when a hold ends).
    owed: Arc<OwedCredit>,
    ended: bool,
    /// Acknowledge the Exit as soon as it is taken (the guest then forgets the session).
    ack_exit: bool,
}

/// Runs `f` when dropped, unless disarmed: undoes a count when the future
/// holding it is dropped before its step completed.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn new(f: F) -> Self {
        OnDrop(Some(f))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl Session {
    /// The session id (the guest's name for this process).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next event. Credit for the previous chunk goes back to the guest
    /// first, so the guest runs ahead of the consumer by at most one window.
    /// Cancel-safe: dropping the future loses neither events nor credit, also
    /// mid-send of the Credit (unit `a_next_dropped_mid_credit_loses_nothing`).
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.return_credit().await;
        self.next_holding_credit().await
    }

    /// Sends the credit owed to the guest once it makes a batch, unless the
    /// connection holds it ([`GuestConn::hold_credit`]).
    async fn return_credit(&mut self) {
        if self.ended
            || self.conn.credit_held()
            || self.owed.pending.load(Ordering::SeqCst) < CREDIT_BATCH
        {
            return;
        }
        // why: taken off before the send (see `OwedCredit::take`); put back
        // unless the Credit was handed over: on an error (the channel is
        // gone or stalled; the events say what happened) and when this
        // future is dropped mid-send (review17 F1: the bytes were lost from
        // `unacked` for good, and taken off again at the next send). Taken
        // whole, so a release's sweep running beside it takes none of it.
        let bytes = self.owed.take();
        if bytes == 0 {
            return;
        }
        let owed = &self.owed;
        let restore = OnDrop::new(|| owed.put_back(bytes));
        let sent = self
            .conn
            .send(Frame::json(Kind::Credit, self.id, &Credit { bytes }))
            .await
            .is_ok();
        if sent {
            restore.disarm();
        }
    }

    /// The next event, like [`Session::next`] but the credit owed stays owed
    /// (in [`Session::unacked`]; an Exit returns it if the channel takes the
    /// Credit): for a VM that is stopped, which takes nothing from its
    /// channel until it runs again (QEMU's virtio-serial port stops reading
    /// its chardev while the VM is stopped), so a Credit written now would
    /// stay on the socket.
    pub async fn next_holding_credit(&mut self) -> Option<SessionEvent> {
        let ev = self.events.recv().await?;
        match &ev {
            SessionEvent::Stdout(b) | SessionEvent::Stderr(b) => self.owed.consumed(b.len()),
            SessionEvent::Exit(_) => {
                // why: everything before the Exit is consumed once it is taken;
                // the guest may then drop what it kept for a replay. Without
                // waiting, so dropping this future never loses the Exit. Held
                // (the VM stopped), it stays owed and the release returns it.
                if !self.conn.credit_held() {
                    let bytes = self.owed.take();
                    // why: a Credit the channel does not take (frozen, a
                    // guest not reading) stays owed (review17 F5).
                    if bytes > 0
                        && !self.conn.try_send(Frame::json(
                            Kind::Credit,
                            self.id,
                            &Credit { bytes },
                        ))
                    {
                        self.owed.put_back(bytes);
                    }
                }
                self.ended = true;
                if self.ack_exit {
                    self.ack_exit();
                }
            }
            SessionEvent::Failed(_) => self.ended = true,
            SessionEvent::Started(_) => {}
        }
        Some(ev)
    }

    /// Keeps the Exit unacknowledged until [`Session::ack_exit`]: the guest then
    /// replays it to a restarted host that has not recorded it yet.
    pub fn defer_exit_ack(&mut self) {
        self.ack_exit = false;
    }

    /// Tells the guest the Exit is recorded, so it forgets the session (best effort).
    pub fn ack_exit(&self) {
        self.conn
            .try_send(Frame::json(Kind::ExitAck, self.id, &Empty {}));
    }

    /// The next event if one is already here; sends no credit (the channel
    /// may be frozen), so what it returns stays counted in [`Session::unacked`].
    pub fn try_next(&mut self) -> Option<SessionEvent> {
        let ev = self.events.try_recv().ok()?;
        match &ev {
            SessionEvent::Stdout(b) | SessionEvent::Stderr(b) => self.owed.consumed(b.len()),
            SessionEvent::Exit(_) | SessionEvent::Failed(_) => self.ended = true,
            SessionEvent::Started(_) => {}
        }
        Some(ev)
    }

    /// Output bytes the guest has sent and not yet got credit for.
    pub fn unacked(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Gives the session up to another host: dropping it then neither kills
    /// the guest process nor touches the channel.
    pub fn hand_over(&mut self) {
        self.ended = true;
        // why: the other host returns what it owes (the commit carries it).
        self.conn.forget_owed(self.id, &self.owed);
    }

    /// A handle for writing stdin and sending signals from another task.
    pub fn input(&self) -> SessionInput {
        SessionInput {
            id: self.id,
            conn: self.conn.clone(),
            stdin_credit: self.stdin_credit.clone(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.conn.forget_owed(self.id, &self.owed);
        if self.ended {
            return;
        }
        let still_there = self
            .conn
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id)
            .is_some();
        if still_there {
            // Best effort without blocking: the guest reaps the process and its
            // Exit frame is ignored as a frame for an unknown session.
            self.conn.try_send(Frame::json(
                Kind::Signal,
                self.id,
                &SignalRequest {
                    signal: libc::SIGKILL,
                },
            ));
            // Let the guest drain what the process left in its pipes.
            for _ in 0..2 {
                self.conn.try_send(Frame::json(
                    Kind::Credit,
                    self.id,
                    &Credit {
                        bytes: INITIAL_WINDOW,
                    },
                ));
            }
        }
    }
}

/// Writes to a session's stdin and signals its process.
#[derive(Clone)]
pub struct SessionInput {
    id: u32,
    conn: Arc<GuestConn>,
    stdin_credit: Arc<Semaphore>,
}

impl SessionInput {
    /// Sends stdin bytes, waiting for guest credit; an empty slice is ignored.
    pub async fn write(&self, mut data: &[u8]) -> Result<(), GuestError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_FRAME).min(INITIAL_WINDOW as usize / 4);
            let permit = self
                .stdin_credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| GuestError::Closed)?;
            permit.forget();
            self.conn
                .send(Frame::data(Kind::Stdin, self.id, data[..n].to_vec()))
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub async fn close(&self) -> Result<(), GuestError> {
        self.conn
            .send(Frame::data(Kind::Stdin, self.id, Vec::new()))
            .await
    }

    /// Delivers a signal to the process.
    pub async fn signal(&self, signal: i32) -> Result<(), GuestError> {
        self.conn
            .send(Frame::json(
                Kind::Signal,
                self.id,
                &SignalRequest { signal },
            ))
            .await
    }
}

/// Tests: the guest's Hello written on `guest`, then the host's handshake
/// over `host` (the other end of the same pipe or socket pair).
#[cfg(test)]
pub(crate) async fn handshake_for_test<S, G>(host: S, guest: &mut G) -> Arc<GuestConn>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    G: AsyncWrite + Unpin,
{
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        kernel_release: "6.1".into(),
    };
    write_frame_async(guest, &Frame::json(Kind::Hello, 0, &hello))
        .await
        .unwrap();
    GuestConn::handshake(host, Duration::from_secs(5))
        .await
        .unwrap()
}

#[cfg(test)]
mod tests {
    //! The host's side of the protocol against a scripted guest: these cases
    //! (a guest that breaks flow control, a client that goes away) cannot be
    //! produced by the real hearth-guest, which behaves.
    use super::*;
    use hearth_proto::{read_frame_async, write_frame_async};
    use tokio::io::DuplexStream;

    async fn connected() -> (Arc<GuestConn>, DuplexStream) {
        connected_with(8 << 20).await
    }

    /// A connection over a pipe of `buffer` bytes each way.
    async fn connected_with(buffer: usize) -> (Arc<GuestConn>, DuplexStream) {
        let (host, mut guest) = tokio::io::duplex(buffer);
        let conn = handshake_for_test(host, &mut guest).await;
        (conn, guest)
    }

    async fn next_frame(guest: &mut DuplexStream) -> Frame {
        tokio::time::timeout(Duration::from_secs(5), read_frame_async(guest))
            .await
            .expect("a frame within 5s")
            .unwrap()
            .unwrap()
    }

    /// Bytes waiting unread on `fd` (a socket).
    fn unread(fd: &std::os::fd::OwnedFd) -> usize {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket fd we own writes one c_int to `n`.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert!(r >= 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n as usize
    }

    /// Waits (bounded) until the barrier passes.
    async fn settles(conn: &GuestConn, fd: &std::os::fd::OwnedFd) -> bool {
        for _ in 0..200 {
            if conn.input_settled(|| unread(fd)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_input_barrier_holds_until_every_byte_is_routed_at_a_frame_boundary() {
        use std::os::fd::AsFd;
        use tokio::io::AsyncWriteExt;
        let (host, mut guest) = tokio::net::UnixStream::pair().unwrap();
        let fd = host.as_fd().try_clone_to_owned().unwrap();
        let conn = handshake_for_test(host, &mut guest).await;
        assert!(settles(&conn, &fd).await, "an idle channel settles");
        assert!(
            !conn.input_settled(|| 1),
            "bytes still unread on the socket hold the barrier"
        );
        let pong = Frame::json(Kind::Pong, CONTROL_ID, &Empty {}).encode();
        let (head, rest) = pong.split_at(pong.len() - 3);
        guest.write_all(head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(unread(&fd), 0, "the reader took the bytes");
        assert!(
            !conn.input_settled(|| unread(&fd)),
            "a frame cut short holds the barrier (its bytes are read, not routed)"
        );
        assert!(conn.input_cut(), "the cut frame is reported");
        guest.write_all(rest).await.unwrap();
        assert!(settles(&conn, &fd).await, "the whole frame is routed");
        assert!(!conn.input_cut());
        // A frame the guest wrote is in its session's channel once the barrier
        // passes, whenever the reader got to it.
        let mut session = conn.adopt_session(7, 0);
        for i in 0..50u8 {
            let out = Frame::data(Kind::Stdout, 7, vec![i; 100]).encode();
            guest.write_all(&out).await.unwrap();
            while !conn.input_settled(|| unread(&fd)) {
                tokio::task::yield_now().await;
            }
            match session.try_next() {
                Some(SessionEvent::Stdout(b)) => assert_eq!(b, vec![i; 100]),
                other => panic!("frame {i} is not in the session at the barrier: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_freeze_for_a_snapshot_that_times_out_fails_and_thaws_the_guest() {
        let (conn, mut guest) = connected().await;
        let err = conn
            .freeze_for_snapshot(Duration::from_millis(100))
            .await
            .expect_err("a guest that never answers Freeze must fail the freeze");
        assert!(matches!(err, GuestError::FreezeTimeout(_)), "{err}");
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Freeze);
        // The guest may still stop its processes when the Freeze reaches it: it is told to thaw.
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Thaw);
    }

    #[tokio::test]
    async fn a_late_frozen_from_a_timed_out_freeze_does_not_satisfy_the_next_one() {
        let (conn, mut guest) = connected().await;
        let err = conn
            .freeze_processes(Duration::from_millis(50))
            .await
            .expect_err("unanswered");
        assert!(matches!(err, GuestError::FreezeTimeout(_)), "{err}");
        let first = next_frame(&mut guest).await;
        assert_eq!(first.kind, Kind::Freeze);

        let second = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.freeze_processes(Duration::from_millis(300)).await })
        };
        let f2 = next_frame(&mut guest).await;
        assert_eq!(f2.kind, Kind::Freeze);
        assert_ne!(f2.id, first.id, "each freeze has its own request id");
        // The first freeze's answer arrives only now.
        let late = Frame::json(Kind::Frozen, first.id, &Frozen { sessions: 7 });
        write_frame_async(&mut guest, &late).await.unwrap();
        let err = second
            .await
            .unwrap()
            .expect_err("a late answer must not count");
        assert!(matches!(err, GuestError::FreezeTimeout(_)), "{err}");

        let third = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.freeze_processes(Duration::from_secs(5)).await })
        };
        let f3 = next_frame(&mut guest).await;
        let answer = Frame::json(Kind::Frozen, f3.id, &Frozen { sessions: 2 });
        write_frame_async(&mut guest, &answer).await.unwrap();
        assert_eq!(third.await.unwrap().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_guest_refusing_a_freeze_fails_it_at_once() {
        let (conn, mut guest) = connected().await;
        let freeze = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.freeze_processes(Duration::from_secs(60)).await })
        };
        let f = next_frame(&mut guest).await;
        // What a guest built before freeze support answers.
        let refusal = ErrorMsg {
            message: "unexpected Freeze frame from host".into(),
        };
        write_frame_async(&mut guest, &Frame::json(Kind::Error, f.id, &refusal))
            .await
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), freeze)
            .await
            .expect("failed at once, not after the timeout")
            .unwrap()
            .expect_err("refused");
        assert!(err.to_string().contains("unexpected Freeze"), "{err}");
    }

    #[tokio::test]
    async fn an_error_on_the_control_id_fails_a_pending_restore_ack_at_once() {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let msg = Restored {
            seed: vec![1; 8],
            unix_ms: 1,
            hostname: "h".into(),
            sandbox_id: "s".into(),
            net: None,
            net_given: false,
            net_kept: false,
        };
        let (conn, ack) = GuestConn::after_restore(host, &msg, 2).await.unwrap();
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Restored);
        // An older guest that cannot parse the Restored answers this way.
        let err = ErrorMsg {
            message: "invalid type: sequence".into(),
        };
        write_frame_async(&mut guest, &Frame::json(Kind::Error, CONTROL_ID, &err))
            .await
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), ack.wait(Duration::from_secs(120)))
            .await
            .expect("failed at once, not after the ack timeout")
            .expect_err("refused");
        assert!(err.to_string().contains("invalid type"), "{err}");
        assert!(
            !conn.guards_restores(),
            "nothing said this guest guards restores"
        );
    }

    #[tokio::test]
    async fn a_guest_guards_restores_when_its_hello_or_restored_ack_says_so() {
        let (conn, _guest) = connected().await;
        assert!(!conn.guards_restores(), "a plain agent version");

        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: format!("0.1.0{}", hearth_proto::RESTORE_GUARD),
            kernel_release: "6.1".into(),
        };
        write_frame_async(&mut guest, &Frame::json(Kind::Hello, 0, &hello))
            .await
            .unwrap();
        let conn = GuestConn::handshake(host, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(conn.guards_restores(), "from the Hello");

        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let msg = Restored {
            seed: vec![1; 8],
            unix_ms: 1,
            hostname: "h".into(),
            sandbox_id: "s".into(),
            net: None,
            net_given: false,
            net_kept: false,
        };
        let (conn, ack) = GuestConn::after_restore(host, &msg, 2).await.unwrap();
        assert!(!conn.guards_restores(), "no Hello on a restored connection");
        let answer = RestoredAck {
            restore_guard: true,
            sent_first: true,
            ..Default::default()
        };
        write_frame_async(&mut guest, &Frame::json(Kind::RestoredAck, 0, &answer))
            .await
            .unwrap();
        ack.wait(Duration::from_secs(5)).await.unwrap();
        assert!(conn.guards_restores(), "from the RestoredAck");
    }

    #[tokio::test]
    async fn a_thaw_that_cannot_be_sent_is_retried_until_it_is() {
        let (conn, mut guest) = connected().await;
        // Sends fail while the channel is paused (as for a migration's switch-over).
        conn.freeze(Duration::from_secs(1)).await.unwrap();
        let err = conn.thaw_processes().await.expect_err("paused");
        assert!(matches!(err, GuestError::Frozen), "{err}");
        conn.thaw();
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Thaw);
    }

    #[tokio::test]
    async fn restored_ack_offsets_are_rebased_to_where_this_connections_log_starts() {
        use hearth_proto::SessionSent;
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let msg = Restored {
            seed: vec![1; 8],
            unix_ms: 1,
            hostname: "h".into(),
            sandbox_id: "s".into(),
            net: None,
            net_given: false,
            net_kept: false,
        };
        let (conn, ack) = GuestConn::after_restore(host, &msg, 5).await.unwrap();
        let mut session = conn.attach(2);
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Restored);
        // Output of the continued session arrives before the ack (the guest
        // ran before it read Restored); at the ack it had sent 100 bytes.
        write_frame_async(&mut guest, &Frame::data(Kind::Stdout, 2, b"abcd".to_vec()))
            .await
            .unwrap();
        let restored = RestoredAck {
            warnings: vec![],
            sessions: vec![
                SessionSent { id: 2, sent: 100 },
                SessionSent { id: 3, sent: 7 },
            ],
            ..Default::default()
        };
        write_frame_async(&mut guest, &Frame::json(Kind::RestoredAck, 0, &restored))
            .await
            .unwrap();
        let got = ack.wait(Duration::from_secs(5)).await.unwrap();
        // Session 3 is not attached here; session 2's log starts at 96.
        assert_eq!(got.sessions, vec![SessionSent { id: 2, sent: 96 }]);
        assert!(matches!(session.next().await, Some(SessionEvent::Stdout(b)) if b == b"abcd"));
    }

    #[tokio::test]
    async fn guest_exceeding_its_output_window_is_cut_off() {
        let (conn, mut guest) = connected().await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        assert_eq!(exec.kind, Kind::Exec);
        let chunk = vec![b'x'; MAX_FRAME];
        let frames = INITIAL_WINDOW as usize / MAX_FRAME + 2;
        for _ in 0..frames {
            let _ = write_frame_async(
                &mut guest,
                &Frame::data(Kind::Stdout, exec.id, chunk.clone()),
            )
            .await;
        }
        let mut got = 0usize;
        let failure = loop {
            match s.next().await {
                Some(SessionEvent::Stdout(b)) => got += b.len(),
                Some(SessionEvent::Failed(m)) => break m,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(failure.contains("flow control"), "{failure}");
        assert!(got <= INITIAL_WINDOW as usize, "host accepted {got} bytes");
        tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn credit_is_returned_only_as_output_is_consumed() {
        let (conn, mut guest) = connected().await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        // Six chunks of 60,000 bytes: credit goes back once a batch of consumed
        // output is reached (taking the sixth returns the first five), never
        // per chunk, and never for a chunk not yet consumed.
        for _ in 0..6 {
            write_frame_async(
                &mut guest,
                &Frame::data(Kind::Stdout, exec.id, vec![1; 60_000]),
            )
            .await
            .unwrap();
        }
        for _ in 0..6 {
            assert!(matches!(s.next().await, Some(SessionEvent::Stdout(_))));
        }
        const _: () = assert!(5 * 60_000 >= CREDIT_BATCH && 4 * 60_000 < CREDIT_BATCH);
        let credit = next_frame(&mut guest).await;
        assert_eq!(credit.kind, Kind::Credit);
        assert_eq!(credit.parse::<Credit>().unwrap().bytes, 5 * 60_000);
    }

    /// review17 F1: `next` dropped while its Credit waits for room in the
    /// writer's queue (a guest not reading; tokio's `send` may also yield for
    /// its budget, and `run_source`'s select drops the losing branch) lost
    /// the credit from `unacked` and left the queued-frame count one too
    /// high, so `freeze` (every later migration's switch-over) never passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_next_dropped_mid_credit_loses_nothing() {
        let (conn, mut guest) = connected_with(256).await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        let chunk = Frame::data(Kind::Stdout, exec.id, vec![1; 60_000]);
        for _ in 0..5 {
            write_frame_async(&mut guest, &chunk).await.unwrap();
        }
        for _ in 0..5 {
            let ev = s.next_holding_credit().await;
            assert!(matches!(ev, Some(SessionEvent::Stdout(_))));
        }
        let owed = s.unacked();
        assert_eq!(owed, 300_000);
        // The guest stops reading: pings fill its pipe and the writer's queue.
        let mut pings = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let c = conn.clone();
            pings.spawn(async move {
                let _ = c.ping(Duration::from_secs(60)).await;
            });
        }
        // why: every ping counted and the writer stuck (nothing written for
        // a while), not just a full queue seen for a moment (review18 F4).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut written = u64::MAX;
        loop {
            let now = conn.written.load(Ordering::Acquire);
            if conn.tx.capacity() == 0
                && conn.queued.load(Ordering::Acquire) >= 201
                && now == written
            {
                break;
            }
            written = now;
            assert!(
                std::time::Instant::now() < deadline,
                "the writer's queue never filled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stuck = tokio::time::timeout(Duration::from_millis(100), s.next()).await;
        assert!(stuck.is_err(), "the Credit found room in a full queue");
        assert_eq!(s.unacked(), owed, "credit lost with the dropped next()");
        // The guest reads again: every frame handed over is written, and a
        // freeze (a switch-over) passes.
        let reader =
            tokio::spawn(
                async move { while let Ok(Some(_)) = read_frame_async(&mut guest).await {} },
            );
        conn.freeze(Duration::from_secs(10))
            .await
            .expect("a frame never handed over still counted as queued");
        pings.abort_all();
        reader.abort();
    }

    /// A migration's source holds the credit once the VM stopped (QEMU does
    /// not read the channel then): taken with `next_holding_credit`, output
    /// stays owed in `unacked` and no Credit is written; the next `next`
    /// returns all of it in one Credit.
    #[tokio::test]
    async fn credit_is_held_while_the_vm_is_stopped() {
        let (conn, mut guest) = connected().await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        let chunk = Frame::data(Kind::Stdout, exec.id, vec![1; 60_000]);
        for _ in 0..6 {
            write_frame_async(&mut guest, &chunk).await.unwrap();
        }
        for _ in 0..6 {
            let ev = s.next_holding_credit().await;
            assert!(matches!(ev, Some(SessionEvent::Stdout(_))));
        }
        assert_eq!(s.unacked(), 6 * 60_000, "credit was returned while held");
        write_frame_async(&mut guest, &chunk).await.unwrap();
        assert!(matches!(s.next().await, Some(SessionEvent::Stdout(_))));
        let credit = next_frame(&mut guest).await;
        assert_eq!(credit.kind, Kind::Credit);
        assert_eq!(
            credit.parse::<Credit>().unwrap().bytes,
            6 * 60_000,
            "a Credit went out while the credit was held"
        );
    }

    /// review17 F3: the hold is the connection's, so every session's
    /// consumer (an exec's stream as well as the main session's) takes its
    /// output with plain `next` and returns no credit while it is held; the
    /// release returns what each owes, at once, without any `next`.
    #[tokio::test]
    async fn a_held_connection_holds_every_sessions_credit_and_its_release_returns_it() {
        let (conn, mut guest) = connected().await;
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let s = conn.exec(&ExecRequest::default()).await.unwrap();
            let exec = next_frame(&mut guest).await;
            assert_eq!(exec.id, s.id());
            sessions.push(s);
        }
        conn.hold_credit(true);
        for s in &sessions {
            let chunk = Frame::data(Kind::Stdout, s.id(), vec![1; 60_000]);
            for _ in 0..6 {
                write_frame_async(&mut guest, &chunk).await.unwrap();
            }
        }
        for s in &mut sessions {
            for _ in 0..6 {
                assert!(matches!(s.next().await, Some(SessionEvent::Stdout(_))));
            }
            assert_eq!(s.unacked(), 6 * 60_000, "credit was returned while held");
        }
        // why: a marker frame; a Credit sent while held would come before it.
        conn.shutdown().await.unwrap();
        assert_eq!(next_frame(&mut guest).await.kind, Kind::Shutdown);
        conn.hold_credit(false);
        let mut credited = Vec::new();
        for _ in 0..2 {
            let f = next_frame(&mut guest).await;
            assert_eq!(f.kind, Kind::Credit);
            credited.push((f.id, f.parse::<Credit>().unwrap().bytes));
        }
        credited.sort();
        let want: Vec<(u32, u32)> = sessions.iter().map(|s| (s.id(), 6 * 60_000)).collect();
        assert_eq!(
            credited, want,
            "the release did not return every session's credit"
        );
        for s in &sessions {
            assert_eq!(s.unacked(), 0);
        }
    }

    /// review19: a consumer that already waits in `next` when the hold ends,
    /// its guest at a full window (it sends nothing more before it gets
    /// credit), gets its stream going again: the release returns the credit
    /// itself. (Released by a flag only, nothing was sent and both sides
    /// waited for each other for good, an exec after an aborted move.)
    #[tokio::test]
    async fn a_consumer_waiting_at_a_full_window_gets_going_when_the_hold_ends() {
        let (conn, mut guest) = connected().await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        let part = INITIAL_WINDOW as usize / 16;
        let chunk = Frame::data(Kind::Stdout, exec.id, vec![1; part]);
        conn.hold_credit(true);
        for _ in 0..16 {
            write_frame_async(&mut guest, &chunk).await.unwrap();
        }
        for _ in 0..16 {
            assert!(matches!(s.next().await, Some(SessionEvent::Stdout(_))));
        }
        assert_eq!(
            s.unacked(),
            u64::from(INITIAL_WINDOW),
            "the guest's window is full"
        );
        let mut waiting = Box::pin(s.next());
        // why: polled once, so it waits for output before the release.
        tokio::select! {
            biased;
            _ = &mut waiting => panic!("an event came with no output sent"),
            _ = std::future::ready(()) => {}
        }
        conn.hold_credit(false);
        let credit = next_frame(&mut guest).await;
        assert_eq!(credit.kind, Kind::Credit);
        assert_eq!(credit.parse::<Credit>().unwrap().bytes, INITIAL_WINDOW);
        write_frame_async(&mut guest, &chunk).await.unwrap();
        assert!(matches!(waiting.await, Some(SessionEvent::Stdout(b)) if b.len() == part));
        assert_eq!(s.unacked(), part as u64);
    }

    /// review22 F1: a release that cannot queue a session's credit (the
    /// channel frozen: `run_source`'s backstop on a move or an unresolved
    /// commit; or the writer's queue and its overflow full) leaves it for the
    /// session's next `next` — which a consumer already waiting there, its
    /// guest at a full window, never reaches. A later thaw and release (what
    /// `resume_here` does) find the connection not held and sweep nothing:
    /// the review19 hang by another path.
    #[tokio::test]
    async fn a_credit_the_release_could_not_queue_still_reaches_a_waiting_consumers_guest() {
        let (conn, mut guest) = connected().await;
        let mut s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        let part = INITIAL_WINDOW as usize / 16;
        let chunk = Frame::data(Kind::Stdout, exec.id, vec![1; part]);
        conn.hold_credit(true);
        for _ in 0..16 {
            write_frame_async(&mut guest, &chunk).await.unwrap();
        }
        for _ in 0..16 {
            assert!(matches!(s.next().await, Some(SessionEvent::Stdout(_))));
        }
        let mut waiting = Box::pin(s.next());
        tokio::select! {
            biased;
            _ = &mut waiting => panic!("an event came with no output sent"),
            _ = std::future::ready(()) => {}
        }
        conn.freeze(Duration::from_secs(1)).await.unwrap();
        // why: `CreditHold`'s drop while the channel is still frozen.
        conn.hold_credit(false);
        // why: what `resume_here` does when the VM runs here again.
        conn.thaw();
        conn.hold_credit(false);
        let got = tokio::time::timeout(Duration::from_secs(5), read_frame_async(&mut guest)).await;
        assert!(
            matches!(&got, Ok(Ok(Some(f))) if f.kind == Kind::Credit),
            "no Credit reached the guest after the thaw ({got:?}): it stays at a full window and the consumer waiting in next waits for good"
        );
    }

    #[tokio::test]
    async fn resume_skips_stale_bytes_and_routes_the_replay_to_the_session() {
        use hearth_proto::{Resume, ResumedSession};
        use tokio::io::AsyncWriteExt;
        let (host, mut guest) = tokio::io::duplex(8 << 20);
        let want = [ResumeSession {
            id: 4,
            persisted: 10,
        }];
        let task =
            tokio::spawn(
                async move { GuestConn::resume(host, &want, Duration::from_secs(5)).await },
            );
        let msg: Resume = next_frame(&mut guest).await.parse().unwrap();
        assert_eq!(msg.sessions, want);
        // A frame torn by the previous connection, then the answer and the replay.
        let mut wire = Frame::data(Kind::Stdout, 4, b"stale".to_vec()).encode()[3..].to_vec();
        wire.extend_from_slice(&msg.nonce);
        let resumed = Resumed {
            hello: Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "test".into(),
                kernel_release: "6.1".into(),
            },
            next_session: 9,
            sessions: vec![ResumedSession {
                id: 4,
                replay_from: 10,
                sent: 13,
                exited: true,
            }],
        };
        wire.extend(Frame::json(Kind::Resumed, 0, &resumed).encode());
        wire.extend(Frame::data(Kind::Stdout, 4, b"abc".to_vec()).encode());
        let exit = ExitStatus {
            code: Some(7),
            signal: None,
        };
        wire.extend(Frame::json(Kind::Exit, 4, &exit).encode());
        guest.write_all(&wire).await.unwrap();
        let (conn, got, mut sessions) = task.await.unwrap().unwrap();
        assert_eq!(got, resumed);
        assert_eq!(conn.next_session_id(), 9);
        let mut s = sessions.pop().unwrap();
        assert!(matches!(s.next().await, Some(SessionEvent::Stdout(b)) if b == b"abc"));
        assert!(matches!(s.next().await, Some(SessionEvent::Exit(st)) if st == exit));
        // Taking the Exit acknowledges it, after crediting the output.
        let credit = next_frame(&mut guest).await;
        assert_eq!((credit.kind, credit.id), (Kind::Credit, 4));
        let ack = next_frame(&mut guest).await;
        assert_eq!((ack.kind, ack.id), (Kind::ExitAck, 4));
    }

    #[tokio::test]
    async fn dropping_a_live_session_kills_its_process() {
        let (conn, mut guest) = connected().await;
        let s = conn.exec(&ExecRequest::default()).await.unwrap();
        let exec = next_frame(&mut guest).await;
        drop(s);
        let sig = next_frame(&mut guest).await;
        assert_eq!((sig.kind, sig.id), (Kind::Signal, exec.id));
        assert_eq!(sig.parse::<SignalRequest>().unwrap().signal, libc::SIGKILL);
    }

    #[tokio::test]
    async fn acks_are_not_lost_when_the_send_queue_is_full() {
        // A tiny pipe the "guest" does not read yet: the writer blocks and the
        // 64-frame queue fills with acks for its Exit frames.
        let (conn, guest) = connected_with(256).await;
        let (mut rd, mut wr) = tokio::io::split(guest);
        const N: u32 = 200;
        let exit = ExitStatus {
            code: Some(0),
            signal: None,
        };
        for id in 1000..1000 + N {
            // Exits of sessions the host does not know: each is acknowledged.
            write_frame_async(&mut wr, &Frame::json(Kind::Exit, id, &exit))
                .await
                .unwrap();
        }
        let mut acked = std::collections::BTreeSet::new();
        while acked.len() < N as usize {
            let f = tokio::time::timeout(Duration::from_secs(5), read_frame_async(&mut rd))
                .await
                .expect("every ack arrives")
                .unwrap()
                .unwrap();
            assert_eq!(f.kind, Kind::ExitAck);
            acked.insert(f.id);
        }
        assert_eq!(acked, (1000..1000 + N).collect());
        drop(conn);
    }

    #[tokio::test]
    async fn a_guest_that_does_not_read_cannot_make_the_host_hold_frames_without_bound() {
        let (conn, guest) = connected_with(256).await;
        let (_rd, mut wr) = tokio::io::split(guest);
        let exit = ExitStatus {
            code: Some(0),
            signal: None,
        };
        for id in 1000..6000u32 {
            write_frame_async(&mut wr, &Frame::json(Kind::Exit, id, &exit))
                .await
                .unwrap();
        }
        // The reader has handled every frame once the Exits' acks stop growing
        // the overflow; it never holds more than the bound.
        assert!(conn.overflow.load(Ordering::Acquire) <= MAX_OVERFLOW);
    }
}
