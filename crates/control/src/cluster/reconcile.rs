//! What one heartbeat means: which of the copies a node reports are the ones
//! its records ask for, which are stale (fenced: the agent stops, then
//! removes them), and which records have no copy on the node any more.
//!
//! Pure: the state at the heartbeat, the report, the clock in; a plan out.
//! A copy the control plane started carries its record's owner tag
//! (`ID@GENERATION`), and the record is committed before the start call, so
//! a copy whose start is still in flight already matches its record and is
//! never fenced; a copy without a tag (made on the node-local API) is left
//! alone.

use std::collections::{BTreeMap, BTreeSet};

use hearth_api::cluster::{Fenced, ObservedSandbox};
use hearth_store::{parse_owner, Observed, SandboxRecord, State};

use super::nodes::status_name;

/// What the control plane does with one heartbeat.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    /// New observed state, by record id (only what changed).
    pub observed: BTreeMap<String, Observed>,
    /// Agent ids of the copies the records want on this node.
    pub keep: Vec<String>,
    /// Running copies to stop.
    pub stop: Vec<Fenced>,
    /// Ended copies to remove.
    pub remove: Vec<String>,
    /// Records whose copy is gone from the node: (id, generation).
    pub missing: Vec<(String, u32)>,
}

/// Why a tagged copy is not (any more) its record's, if it is not.
fn stale(
    rec: Option<&SandboxRecord>,
    id: &str,
    generation: u32,
    node: &str,
    agent_id: &str,
) -> Option<String> {
    let Some(rec) = rec else {
        return Some(format!("sandbox {id} was deleted"));
    };
    if rec.node != node {
        return Some(format!("sandbox {id} now runs on node {}", rec.node));
    }
    if rec.reschedules != generation {
        return Some(format!(
            "sandbox {id} was started again (generation {})",
            rec.reschedules
        ));
    }
    let o = rec.observed.as_ref();
    if rec.abandoned() {
        let why = o.and_then(|o| o.error.clone()).unwrap_or_default();
        return Some(format!("the control plane gave sandbox {id} up ({why})"));
    }
    match o.and_then(|o| o.agent_id.as_deref()) {
        Some(a) if a != agent_id => Some(format!("sandbox {id} already runs here as {a}")),
        _ => None,
    }
}

