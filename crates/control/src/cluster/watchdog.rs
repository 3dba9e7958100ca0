//! Leader-only background work: nodes that stop heartbeating become
//! NotReady (their sandboxes are lost, or moved when they asked for
//! `restart: always`), moved or restarted sandboxes are started on their
//! node, and a record whose start never finished is given up (`failed`, with
//! the reason) or, with `restart: always`, started again.

use std::collections::HashMap;
use std::time::Duration;

use hearth_store::{Command, Expect};

use super::{now_ms, sandboxes, ControlPlane};

pub(super) async fn run(cp: ControlPlane) {
    let period = (cp.cfg.node_timeout / 5).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    // why: a new leader has not seen heartbeats sent to the old one's term yet;
    // give every node one full timeout from the moment this member leads.
    let mut leading_since: Option<u64> = None;
    // why: deadlines of unstarted records run on this leader's clock, from
    // when it first saw them unstarted (not the proposing member's clock).
    let mut unstarted: HashMap<(String, u32), u64> = HashMap::new();
    loop {
        tick.tick().await;
        let me = cp.store.member_status();
        if me.leader != Some(me.id) {
            leading_since = None;
            unstarted.clear();
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

/// Starts sandboxes that were moved to a new node and not started there yet.
fn restart_moved(cp: &ControlPlane) {
    let todo: Vec<hearth_store::SandboxRecord> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| {
                s.reschedules > 0
                    && !s.record_only
                    && s.observed
                        .as_ref()
                        .is_some_and(|o| o.status == "creating" && o.agent_id.is_none())
                    && st.nodes.get(&s.node).is_some_and(|n| n.ready)
            })
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
