//! The state machine's apply is deterministic and its snapshots round-trip.

use std::collections::BTreeMap;

use hearth_sched::{Accel, Request, Resources};
use hearth_store::{
    Cidr, Command, CopyReport, NodeRecord, Observed, Reply, RestartPolicy, SandboxRecord, State,
};
use proptest::prelude::*;

fn node_id() -> impl Strategy<Value = String> {
    (0u8..4).prop_map(|i| format!("node{i}"))
}

/// Slices (small ones that run out, overlapping ones, allocated ones) and
/// leases from them.
fn lease_command() -> impl Strategy<Value = Command> {
    let want = prop::option::of(
        prop_oneof![
            Just("10.9.0.0/30"),
            Just("10.9.0.0/29"),
            Just("10.9.1.0/30"),
            Just("10.88.0.0/24"),
        ]
        .prop_map(|c| c.parse::<Cidr>().unwrap()),
    );
    prop_oneof![
        (node_id(), 0u8..2, want).prop_map(|(node, inst, want)| Command::AllocateSlice {
            node,
            instance: format!("i{inst}"),
            want,
        }),
        (
            node_id(),
            0u8..2,
            0u8..8,
            prop::option::of((0u8..2, 0u8..5))
        )
            .prop_map(|(node, inst, sb, want)| Command::Lease {
                node,
                instance: format!("i{inst}"),
                sandbox: format!("a{sb}"),
                want: want.map(|(net, host)| {
                    std::net::Ipv4Addr::new(10, if net == 0 { 9 } else { 88 }, 0, host)
                }),
            }),
        (node_id(), 0u8..2, 0u8..8).prop_map(|(node, inst, sb)| Command::Release {
            node,
            instance: format!("i{inst}"),
            sandbox: format!("a{sb}"),
        }),
        (node_id(), 0u8..2, prop::collection::btree_set(0u8..8, 0..4)).prop_map(
            |(node, inst, keep)| Command::RetainLeases {
                node,
                instance: format!("i{inst}"),
                keep: keep.into_iter().map(|k| format!("a{k}")).collect(),
            }
        ),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        lease_command(),
        lease_command(),
        (
            node_id(),
            0u8..2,
            1u32..16,
            1u64..32,
            any::<bool>(),
            0u64..1000
        )
            .prop_map(|(id, inst, cpus, gib, kvm, at)| Command::RegisterNode {
                node: NodeRecord {
                    id,
                    instance: format!("i{inst}"),
                    address: "http://10.77.0.2:7071".into(),
                    capacity: Resources::new(cpus, gib * 1024, 100_000),
                    accel: if kvm { Accel::Kvm } else { Accel::Tcg },
                    labels: BTreeMap::new(),
                    cordoned: false,
                    ready: true,
                    registered_ms: at,
                    last_heartbeat_ms: at,
                    warm_templates: Default::default(),
                    volumes: Default::default(),
                }
            }),
        (
            node_id(),
            0u8..2,
            0u64..10_000,
            0u8..20,
            prop::option::of("running|exited|lost")
        )
            .prop_map(|(node, inst, at, sb, status)| Command::Heartbeat {
                node,
                instance: format!("i{inst}"),
                at_ms: at,
                observed: status
                    .map(|s| {
                        [(
                            format!("sb{sb}"),
                            Observed {
                                status: s,
                                agent_id: None,
                                error: None,
                                updated_ms: at,
                            },
                        )]
                        .into()
                    })
                    .unwrap_or_default(),
                report: None,
                grace_ms: 0,
            }),
        (
            node_id(),
            0u8..2,
            0u64..10_000,
            0u8..20,
            0u32..3,
            "creating|running|exited|lost|failed"
        )
            .prop_map(
                |(node, inst, at, sb, generation, status)| Command::Heartbeat {
                    node,
                    instance: format!("i{inst}"),
                    at_ms: at,
                    observed: Default::default(),
                    report: Some(vec![CopyReport {
                        agent_id: format!("agent-sb{sb}-{generation}"),
                        status,
                        error: None,
                        owner: Some(if generation == 2 {
                            format!("c0/sb{sb}@{generation}")
                        } else {
                            format!("sb{sb}@{generation}")
                        }),
                        paused: false,
                        migrating: false,
                    }]),
                    grace_ms: 100,
                }
            ),
        (node_id(), 0u64..10_000).prop_map(|(node, at_ms)| Command::MarkNotReady { node, at_ms }),
        (node_id(), any::<bool>())
            .prop_map(|(node, cordoned)| Command::SetCordon { node, cordoned }),
        (node_id(), 0u64..10_000).prop_map(|(node, at_ms)| Command::Drain {
            node,
            at_ms,
            only: None,
        }),
        (node_id(), 0u64..10_000).prop_map(|(id, at_ms)| Command::RemoveNode { id, at_ms }),
        (
            0u8..20,
            node_id(),
            1u32..8,
            64u64..8192,
            any::<bool>(),
            prop::option::of(0u8..10),
            prop::option::of(0u8..5)
        )
            .prop_map(
                |(i, node, cpus, mem, always, key, name)| Command::CreateSandbox {
                    sandbox: SandboxRecord {
                        id: format!("sb{i}"),
                        name: name.map(|n| format!("name{n}")),
                        spec: serde_json::json!({"image": "alpine"}),
                        request: Request {
                            resources: Resources::new(cpus, mem, 100),
                            ..Default::default()
                        },
                        node,
                        restart: if always {
                            RestartPolicy::Always
                        } else {
                            RestartPolicy::Never
                        },
                        record_only: true,
                        idempotency_key: key.map(|k| format!("k{k}")),
                        ip: None,
                        created_ms: 1,
                        reschedules: 0,
                        policy_version: 0,
                        pinned: false,
                        observed: None,
                        migration: None,
                    }
                }
            ),
        (0u8..20, node_id(), 0u32..3, 0u64..10_000).prop_map(|(i, node, generation, at_ms)| {
            Command::NotRunning {
                id: format!("sb{i}"),
                node,
                generation,
                status: "lost".into(),
                why: "its node no longer runs it".into(),
                at_ms,
                expect: None,
            }
        }),
        (0u8..20).prop_map(|i| Command::DeleteSandbox {
            id: format!("sb{i}")
        }),
        (0u8..20, 0u8..3, proptest::option::of(0u64..4)).prop_map(|(i, p, v)| Command::SetPolicy {
            id: format!("sb{i}"),
            policy: serde_json::json!({
                "egress": {"default": if p == 0 { "deny" } else { "allow" }, "allow": [], "deny": [format!("10.{p}.0.0/16")]},
                "ingress": {},
            }),
            expect_version: v,
        }),
        (0u8..3).prop_map(|i| Command::InitCluster {
            id: format!("c{i}")
        }),
    ]
}