/// The plan for `node`'s report at `now_ms`. A record whose copy has been
/// known for longer than `grace_ms` and is missing from the report is listed
/// in `missing` (younger ones may simply postdate the report).
pub(super) fn plan(
    st: &State,
    node: &str,
    report: &[ObservedSandbox],
    now_ms: u64,
    grace_ms: u64,
) -> Plan {
    let mut p = Plan::default();
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for r in report {
        let terminal = r.status.is_terminal();
        let id = match r.owner.as_deref().and_then(parse_owner) {
            Some((id, generation)) => {
                let rec = st.sandboxes.get(id);
                let why = stale(rec, id, generation, node, &r.agent_id).or_else(|| {
                    claimed
                        .contains(id)
                        .then(|| format!("another copy of sandbox {id} runs here"))
                });
                if let Some(reason) = why {
                    if terminal {
                        p.remove.push(r.agent_id.clone());
                    } else {
                        p.stop.push(Fenced {
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
            None => match st.sandboxes.values().find(|s| {
                s.node == node
                    && s.observed.as_ref().and_then(|o| o.agent_id.as_deref())
                        == Some(r.agent_id.as_str())
            }) {
                Some(s) => s.id.clone(),
                None => continue,
            },
        };
        claimed.insert(id.clone());
        let Some(rec) = st.sandboxes.get(&id) else {
            continue;
        };
        let obs = Observed {
            status: status_name(r.status),
            agent_id: Some(r.agent_id.clone()),
            error: r.error.clone(),
            updated_ms: now_ms,
        };
        let same = rec.observed.as_ref().is_some_and(|cur| {
            cur.status == obs.status && cur.agent_id == obs.agent_id && cur.error == obs.error
        });
        if !same {
            p.observed.insert(id.clone(), obs);
        }
        if !terminal {
            p.keep.push(r.agent_id.clone());
        }
    }
    // why: a record's copy stays wanted even when this report lacks it (an
    // agent restarting re-adopts what `keep` lists).
    for rec in st
        .sandboxes
        .values()
        .filter(|s| s.node == node && s.reserves())
    {
        if let Some(a) = rec.observed.as_ref().and_then(|o| o.agent_id.as_ref()) {
            if !p.keep.contains(a) {
                p.keep.push(a.clone());
            }
        }
    }
    let reported: BTreeSet<&str> = report.iter().map(|r| r.agent_id.as_str()).collect();
    for rec in st
        .sandboxes
        .values()
        .filter(|s| s.node == node && !s.record_only && s.reserves() && !claimed.contains(&s.id))
    {
        let Some(o) = &rec.observed else { continue };
        let Some(a) = &o.agent_id else { continue };
        if !reported.contains(a.as_str()) && now_ms.saturating_sub(o.updated_ms) > grace_ms {
            p.missing.push((rec.id.clone(), rec.reschedules));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use hearth_api::SandboxStatus;
    use hearth_sched::{Request, Resources};
    use hearth_store::RestartPolicy;

    use super::*;

    /// A record: id, node, generation, observed (status, agent id).
    type Rec<'a> = (&'a str, &'a str, u32, Option<(&'a str, Option<&'a str>)>);

    fn state(records: &[Rec]) -> State {
        let mut st = State::default();
        for (id, node, generation, obs) in records {
            st.sandboxes.insert(
                id.to_string(),
                SandboxRecord {
                    id: id.to_string(),
                    name: None,
                    spec: serde_json::json!({"image": "busybox"}),
                    request: Request {
                        resources: Resources::new(1, 64, 10),
                        ..Default::default()
                    },
                    node: node.to_string(),
                    restart: RestartPolicy::Always,
                    record_only: false,
                    idempotency_key: None,
                    ip: None,
                    created_ms: 0,
                    reschedules: *generation,
                    pinned: false,
                    observed: obs.map(|(status, agent)| Observed {
                        status: status.into(),
                        agent_id: agent.map(str::to_string),
                        error: None,
                        updated_ms: 0,
                    }),
                },
            );
        }
        st.reindex();
        st
    }

    fn copy(agent_id: &str, status: SandboxStatus, owner: Option<&str>) -> ObservedSandbox {
        ObservedSandbox {
            agent_id: agent_id.into(),
            status,
            error: None,
            owner: owner.map(str::to_string),
        }
    }

    #[test]
    fn a_copy_whose_start_is_in_flight_is_kept_and_learns_its_agent_id() {
        let st = state(&[("s1", "n1", 0, None)]);
        let p = plan(
            &st,
            "n1",
            &[copy("a1", SandboxStatus::Creating, Some("s1@0"))],
            10,
            5,
        );
        assert!(p.stop.is_empty() && p.remove.is_empty(), "{p:?}");
        assert_eq!(p.keep, vec!["a1".to_string()]);
        assert_eq!(p.observed["s1"].agent_id.as_deref(), Some("a1"));
    }

    #[test]
    fn a_copy_of_a_sandbox_moved_elsewhere_is_stopped_then_removed() {
        let st = state(&[("s1", "n2", 1, Some(("running", Some("b1"))))]);
        let p = plan(
            &st,
            "n1",
            &[copy("a1", SandboxStatus::Running, Some("s1@0"))],
            10,
            5,
        );
        assert_eq!(p.stop.len(), 1, "{p:?}");
        assert!(p.stop[0].reason.contains("node n2"), "{p:?}");
        let p = plan(
            &st,
            "n1",
            &[copy("a1", SandboxStatus::Stopped, Some("s1@0"))],
            10,
            5,
        );
        assert_eq!(p.remove, vec!["a1".to_string()]);
        assert!(p.observed.is_empty() && p.keep.is_empty());
    }

    #[test]
    fn a_copy_of_a_deleted_or_superseded_or_given_up_sandbox_is_stopped() {
        let st = state(&[
            ("s2", "n1", 2, Some(("creating", None))),
            ("s3", "n1", 0, Some(("failed", None))),
        ]);
        let report = [
            copy("a1", SandboxStatus::Running, Some("gone@0")),
            copy("a2", SandboxStatus::Running, Some("s2@1")),
            copy("a3", SandboxStatus::Creating, Some("s3@0")),
        ];
        let p = plan(&st, "n1", &report, 10, 5);
        let stopped: Vec<&str> = p.stop.iter().map(|f| f.agent_id.as_str()).collect();
        assert_eq!(stopped, ["a1", "a2", "a3"], "{p:?}");
        assert!(p.observed.is_empty(), "{p:?}");
    }

    #[test]
    fn a_second_copy_of_one_record_is_stopped() {
        let st = state(&[("s1", "n1", 0, None)]);
        let report = [
            copy("a1", SandboxStatus::Running, Some("s1@0")),
            copy("a2", SandboxStatus::Running, Some("s1@0")),
        ];
        let p = plan(&st, "n1", &report, 10, 5);
        assert_eq!(p.keep, vec!["a1".to_string()]);
        assert_eq!(p.stop.len(), 1);
        assert_eq!(p.stop[0].agent_id, "a2");
    }

    #[test]
    fn untagged_copies_are_never_fenced() {
        let st = state(&[]);
        let p = plan(
            &st,
            "n1",
            &[copy("a1", SandboxStatus::Running, None)],
            10,
            5,
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_copy_missing_from_the_node_is_noticed_only_after_the_grace() {
        let st = state(&[("s1", "n1", 0, Some(("running", Some("a1"))))]);
        assert!(plan(&st, "n1", &[], 4, 5).missing.is_empty());
        assert_eq!(
            plan(&st, "n1", &[], 6, 5).missing,
            vec![("s1".to_string(), 0)]
        );
        let p = plan(
            &st,
            "n1",
            &[copy("a1", SandboxStatus::Running, Some("s1@0"))],
            6,
            5,
        );
        assert!(p.missing.is_empty());
    }
}
