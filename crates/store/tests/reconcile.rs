//! Heartbeats are reconciled inside the state machine's apply: the fencing
//! plan follows the log position, needs positive evidence, and observed-state
//! writes and give-ups are checked against the record they were meant for.

use std::collections::BTreeMap;

use hearth_sched::{Accel, Request, Resources};
use hearth_store::{
    Command, CopyReport, Expect, Fence, Migration, NodeRecord, Observed, Reply, RestartPolicy,
    SandboxRecord, State, TargetAnswer, TOMBSTONES_MAX,
};

fn node(id: &str) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: id.into(),
            instance: format!("inst-{id}"),
            address: "http://127.0.0.1:1".into(),
            capacity: Resources::new(64, 65536, 1_000_000),
            accel: Accel::Tcg,
            labels: BTreeMap::new(),
            cordoned: false,
            ready: true,
            registered_ms: 1,
            last_heartbeat_ms: 1,
            warm_templates: Default::default(),
            volumes: Default::default(),
        },
    }
}

fn create(id: &str, node: &str, restart: RestartPolicy) -> Command {
    Command::CreateSandbox {
        sandbox: SandboxRecord {
            id: id.into(),
            name: None,
            spec: serde_json::json!({"image": "busybox"}),
            request: Request {
                resources: Resources::new(1, 64, 10),
                ..Default::default()
            },
            node: node.into(),
            restart,
            record_only: false,
            idempotency_key: None,
            ip: None,
            created_ms: 1,
            reschedules: 0,
            policy_version: 0,
            pinned: false,
            observed: None,
            migration: None,
        },
    }
}

fn copy(agent_id: &str, status: &str, owner: Option<&str>) -> CopyReport {
    CopyReport {
        agent_id: agent_id.into(),
        status: status.into(),
        error: None,
        owner: owner.map(str::to_string),
        paused: false,
        migrating: false,
    }
}

/// A copy whose VM a migration paused (the source after the switch-over).
fn paused_copy(agent_id: &str, owner: &str) -> CopyReport {
    CopyReport {
        paused: true,
        ..copy(agent_id, "running", Some(owner))
    }
}

fn heartbeat(s: &mut State, node: &str, at_ms: u64, report: Vec<CopyReport>) -> Desired {
    match s.apply(&Command::Heartbeat {
        node: node.into(),
        instance: format!("inst-{node}"),
        at_ms,
        observed: Default::default(),
        report: Some(report),
        grace_ms: 5,
    }) {
        Reply::Desired {
            keep,
            stop,
            remove,
            not_running,
        } => Desired {
            keep,
            stop,
            remove,
            not_running,
        },
        other => panic!("heartbeat answered {other:?}"),
    }
}

#[derive(Debug)]
struct Desired {
    keep: Vec<String>,
    stop: Vec<Fence>,
    remove: Vec<String>,
    not_running: Vec<String>,
}

fn stopped(d: &Desired) -> Vec<&str> {
    d.stop.iter().map(|f| f.agent_id.as_str()).collect()
}

fn set_observed(id: &str, node: &str, generation: u32, status: &str, agent: &str) -> Command {
    Command::SetObserved {
        id: id.into(),
        observed: Observed {
            status: status.into(),
            agent_id: Some(agent.into()),
            error: None,
            updated_ms: 2,
        },
        node: Some(node.into()),
        generation: Some(generation),
    }
}

fn not_running(id: &str, node: &str, generation: u32, expect: Option<Expect>) -> Command {
    Command::NotRunning {
        id: id.into(),
        node: node.into(),
        generation,
        status: "failed".into(),
        why: "it was never started".into(),
        at_ms: 3,
        expect,
    }
}

fn status(s: &State, id: &str) -> (String, Option<String>, u32) {
    let r = &s.sandboxes[id];
    let o = r.observed.clone().unwrap_or(Observed {
        status: "none".into(),
        agent_id: None,
        error: None,
        updated_ms: 0,
    });
    (o.status, o.agent_id, r.reschedules)
}

/// C2: the plan is computed at the heartbeat's log position, after the
/// create, so the brand-new copy is kept and learns its agent id.
#[test]
fn a_heartbeat_ordered_after_the_create_keeps_the_new_copy() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Never));
    let d = heartbeat(&mut s, "n1", 10, vec![copy("a1", "creating", Some("s1@0"))]);
    assert!(d.stop.is_empty() && d.remove.is_empty(), "{d:?}");
    assert_eq!(d.keep, ["a1"]);
    assert_eq!(status(&s, "s1"), ("creating".into(), Some("a1".into()), 0));
}

/// C2 / M8: a copy whose record this state does not know (not applied yet, a
/// wiped or restored control plane) is never stopped or removed.
#[test]
fn a_copy_of_an_unknown_record_is_left_alone_without_a_tombstone() {
    let mut s = State::default();
    s.apply(&node("n1"));
    let d = heartbeat(
        &mut s,
        "n1",
        10,
        vec![
            copy("a1", "running", Some("ghost@0")),
            copy("a2", "exited", Some("ghost2@4")),
        ],
    );
    assert!(d.stop.is_empty() && d.remove.is_empty(), "{d:?}");
    assert!(d.keep.is_empty(), "{d:?}");
}

/// M8: a deleted record's running copy is stopped (its tombstone is the
/// evidence); its ended copy is never removed automatically.
#[test]
fn a_deleted_records_running_copy_is_stopped_and_its_ended_copy_is_kept() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Never));
    s.apply(&Command::DeleteSandbox { id: "s1".into() });
    assert_eq!(s.tombstones["s1"].generation, 0);
    let d = heartbeat(&mut s, "n1", 10, vec![copy("a1", "running", Some("s1@0"))]);
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    assert!(d.stop[0].reason.contains("deleted"), "{d:?}");
    let d = heartbeat(&mut s, "n1", 11, vec![copy("a1", "stopped", Some("s1@0"))]);
    assert!(d.stop.is_empty() && d.remove.is_empty(), "{d:?}");
}

/// C2: a copy of a newer generation than its record is never fenced.
#[test]
fn a_copy_newer_than_its_record_is_never_fenced() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    let d = heartbeat(
        &mut s,
        "n1",
        3,
        vec![
            copy("a1", "running", Some("s1@0")),
            copy("a9", "running", Some("s1@3")),
        ],
    );
    assert!(d.stop.is_empty() && d.remove.is_empty(), "{d:?}");
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 0));
}

#[test]
fn a_copy_of_a_moved_record_is_stopped_then_removed() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s.apply(&Command::Drain {
        node: "n1".into(),
        at_ms: 4,
        only: None,
    });
    assert_eq!(s.sandboxes["s1"].node, "n2");
    let d = heartbeat(&mut s, "n1", 5, vec![copy("a1", "running", Some("s1@0"))]);
    assert_eq!(stopped(&d), ["a1"]);
    assert!(d.stop[0].reason.contains("node n2"), "{d:?}");
    let d = heartbeat(&mut s, "n1", 6, vec![copy("a1", "stopped", Some("s1@0"))]);
    assert_eq!(d.remove, ["a1"]);
    assert_eq!(s.sandboxes["s1"].node, "n2");
}

#[test]
fn an_older_generation_a_given_up_record_and_a_second_copy_are_stopped() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("old", "n1", RestartPolicy::Always));
    s.apply(&Command::NotRunning {
        id: "old".into(),
        node: "n1".into(),
        generation: 0,
        status: "lost".into(),
        why: "gone".into(),
        at_ms: 2,
        expect: None,
    });
    s.apply(&create("gaveup", "n1", RestartPolicy::Never));
    s.apply(&not_running("gaveup", "n1", 0, Some(Expect::Unstarted)));
    s.apply(&create("twice", "n1", RestartPolicy::Never));
    let d = heartbeat(
        &mut s,
        "n1",
        3,
        vec![
            copy("a1", "running", Some("old@0")),
            copy("a2", "creating", Some("gaveup@0")),
            copy("a3", "running", Some("twice@0")),
            copy("a4", "running", Some("twice@0")),
        ],
    );
    assert_eq!(stopped(&d), ["a1", "a2", "a4"], "{d:?}");
    assert!(d.keep.contains(&"a3".to_string()), "{d:?}");
}

#[test]
fn a_copy_missing_from_the_node_is_noticed_only_after_the_grace() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Never));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    // updated_ms 2, grace 5
    assert!(heartbeat(&mut s, "n1", 6, vec![]).not_running.is_empty());
    let d = heartbeat(&mut s, "n1", 8, vec![]);
    assert_eq!(d.not_running, ["s1"]);
    assert_eq!(status(&s, "s1").0, "lost");
}

