//! Leader: settles the migrations the state machine ended `aborted` without
//! the source's word (`Migration::awaits_target`) by asking their target,
//! before any copy of the record is started again (the watchdog starts none
//! while a record is held: `SandboxRecord::held_for_target`).
//!
//! The question is the target's incoming-abort route for that one attempt
//! (`DELETE /v1/migrations/incoming/{id}?attempt=ID&owner=TAG`, cluster
//! token), whose answer is ordered against the target's commit: "removed
//! uncommitted" means the attempt never committed there and now never will
//! (`SettleAbort uncommitted`: the restart proceeds); 409
//! `migration_committed` means its copy is the target's (`SettleAbort
//! committed`: the record moves there at once). Any other answer, or none,
//! changes nothing and is asked again with a backoff; one question per
//! attempt is in flight, off the watchdog's tick. A target NotReady or
//! removed cannot answer: `SettleAbort target_lost` (the restart proceeds; a
//! copy it committed still takes the record over if it reports before any
//! other copy was reported, and is fenced after that).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_agent::migration::peer::{classify_abort, AbortVerdict, Peer};
use hearth_store::{Command, TargetAnswer};

use super::{now_ms, ControlPlane};

/// The questions in flight or waiting for their next try, by attempt id.
#[derive(Clone, Default)]
pub(super) struct Asks(Arc<Mutex<HashMap<String, Ask>>>);

#[derive(Debug, Default, Clone, Copy)]
struct Ask {
    in_flight: bool,
    tries: u32,
    next_ms: u64,
}

impl Asks {
    pub(super) fn clear(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
        }
    }
}

/// The longest wait between two questions to a target that does not answer.
const ASK_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long the leader waits after the `tries`-th question went unanswered:
/// doubling from 1 s up to [`ASK_BACKOFF_MAX`].
fn backoff(tries: u32) -> Duration {
    Duration::from_secs(1u64 << tries.saturating_sub(1).min(5)).min(ASK_BACKOFF_MAX)
}

/// One record waiting for its target's answer.
#[derive(Debug, Clone)]
struct Question {
    id: String,
    attempt: String,
    to: String,
    /// The target's API, when it is registered and Ready.
    address: Option<String>,
    /// The id the migrating copy has (the target's incoming VM's id).
    agent_id: Option<String>,
    /// The tag the target's committed copy carries.
    owner: String,
}

/// Asks the target of every held record (at most one question per attempt
/// in flight, the next one after a backoff); settles those whose target is
/// lost. Returns at once: the questions run in their own tasks.
pub(super) fn settle(cp: &ControlPlane, now: u64, asks: &Asks) {
    let held: Vec<Question> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter_map(|s| {
                let m = s.held_for_target()?;
                let mut next = s.clone();
                next.reschedules = m.generation;
                Some(Question {
                    id: s.id.clone(),
                    attempt: m.id.clone(),
                    to: m.to.clone(),
                    address: st
                        .nodes
                        .get(&m.to)
                        .filter(|n| n.ready)
                        .map(|n| n.address.clone()),
                    // why: a record still at the source's generation names
                    // the migrating copy itself (aborts of older logs).
                    agent_id: m.agent_id.clone().or_else(|| {
                        s.observed
                            .as_ref()
                            .and_then(|o| o.agent_id.clone())
                            .filter(|_| s.reschedules < m.generation)
                    }),
                    owner: st.owner_of(&next),
                })
            })
            .collect()
    });
    let Ok(mut map) = asks.0.lock() else {
        return;
    };
    map.retain(|k, _| held.iter().any(|q| &q.attempt == k));
    for q in held {
        let a = map.entry(q.attempt.clone()).or_default();
        if a.in_flight || now < a.next_ms {
            continue;
        }
        a.in_flight = true;
        tokio::spawn(ask(cp.clone(), q, asks.clone()));
    }
}

