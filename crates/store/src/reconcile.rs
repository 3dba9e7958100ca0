//! What one heartbeat means, decided inside the state machine's apply of
//! `Command::Heartbeat`: which of the copies a node reports are the ones its
//! records ask for, which are stale (fenced: the agent stops, then removes
//! them), and which records have no copy on the node any more.
//!
//! Being part of apply, the plan is consistent with the heartbeat's log
//! position on every member: a member that has not applied a create yet
//! cannot answer for it, because the heartbeat is ordered after the create.
//!
//! Fencing needs **positive evidence**: the record placed on another node,
//! started again as a newer generation, given up, a second copy of the same
//! record, or a tombstone of the deleted record. A copy whose record is
//! unknown and has no tombstone, or whose generation is newer than its
//! record's, is left alone (a restored or rebuilt control plane must never
//! make agents kill what they run). Ended copies are removed only when their
//! record still exists and says they are stale; a deleted record's copy is
//! stopped at most. A copy whose tag names another cluster id is ignored.

use std::collections::BTreeSet;

use crate::state::{
    owner_cluster, parse_owner, CopyReport, Fence, Observed, Reply, RestartPolicy, SandboxRecord,
    State,
};

/// Why a tagged copy is not (any more) its existing record's, if it is not.
fn stale(rec: &SandboxRecord, generation: u32, node: &str, agent_id: &str) -> Option<String> {
    let id = &rec.id;
    if generation > rec.reschedules {
        // why: no evidence: the record is older than the copy (a restored state).
        return None;
    }
    if rec.node != node {
        return Some(format!("sandbox {id} now runs on node {}", rec.node));
    }
    if generation < rec.reschedules {
        return Some(format!(
            "sandbox {id} was started again (generation {})",
            rec.reschedules
        ));
    }
    let o = rec.observed.as_ref();
    // why: a `restart: always` record given up because its start failed
    // (the node answered too late) takes a copy of that very start that
    // turns up running: that is what the policy wants (a later retry then
    // changes nothing); any other given-up record fences it.
    if rec.abandoned() && (rec.restart != RestartPolicy::Always || rec.pinned) {
        let why = o.and_then(|o| o.error.clone()).unwrap_or_default();
        return Some(format!("the control plane gave sandbox {id} up ({why})"));
    }
    match o.and_then(|o| o.agent_id.as_deref()) {
        Some(a) if a != agent_id => Some(format!("sandbox {id} already runs here as {a}")),
        _ => None,
    }
}