fn reload(s: &State) -> State {
    let mut back: State = serde_json::from_slice(&serde_json::to_vec(s).unwrap()).unwrap();
    back.reindex();
    back
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn apply_is_deterministic(cmds in prop::collection::vec(command(), 0..80)) {
        let (mut a, mut b) = (State::default(), State::default());
        for c in &cmds {
            // Commands cross the wire as JSON: apply what a follower would decode.
            let decoded: Command = serde_json::from_str(&serde_json::to_string(c).unwrap()).unwrap();
            prop_assert_eq!(a.apply(c), b.apply(&decoded));
        }
        a.take_dirty();
        b.take_dirty();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn snapshot_round_trips_and_replays_identically(
        before in prop::collection::vec(command(), 0..60),
        after in prop::collection::vec(command(), 0..30),
    ) {
        let mut live = State::default();
        for c in &before { live.apply(c); }
        live.take_dirty();
        let mut restored = reload(&live);
        prop_assert_eq!(&restored, &live);
        for c in &after {
            prop_assert_eq!(live.apply(c), restored.apply(c));
        }
        live.take_dirty();
        restored.take_dirty();
        prop_assert_eq!(restored, live);
    }

    /// A node may shrink under its sandboxes (it re-registers smaller), but
    /// a placement is only ever accepted into room that exists.
    #[test]
    fn placements_never_overcommit_a_node(cmds in prop::collection::vec(command(), 0..120)) {
        let mut s = State::default();
        for c in &cmds {
            let fresh = match c {
                Command::CreateSandbox { sandbox } if !s.sandboxes.contains_key(&sandbox.id) => Some(sandbox.id.clone()),
                _ => None,
            };
            let reply = s.apply(c);
            if let (Some(id), hearth_store::Reply::Sandbox { sandbox }) = (fresh, reply) {
                if sandbox.id != id {
                    continue; // an idempotent retry answered with the first creation
                }
                let used = s.allocated().get(sandbox.node.as_str()).copied().unwrap_or_default();
                let cap = s.nodes[&sandbox.node].capacity;
                prop_assert!(used.fits_in(cap), "{} overcommitted: {:?} of {:?}", sandbox.node, used, cap);
            }
        }
    }

    /// Every leased address is in its node's slice, slices never overlap,
    /// and no address is held twice, whatever the order of commands.
    #[test]
    fn no_address_is_ever_leased_twice(cmds in prop::collection::vec(command(), 0..150)) {
        let mut s = State::default();
        for c in &cmds {
            let reply = s.apply(c);
            if let (Command::Lease { node, sandbox, .. }, Reply::Lease { ip, .. }) = (c, &reply) {
                prop_assert_eq!(s.slices[node].leases.get(sandbox), Some(ip));
            }
            let mut seen = std::collections::BTreeSet::new();
            let slices: Vec<_> = s.slices.values().collect();
            for (i, a) in slices.iter().enumerate() {
                for b in &slices[i + 1..] {
                    prop_assert!(!a.cidr.overlaps(b.cidr), "{} and {} overlap", a.cidr, b.cidr);
                }
                for ip in a.leases.values() {
                    prop_assert!(a.cidr.contains(*ip), "{} outside {}", ip, a.cidr);
                    prop_assert!(seen.insert(*ip), "{} leased twice", ip);
                }
            }
        }
    }
}

fn node(id: &str, cpus: u32) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: id.into(),
            instance: "i0".into(),
            address: "http://10.77.0.2:7071".into(),
            capacity: Resources::new(cpus, 1024, 100_000),
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

fn sandbox(id: &str, node: &str, restart: RestartPolicy, pinned: bool) -> Command {
    Command::CreateSandbox {
        sandbox: SandboxRecord {
            id: id.into(),
            name: None,
            spec: serde_json::json!({"image": "alpine"}),
            request: Request {
                resources: Resources::new(2, 256, 10),
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
            pinned,
            observed: Some(Observed {
                status: "running".into(),
                agent_id: Some(format!("agent-{id}")),
                error: None,
                updated_ms: 1,
            }),
            migration: None,
        },
    }
}

fn not_running(id: &str, node: &str, generation: u32) -> Command {
    Command::NotRunning {
        id: id.into(),
        node: node.into(),
        generation,
        status: "lost".into(),
        why: "node n1 no longer runs it".into(),
        at_ms: 5,
        expect: None,
    }
}

#[test]
fn a_vanished_restart_always_sandbox_starts_again_as_a_new_generation() {
    let mut s = State::default();
    s.apply(&node("n1", 4));
    s.apply(&sandbox("a", "n1", RestartPolicy::Always, false));
    assert_eq!(s.sandboxes["a"].owner(), "a@0");
    s.apply(&not_running("a", "n1", 0));
    let a = &s.sandboxes["a"];
    assert_eq!(a.owner(), "a@1");
    let o = a.observed.as_ref().unwrap();
    assert_eq!(
        (o.status.as_str(), o.agent_id.as_deref()),
        ("creating", None)
    );
    // A second report about the old generation changes nothing.
    s.apply(&not_running("a", "n1", 0));
    assert_eq!(s.sandboxes["a"].owner(), "a@1");
}

#[test]
fn a_vanished_restart_never_sandbox_is_lost_with_the_reason() {
    let mut s = State::default();
    s.apply(&node("n1", 4));
    s.apply(&sandbox("b", "n1", RestartPolicy::Never, false));
    s.apply(&not_running("b", "n1", 0));
    let o = s.sandboxes["b"].observed.clone().unwrap();
    assert_eq!(o.status, "lost");
    assert_eq!(o.error.as_deref(), Some("lost: node n1 no longer runs it"));
    assert!(!s.sandboxes["b"].abandoned(), "it had an agent copy");
}

#[test]
fn a_pinned_sandbox_skips_the_capacity_check_and_a_placed_one_does_not() {
    let mut s = State::default();
    s.apply(&node("n1", 2));
    s.apply(&sandbox("a", "n1", RestartPolicy::Never, false));
    let full = s.apply(&sandbox("b", "n1", RestartPolicy::Never, false));
    assert!(
        matches!(full, hearth_store::Reply::Rejected { .. }),
        "{full:?}"
    );
    let pinned = s.apply(&sandbox("c", "n1", RestartPolicy::Never, true));
    assert!(
        matches!(pinned, hearth_store::Reply::Sandbox { .. }),
        "{pinned:?}"
    );
}

#[test]
fn owner_tags_parse_back_to_record_and_generation() {
    assert_eq!(hearth_store::parse_owner("ab12@3"), Some(("ab12", 3)));
    assert_eq!(hearth_store::parse_owner("ab12"), None);
    assert_eq!(hearth_store::parse_owner("ab12@x"), None);
}

#[test]
fn owner_tags_with_a_cluster_id_parse_to_record_and_generation() {
    assert_eq!(hearth_store::parse_owner("c1/ab12@3"), Some(("ab12", 3)));
    assert_eq!(hearth_store::owner_cluster("c1/ab12@3"), Some("c1"));
    assert_eq!(hearth_store::owner_cluster("ab12@3"), None);
}