/// Asks (or, the target lost, does not), records the answer, and schedules
/// the next question if the record is still held.
async fn ask(cp: ControlPlane, q: Question, asks: Asks) {
    let answer = match (&q.address, &q.agent_id) {
        (None, _) => Some(TargetAnswer::TargetLost),
        (Some(_), None) => {
            tracing::warn!(sandbox = %q.id, target = %q.to,
                "the migrating copy's id is not recorded; cannot ask node {} about attempt {}: the record waits until that node is NotReady or removed",
                q.to, q.attempt);
            None
        }
        (Some(addr), Some(agent_id)) => {
            let r = Peer::new(addr, &cp.credential_key)
                .give_up(agent_id, &q.attempt, &q.owner)
                .await;
            match classify_abort(&r) {
                AbortVerdict::RemovedUncommitted => Some(TargetAnswer::Uncommitted),
                AbortVerdict::Committed => Some(TargetAnswer::Committed),
                AbortVerdict::Unknown(why) => {
                    tracing::warn!(sandbox = %q.id, target = %q.to,
                        "node {} did not say whether it committed migration attempt {} ({why}); nothing is started until it does or is NotReady, asked again",
                        q.to, q.attempt);
                    None
                }
            }
        }
    };
    if let Some(answer) = answer {
        let cmd = Command::SettleAbort {
            id: q.id.clone(),
            migration: q.attempt.clone(),
            answer,
            at_ms: now_ms(),
        };
        match cp.store.write(cmd).await {
            Ok(hearth_store::Reply::Sandbox { sandbox }) => {
                tracing::info!(sandbox = %q.id, target = %q.to, attempt = %q.attempt, ?answer,
                    node = %sandbox.node, generation = sandbox.reschedules,
                    "settled a migration aborted without the source's word");
            }
            Ok(other) => {
                tracing::warn!(sandbox = %q.id, "settling its aborted migration: {other:?}")
            }
            Err(e) => tracing::warn!(sandbox = %q.id, "settling its aborted migration: {e}"),
        }
    }
    if let Ok(mut map) = asks.0.lock() {
        if let Some(a) = map.get_mut(&q.attempt) {
            a.in_flight = false;
            a.tries += 1;
            a.next_ms = now_ms() + backoff(a.tries).as_millis() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::migrate::tests::cluster;
    use axum::extract::{Path, Query};
    use hearth_api::{ApiError, ErrorCode};
    use hearth_sched::{Accel, Resources};
    use hearth_store::{Migration, NodeRecord, Reply, SandboxRecord};

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let s: Vec<u64> = (1..=8).map(|t| backoff(t).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    /// What the stub target answers.
    #[derive(Clone, Copy)]
    enum Says {
        Committed,
        Removed,
    }

    /// A target agent's incoming-abort route on loopback (the only route
    /// the leader calls), answering `says` and keeping the queries it got.
    async fn target(says: Says) -> (String, Arc<Mutex<Vec<(String, String, String)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let route = move |Path(id): Path<String>, Query(q): Query<HashMap<String, String>>| {
            let seen = s2.clone();
            async move {
                seen.lock().unwrap().push((
                    id.clone(),
                    q.get("attempt").cloned().unwrap_or_default(),
                    q.get("owner").cloned().unwrap_or_default(),
                ));
                match says {
                    Says::Committed => Err(crate::HttpError(ApiError::new(
                        ErrorCode::MigrationCommitted,
                        format!("sandbox '{id}' was committed and runs on node n2"),
                    ))),
                    Says::Removed => Ok(axum::Json(serde_json::json!({"removed": "uncommitted"}))),
                }
            }
        };
        let app =
            axum::Router::new().route("/v1/migrations/incoming/{id}", axum::routing::delete(route));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (format!("http://{addr}"), seen)
    }

    /// n1 (source), n2 (the target, at `address`), n3; `s1` (restart:
    /// always) migrating n1 → n2 in pre-copy when n1 is lost: the record is
    /// placed on n3 and held for n2's answer.
    async fn held(cp: &ControlPlane, address: &str) {
        cluster::node(cp, "n1", 64, 65536).await;
        cluster::node(cp, "n3", 64, 65536).await;
        cp.store
            .write(Command::RegisterNode {
                node: NodeRecord {
                    id: "n2".into(),
                    instance: "inst-n2".into(),
                    address: address.into(),
                    capacity: Resources::new(64, 65536, 1_000_000),
                    accel: Accel::Tcg,
                    labels: Default::default(),
                    cordoned: false,
                    ready: true,
                    registered_ms: 1,
                    last_heartbeat_ms: now_ms(),
                    warm_templates: Default::default(),
                    volumes: Default::default(),
                },
            })
            .await
            .unwrap();
        cp.store
            .write(Command::InitCluster { id: "c1".into() })
            .await
            .unwrap();
        cluster::sandbox(cp, "s1", "n1").await;
        let now = now_ms();
        let r = cp
            .store
            .write(Command::StartMigration {
                id: "s1".into(),
                migration: Migration {
                    id: "att1".into(),
                    from: "n1".into(),
                    to: "n2".into(),
                    phase: "preparing".into(),
                    generation: 0,
                    started_ms: now,
                    updated_ms: now,
                    error: None,
                    progress: None,
                    stall_ms: None,
                    source_gone_ms: None,
                    unconfirmed: false,
                    target_lost: false,
                    agent_id: None,
                },
            })
            .await
            .unwrap();
        assert!(matches!(r, Reply::Sandbox { .. }), "{r:?}");
        cp.store
            .write(Command::MarkNotReady {
                node: "n1".into(),
                at_ms: now,
            })
            .await
            .unwrap();
        let rec = record(cp);
        assert_eq!((rec.node.as_str(), rec.reschedules), ("n3", 1), "{rec:?}");
        assert!(rec.held_for_target().is_some(), "{rec:?}");
    }

    fn record(cp: &ControlPlane) -> SandboxRecord {
        cp.store.read_local(|st| st.sandboxes["s1"].clone())
    }

    /// Waits (readiness, bounded) until the question in flight came back.
    async fn answered(asks: &Asks) {
        for _ in 0..500 {
            let busy = asks.0.lock().unwrap().values().any(|a| a.in_flight);
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the question to the target never came back");
    }

    /// ask7: the target answers `migration_committed`: the record moves to
    /// it at once (its copy, at the migration's generation), the restart's
    /// placement on n3 is dropped and nothing is left to start. The question
    /// names the migrating copy, the attempt and the copy's tag.
    #[tokio::test]
    async fn a_target_that_committed_takes_the_record_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        let (addr, seen) = target(Says::Committed).await;
        held(&cp, &addr).await;
        let asks = Asks::default();
        settle(&cp, now_ms(), &asks);
        answered(&asks).await;
        assert_eq!(
            seen.lock().unwrap().clone(),
            [(
                "a-s1".to_string(),
                "att1".to_string(),
                "c1/s1@1".to_string()
            )]
        );
        let rec = record(&cp);
        assert_eq!((rec.node.as_str(), rec.reschedules), ("n2", 1), "{rec:?}");
        let m = rec.migration.clone().unwrap();
        assert_eq!((m.phase.as_str(), m.unconfirmed), ("completed", false));
        let o = rec.observed.clone().unwrap();
        assert_eq!(
            (o.status.as_str(), o.agent_id.as_deref()),
            ("running", Some("a-s1"))
        );
        assert!(rec.held_for_target().is_none());
        // Nothing is asked again.
        settle(&cp, now_ms() + 60_000, &asks);
        answered(&asks).await;
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    /// ask7: the target removed (or never had) the attempt: the abort is
    /// confirmed and the record, still placed on n3, may be started.
    #[tokio::test]
    async fn a_target_that_never_committed_lets_the_restart_proceed() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        let (addr, seen) = target(Says::Removed).await;
        held(&cp, &addr).await;
        let asks = Asks::default();
        settle(&cp, now_ms(), &asks);
        answered(&asks).await;
        assert_eq!(seen.lock().unwrap().len(), 1);
        let rec = record(&cp);
        assert!(rec.held_for_target().is_none(), "{rec:?}");
        assert_eq!((rec.node.as_str(), rec.reschedules), ("n3", 1), "{rec:?}");
        let m = rec.migration.clone().unwrap();
        assert_eq!((m.phase.as_str(), m.unconfirmed), ("aborted", false));
        assert!(
            m.error.unwrap_or_default().contains("never committed"),
            "the record does not say why"
        );
        assert!(cp
            .store
            .read_local(|st| super::super::watchdog::to_start(st, &rec)));
    }

    /// ask7: a target that does not answer holds the record (nothing is
    /// started; asked again after a backoff, one question at a time) until
    /// it is NotReady: then the abort is confirmed "target lost" and the
    /// restart proceeds (never zero copies for ever).
    #[tokio::test]
    async fn an_unreachable_target_holds_the_restart_until_it_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        held(&cp, "http://127.0.0.1:1").await;
        let asks = Asks::default();
        let t0 = now_ms();
        settle(&cp, t0, &asks);
        answered(&asks).await;
        let rec = record(&cp);
        assert!(rec.held_for_target().is_some(), "{rec:?}");
        assert!(!cp
            .store
            .read_local(|st| super::super::watchdog::to_start(st, &rec)));
        let a = asks.0.lock().unwrap()["att1"];
        assert_eq!(a.tries, 1);
        assert!(a.next_ms > t0, "no backoff: {a:?}");
        // Within the backoff nothing is asked.
        settle(&cp, t0, &asks);
        assert!(!asks.0.lock().unwrap()["att1"].in_flight);
        cp.store
            .write(Command::MarkNotReady {
                node: "n2".into(),
                at_ms: now_ms(),
            })
            .await
            .unwrap();
        settle(&cp, a.next_ms, &asks);
        answered(&asks).await;
        let rec = record(&cp);
        assert!(rec.held_for_target().is_none(), "{rec:?}");
        let m = rec.migration.clone().unwrap();
        assert!(
            m.error
                .clone()
                .unwrap_or_default()
                .contains("node n2 (the target) is NotReady"),
            "{m:?}"
        );
        assert_eq!(rec.node, "n3");
        assert!(cp
            .store
            .read_local(|st| super::super::watchdog::to_start(st, &rec)));
    }
}