/// M5: a late start result of an old generation or another node does not
/// overwrite a record that was moved or started again.
#[test]
fn a_late_start_result_of_an_old_generation_is_ignored() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    // why: its node lost (a drain leaves one still being created alone).
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 2,
    });
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    s.apply(&set_observed("s1", "n1", 0, "running", "late"));
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    s.apply(&set_observed("s1", "n2", 0, "running", "late"));
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    s.apply(&set_observed("s1", "n2", 1, "running", "b1"));
    assert_eq!(status(&s, "s1"), ("running".into(), Some("b1".into()), 1));
}

/// M5: a heartbeat of the old node about an old generation's copy never
/// writes into the moved record.
#[test]
fn a_stale_heartbeat_does_not_write_into_a_moved_record() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s.apply(&Command::Drain {
        node: "n1".into(),
        at_ms: 2,
        only: None,
    });
    heartbeat(&mut s, "n2", 3, vec![copy("b1", "running", Some("s1@1"))]);
    heartbeat(&mut s, "n1", 4, vec![copy("a1", "exited", Some("s1@0"))]);
    assert_eq!(status(&s, "s1"), ("running".into(), Some("b1".into()), 1));
}

/// M6: a give-up proposed from a lagging view does not overwrite a record
/// whose start result was committed meanwhile.
#[test]
fn a_give_up_expecting_no_start_result_leaves_a_started_record_alone() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Never));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s.apply(&not_running("s1", "n1", 0, Some(Expect::Unstarted)));
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 0));
    s.apply(&not_running(
        "s1",
        "n1",
        0,
        Some(Expect::Copy {
            agent_id: "other".into(),
        }),
    ));
    assert_eq!(status(&s, "s1").0, "running");
    s.apply(&not_running(
        "s1",
        "n1",
        0,
        Some(Expect::Copy {
            agent_id: "a1".into(),
        }),
    ));
    assert_eq!(status(&s, "s1").0, "failed");
}

/// M10: a restart=always copy that died (lost, failed) is started again as
/// a new generation; one that exited stays exited.
#[test]
fn a_restart_always_copy_that_died_is_started_again() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&create("s2", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s.apply(&set_observed("s2", "n1", 0, "running", "a2"));
    let d = heartbeat(
        &mut s,
        "n1",
        3,
        vec![
            copy("a1", "failed", Some("s1@0")),
            copy("a2", "exited", Some("s2@0")),
        ],
    );
    assert_eq!(d.not_running, ["s1"]);
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    assert_eq!(status(&s, "s2"), ("exited".into(), Some("a2".into()), 0));
    // The dead copy of the old generation is removed at the next beat.
    let d = heartbeat(&mut s, "n1", 4, vec![copy("a1", "failed", Some("s1@0"))]);
    assert_eq!(d.remove, ["a1"]);
}

#[test]
fn tombstones_are_bounded_and_the_oldest_go_first() {
    let mut s = State::default();
    s.apply(&node("n1"));
    for i in 0..=TOMBSTONES_MAX {
        let id = format!("t{i}");
        s.apply(&create(&id, "n1", RestartPolicy::Never));
        s.apply(&Command::DeleteSandbox { id });
    }
    assert_eq!(s.tombstones.len(), TOMBSTONES_MAX);
    assert!(!s.tombstones.contains_key("t0"));
    assert!(s.tombstones.contains_key(&format!("t{TOMBSTONES_MAX}")));
}

/// M8: a copy tagged with another cluster's id (another cluster, or this
/// control plane before it was rebuilt) is never fenced, even when a record
/// of the same id says it is stale; copies of this cluster are.
#[test]
fn a_copy_of_another_cluster_is_never_fenced() {
    let mut s = State::default();
    s.apply(&Command::InitCluster { id: "c1".into() });
    s.apply(&Command::InitCluster { id: "c2".into() });
    assert_eq!(s.cluster_id.as_deref(), Some("c1"), "named once");
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n2", RestartPolicy::Never));
    assert_eq!(s.owner_of(&s.sandboxes["s1"]), "c1/s1@0");
    s.apply(&create("gone", "n1", RestartPolicy::Never));
    s.apply(&Command::DeleteSandbox { id: "gone".into() });
    let d = heartbeat(
        &mut s,
        "n1",
        3,
        vec![
            copy("x1", "running", Some("other/s1@0")),
            copy("x2", "running", Some("other/gone@0")),
            copy("a1", "running", Some("c1/s1@0")),
            copy("a2", "running", Some("c1/gone@0")),
        ],
    );
    assert_eq!(stopped(&d), ["a1", "a2"], "{d:?}");
}

fn start_migration(s: &mut State, id: &str, mig: &str, from: &str, to: &str) -> Reply {
    s.apply(&Command::StartMigration {
        id: id.into(),
        migration: Migration {
            id: mig.into(),
            from: from.into(),
            to: to.into(),
            phase: "preparing".into(),
            generation: 0,
            started_ms: 10,
            updated_ms: 10,
            error: None,
            progress: None,
            stall_ms: None,
            source_gone_ms: None,
            unconfirmed: false,
            target_lost: false,
            agent_id: None,
        },
    })
}

fn phase(s: &mut State, id: &str, mig: &str, phase: &str) -> Reply {
    s.apply(&Command::MigrationPhase {
        id: id.into(),
        migration: mig.into(),
        phase: phase.into(),
        error: None,
        progress: None,
        at_ms: 20,
    })
}

/// A running sandbox `s1` on n1 (agent copy a1, generation 0), nodes n1..n3.
fn migratable() -> State {
    let mut s = State::default();
    for n in ["n1", "n2", "n3"] {
        s.apply(&node(n));
    }
    s.apply(&create("s1", "n1", RestartPolicy::Never));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s
}

#[test]
fn a_migration_is_refused_unless_the_sandbox_runs_and_the_target_can_take_it() {
    let mut s = migratable();
    let conflict = |r: Reply| match r {
        Reply::Conflict { message } => message,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert!(matches!(
        start_migration(&mut s, "s1", "m", "n1", "n1"),
        Reply::Invalid { message } if message.contains("already runs on node n1")
    ));
    assert!(matches!(
        start_migration(&mut s, "s1", "m", "n1", "n9"),
        Reply::NotFound { what } if what == "node n9"
    ));
    s.apply(&Command::SetCordon {
        node: "n2".into(),
        cordoned: true,
    });
    assert!(matches!(
        start_migration(&mut s, "s1", "m", "n1", "n2"),
        Reply::Rejected { reason, .. } if reason.contains("cordoned")
    ));
    s.apply(&Command::MarkNotReady {
        node: "n3".into(),
        at_ms: 5,
    });
    assert!(matches!(
        start_migration(&mut s, "s1", "m", "n1", "n3"),
        Reply::Rejected { reason, .. } if reason.contains("NotReady")
    ));
    s.apply(&Command::SetCordon {
        node: "n2".into(),
        cordoned: false,
    });
    assert!(matches!(
        start_migration(&mut s, "s1", "m1", "n1", "n2"),
        Reply::Sandbox { sandbox } if sandbox.migration.as_ref().unwrap().generation == 1
    ));
    let msg = conflict(start_migration(&mut s, "s1", "m2", "n1", "n2"));
    assert!(msg.contains("already migrating"), "{msg}");
    // A stopped sandbox cannot migrate.
    s.apply(&create("s2", "n1", RestartPolicy::Never));
    s.apply(&set_observed("s2", "n1", 0, "exited", "a2"));
    let msg = conflict(start_migration(&mut s, "s2", "m3", "n1", "n2"));
    assert!(msg.contains("not running"), "{msg}");
}

#[test]
fn a_migration_reserves_the_target_until_it_ends() {
    let mut s = migratable();
    assert!(matches!(
        start_migration(&mut s, "s1", "m1", "n1", "n2"),
        Reply::Sandbox { .. }
    ));
    let alloc = s.allocated();
    assert_eq!(alloc["n1"].memory_mib, 64);
    assert_eq!(
        alloc["n2"].memory_mib, 64,
        "the target must hold a reservation while the migration is active"
    );
    phase(&mut s, "s1", "m1", "aborted");
    assert!(!s.allocated().contains_key("n2"));
    assert_eq!(s.sandboxes["s1"].node, "n1");
}

#[test]
fn the_targets_running_copy_completes_the_move_and_the_source_copy_is_then_stale() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "switchover");
    // The source released its copy after the switch-over: not lost while the
    // migration is active.
    let d = heartbeat(&mut s, "n1", 1000, vec![]);
    assert!(d.not_running.is_empty(), "{d:?}");
    assert_eq!(status(&s, "s1").0, "running");
    // The target's copy, tagged with the migration's generation, completes it.
    let d = heartbeat(
        &mut s,
        "n2",
        1001,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(
        d.stop.is_empty() && d.keep == vec!["a1".to_string()],
        "{d:?}"
    );
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1));
    assert_eq!(r.migration.as_ref().unwrap().phase, "completed");
    assert!(!s.allocated().contains_key("n1"));
    // A late phase write of the driver changes nothing.
    phase(&mut s, "s1", "m1", "aborted");
    assert_eq!(
        s.sandboxes["s1"].migration.as_ref().unwrap().phase,
        "completed"
    );
    // A copy the source still has is stopped.
    let d = heartbeat(
        &mut s,
        "n1",
        1002,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    assert_eq!(stopped(&d), vec!["a1"]);
}

