//! Properties of placement on random clusters and workloads.

use hearth_sched::{place, Accel, NodeView, Request, Resources, Strategy as Pack};
use proptest::prelude::*;

fn nodes_strategy() -> impl Strategy<Value = Vec<NodeView>> {
    prop::collection::vec((1u32..=16, 1u64..=64, any::<bool>()), 1..12).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (cpus, mem_gib, cordoned))| {
                let mut n = NodeView::new(
                    format!("n{i}"),
                    Resources::new(cpus, mem_gib * 1024, 50_000),
                    Accel::Tcg,
                );
                n.cordoned = cordoned && i % 3 == 0;
                n
            })
            .collect()
    })
}

fn requests_strategy(max: usize) -> impl Strategy<Value = Vec<Request>> {
    prop::collection::vec((1u32..=8, 64u64..=16_384, 0u64..=4_000), 1..max).prop_map(|v| {
        v.into_iter()
            .map(|(c, m, d)| Request {
                resources: Resources::new(c, m, d),
                ..Default::default()
            })
            .collect()
    })
}

/// Places every request in turn, reserving what it takes; returns the nodes.
fn run(mut nodes: Vec<NodeView>, reqs: &[Request], strategy: Pack) -> (Vec<NodeView>, usize) {
    let mut placed = 0;
    for r in reqs {
        let id = match place(&nodes, r, strategy) {
            Ok(n) => n.id.clone(),
            Err(_) => continue,
        };
        let n = nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("placed on a known node");
        n.allocated = n.allocated.plus(r.resources);
        placed += 1;
    }
    (nodes, placed)
}

/// The baseline: the first node (in order) with room.
fn first_fit_nodes_used(nodes: &[NodeView], reqs: &[Request]) -> Option<usize> {
    let mut alloc = vec![Resources::default(); nodes.len()];
    for r in reqs {
        let i =
            (0..nodes.len()).find(|&i| alloc[i].plus(r.resources).fits_in(nodes[i].capacity))?;
        alloc[i] = alloc[i].plus(r.resources);
    }
    Some(alloc.iter().filter(|a| **a != Resources::default()).count())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn placement_never_overcommits_a_node(nodes in nodes_strategy(), reqs in requests_strategy(80), spread in any::<bool>()) {
        let strategy = if spread { Pack::Spread } else { Pack::BinPack };
        let (after, _) = run(nodes, &reqs, strategy);
        for n in &after {
            prop_assert!(n.allocated.fits_in(n.capacity), "{} overcommitted: {:?} > {:?}", n.id, n.allocated, n.capacity);
            if n.cordoned { prop_assert_eq!(n.allocated, Resources::default()); }
        }
    }

    #[test]
    fn unschedulable_only_when_no_node_has_room(nodes in nodes_strategy(), r in requests_strategy(2)) {
        let r = &r[0];
        let fits_somewhere = nodes.iter().any(|n| !n.cordoned && r.resources.fits_in(n.free()));
        match place(&nodes, r, Pack::BinPack) {
            Ok(n) => prop_assert!(r.resources.fits_in(n.free()) && !n.cordoned),
            Err(e) => {
                prop_assert!(!fits_somewhere);
                prop_assert_eq!(e.rejections.len(), nodes.len());
            }
        }
    }
}

/// Online bin-packing heuristics are incomparable workload by workload:
/// best-fit beats first-fit on some sequences and loses on others (proptest
/// finds such sequences when asked for per-workload dominance). The claim is
/// about random workloads: over 600 of them, drawn from a fixed seed so the
/// test is reproducible, bin-pack uses no more nodes in total than first-fit,
/// and more on a single workload only rarely.
#[test]
fn bin_packing_uses_no_more_nodes_than_first_fit() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let shape = (8u32..=32, 16u64..=64, requests_strategy(120));
    let (mut bp_total, mut ff_total, mut worse) = (0, 0, 0);
    let trials = 600;
    for _ in 0..trials {
        let (cpus, mem_gib, reqs) = shape.new_tree(&mut runner).expect("generate").current();
        // A pool large enough that nothing is refused: only packing differs.
        let nodes: Vec<NodeView> = (0..reqs.len())
            .map(|i| {
                NodeView::new(
                    format!("n{i}"),
                    Resources::new(cpus, mem_gib * 1024, 100_000),
                    Accel::Tcg,
                )
            })
            .collect();
        let ff = first_fit_nodes_used(&nodes, &reqs).expect("pool fits every request");
        let (after, placed) = run(nodes, &reqs, Pack::BinPack);
        assert_eq!(placed, reqs.len());
        let bp = after
            .iter()
            .filter(|n| n.allocated != Resources::default())
            .count();
        bp_total += bp;
        ff_total += ff;
        worse += usize::from(bp > ff);
    }
    assert!(
        bp_total <= ff_total,
        "bin-pack used {bp_total} nodes, first-fit {ff_total}"
    );
    assert!(
        worse * 10 < trials,
        "bin-pack used more nodes than first-fit on {worse} of {trials}"
    );
    eprintln!("nodes used over {trials} random workloads: bin-pack {bp_total}, first-fit {ff_total}; bin-pack worse on {worse}");
}
