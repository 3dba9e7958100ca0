//! Leader-only background work: nodes that stop heartbeating become
//! NotReady (their sandboxes are lost, or moved when they asked for
//! `restart: always`), moved or restarted sandboxes are started on their
//! node, and a record whose start never finished is given up (`failed`, with
//! the reason) or, with `restart: always`, started again (as is one whose
//! start failed, after a backoff); a live migration
//! whose driving member went away is finished from the source's answer; a
//! migration the state machine aborted without the source's word is settled
//! by asking its target ([`unconfirmed`]) before any copy is started again.

use std::collections::HashMap;
use std::time::Duration;

use hearth_store::{Command, Expect, RestartPolicy};

use super::{migrate, now_ms, sandboxes, unconfirmed, ControlPlane};

pub(super) async fn run(cp: ControlPlane) {
    tokio::join!(nodes(cp.clone()), migrations(cp));
}

/// Leader: finishes migrations whose driving member went away.
async fn migrations(cp: ControlPlane) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let me = cp.store.member_status();
        if me.leader == Some(me.id) {
            migrate::resolve_orphans(&cp).await;
        }
    }
}

async fn nodes(cp: ControlPlane) {
    // why: the tick also starts moved and failed sandboxes again; a long
    // node timeout must not make those wait for minutes.
    let period =
        (cp.cfg.node_timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    // why: a new leader has not seen heartbeats sent to the old one's term yet;
    // give every node one full timeout from the moment this member leads.
    let mut leading_since: Option<u64> = None;
    // why: deadlines of unstarted records run on this leader's clock, from
    // when it first saw them unstarted (not the proposing member's clock).
    let mut unstarted: HashMap<(String, u32), u64> = HashMap::new();
    let mut abandoned: HashMap<(String, u32), u64> = HashMap::new();
    let asks = unconfirmed::Asks::default();
    loop {
        tick.tick().await;
        let me = cp.store.member_status();
        if me.leader != Some(me.id) {
            leading_since = None;
            unstarted.clear();
            abandoned.clear();
            asks.clear();
            continue;
        }
        if cp.store.read_local(|st| st.cluster_id.is_none()) {
            name_cluster(&cp).await;
        }
        let now = now_ms();
        let since = *leading_since.get_or_insert(now);
        let timeout = cp.cfg.node_timeout.as_millis() as u64;
        let silent: Vec<String> = cp.store.read_local(|st| {
            st.nodes
                .values()
                .filter(|n| n.ready && now.saturating_sub(n.last_heartbeat_ms.max(since)) > timeout)
                .map(|n| n.id.clone())
                .collect()
        });
        for node in silent {
            tracing::warn!(%node, "node missed heartbeats; marking it NotReady");
            if let Err(e) = cp
                .store
                .write(Command::MarkNotReady { node, at_ms: now })
                .await
            {
                tracing::warn!("marking node NotReady: {e}");
            }
        }
        give_up_stuck(&cp, now, &mut unstarted).await;
        unconfirmed::settle(&cp, now, &asks);
        retry_failed_starts(&cp, now, &mut abandoned).await;
        restart_moved(&cp);
    }
}

/// Gives the cluster its random id (the first leader does, once).
async fn name_cluster(cp: &ControlPlane) {
    let mut b = [0u8; 8];
    if let Err(e) = getrandom::fill(&mut b) {
        tracing::warn!("no randomness for the cluster id: {e}");
        return;
    }
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if let Err(e) = cp.store.write(Command::InitCluster { id }).await {
        tracing::warn!("naming the cluster: {e}");
    }
}

/// Records committed but never started (the member starting it stopped, or
/// the node never answered): after twice the start timeout no start call can
/// still be in flight (each gives up after one), so end them.
async fn give_up_stuck(cp: &ControlPlane, now: u64, seen: &mut HashMap<(String, u32), u64>) {
    let limit = 2 * cp.cfg.start_timeout.as_millis() as u64;
    let pending: Vec<(String, String, u32)> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| !s.record_only && s.observed.is_none())
            .map(|s| (s.id.clone(), s.node.clone(), s.reschedules))
            .collect()
    });
    let live: std::collections::HashSet<(String, u32)> =
        pending.iter().map(|(id, _, g)| (id.clone(), *g)).collect();
    seen.retain(|k, _| live.contains(k));
    let stuck: Vec<(String, String, u32)> = pending
        .into_iter()
        .filter(|(id, _, g)| {
            let first = *seen.entry((id.clone(), *g)).or_insert(now);
            now.saturating_sub(first) > limit
        })
        .collect();
    for (id, node, generation) in stuck {
        if cp.starting.lock().is_ok_and(|s| s.contains(&id)) {
            continue;
        }
        tracing::warn!(sandbox = %id, %node, "its start never finished; giving it up");
        let why = format!(
            "it was never started on node {node} within {}s (the node did not answer, or the \
             control-plane member starting it stopped); remove it and create it again",
            limit / 1000
        );
        let cmd = Command::NotRunning {
            id,
            node,
            generation,
            status: "failed".into(),
            why,
            at_ms: now,
            // why: this member's view may lag the log; the state machine
            // gives up only if no start result was recorded meanwhile.
            expect: Some(Expect::Unstarted),
        };
        if let Err(e) = cp.store.write(cmd).await {
            tracing::warn!("giving up a stuck sandbox: {e}");
        }
    }
}