#[test]
fn the_driver_completes_the_move_and_an_aborted_migrations_target_copy_is_stopped() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    assert!(matches!(
        phase(&mut s, "s1", "other", "completed"),
        Reply::Conflict { .. }
    ));
    phase(&mut s, "s1", "m1", "completed");
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 1));
    assert_eq!(s.sandboxes["s1"].node, "n2");

    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "aborted");
    let d = heartbeat(
        &mut s,
        "n2",
        1000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert_eq!(stopped(&d), vec!["a1"]);
    assert_eq!(s.sandboxes["s1"].node, "n1");
}

// ---- review findings (issue #7): each reproduced a lost or stuck sandbox ----
fn migratable_always() -> State {
    let mut s = State::default();
    for n in ["n1", "n2", "n3"] {
        s.apply(&node(n));
    }
    // make n3 fuller than n2 so bin-pack prefers it for the reschedule
    s.apply(&create("big", "n3", RestartPolicy::Never));
    s.apply(&set_observed("big", "n3", 0, "running", "z1"));
    s.apply(&create("big2", "n3", RestartPolicy::Never));
    s.apply(&set_observed("big2", "n3", 0, "running", "z2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s
}

#[test]
fn review_drain_reschedule_then_completed_leaves_zero_copies() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    // the driver lost the source (timeout / unresolved) -> drain falls back to Command::Drain
    s.apply(&Command::Drain {
        node: "n1".into(),
        at_ms: 30,
        only: None,
    });
    let r = s.sandboxes["s1"].clone();
    eprintln!(
        "after Drain: node={} gen={} mig={:?}",
        r.node, r.reschedules, r.migration
    );
    let x = r.node.clone();
    assert_ne!(x, "n2", "pick must differ from target for this repro");
    // the leader starts a fresh copy b1 on x, generation 1
    s.apply(&set_observed("s1", &x, 1, "running", "b1"));
    let dx = heartbeat(&mut s, &x, 1000, vec![copy("b1", "running", Some("s1@1"))]);
    eprintln!("x heartbeat: {dx:?}");
    // the live migration commits on n2 meanwhile: its copy a1@1
    let d2 = heartbeat(
        &mut s,
        "n2",
        1001,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    eprintln!("n2 heartbeat: {d2:?}");
    let n2_fenced = stopped(&d2) == vec!["a1"];
    // source says completed -> driver/watchdog write MigrationPhase completed
    phase(&mut s, "s1", "m1", "completed");
    let r = s.sandboxes["s1"].clone();
    eprintln!(
        "after completed: node={} gen={} obs={:?}",
        r.node, r.reschedules, r.observed
    );
    let dx = heartbeat(&mut s, &x, 1002, vec![copy("b1", "running", Some("s1@1"))]);
    eprintln!("x heartbeat 2: {dx:?}");
    let x_fenced = stopped(&dx) == vec!["b1"];
    assert!(
        !(n2_fenced && x_fenced),
        "ZERO copies: n2's live copy and {x}'s fresh copy both fenced; record says {} running",
        r.node
    );
}

#[test]
fn review_delete_during_migration_leaves_target_copy_unfenced() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "committing");
    s.apply(&Command::DeleteSandbox { id: "s1".into() });
    let d = heartbeat(
        &mut s,
        "n2",
        1000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert_eq!(
        stopped(&d),
        vec!["a1"],
        "copy of a deleted record keeps running: {d:?}"
    );
}

#[test]
fn review_unresolved_migration_holds_reservation_and_disables_lost_forever() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "unresolved");
    // target dies and is removed
    s.apply(&Command::MarkNotReady {
        node: "n2".into(),
        at_ms: 100,
    });
    s.apply(&Command::RemoveNode {
        id: "n2".into(),
        at_ms: 101,
    });
    // source restarts and no longer has the copy, for a very long time
    let d = heartbeat(&mut s, "n1", 10_000_000, vec![]);
    eprintln!(
        "{d:?} status={:?} alloc={:?}",
        status(&s, "s1"),
        s.allocated()
    );
    assert!(
        !d.not_running.is_empty() || status(&s, "s1").0 != "running",
        "record still says running on n1 with no copy anywhere; migration still active: {:?}",
        s.sandboxes["s1"].migration
    );
}

#[test]
fn review_reschedule_during_migration_never_ends_it() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    // source node stops heartbeating
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 100,
    });
    let r = &s.sandboxes["s1"];
    eprintln!(
        "node={} gen={} mig={:?} alloc={:?}",
        r.node,
        r.reschedules,
        r.migration,
        s.allocated()
    );
    // Before the switch-over the target cannot have committed: the node's
    // loss ends the migration and the record is rescheduled (migsafe2 H1).
    assert!(
        r.migrating().is_none() && r.node != "n1" && r.reschedules == 1,
        "not rescheduled, or the migration still active after it: {:?}",
        r
    );
}

#[test]
fn review_completion_onto_removed_node() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "committing");
    s.apply(&Command::RemoveNode {
        id: "n2".into(),
        at_ms: 30,
    });
    phase(&mut s, "s1", "m1", "completed");
    let r = &s.sandboxes["s1"];
    assert!(
        s.nodes.contains_key(&r.node),
        "record placed on removed node {}",
        r.node
    );
}

#[test]
fn review_exited_copy_of_aborted_migration_is_never_removed() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "aborted");
    let d = heartbeat(
        &mut s,
        "n2",
        1000,
        vec![copy("a1", "stopped", Some("s1@1"))],
    );
    assert!(d.remove.contains(&"a1".to_string()), "{d:?}");
}

#[test]
fn a_source_copy_missing_before_the_switch_over_is_lost_and_ends_the_migration() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    // The first heartbeat without it opens the window in which the target
    // may report the copy (the record may have missed the switch-over).
    let d = heartbeat(&mut s, "n1", 1000, vec![]);
    assert!(d.not_running.is_empty(), "{d:?}");
    let d = heartbeat(&mut s, "n1", 1006, vec![]);
    assert_eq!(d.not_running, vec!["s1".to_string()], "{d:?}");
    assert_eq!(status(&s, "s1").0, "lost");
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "aborted", "{m:?}");
    assert!(!s.allocated().contains_key("n2"), "{:?}", s.allocated());
}

#[test]
fn a_stalled_migration_is_resolved_on_the_sources_evidence() {
    // The source still runs the guest: the migration ends as aborted.
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "switchover");
    let before = hearth_store::MIGRATION_STALL_MS;
    heartbeat(
        &mut s,
        "n1",
        before,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    assert!(
        s.sandboxes["s1"].migrating().is_some(),
        "ended before its deadline"
    );
    let d = heartbeat(
        &mut s,
        "n1",
        before + 1000,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    assert!(d.stop.is_empty() && d.not_running.is_empty(), "{d:?}");
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "aborted", "{m:?}");
    assert!(m.error.unwrap().contains("still runs"));
    assert_eq!(status(&s, "s1").0, "running");
    // Neither copy: the record is lost on the source (restart policy never).
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "unresolved");
    let d = heartbeat(&mut s, "n1", before + 1000, vec![]);
    assert_eq!(d.not_running, vec!["s1".to_string()], "{d:?}");
    assert_eq!(status(&s, "s1").0, "lost");
    assert!(!s.allocated().contains_key("n2"));
}

#[test]
fn unknown_phases_are_refused_and_a_late_write_never_moves_a_migration_back() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    assert!(matches!(
        phase(&mut s, "s1", "m1", "copying"),
        Reply::Invalid { message } if message.contains("unknown migration phase")
    ));
    phase(&mut s, "s1", "m1", "switchover");
    phase(&mut s, "s1", "m1", "precopy");
    assert_eq!(
        s.sandboxes["s1"].migration.as_ref().unwrap().phase,
        "switchover",
        "a late precopy write moved the migration back"
    );
    // An end may follow any active phase.
    phase(&mut s, "s1", "m1", "aborted");
    assert_eq!(
        s.sandboxes["s1"].migration.as_ref().unwrap().phase,
        "aborted"
    );
}

fn progress_phase(s: &mut State, mig: &str, phase: &str, bytes: u64, iters: u64, at_ms: u64) {
    s.apply(&Command::MigrationPhase {
        id: "s1".into(),
        migration: mig.into(),
        phase: phase.into(),
        error: None,
        progress: Some(serde_json::json!({"bytes_sent": bytes, "iterations": iters})),
        at_ms,
    });
}

