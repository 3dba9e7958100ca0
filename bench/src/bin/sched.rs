//! Scheduler decisions per second and decision latency at 1,000 and 10,000
//! nodes: `hearth_sched::place` over random clusters (varied capacity,
//! allocation, labels, a few cordoned/NotReady nodes) and random requests.
//!
//! Run: cargo run --release -p hearth-bench --bin sched

use std::time::{Duration, Instant};

use hearth_bench::percentile;
use hearth_sched::{place, Accel, NodeView, Request, Resources, Strategy};

struct Rng(u64);

impl Rng {
    fn next(&mut self, m: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % m.max(1)
    }
}

fn cluster(n: usize, rng: &mut Rng) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let cpus = 8 + rng.next(57) as u32;
            let mem = (16 + rng.next(241)) * 1024;
            let mut v = NodeView::new(
                format!("node{i:05}"),
                Resources::new(cpus, mem, 500_000),
                Accel::Kvm,
            );
            v.allocated = Resources::new(
                rng.next(cpus as u64) as u32,
                rng.next(mem),
                rng.next(400_000),
            );
            v.labels.insert("zone".into(), format!("z{}", rng.next(3)));
            v.cordoned = rng.next(100) == 0;
            v.ready = rng.next(200) != 0;
            if rng.next(10) == 0 {
                v.warm_templates.insert("sha256:python".into());
            }
            v
        })
        .collect()
}

fn main() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    println!(
        "| nodes  | strategy | decisions | decisions/s | p50 (µs) | p99 (µs) | unschedulable |"
    );
    println!(
        "|--------|----------|-----------|-------------|----------|----------|---------------|"
    );
    for n in [1_000usize, 10_000] {
        let nodes = cluster(n, &mut rng);
        for strategy in [Strategy::BinPack, Strategy::Spread] {
            let decisions = if n >= 10_000 { 2_000 } else { 10_000 };
            let reqs: Vec<Request> = (0..decisions)
                .map(|_| {
                    let mut r = Request {
                        resources: Resources::new(
                            1 + rng.next(8) as u32,
                            256 + rng.next(16_000),
                            1024,
                        ),
                        ..Default::default()
                    };
                    if rng.next(4) == 0 {
                        r.selector
                            .insert("zone".into(), format!("z{}", rng.next(3)));
                    }
                    if rng.next(3) == 0 {
                        r.image_digest = Some("sha256:python".into());
                    }
                    r
                })
                .collect();
            let mut lat = Vec::with_capacity(decisions);
            let mut refused = 0;
            let start = Instant::now();
            for r in &reqs {
                let t = Instant::now();
                match place(&nodes, r, strategy) {
                    Ok(n) => {
                        std::hint::black_box(n);
                    }
                    Err(e) => {
                        refused += 1;
                        std::hint::black_box(e);
                    }
                }
                lat.push(t.elapsed());
            }
            let total = start.elapsed();
            let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
            println!(
                "| {n:>6} | {:<8} | {decisions:>9} | {:>11.0} | {:>8} | {:>8} | {refused:>13} |",
                format!("{strategy:?}"),
                decisions as f64 / total.as_secs_f64(),
                us(percentile(&lat, 50.0)),
                us(percentile(&lat, 99.0)),
            );
        }
    }
}