impl State {
    /// Applies `node`'s report at `at_ms` and answers what the node must do.
    /// A record whose copy has been known for longer than `grace_ms` and is
    /// missing from the report is not running: lost, or with
    /// `restart: always` started again as a new generation.
    pub(crate) fn reconcile(
        &mut self,
        node: &str,
        report: &[CopyReport],
        at_ms: u64,
        grace_ms: u64,
    ) -> Reply {
        let mut keep: Vec<String> = Vec::new();
        let mut stop: Vec<Fence> = Vec::new();
        let mut remove: Vec<String> = Vec::new();
        let mut not_running: Vec<String> = Vec::new();
        let mut claimed: BTreeSet<String> = BTreeSet::new();
        // why: a copy paused by a migration is claimed (kept) but is no
        // evidence that the guest runs here.
        let mut running: BTreeSet<String> = BTreeSet::new();
        let mut paused: BTreeSet<String> = BTreeSet::new();
        let mut migrating: BTreeSet<String> = BTreeSet::new();
        for r in report {
            // why: a copy tagged by another cluster (or by this control plane
            // before it was rebuilt) is none of this state's business.
            if let Some(c) = r.owner.as_deref().and_then(owner_cluster) {
                if self.cluster_id.as_deref() != Some(c) {
                    continue;
                }
            }
            let terminal = r.is_terminal();
            let id = match r.owner.as_deref().and_then(parse_owner) {
                Some((id, generation)) => {
                    let Some(rec) = self.sandboxes.get(id) else {
                        // why: only a tombstone is evidence that the record is
                        // gone, not merely unknown here; and an ended copy of
                        // it is kept (its data stays until someone removes it).
                        let buried = self
                            .tombstones
                            .get(id)
                            .is_some_and(|t| t.generation >= generation);
                        if buried && !terminal {
                            stop.push(Fence {
                                agent_id: r.agent_id.clone(),
                                reason: format!("sandbox {id} was deleted"),
                            });
                        }
                        continue;
                    };
                    // why: a running copy of the migration's generation on its
                    // target is the evidence that the target committed.
                    let mig = rec
                        .migration
                        .as_ref()
                        .filter(|m| m.to == node && m.generation == generation);
                    let next = r.status == "running" && rec.reschedules + 1 == generation;
                    if mig.is_some_and(|m| m.active() && next) {
                        self.complete_migration(id, Some(&r.agent_id), at_ms);
                    } else if mig.is_some_and(|m| {
                        m.phase == "aborted"
                            && next
                            && rec.node == m.from
                            && rec.observed.as_ref().is_some_and(|o| o.status == "lost")
                    }) {
                        // why: the migration was ended with no copy left on
                        // the source (its deadline, or the source's absence)
                        // and the record is lost; the target committed after
                        // all: its copy is the only one, so it takes the
                        // record over instead of being fenced (never zero).
                        self.complete_late_migration(id, &r.agent_id, at_ms);
                    } else if mig.is_some_and(|m| {
                        r.status == "running"
                            && !r.paused
                            && !(rec.node == node && rec.reschedules == m.generation)
                            // why: only while the abort waits for the
                            // target's answer, or its target was lost, and
                            // no copy was reported since (the leader starts
                            // none before it asked the target): once the
                            // abort is confirmed (the target said it never
                            // committed this attempt) or another copy was
                            // reported, a copy it reports is fenced.
                            && rec.takeover_open().is_some_and(|h| h.id == m.id)
                    }) {
                        // why: the state machine ended the migration without
                        // the source's word (its copy died or its node was
                        // lost while the record still showed pre-copy: the
                        // record lags the source) and the target reports the
                        // committed copy: it is the sandbox, with its live
                        // state, and takes the record over; the placement a
                        // restart had reserved (never started) is dropped.
                        self.take_over_unconfirmed(id, Some(&r.agent_id), at_ms);
                    } else if mig.is_some_and(|m| {
                        r.status == "running"
                            && r.paused
                            && rec.takeover_open().is_some_and(|h| h.id == m.id)
                    }) {
                        // why: the target's committed copy whose resume
                        // failed (reported paused) is the only copy that may
                        // hold the live state: it is neither taken over (it
                        // does not serve) nor fenced while the leader asks
                        // the target (a committed answer takes it over). A
                        // target settled as lost reports again: it is asked.
                        if let Some(m) = self
                            .sandboxes
                            .get_mut(id)
                            .and_then(|s| s.migration.as_mut())
                            .filter(|m| m.target_lost)
                        {
                            m.target_lost = false;
                            m.updated_ms = at_ms;
                            self.touch_sandbox(id);
                        }
                        continue;
                    } else if mig.is_some_and(|m| m.phase == "aborted")
                        && (generation > rec.reschedules || rec.node != node)
                    {
                        // why: the target's copy of an aborted migration is
                        // stopped, and once ended removed (nothing else will).
                        if terminal {
                            remove.push(r.agent_id.clone());
                        } else {
                            stop.push(Fence {
                                agent_id: r.agent_id.clone(),
                                reason: format!(
                                    "the migration of sandbox {id} to node {node} was aborted; it runs on node {}",
                                    rec.node
                                ),
                            });
                        }
                        continue;
                    }
                    let Some(rec) = self.sandboxes.get(id) else {
                        continue;
                    };
                    if generation > rec.reschedules {
                        continue;
                    }
                    let why = stale(rec, generation, node, &r.agent_id).or_else(|| {
                        claimed
                            .contains(id)
                            .then(|| format!("another copy of sandbox {id} runs here"))
                    });
                    if let Some(reason) = why {
                        if terminal {
                            remove.push(r.agent_id.clone());
                        } else {
                            stop.push(Fence {
                                agent_id: r.agent_id.clone(),
                                reason,
                            });
                        }
                        continue;
                    }
                    id.to_string()
                }
                // why: a copy without a tag was started before tags existed;
                // match it by the agent id its record holds, never fence it.
                None => match self.sandboxes.values().find(|s| {
                    s.node == node
                        && s.observed.as_ref().and_then(|o| o.agent_id.as_deref())
                            == Some(r.agent_id.as_str())
                }) {
                    Some(s) => s.id.clone(),
                    None => continue,
                },
            };
            claimed.insert(id.clone());
            if !terminal {
                if r.paused {
                    paused.insert(id.clone());
                } else {
                    running.insert(id.clone());
                }
                if r.migrating {
                    migrating.insert(id.clone());
                }
            }
            // why: restart=always means a copy that died (lost, failed) is
            // started again, not recorded as the end.
            // why: not while a migration of it is open past the switch-over:
            // the target may have committed (a source restarted during an
            // unclear commit), and a fresh copy of the next generation would
            // fence the target's; the migration settles first (the target's
            // report completes it, the leader's cancel or the deadline ends
            // it). Before the switch-over the target cannot have committed.
            let died = matches!(r.status.as_str(), "lost" | "failed");
            if let Some(rec) = self.sandboxes.get(&id).filter(|s| {
                died && s.restart == RestartPolicy::Always
                    && s.node == node
                    && !s.pinned
                    && !s.may_have_switched()
            }) {
                let generation = rec.reschedules;
                let why = format!(
                    "its copy {} on node {node} ended {}{}",
                    r.agent_id,
                    r.status,
                    r.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                self.not_running(&id, node, generation, &r.status, &why, at_ms);
                not_running.push(id);
                continue;
            }
            let obs = Observed {
                status: r.status.clone(),
                agent_id: Some(r.agent_id.clone()),
                error: r.error.clone(),
                updated_ms: at_ms,
            };
            let copy_generation = r.owner.as_deref().and_then(parse_owner).map(|(_, g)| g);
            if let Some(sb) = self.sandboxes.get_mut(&id) {
                // why: a running copy of the restart's generation is
                // reported: see `close_takeover` (never the source's own
                // copy: paused, migrating, or of an older generation).
                let closed = !terminal
                    && !r.paused
                    && !r.migrating
                    && copy_generation.is_some_and(|g| sb.close_takeover(g));
                let same = sb.observed.as_ref().is_some_and(|cur| {
                    cur.status == obs.status
                        && cur.agent_id == obs.agent_id
                        && cur.error == obs.error
                });
                if !same {
                    sb.observed = Some(obs);
                }
                if !same || closed {
                    self.touch_sandbox(&id);
                }
            }
            if !terminal {
                keep.push(r.agent_id.clone());
            }
        }
        // why: a migration past its deadline (no news for its stall time:
        // its driver died or lost the source, or the source stopped making
        // progress) is resolved on the source's evidence. A copy of the
        // target's generation would have completed it in the target's
        // heartbeat; the source still running its copy (not paused) means the
        // guest stayed here; a paused copy decides nothing (the target may
        // have committed: the migration stays open until the target reports
        // its copy or the source resumes); no copy means it is lost here
        // (restart policy), and a target copy reported later takes it over.
        // why: a copy that runs while its outgoing migration is still in
        // progress (pre-copy) decides nothing either: the source may still
        // switch over and commit, so the deadline alone must not record it
        // aborted (the target's copy would be fenced while the source
        // releases its own: zero copies). The leader asks the source to
        // cancel first (control plane, `cancel_stalled`) and records its
        // answer; the source's next report, no longer migrating, ends it here.
        let stalled: Vec<String> = self
            .sandboxes
            .values()
            .filter(|s| s.node == node && s.migrating().is_some_and(|m| m.stalled(at_ms)))
            .filter(|s| !paused.contains(&s.id) && !migrating.contains(&s.id))
            .map(|s| s.id.clone())
            .collect();
        for id in stalled {
            let why = if running.contains(&id) {
                format!("past its deadline with no progress; node {node} still runs sandbox {id}")
            } else {
                format!("past its deadline with no progress; no copy of sandbox {id} runs on node {node} or on the target")
            };
            if let Some(sb) = self.sandboxes.get_mut(&id) {
                crate::state::end_migration(sb, &why, at_ms);
                // why: a source running its copy, no longer migrating, has
                // resumed it: only an explicit "removed uncommitted" from
                // the target lets it (the abort is confirmed).
                if running.contains(&id) {
                    if let Some(m) = sb.migration.as_mut() {
                        m.unconfirmed = false;
                    }
                }
            }
            self.touch_sandbox(&id);
        }
        let reported: BTreeSet<&str> = report.iter().map(|r| r.agent_id.as_str()).collect();
        let mut missing: Vec<(String, u32)> = Vec::new();
        let mut gone_now: Vec<String> = Vec::new();
        let mut back: Vec<String> = Vec::new();
        for rec in self
            .sandboxes
            .values()
            .filter(|s| s.node == node && s.reserves())
        {
            let Some(o) = &rec.observed else { continue };
            let Some(a) = &o.agent_id else { continue };
            // why: a record's copy stays wanted even when this report lacks
            // it (an agent restarting re-adopts what `keep` lists).
            if !keep.contains(a) {
                keep.push(a.clone());
            }
            let absent = !rec.record_only
                && !claimed.contains(&rec.id)
                && !reported.contains(a.as_str())
                && at_ms.saturating_sub(o.updated_ms) > grace_ms;
            // why: a migrating sandbox's source copy goes away once the
            // guest switched over; the target's report completes the move
            // (or the deadline resolves it). Before the switch-over the
            // source copy must stay, but the record may not show a
            // switch-over that happened (the control plane polls the
            // phases): the absence is a loss only if the target has not
            // reported the migrated copy within the grace after it.
            match rec.migrating() {
                Some(m) if m.switched() => {}
                Some(m) if absent => match m.source_gone_ms {
                    None => gone_now.push(rec.id.clone()),
                    // why: a `restart: always` record would be started again
                    // as the generation the target's copy has (fencing it if
                    // the target committed): it waits for the migration to
                    // settle (the target's report, the cancel or the deadline).
                    Some(_) if rec.restart == RestartPolicy::Always => {}
                    Some(t) if at_ms.saturating_sub(t) > grace_ms => {
                        missing.push((rec.id.clone(), rec.reschedules));
                    }
                    Some(_) => {}
                },
                Some(m) if m.source_gone_ms.is_some() && claimed.contains(&rec.id) => {
                    back.push(rec.id.clone());
                }
                _ if absent => missing.push((rec.id.clone(), rec.reschedules)),
                _ => {}
            }
        }
        for (id, gone) in gone_now
            .into_iter()
            .map(|id| (id, Some(at_ms)))
            .chain(back.into_iter().map(|id| (id, None)))
        {
            if let Some(m) = self
                .sandboxes
                .get_mut(&id)
                .and_then(|s| s.migration.as_mut())
            {
                m.source_gone_ms = gone;
            }
            self.touch_sandbox(&id);
        }
        for (id, generation) in missing {
            let why = format!("node {node} no longer runs it (its agent lost or removed it)");
            self.not_running(&id, node, generation, "lost", &why, at_ms);
            if let Some(a) = self
                .sandboxes
                .get(&id)
                .and_then(|s| s.observed.as_ref())
                .and_then(|o| o.agent_id.as_ref())
            {
                keep.retain(|k| k != a);
            }
            not_running.push(id);
        }
        Reply::Desired {
            keep,
            stop,
            remove,
            not_running,
        }
    }
}