/// Issue 7, finding 1: a healthy pre-copy longer than the deadline keeps its
/// record alive by its advancing progress (the source goes on and commits),
/// while a source whose progress stopped still meets the deadline.
#[test]
fn advancing_progress_keeps_a_long_pre_copy_alive_and_a_stuck_one_still_ends() {
    let stall = hearth_store::MIGRATION_STALL_MS;
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    progress_phase(&mut s, "m1", "precopy", 1 << 20, 1, 100);
    // The same phase, every 30 s, with more bytes each time: 5 deadlines long.
    let mut at = 100;
    for i in 2..=20u64 {
        at += 30_000;
        progress_phase(&mut s, "m1", "precopy", i << 20, 1, at);
        heartbeat(
            &mut s,
            "n1",
            at + 1,
            vec![copy("a1", "running", Some("s1@0"))],
        );
    }
    assert!(at > 4 * stall);
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(
        m.phase, "precopy",
        "a progressing pre-copy was ended: {m:?}"
    );
    // It commits: the target's copy completes the move.
    heartbeat(
        &mut s,
        "n2",
        at + 2,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    let r = &s.sandboxes["s1"];
    assert_eq!(r.node, "n2");
    assert_eq!(r.migration.as_ref().unwrap().phase, "completed");

    // A source that repeats the same progress is stuck: the deadline ends it.
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    progress_phase(&mut s, "m1", "precopy", 5 << 20, 3, 100);
    let mut at = 100;
    for _ in 0..5 {
        at += 30_000;
        progress_phase(&mut s, "m1", "precopy", 5 << 20, 3, at);
    }
    heartbeat(
        &mut s,
        "n1",
        at + 1,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "aborted", "a stuck migration never ended: {m:?}");
    assert_eq!(status(&s, "s1").0, "running");
}

/// The deadline is the record's own (`hearthd control --migration-stall-ms`).
#[test]
fn a_migration_carries_its_own_deadline() {
    let mut s = migratable();
    s.apply(&Command::StartMigration {
        id: "s1".into(),
        migration: Migration {
            id: "m1".into(),
            from: "n1".into(),
            to: "n2".into(),
            phase: "preparing".into(),
            generation: 0,
            started_ms: 10,
            updated_ms: 10,
            error: None,
            progress: None,
            stall_ms: Some(1000),
            source_gone_ms: None,
            unconfirmed: false,
            target_lost: false,
            agent_id: None,
        },
    });
    let running = || vec![copy("a1", "running", Some("s1@0"))];
    heartbeat(&mut s, "n1", 1000, running());
    assert!(s.sandboxes["s1"].migrating().is_some());
    heartbeat(&mut s, "n1", 1011, running());
    assert_eq!(
        s.sandboxes["s1"].migration.as_ref().unwrap().phase,
        "aborted"
    );
}

/// Issue 7, finding 2: past the deadline, a source copy the migration paused
/// is not "the source still runs it": the migration stays open and the
/// target's committed copy completes it (before the fix it was ended as
/// aborted and the target's copy fenced: the guest ran nowhere).
#[test]
fn a_paused_source_copy_past_the_deadline_never_fences_the_committed_target() {
    let stall = hearth_store::MIGRATION_STALL_MS;
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "unresolved");
    let d = heartbeat(&mut s, "n1", stall + 1000, vec![paused_copy("a1", "s1@0")]);
    assert!(d.stop.is_empty() && d.not_running.is_empty(), "{d:?}");
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "unresolved", "{m:?}");
    // The target reports its committed copy: the move completes, nothing of
    // it is fenced, and the paused source copy is the stale one.
    let d = heartbeat(
        &mut s,
        "n2",
        stall + 2000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(
        d.stop.is_empty(),
        "the committed target copy was fenced: {d:?}"
    );
    assert_eq!(s.sandboxes["s1"].node, "n2");
    let d = heartbeat(&mut s, "n1", stall + 3000, vec![paused_copy("a1", "s1@0")]);
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    // A source that resumed (not paused) past the deadline: it runs there.
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "unresolved");
    heartbeat(
        &mut s,
        "n1",
        stall + 1000,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    assert_eq!(
        s.sandboxes["s1"].migration.as_ref().unwrap().phase,
        "aborted"
    );
}

/// Issue 7, finding 3: the control plane missed the switch-over (the record
/// still says precopy) and the source's heartbeat after the release lacks the
/// copy; the target's report that follows completes the move instead of the
/// record ending `lost` with the target's copy fenced.
#[test]
fn a_missed_switch_over_is_completed_by_the_target_not_lost_on_the_source() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    let d = heartbeat(&mut s, "n1", 1000, vec![]);
    assert!(d.not_running.is_empty(), "marked lost at once: {d:?}");
    assert_eq!(status(&s, "s1").0, "running");
    let d = heartbeat(
        &mut s,
        "n2",
        1003,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "{d:?}");
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1));
    assert_eq!(r.migration.as_ref().unwrap().phase, "completed");
    assert_eq!(status(&s, "s1").0, "running");
    // A later source heartbeat changes nothing.
    let d = heartbeat(&mut s, "n1", 2000, vec![]);
    assert!(d.not_running.is_empty(), "{d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n2");
}

/// A migration that ended with no copy left on the source (the record lost)
/// is completed when its target reports the committed copy late, instead of
/// that copy, the only one, being fenced.
#[test]
fn a_target_copy_reported_after_the_record_was_lost_takes_it_over() {
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "committing");
    let at = hearth_store::MIGRATION_STALL_MS + 1000;
    heartbeat(&mut s, "n1", at, vec![]);
    assert_eq!(status(&s, "s1").0, "lost");
    let d = heartbeat(
        &mut s,
        "n2",
        at + 1,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "the only copy was fenced: {d:?}");
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1));
    assert_eq!(status(&s, "s1").0, "running");
    // An aborted migration whose source runs on still fences the target's copy.
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "aborted");
    let d = heartbeat(&mut s, "n2", 100, vec![copy("a9", "running", Some("s1@1"))]);
    assert_eq!(stopped(&d), ["a9"], "{d:?}");
}

/// Issue 7 review M3: the drain's cold-restart fallback moves only the
/// `restart: always` sandboxes it names (those whose live migration failed
/// for a runtime reason), not every one still on the node.
#[test]
fn a_drain_restarts_only_the_sandboxes_it_names() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s.apply(&create("s2", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s2", "n1", 0, "running", "a2"));
    let r = s.apply(&Command::Drain {
        node: "n1".into(),
        at_ms: 4,
        only: Some(vec!["s2".into()]),
    });
    let Reply::Moved { moved, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(moved, ["s2"]);
    assert_eq!(s.sandboxes["s1"].node, "n1");
    assert_eq!(s.sandboxes["s2"].node, "n2");
    assert!(s.nodes["n1"].cordoned);
}

/// migsafe 1: past the deadline, a source copy that runs while its outgoing
/// migration is still in progress (it may still switch over and commit)
/// does not end the migration; the same copy reported with its migration
/// over (cancelled, or given up: it cannot commit any more) does.
#[test]
fn a_source_still_migrating_past_the_deadline_is_not_recorded_aborted() {
    let stall = hearth_store::MIGRATION_STALL_MS;
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    let migrating = CopyReport {
        migrating: true,
        ..copy("a1", "running", Some("s1@0"))
    };
    let d = heartbeat(&mut s, "n1", stall + 1000, vec![migrating]);
    assert!(d.stop.is_empty() && d.not_running.is_empty(), "{d:?}");
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "precopy", "ended on the deadline alone: {m:?}");
    // It commits after all: the target's copy completes the move.
    let d = heartbeat(
        &mut s,
        "n2",
        stall + 2000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "the committed copy was fenced: {d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n2");
    // A source whose migration is over (not migrating) past the deadline:
    // the guest stayed there.
    let mut s = migratable();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    heartbeat(
        &mut s,
        "n1",
        stall + 1000,
        vec![copy("a1", "running", Some("s1@0"))],
    );
    let m = s.sandboxes["s1"].migration.clone().unwrap();
    assert_eq!(m.phase, "aborted", "{m:?}");
}

/// migsafe 2: a `restart: always` sandbox whose migration is open (here the
/// commit is unclear) is not started again when its source copy dies, goes
/// missing or its source node stops heartbeating: the target's committed
/// copy then completes the move instead of being fenced by a fresh copy of
/// the same generation. Once the migration is settled (aborted) the restart
/// policy applies again.
#[test]
fn an_open_migration_holds_off_the_restart_policy() {
    let dead = |status: &str| vec![copy("a1", status, Some("s1@0"))];
    for (how, at) in [
        ("failed", 0u64),
        ("lost", 0),
        ("missing", 0),
        ("node gone", 0),
    ] {
        let mut s = migratable_always();
        start_migration(&mut s, "s1", "m1", "n1", "n2");
        phase(&mut s, "s1", "m1", "committing");
        match how {
            "missing" => {
                for t in [1000, 1010, 1020] {
                    let d = heartbeat(&mut s, "n1", at + t, vec![]);
                    assert!(d.not_running.is_empty(), "{how}: {d:?}");
                }
            }
            "node gone" => {
                s.apply(&Command::MarkNotReady {
                    node: "n1".into(),
                    at_ms: 1000,
                });
            }
            status => {
                let d = heartbeat(&mut s, "n1", 1000, dead(status));
                assert!(d.not_running.is_empty(), "{how}: restarted: {d:?}");
            }
        }
        let r = &s.sandboxes["s1"];
        assert_eq!((r.node.as_str(), r.reschedules), ("n1", 0), "{how}: {r:?}");
        assert!(r.migrating().is_some(), "{how}: migration ended: {r:?}");
        // The target committed: its copy completes the move, nothing fenced.
        let d = heartbeat(
            &mut s,
            "n2",
            2000,
            vec![copy("a1", "running", Some("s1@1"))],
        );
        assert!(
            d.stop.is_empty(),
            "{how}: the committed copy was fenced: {d:?}"
        );
        let r = &s.sandboxes["s1"];
        assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1), "{how}");
        assert_eq!(status(&s, "s1").0, "running", "{how}");
    }
    // Settled as aborted (the source said it did not commit): the dead copy
    // is started again as usual.
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "committing");
    heartbeat(&mut s, "n1", 1000, dead("failed"));
    phase(&mut s, "s1", "m1", "aborted");
    let d = heartbeat(&mut s, "n1", 1001, dead("failed"));
    assert_eq!(d.not_running, vec!["s1".to_string()], "{d:?}");
    assert_eq!(status(&s, "s1").2, 1);
    // Before the switch-over (pre-copy) the target cannot have committed:
    // a dead source copy is started again at once (migsafe2 H1).
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    let d = heartbeat(&mut s, "n1", 1000, dead("failed"));
    assert_eq!(d.not_running, vec!["s1".to_string()], "{d:?}");
    assert_eq!(status(&s, "s1").2, 1);
}