/// How long a `restart: always` record whose start failed waits before it
/// is started again: doubling with its generation (each start is one),
/// from 1 s to at most [`RETRY_MAX`], plus up to a fifth more by its id so
/// records that failed together are not started again all at once.
fn retry_delay(id: &str, generation: u32) -> Duration {
    let base = Duration::from_secs(1u64 << generation.min(5)).min(RETRY_MAX);
    let spread = id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % 20;
    base + base * spread as u32 / 100
}

/// The longest wait between starts of a `restart: always` record that keeps
/// failing to start.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// At most this many failed starts are started again per tick (each is two
/// Raft writes and a start call; the rest wait for the next tick).
const RETRIES_PER_TICK: usize = 32;

/// `restart: always` records the control plane gave up without a copy (the
/// node did not answer the start in time, or refused it) are started again
/// as their next generation after a backoff: on their node while it is
/// Ready, not cordoned and has room, else wherever they fit (the state
/// machine decides at apply time; a record that fits nowhere stays failed
/// and is tried again). A copy of the failed start turning up late is
/// adopted if it runs before that, else fenced. The policy means the
/// platform keeps trying; the record shows the failure meanwhile.
async fn retry_failed_starts(cp: &ControlPlane, now: u64, seen: &mut HashMap<(String, u32), u64>) {
    let failed: Vec<(String, String, u32, String)> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| {
                s.restart == RestartPolicy::Always
                    && !s.record_only
                    && !s.pinned
                    && s.abandoned()
                    && s.migrating().is_none()
                    && s.held_for_target().is_none()
            })
            .map(|s| {
                let why = s
                    .observed
                    .as_ref()
                    .and_then(|o| o.error.clone())
                    .unwrap_or_else(|| "its start failed".into());
                (s.id.clone(), s.node.clone(), s.reschedules, why)
            })
            .collect()
    });
    let live: std::collections::HashSet<(String, u32)> = failed
        .iter()
        .map(|(id, _, g, _)| (id.clone(), *g))
        .collect();
    seen.retain(|k, _| live.contains(k));
    let due: Vec<_> = failed
        .into_iter()
        .filter(|(id, _, generation, _)| {
            let first = *seen.entry((id.clone(), *generation)).or_insert(now);
            now.saturating_sub(first) >= retry_delay(id, *generation).as_millis() as u64
        })
        .take(RETRIES_PER_TICK)
        .collect();
    for (id, node, generation, why) in due {
        let cmd = Command::NotRunning {
            id: id.clone(),
            node,
            generation,
            status: "failed".into(),
            why,
            at_ms: now,
            // why: a start result recorded meanwhile (this member's view may
            // lag the log) means it is no longer given up.
            expect: Some(Expect::Abandoned),
        };
        match cp.store.write(cmd).await {
            Ok(hearth_store::Reply::Sandbox { sandbox }) if sandbox.reschedules > generation => {
                tracing::info!(sandbox = %id, node = %sandbox.node, generation = sandbox.reschedules,
                    "its start failed; starting it again (restart: always)");
            }
            Ok(hearth_store::Reply::Rejected { reason, .. }) => {
                // why: tried again after another full delay, not every tick.
                seen.insert((id.clone(), generation), now);
                tracing::warn!(sandbox = %id, "{reason}");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(sandbox = %id, "starting a failed sandbox again: {e}"),
        }
    }
}

/// Starts sandboxes that were moved to a new node and not started there yet.
fn restart_moved(cp: &ControlPlane) {
    let todo: Vec<hearth_store::SandboxRecord> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| to_start(st, s))
            .cloned()
            .collect()
    });
    for rec in todo {
        let fresh = cp
            .starting
            .lock()
            .map(|mut s| s.insert(rec.id.clone()))
            .unwrap_or(false);
        if !fresh {
            continue;
        }
        let cp = cp.clone();
        tokio::spawn(async move {
            tracing::info!(sandbox = %rec.id, node = %rec.node, "starting a moved sandbox");
            if let Err(e) = sandboxes::start_on_agent(&cp, &rec).await {
                tracing::warn!(sandbox = %rec.id, "starting a moved sandbox: {}", e.0.message);
            }
            if let Ok(mut s) = cp.starting.lock() {
                s.remove(&rec.id);
            }
        });
    }
}

