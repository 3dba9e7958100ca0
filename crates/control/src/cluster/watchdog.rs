//! Leader-only background work: nodes that stop heartbeating become
//! NotReady (their sandboxes are lost, or moved when they asked for
//! `restart: always`), and moved sandboxes are started on their new node.

use std::time::Duration;

use hearth_store::Command;

use super::{now_ms, sandboxes, ControlPlane};

pub(super) async fn run(cp: ControlPlane) {
    let period = (cp.cfg.node_timeout / 5).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    // why: a new leader has not seen heartbeats sent to the old one's term yet;
    // give every node one full timeout from the moment this member leads.
    let mut leading_since: Option<u64> = None;
    loop {
        tick.tick().await;
        let me = cp.store.member_status();
        if me.leader != Some(me.id) {
            leading_since = None;
            continue;
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
        restart_moved(&cp);
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