/// migsafe 3: a drain's cold-restart fallback never moves a `restart:
/// always` sandbox that is still being created (its first copy may still
/// come up on the drained node: two copies); it stays and is reported.
#[test]
fn a_drain_never_restarts_a_sandbox_still_being_created() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&create("s2", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s2", "n1", 0, "creating", "a2"));
    s.apply(&create("s3", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s3", "n1", 0, "running", "a3"));
    let r = s.apply(&Command::Drain {
        node: "n1".into(),
        at_ms: 4,
        only: Some(vec!["s1".into(), "s2".into(), "s3".into()]),
    });
    let Reply::Moved { moved, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(moved, ["s3"], "a sandbox still being created was restarted");
    for id in ["s1", "s2"] {
        let r = &s.sandboxes[id];
        assert_eq!((r.node.as_str(), r.reschedules), ("n1", 0), "{id}");
    }
}

/// migsafe2 (review H1): the source node of a `restart: always` sandbox dies
/// (NotReady, or `hearth node rm`) while its migration is in pre-copy: the
/// target cannot have committed, so the node's loss ends the migration
/// aborted and the restart policy starts the sandbox elsewhere (no zero
/// copies forever); the record never stays on a removed node.
#[test]
fn a_source_node_lost_in_precopy_ends_the_migration_and_restarts_elsewhere() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let r = &s.sandboxes["s1"];
    assert_ne!(r.node, "n1", "left on the lost node: {r:?}");
    assert_eq!(r.reschedules, 1, "{r:?}");
    assert!(r.migrating().is_none(), "migration still open: {r:?}");
    assert_eq!(
        r.migration.as_ref().map(|m| m.phase.as_str()),
        Some("aborted")
    );
    assert_eq!(status(&s, "s1").0, "creating");
    // The target never committed: it reports no copy, the fresh start on n3
    // is the record's. (A target that reports a running copy of the attempt
    // did commit, the record lagging: that copy takes the record over, see
    // `review_h1_source_node_lost_after_an_unrecorded_commit_keeps_the_targets_copy`;
    // an ended one is removed.)
    let d = heartbeat(&mut s, "n2", 2000, vec![]);
    assert!(d.stop.is_empty() && d.keep.is_empty(), "{d:?}");
    let d = heartbeat(&mut s, "n2", 2001, vec![copy("t1", "failed", Some("s1@1"))]);
    assert_eq!(
        d.remove,
        ["t1"],
        "the aborted attempt's copy was kept: {d:?}"
    );
    assert_eq!(s.sandboxes["s1"].node, "n3");

    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::RemoveNode {
        id: "n1".into(),
        at_ms: 1000,
    });
    let r = &s.sandboxes["s1"];
    assert!(
        s.nodes.contains_key(&r.node),
        "record left on removed node {}",
        r.node
    );
    assert!(r.migrating().is_none(), "migration still open: {r:?}");
    assert_eq!(status(&s, "s1").0, "creating");

    // Past the switch-over the target may have committed: the record stays
    // (its migration open) until the migration settles.
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "committing");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n1", 0), "{r:?}");
    assert!(r.migrating().is_some(), "{r:?}");
}

/// migsafe2 (review H1), the reviewer's scenario as written: the source node dies in
/// pre-copy; neither the node loss nor a later abort leaves the sandbox on the
/// dead node, and `hearth node rm` never leaves it on a removed node.
#[test]
fn review_source_node_dies_in_precopy_target_never_committed() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    // target heartbeats: no copy of s1 (never committed)
    heartbeat(&mut s, "n2", 500_000, vec![]);
    heartbeat(
        &mut s,
        "n3",
        500_000,
        vec![
            copy("z1", "running", Some("big@0")),
            copy("z2", "running", Some("big2@0")),
        ],
    );
    let r = &s.sandboxes["s1"];
    eprintln!(
        "after NotReady: node={} gen={} obs={:?} mig={:?}",
        r.node,
        r.reschedules,
        r.observed,
        r.migration.as_ref().map(|m| m.phase.clone())
    );
    // Suppose the migration gets settled 'aborted' somehow (operator / leader)
    s.apply(&Command::MigrationPhase {
        id: "s1".into(),
        migration: "m1".into(),
        phase: "aborted".into(),
        error: None,
        progress: None,
        at_ms: 600_000,
    });
    heartbeat(&mut s, "n2", 700_000, vec![]);
    let r = &s.sandboxes["s1"];
    eprintln!(
        "after aborted: node={} gen={} obs={:?} mig={:?}",
        r.node,
        r.reschedules,
        r.observed.as_ref().map(|o| o.status.clone()),
        r.migration.as_ref().map(|m| m.phase.clone())
    );
    let stuck_after_abort =
        r.node == "n1" && r.observed.as_ref().is_some_and(|o| o.status == "running");
    // node rm of n1 with an open migration
    let mut s2 = migratable_always();
    start_migration(&mut s2, "s1", "m1", "n1", "n2");
    phase(&mut s2, "s1", "m1", "precopy");
    let rep = s2.apply(&Command::RemoveNode {
        id: "n1".into(),
        at_ms: 1000,
    });
    let r2 = &s2.sandboxes["s1"];
    eprintln!(
        "after node rm: reply={rep:?} node={} exists={} obs={:?} mig={:?}",
        r2.node,
        s2.nodes.contains_key(&r2.node),
        r2.observed.as_ref().map(|o| o.status.clone()),
        r2.migration.as_ref().map(|m| m.phase.clone())
    );
    assert!(!stuck_after_abort, "restart: always sandbox stays on dead node n1 as 'running' even after its migration ended aborted");
    assert!(
        s2.nodes.contains_key(&r2.node),
        "record left on removed node {}",
        r2.node
    );
}

/// A `restart: always` record whose start failed (no agent copy) is started
/// again as its next generation by a `NotRunning` expecting it given up; the
/// same command proposed from a lagging view after a start result was
/// recorded changes nothing, and a repeated one (same generation) starts
/// nothing twice.
#[test]
fn a_failed_start_of_a_restart_always_record_is_started_again_once() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    // The start failed: no copy, given up.
    s.apply(&Command::SetObserved {
        id: "s1".into(),
        observed: Observed {
            status: "failed".into(),
            agent_id: None,
            error: Some("starting on node n1: did not answer".into()),
            updated_ms: 2,
        },
        node: Some("n1".into()),
        generation: Some(0),
    });
    assert!(s.sandboxes["s1"].abandoned());
    s.apply(&not_running("s1", "n1", 0, Some(Expect::Abandoned)));
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    s.apply(&not_running("s1", "n1", 0, Some(Expect::Abandoned)));
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    // Its next start succeeded: a late retry proposal is a no-op.
    s.apply(&set_observed("s1", "n1", 1, "running", "a1"));
    s.apply(&not_running("s1", "n1", 1, Some(Expect::Abandoned)));
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 1));
}