/// A record placed again (moved, or started again) whose copy the leader
/// starts now: its node is Ready, and it is not held for the answer of a
/// migration target (`SandboxRecord::held_for_target`: the state machine
/// ended its migration without the source's word; the target may hold a
/// committed copy, so nothing starts before [`unconfirmed::settle`] asked).
pub(super) fn to_start(st: &hearth_store::State, s: &hearth_store::SandboxRecord) -> bool {
    s.reschedules > 0
        && !s.record_only
        && s.observed
            .as_ref()
            .is_some_and(|o| o.status == "creating" && o.agent_id.is_none())
        && st.nodes.get(&s.node).is_some_and(|n| n.ready)
        && s.held_for_target().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_store::{Migration, NodeRecord, RestartPolicy, SandboxRecord, State};

    fn node(id: &str, heartbeat: u64) -> Command {
        Command::RegisterNode {
            node: NodeRecord {
                id: id.into(),
                instance: format!("inst-{id}"),
                address: "http://127.0.0.1:1".into(),
                capacity: hearth_sched::Resources::new(64, 65536, 1_000_000),
                accel: hearth_sched::Accel::Tcg,
                labels: Default::default(),
                cordoned: false,
                ready: true,
                registered_ms: 1,
                last_heartbeat_ms: heartbeat,
                warm_templates: Default::default(),
                volumes: Default::default(),
            },
        }
    }

    /// mig3 H1, ask7: the fresh copy of a record whose migration was ended
    /// unconfirmed (its source node lost while the record lagged) is not
    /// started before the target answered (`SettleAbort`), however long
    /// that takes, nor because the target heartbeated (it may still be
    /// committing: before ask7 one heartbeat released it); the target's
    /// "never committed" or its loss releases it; "committed" leaves
    /// nothing to start. (Was
    /// `a_restart_after_an_unconfirmed_abort_waits_for_one_target_heartbeat`.)
    #[test]
    fn a_restart_after_an_unconfirmed_abort_waits_for_the_targets_answer() {
        let mut st = State::default();
        for n in ["n1", "n2", "n3"] {
            st.apply(&node(n, 1_000));
        }
        st.apply(&Command::CreateSandbox {
            sandbox: SandboxRecord {
                id: "s1".into(),
                name: None,
                spec: serde_json::json!({"image": "busybox"}),
                request: hearth_sched::Request {
                    resources: hearth_sched::Resources::new(1, 64, 10),
                    ..Default::default()
                },
                node: "n1".into(),
                restart: RestartPolicy::Always,
                record_only: false,
                idempotency_key: None,
                ip: None,
                created_ms: 1,
                reschedules: 0,
                policy_version: 0,
                pinned: false,
                observed: Some(hearth_store::Observed {
                    status: "running".into(),
                    agent_id: Some("a1".into()),
                    error: None,
                    updated_ms: 1,
                }),
                migration: None,
            },
        });
        st.apply(&Command::StartMigration {
            id: "s1".into(),
            migration: Migration {
                id: "m1".into(),
                from: "n1".into(),
                to: "n2".into(),
                phase: "preparing".into(),
                generation: 0,
                started_ms: 1_500,
                updated_ms: 1_500,
                error: None,
                progress: None,
                stall_ms: None,
                source_gone_ms: None,
                unconfirmed: false,
                target_lost: false,
                agent_id: None,
            },
        });
        st.apply(&Command::MarkNotReady {
            node: "n1".into(),
            at_ms: 2_000,
        });
        let rec = st.sandboxes["s1"].clone();
        assert_eq!((rec.node.as_str(), rec.reschedules), ("n3", 1), "{rec:?}");
        assert!(!to_start(&st, &rec), "not held");
        // The target heartbeats without the copy (its commit may still run).
        st.apply(&Command::Heartbeat {
            node: "n2".into(),
            instance: "inst-n2".into(),
            at_ms: 2_300,
            observed: Default::default(),
            report: Some(vec![]),
            grace_ms: 5_000,
        });
        let rec = st.sandboxes["s1"].clone();
        assert_eq!(rec.node, "n3");
        assert!(!to_start(&st, &rec), "released by the target's heartbeat");
        let settle = |st: &mut State, answer| {
            st.apply(&Command::SettleAbort {
                id: "s1".into(),
                migration: "m1".into(),
                answer,
                at_ms: 9_000_000,
            })
        };
        // The target said it never committed.
        let mut st1 = st.clone();
        settle(&mut st1, hearth_store::TargetAnswer::Uncommitted);
        assert!(to_start(&st1, &st1.sandboxes["s1"]));
        // The target is NotReady: lost.
        let mut st2 = st.clone();
        st2.apply(&Command::MarkNotReady {
            node: "n2".into(),
            at_ms: 2_350,
        });
        assert!(
            !to_start(&st2, &st2.sandboxes["s1"]),
            "released before the settle"
        );
        settle(&mut st2, hearth_store::TargetAnswer::TargetLost);
        assert!(to_start(&st2, &st2.sandboxes["s1"]));
        // The target committed: the record is its copy, nothing to start.
        let mut st3 = st.clone();
        settle(&mut st3, hearth_store::TargetAnswer::Committed);
        let rec = &st3.sandboxes["s1"];
        assert_eq!((rec.node.as_str(), rec.reschedules), ("n2", 1));
        assert!(!to_start(&st3, rec));
        // A confirmed abort (the source's word) is not held.
        let mut rec4 = st.sandboxes["s1"].clone();
        if let Some(m) = rec4.migration.as_mut() {
            m.unconfirmed = false;
        }
        assert!(to_start(&st, &rec4));
    }
}