fn give_up_start(s: &mut State, id: &str, node: &str, generation: u32) {
    s.apply(&Command::SetObserved {
        id: id.into(),
        observed: Observed {
            status: "failed".into(),
            agent_id: None,
            error: Some(format!("starting on node {node}: did not answer")),
            updated_ms: 2,
        },
        node: Some(node.into()),
        generation: Some(generation),
    });
}

/// Review (retry placement): a given-up record holds no room, so its node
/// may be full or cordoned by the time it is started again: it goes where
/// it fits, and nowhere when nothing fits (it stays failed).
#[test]
fn a_failed_start_is_started_again_where_it_fits_or_not_at_all() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&node("n2"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    give_up_start(&mut s, "s1", "n1", 0);
    s.apply(&Command::SetCordon {
        node: "n1".into(),
        cordoned: true,
    });
    s.apply(&not_running("s1", "n1", 0, Some(Expect::Abandoned)));
    assert_eq!(status(&s, "s1"), ("creating".into(), None, 1));
    assert_eq!(s.sandboxes["s1"].node, "n2", "moved off the cordoned node");

    give_up_start(&mut s, "s1", "n2", 1);
    s.apply(&Command::SetCordon {
        node: "n2".into(),
        cordoned: true,
    });
    let r = s.apply(&not_running("s1", "n2", 1, Some(Expect::Abandoned)));
    assert!(matches!(r, Reply::Rejected { .. }), "{r:?}");
    assert_eq!(
        status(&s, "s1"),
        ("failed".into(), None, 1),
        "fits nowhere: stays failed"
    );
    assert_eq!(s.sandboxes["s1"].node, "n2");
}

/// Review (slow start): the copy of a start the caller gave up on (the node
/// answered too late) is adopted for a `restart: always` record, not
/// fenced and booted again for ever; a failure written after a heartbeat
/// reported the copy does not overwrite it. A `restart: never` record's late
/// copy is still fenced.
#[test]
fn a_late_copy_of_a_failed_start_is_adopted_only_with_restart_always() {
    let mut s = State::default();
    s.apply(&node("n1"));
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&create("s2", "n1", RestartPolicy::Never));
    give_up_start(&mut s, "s1", "n1", 0);
    give_up_start(&mut s, "s2", "n1", 0);
    let d = heartbeat(
        &mut s,
        "n1",
        10,
        vec![
            copy("a1", "running", Some("s1@0")),
            copy("a2", "running", Some("s2@0")),
        ],
    );
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 0));
    assert!(d.keep.contains(&"a1".to_string()), "{d:?}");
    assert_eq!(d.stop.len(), 1, "{d:?}");
    assert_eq!(d.stop[0].agent_id, "a2");
    // The retry proposed from a view before the adoption changes nothing.
    s.apply(&not_running("s1", "n1", 0, Some(Expect::Abandoned)));
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 0));
    // A failed start result arriving after the heartbeat's adoption.
    give_up_start(&mut s, "s1", "n1", 0);
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 0));
}

/// A two-node cluster (n1 source, n2 target) for the fall-back placement.
fn migratable_always_two_nodes() -> State {
    let mut s = State::default();
    for n in ["n1", "n2"] {
        s.apply(&node(n));
    }
    s.apply(&create("s1", "n1", RestartPolicy::Always));
    s.apply(&set_observed("s1", "n1", 0, "running", "a1"));
    s
}

/// mig3 H1, the reviewer's scenario (a): the record still says pre-copy (it
/// lags the source by a poll) but the source switched over and the target
/// committed; then the source node is lost. The state machine cold-restarts
/// the sandbox elsewhere (never on the target), and when the target reports
/// its committed copy of the migration's generation, that copy takes the
/// record over (its live state is kept) and the cold copy is fenced: one copy.
#[test]
fn review_h1_source_node_lost_after_an_unrecorded_commit_keeps_the_targets_copy() {
    for how in ["not ready", "node rm"] {
        let mut s = migratable_always();
        start_migration(&mut s, "s1", "m1", "n1", "n2");
        phase(&mut s, "s1", "m1", "precopy");
        // The target committed; the record has not seen it. The source is lost.
        match how {
            "not ready" => s.apply(&Command::MarkNotReady {
                node: "n1".into(),
                at_ms: 1000,
            }),
            _ => s.apply(&Command::RemoveNode {
                id: "n1".into(),
                at_ms: 1000,
            }),
        };
        let r = &s.sandboxes["s1"];
        assert_eq!((r.node.as_str(), r.reschedules), ("n3", 1), "{how}: {r:?}");
        let m = r.migration.clone().unwrap();
        assert_eq!(
            (m.phase.as_str(), m.unconfirmed),
            ("aborted", true),
            "{how}"
        );
        // The target reports the committed copy (the source's agent id, tag
        // s1@1): it is kept and takes the record over.
        let d = heartbeat(
            &mut s,
            "n2",
            2000,
            vec![copy("a1", "running", Some("s1@1"))],
        );
        assert!(
            d.stop.is_empty() && d.remove.is_empty(),
            "{how}: the committed copy was fenced: {d:?}"
        );
        assert!(d.keep.contains(&"a1".to_string()), "{how}: {d:?}");
        let r = &s.sandboxes["s1"];
        assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1), "{how}: {r:?}");
        assert_eq!(
            status(&s, "s1"),
            ("running".into(), Some("a1".into()), 1),
            "{how}"
        );
        let m = r.migration.clone().unwrap();
        assert_eq!((m.phase.as_str(), m.unconfirmed), ("completed", false));
        // The cold copy the restart started on n3 is stale now.
        let d = heartbeat(
            &mut s,
            "n3",
            2100,
            vec![
                copy("z1", "running", Some("big@0")),
                copy("z2", "running", Some("big2@0")),
                copy("c1", "running", Some("s1@1")),
            ],
        );
        assert_eq!(stopped(&d), ["c1"], "{how}: {d:?}");
        // And the target's copy stays the record's at its next heartbeat.
        let d = heartbeat(
            &mut s,
            "n2",
            3000,
            vec![copy("a1", "running", Some("s1@1"))],
        );
        assert!(d.stop.is_empty(), "{how}: {d:?}");
        assert_eq!(s.sandboxes["s1"].node, "n2");
    }
}

/// mig3 H1, the reviewer's scenario (b): the source agent restarted during a
/// commit the record never saw (it still says pre-copy) and reports its copy
/// lost. The restart policy starts it again on the source node, and the
/// target's committed copy, reported next, takes the record over; the cold
/// copy on the source node is fenced.
#[test]
fn review_h1_a_source_restarted_during_an_unrecorded_commit_keeps_the_targets_copy() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    let d = heartbeat(&mut s, "n1", 1000, vec![copy("a1", "lost", Some("s1@0"))]);
    assert_eq!(d.not_running, vec!["s1".to_string()], "{d:?}");
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n1", 1), "{r:?}");
    let d = heartbeat(
        &mut s,
        "n2",
        1500,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "the committed copy was fenced: {d:?}");
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 1));
    assert_eq!(s.sandboxes["s1"].node, "n2");
    // n1 started the cold copy meanwhile (c1, tag s1@1): it is stopped.
    let d = heartbeat(
        &mut s,
        "n1",
        2000,
        vec![copy("c1", "running", Some("s1@1"))],
    );
    assert_eq!(stopped(&d), ["c1"], "{d:?}");
}

/// mig3 H1: only an abort the state machine decided on its own is reopened
/// by the target's copy. An abort the source confirmed (it resumed after the
/// target said "removed uncommitted", or the leader's cancel answered
/// `aborted`) fences a target copy of that attempt as before; so does a copy
/// that is not running, and one reported after the record was started again
/// a second time.
#[test]
fn only_an_unconfirmed_abort_is_taken_over_by_the_targets_copy() {
    // Confirmed by the source.
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    phase(&mut s, "s1", "m1", "aborted");
    assert!(!s.sandboxes["s1"].migration.as_ref().unwrap().unconfirmed);
    let d = heartbeat(
        &mut s,
        "n2",
        1000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n1");

    // Unconfirmed, but the target's copy already ended: removed, no take-over.
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let d = heartbeat(&mut s, "n2", 2000, vec![copy("a1", "failed", Some("s1@1"))]);
    assert_eq!(d.remove, ["a1"], "{d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n3");

    // Unconfirmed, but a copy started since the abort runs (reported): it is
    // the record's. (ask7: the leader starts no copy before the target
    // answered, so this arises only from a start of an older control plane;
    // the test used to start a copy twice, which no longer keeps the target
    // out: a record whose newest placement has no copy yet is still held.)
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    heartbeat(&mut s, "n1", 1000, vec![copy("a1", "lost", Some("s1@0"))]);
    s.apply(&set_observed("s1", "n1", 1, "running", "c1"));
    assert!(s.sandboxes["s1"].held_for_target().is_none());
    let d = heartbeat(
        &mut s,
        "n2",
        1200,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n1");

    // Unconfirmed, then confirmed by the target's answer (ask7): fenced.
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    settle(&mut s, "m1", TargetAnswer::Uncommitted, 1100);
    let d = heartbeat(
        &mut s,
        "n2",
        1200,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    assert_eq!(s.sandboxes["s1"].node, "n3");
}

fn settle(s: &mut State, mig: &str, answer: TargetAnswer, at_ms: u64) -> Reply {
    s.apply(&Command::SettleAbort {
        id: "s1".into(),
        migration: mig.into(),
        answer,
        at_ms,
    })
}

/// mig3 H1 / ask7: when only the migration's target fits, the restart after
/// an unconfirmed abort is placed there one generation above the migrated
/// copy, and (the leader starting nothing before the target answered) a
/// committed copy the target reports takes the record over: the placement is
/// dropped, the live state kept. (Before ask7 the fresh copy started at once
/// and the migrated copy was fenced.) Once the target confirmed it never
/// committed, the fresh copy is the record's on that node.
#[test]
fn when_only_the_target_fits_its_committed_copy_still_takes_the_record_over() {
    let mut s = migratable_always_two_nodes();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 2), "{r:?}");
    assert!(r.held_for_target().is_some());
    let mut committed = s.clone();
    let d = heartbeat(
        &mut committed,
        "n2",
        2000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "{d:?}");
    let r = &committed.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1), "{r:?}");
    assert_eq!(
        status(&committed, "s1"),
        ("running".into(), Some("a1".into()), 1)
    );

    settle(&mut s, "m1", TargetAnswer::Uncommitted, 1500);
    assert!(s.sandboxes["s1"].held_for_target().is_none());
    let d = heartbeat(
        &mut s,
        "n2",
        2000,
        vec![
            copy("a1", "running", Some("s1@1")),
            copy("c1", "running", Some("s1@2")),
        ],
    );
    assert_eq!(stopped(&d), ["a1"], "{d:?}");
    assert!(d.keep.contains(&"c1".to_string()), "{d:?}");
}

/// Review of mig3 (finding 3), ask7: the takeover by the target's copy is no
/// longer bounded by a time window (`TAKEOVER_WINDOW_MS` is gone) but by the
/// target's answer: while the abort is unconfirmed no copy was started, so a
/// target reporting its committed copy an hour later still takes the record
/// over; once the abort was confirmed (the target said it never committed,
/// or it was lost) and the copy started again runs, a target copy is fenced.
/// (Was `a_target_reporting_long_after_an_unconfirmed_abort_does_not_take_over_a_serving_copy`.)
#[test]
fn a_target_reporting_after_the_abort_was_confirmed_is_fenced() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    assert_eq!(s.sandboxes["s1"].node, "n3");
    // Not confirmed yet (no copy started): an hour later it still takes over.
    let mut late = s.clone();
    let d = heartbeat(
        &mut late,
        "n2",
        3_600_000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.is_empty(), "{d:?}");
    assert_eq!(late.sandboxes["s1"].node, "n2");

    for answer in [TargetAnswer::Uncommitted, TargetAnswer::TargetLost] {
        let mut s = s.clone();
        if answer == TargetAnswer::TargetLost {
            s.apply(&Command::MarkNotReady {
                node: "n2".into(),
                at_ms: 1500,
            });
        }
        settle(&mut s, "m1", answer, 1600);
        let m = s.sandboxes["s1"].migration.clone().unwrap();
        // why: a lost target's abort stays unconfirmed (its copy may still
        // take over until another copy is reported), but gates no start.
        assert_eq!(
            (m.phase.as_str(), m.unconfirmed, m.awaits_target()),
            ("aborted", answer == TargetAnswer::TargetLost, false),
            "{answer:?}"
        );
        // The copy started again on n3 runs and is reported.
        heartbeat(
            &mut s,
            "n3",
            2000,
            vec![copy("c1", "running", Some("s1@1"))],
        );
        assert_eq!(status(&s, "s1"), ("running".into(), Some("c1".into()), 1));
        // The target reports its copy of the attempt (soon, or after a partition).
        let d = heartbeat(
            &mut s,
            "n2",
            46_000,
            vec![copy("a1", "running", Some("s1@1"))],
        );
        assert_eq!(stopped(&d), ["a1"], "{answer:?}: {d:?}");
        assert_eq!(s.sandboxes["s1"].node, "n3");
        assert_eq!(status(&s, "s1"), ("running".into(), Some("c1".into()), 1));
    }
}

/// ask7: `SettleAbort` applies only while the record still waits for the
/// target's answer about that very attempt: another attempt's id, an abort
/// the source confirmed, a record whose restarted copy was reported, a
/// `Committed` while the target is NotReady and a `TargetLost` while it is
/// Ready change nothing.
#[test]
fn a_settle_applies_only_to_the_attempt_still_awaiting_its_target() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let held = s.clone();
    let m = held.sandboxes["s1"].held_for_target().cloned().unwrap();
    assert_eq!(
        m.agent_id.as_deref(),
        Some("a1"),
        "the copy id is kept: {m:?}"
    );
    for (mig, answer) in [
        ("m0", TargetAnswer::Uncommitted),
        ("m0", TargetAnswer::Committed),
        ("m1", TargetAnswer::TargetLost),
    ] {
        let mut t = held.clone();
        settle(&mut t, mig, answer, 1100);
        assert_eq!(t, held, "{mig} {answer:?} changed the state");
    }
    // The target NotReady: a `Committed` (a late answer) changes nothing.
    let mut t = held.clone();
    t.apply(&Command::MarkNotReady {
        node: "n2".into(),
        at_ms: 1050,
    });
    let before = t.clone();
    settle(&mut t, "m1", TargetAnswer::Committed, 1100);
    assert_eq!(t, before);
    // The restarted copy was reported: nothing to settle.
    let mut t = held.clone();
    t.apply(&set_observed("s1", "n3", 1, "running", "c1"));
    let before = t.clone();
    for answer in [TargetAnswer::Uncommitted, TargetAnswer::Committed] {
        settle(&mut t, "m1", answer, 1100);
        assert_eq!(t, before, "{answer:?}");
    }
    // An abort on the source's word is confirmed already.
    let mut t = migratable_always();
    start_migration(&mut t, "s1", "m1", "n1", "n2");
    phase(&mut t, "s1", "m1", "aborted");
    let before = t.clone();
    settle(&mut t, "m1", TargetAnswer::Committed, 1100);
    assert_eq!(t, before);
    // Settled once, a second answer changes nothing.
    let mut t = held.clone();
    settle(&mut t, "m1", TargetAnswer::Uncommitted, 1100);
    let once = t.clone();
    settle(&mut t, "m1", TargetAnswer::Committed, 1200);
    assert_eq!(t, once);
}

/// ask7: the target said it committed: the record moves there at once (the
/// migration completes at its generation, the copy id is the source's, the
/// cold placement on n3 and its reservation are dropped), without waiting
/// for the target's heartbeat, which then keeps the copy.
#[test]
fn a_committed_answer_moves_the_record_to_the_target_at_once() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    let n3_before = s.allocated()["n3"];
    settle(&mut s, "m1", TargetAnswer::Committed, 1100);
    let r = &s.sandboxes["s1"];
    assert_eq!((r.node.as_str(), r.reschedules), ("n2", 1), "{r:?}");
    let m = r.migration.clone().unwrap();
    assert_eq!((m.phase.as_str(), m.unconfirmed), ("completed", false));
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 1));
    assert!(s.allocated()["n3"].memory_mib < n3_before.memory_mib);
    let d = heartbeat(
        &mut s,
        "n2",
        2000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(
        d.stop.is_empty() && d.keep.contains(&"a1".to_string()),
        "{d:?}"
    );
    assert_eq!(status(&s, "s1"), ("running".into(), Some("a1".into()), 1));
}

/// ask7: `TargetLost` confirms the abort only while the target is NotReady
/// or removed; the restart then proceeds and the target's copy, if it comes
/// back, is fenced.
#[test]
fn a_lost_target_confirms_the_abort() {
    for how in ["not ready", "node rm"] {
        let mut s = migratable_always();
        start_migration(&mut s, "s1", "m1", "n1", "n2");
        phase(&mut s, "s1", "m1", "precopy");
        s.apply(&Command::MarkNotReady {
            node: "n1".into(),
            at_ms: 1000,
        });
        match how {
            "not ready" => s.apply(&Command::MarkNotReady {
                node: "n2".into(),
                at_ms: 1500,
            }),
            _ => s.apply(&Command::RemoveNode {
                id: "n2".into(),
                at_ms: 1500,
            }),
        };
        settle(&mut s, "m1", TargetAnswer::TargetLost, 1600);
        let r = &s.sandboxes["s1"];
        assert!(r.held_for_target().is_none(), "{how}: {r:?}");
        let why = r.migration.as_ref().unwrap().error.clone().unwrap();
        let word = if how == "node rm" {
            "removed"
        } else {
            "NotReady"
        };
        assert!(
            why.contains(&format!("node n2 (the target) is {word}")),
            "{why}"
        );
        assert_eq!((r.node.as_str(), r.reschedules), ("n3", 1), "{how}");
    }
}

/// ask7: the same log gives the same state on every member, also with the
/// new command (and it survives its JSON form, as it travels in Raft).
#[test]
fn settling_an_abort_is_deterministic() {
    let mut log = vec![
        node("n1"),
        node("n2"),
        node("n3"),
        create("s1", "n1", RestartPolicy::Always),
        set_observed("s1", "n1", 0, "running", "a1"),
        Command::StartMigration {
            id: "s1".into(),
            migration: Migration {
                id: "m1".into(),
                from: "n1".into(),
                to: "n2".into(),
                phase: "preparing".into(),
                generation: 0,
                started_ms: 10,
                updated_ms: 10,
                error: None,
                progress: None,
                stall_ms: None,
                source_gone_ms: None,
                unconfirmed: false,
                target_lost: false,
                agent_id: None,
            },
        },
        Command::MarkNotReady {
            node: "n1".into(),
            at_ms: 1000,
        },
    ];
    for answer in [
        TargetAnswer::Committed,
        TargetAnswer::Uncommitted,
        TargetAnswer::TargetLost,
    ] {
        log.push(Command::SettleAbort {
            id: "s1".into(),
            migration: "m1".into(),
            answer,
            at_ms: 1100,
        });
        let (mut a, mut b) = (State::default(), State::default());
        for c in &log {
            a.apply(c);
            let wire: Command = serde_json::from_str(&serde_json::to_string(c).unwrap()).unwrap();
            b.apply(&wire);
        }
        a.take_dirty();
        b.take_dirty();
        assert_eq!(a, b, "{answer:?}");
        log.pop();
    }
}

/// review8a finding 1: the target was NotReady when the leader would have
/// asked it (the abort is settled `target_lost`, a restart may start), but
/// it had committed and the source released to it: when it reports its copy
/// before any other copy was reported, that copy takes the record over
/// (never zero copies); once the restarted copy was reported, a late target
/// copy is fenced.
#[test]
fn a_lost_targets_committed_copy_takes_over_until_another_copy_was_reported() {
    for other_first in [false, true] {
        let mut s = migratable_always();
        start_migration(&mut s, "s1", "m1", "n1", "n2");
        phase(&mut s, "s1", "m1", "precopy");
        s.apply(&Command::MarkNotReady {
            node: "n1".into(),
            at_ms: 1000,
        });
        s.apply(&Command::MarkNotReady {
            node: "n2".into(),
            at_ms: 1500,
        });
        settle(&mut s, "m1", TargetAnswer::TargetLost, 1600);
        let r = &s.sandboxes["s1"];
        assert!(r.held_for_target().is_none(), "a restart may start: {r:?}");
        assert_eq!((r.node.as_str(), r.reschedules), ("n3", 1), "{r:?}");
        if other_first {
            let d = heartbeat(
                &mut s,
                "n3",
                1700,
                vec![copy("a3", "running", Some("s1@1"))],
            );
            assert!(d.stop.is_empty(), "{d:?}");
        }
        let d = heartbeat(
            &mut s,
            "n2",
            2000,
            vec![copy("a1", "running", Some("s1@1"))],
        );
        let r = &s.sandboxes["s1"];
        if other_first {
            assert!(
                d.stop.iter().any(|f| f.agent_id == "a1"),
                "the late target copy is fenced: {d:?}"
            );
            assert_eq!(r.node, "n3", "{r:?}");
        } else {
            assert!(
                d.stop.is_empty() && d.keep.contains(&"a1".to_string()),
                "the target's copy is kept: {d:?}"
            );
            assert_eq!(r.node, "n2", "{r:?}");
            assert_eq!(r.migration.as_ref().unwrap().phase, "completed");
        }
    }
}

/// review8a finding 2: while the record waits for the target's answer, the
/// target's committed copy whose resume failed (reported paused) is neither
/// fenced nor taken over; the committed answer then takes it over.
#[test]
fn a_paused_target_copy_of_a_held_record_is_not_fenced() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    assert!(s.sandboxes["s1"].held_for_target().is_some());
    let d = heartbeat(&mut s, "n2", 1500, vec![paused_copy("a1", "s1@1")]);
    assert!(
        !d.stop.iter().any(|f| f.agent_id == "a1") && !d.remove.contains(&"a1".to_string()),
        "{d:?}"
    );
    assert!(s.sandboxes["s1"].held_for_target().is_some());
    settle(&mut s, "m1", TargetAnswer::Committed, 1600);
    assert_eq!(s.sandboxes["s1"].node, "n2");
}

/// review9 blocker: after a lost target's abort, the restarted copy was
/// reported and then moved again (a later generation, not reported yet):
/// the target's late copy must not take the record over (the window closed
/// with the first reported copy) but be fenced.
#[test]
fn a_lost_targets_copy_never_outranks_a_later_generation() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    s.apply(&Command::MarkNotReady {
        node: "n2".into(),
        at_ms: 1500,
    });
    settle(&mut s, "m1", TargetAnswer::TargetLost, 1600);
    heartbeat(
        &mut s,
        "n3",
        1700,
        vec![copy("a3", "running", Some("s1@1"))],
    );
    s.apply(&node("n4"));
    s.apply(&Command::MarkNotReady {
        node: "n3".into(),
        at_ms: 1800,
    });
    let r = &s.sandboxes["s1"];
    assert!(r.reschedules >= 2, "moved again: {r:?}");
    let (node_now, gen_now) = (r.node.clone(), r.reschedules);
    let d = heartbeat(
        &mut s,
        "n2",
        2000,
        vec![copy("a1", "running", Some("s1@1"))],
    );
    assert!(d.stop.iter().any(|f| f.agent_id == "a1"), "{d:?}");
    let r = &s.sandboxes["s1"];
    assert_eq!(
        (r.node.clone(), r.reschedules),
        (node_now, gen_now),
        "{r:?}"
    );
}

/// review9: a target settled as lost that reports its paused committed copy
/// is asked again (the record waits for its answer once more).
#[test]
fn a_lost_target_reporting_a_paused_copy_is_asked_again() {
    let mut s = migratable_always();
    start_migration(&mut s, "s1", "m1", "n1", "n2");
    phase(&mut s, "s1", "m1", "precopy");
    s.apply(&Command::MarkNotReady {
        node: "n1".into(),
        at_ms: 1000,
    });
    s.apply(&Command::MarkNotReady {
        node: "n2".into(),
        at_ms: 1500,
    });
    settle(&mut s, "m1", TargetAnswer::TargetLost, 1600);
    assert!(s.sandboxes["s1"].held_for_target().is_none());
    let d = heartbeat(&mut s, "n2", 2000, vec![paused_copy("a1", "s1@1")]);
    assert!(!d.stop.iter().any(|f| f.agent_id == "a1"), "{d:?}");
    assert!(
        s.sandboxes["s1"].held_for_target().is_some(),
        "{:?}",
        s.sandboxes["s1"]
    );
}

/// review10 F1: the source's own copy (paused after the switch-over, of the
/// source's generation) reported after an unconfirmed abort does not close
/// the window: the target's committed copy still takes the record over.
#[test]
fn the_sources_paused_copy_does_not_close_the_takeover() {
    let mut t = migratable_always();
    start_migration(&mut t, "s1", "m1", "n1", "n2");
    phase(&mut t, "s1", "m1", "precopy");
    t.apply(&Command::MarkNotReady {
        node: "n2".into(),
        at_ms: 1000,
    });
    heartbeat(&mut t, "n1", 1100, vec![paused_copy("a1", "s1@0")]);
    let m = t.sandboxes["s1"].migration.clone().unwrap();
    assert!(
        m.unconfirmed,
        "the paused source copy closed the window: {m:?}"
    );
    let d = heartbeat(
        &mut t,
        "n2",
        2000,
        vec![copy("b1", "running", Some("s1@1"))],
    );
    assert!(
        !d.stop.iter().any(|f| f.agent_id == "b1"),
        "the target's committed copy was fenced: {d:?}"
    );
    assert_eq!(t.sandboxes["s1"].node, "n2");
}
