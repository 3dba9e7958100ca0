//! Placement: pure functions from a cluster view and a request to a node.
//!
//! No I/O and no clock: the control plane builds a [`NodeView`] per node from
//! its replicated state, calls [`place`], and commits the answer through Raft
//! (where the state machine checks capacity again, so two concurrent
//! placements can never overcommit a node). Filtering rejects nodes with a
//! reason each; scoring orders the survivors (bin-pack by default).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Amounts of the resources a node offers and a sandbox asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl Resources {
    pub fn new(cpus: u32, memory_mib: u64, disk_mib: u64) -> Resources {
        Resources {
            cpus,
            memory_mib,
            disk_mib,
        }
    }

    /// Component-wise sum, saturating.
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            cpus: self.cpus.saturating_add(o.cpus),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_mib: self.disk_mib.saturating_add(o.disk_mib),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            cpus: self.cpus.saturating_sub(o.cpus),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_mib: self.disk_mib.saturating_sub(o.disk_mib),
        }
    }

    /// True when every component of `self` is at most that of `o`.
    pub fn fits_in(self, o: Resources) -> bool {
        self.cpus <= o.cpus && self.memory_mib <= o.memory_mib && self.disk_mib <= o.disk_mib
    }
}

/// How a node runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What the scheduler knows about one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub capacity: Resources,
    /// Sum of what the sandboxes placed on it reserve.
    pub allocated: Resources,
    pub accel: Accel,
    pub labels: BTreeMap<String, String>,
    /// Cordoned nodes take no new sandboxes.
    pub cordoned: bool,
    /// False once it missed heartbeats.
    pub ready: bool,
    /// Image digests with a warm template on this node.
    pub warm_templates: BTreeSet<String>,
    /// Volumes that live on this node's disks.
    pub volumes: BTreeSet<String>,
    /// Co-location groups with a member on this node.
    pub groups: BTreeSet<String>,
}

impl NodeView {
    /// A ready, uncordoned, empty node with no labels.
    pub fn new(id: impl Into<String>, capacity: Resources, accel: Accel) -> NodeView {
        NodeView {
            id: id.into(),
            capacity,
            allocated: Resources::default(),
            accel,
            labels: BTreeMap::new(),
            cordoned: false,
            ready: true,
            warm_templates: BTreeSet::new(),
            volumes: BTreeSet::new(),
            groups: BTreeSet::new(),
        }
    }

    pub fn free(&self) -> Resources {
        self.capacity.minus(self.allocated)
    }
}

/// What a sandbox needs from a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub resources: Resources,
    /// Only nodes with hardware virtualization.
    #[serde(default)]
    pub require_kvm: bool,
    /// Every `key=value` must be among the node's labels.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Volumes it mounts; each lives on one node, so it must run there.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Co-location group: runs beside the group's other members, if any exist.
    #[serde(default)]
    pub group: Option<String>,
    /// For the warm-template bonus.
    #[serde(default)]
    pub image_digest: Option<String>,
}

/// How survivors of the filter are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fill the fullest node that fits first (fewest nodes in use).
    #[default]
    BinPack,
    /// Prefer the emptiest node (spread load).
    Spread,
}

/// Why a node cannot take a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    /// node is not ready (missed heartbeats)
    #[error("node is not ready (missed heartbeats)")]
    NotReady,
    /// node is cordoned
    #[error("node is cordoned")]
    Cordoned,
    #[error("not enough {resource}: wants {wanted}, {free} free of {capacity}")]
    Insufficient {
        resource: String,
        wanted: u64,
        free: u64,
        capacity: u64,
    },
    #[error("needs KVM, node runs TCG")]
    NoKvm,
    #[error("label {key}={want} required, node has {have}")]
    Label {
        key: String,
        want: String,
        have: String,
    },
    #[error("volume {volume} is not on this node")]
    VolumeElsewhere { volume: String },
    #[error("co-location group {group} runs on another node")]
    GroupElsewhere { group: String },
}

/// No node can take the sandbox; each node's reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("unschedulable: {}", describe(.rejections))]
pub struct Unschedulable {
    /// `(node id, why)` for every node, in node order.
    pub rejections: Vec<(String, Rejection)>,
}

fn describe(r: &[(String, Rejection)]) -> String {
    if r.is_empty() {
        return "no nodes are registered".into();
    }
    r.iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why `node` cannot take `req`, or `Ok` when it can.
pub fn filter(node: &NodeView, req: &Request, ctx: &Context) -> Result<(), Rejection> {
    match check(node, req, ctx) {
        None => Ok(()),
        Some(f) => Err(explain(f, node, req)),
    }
}

/// A filter failure without allocation: [`place`] checks every node with
/// this on the hot path and only spells out reasons when nothing fits.
#[derive(Debug, Clone, Copy)]
enum Fail {
    NotReady,
    Cordoned,
    NoKvm,
    Label(usize),
    Volume(usize),
    Group,
    Insufficient(usize),
}

fn check(node: &NodeView, req: &Request, ctx: &Context) -> Option<Fail> {
    if !node.ready {
        return Some(Fail::NotReady);
    }
    if node.cordoned {
        return Some(Fail::Cordoned);
    }
    if req.require_kvm && node.accel != Accel::Kvm {
        return Some(Fail::NoKvm);
    }
    for (i, (k, v)) in req.selector.iter().enumerate() {
        if node.labels.get(k) != Some(v) {
            return Some(Fail::Label(i));
        }
    }
    for (i, vol) in req.volumes.iter().enumerate() {
        if ctx.volume_nodes.contains_key(vol.as_str()) && !node.volumes.contains(vol) {
            return Some(Fail::Volume(i));
        }
    }
    if let Some(g) = &req.group {
        if ctx.group_nodes.contains(g.as_str()) && !node.groups.contains(g) {
            return Some(Fail::Group);
        }
    }
    let free = node.free();
    let want = req.resources;
    if want.cpus > free.cpus {
        return Some(Fail::Insufficient(0));
    }
    if want.memory_mib > free.memory_mib {
        return Some(Fail::Insufficient(1));
    }
    if want.disk_mib > free.disk_mib {
        return Some(Fail::Insufficient(2));
    }
    None
}

fn explain(f: Fail, node: &NodeView, req: &Request) -> Rejection {
    match f {
        Fail::NotReady => Rejection::NotReady,
        Fail::Cordoned => Rejection::Cordoned,
        Fail::NoKvm => Rejection::NoKvm,
        Fail::Label(i) => {
            let (k, v) = req.selector.iter().nth(i).expect("selector index");
            Rejection::Label {
                key: k.clone(),
                want: v.clone(),
                have: node.labels.get(k).cloned().unwrap_or_else(|| "none".into()),
            }
        }
        Fail::Volume(i) => Rejection::VolumeElsewhere {
            volume: req.volumes[i].clone(),
        },
        Fail::Group => Rejection::GroupElsewhere {
            group: req.group.clone().unwrap_or_default(),
        },
        Fail::Insufficient(i) => {
            let (free, want, cap) = (node.free(), req.resources, node.capacity);
            let (resource, wanted, free, capacity) = match i {
                0 => ("cpus", want.cpus as u64, free.cpus as u64, cap.cpus as u64),
                1 => (
                    "memory_mib",
                    want.memory_mib,
                    free.memory_mib,
                    cap.memory_mib,
                ),
                _ => ("disk_mib", want.disk_mib, free.disk_mib, cap.disk_mib),
            };
            Rejection::Insufficient {
                resource: resource.into(),
                wanted,
                free,
                capacity,
            }
        }
    }
}

/// Facts about the whole cluster that filtering needs (which volumes and
/// groups exist anywhere). Built once per decision by [`Context::of`].
#[derive(Debug, Default)]
pub struct Context<'a> {
    volume_nodes: BTreeMap<&'a str, ()>,
    group_nodes: BTreeSet<&'a str>,
}

impl<'a> Context<'a> {
    pub fn of(nodes: &'a [NodeView]) -> Context<'a> {
        let mut c = Context::default();
        for n in nodes {
            for v in &n.volumes {
                c.volume_nodes.insert(v.as_str(), ());
            }
            for g in &n.groups {
                c.group_nodes.insert(g.as_str());
            }
        }
        c
    }
}

/// Bonus for a node holding a warm template of the requested image, in the
/// same units as the utilization scores (per mille).
pub const WARM_TEMPLATE_BONUS: i64 = 150;

/// Higher is better. Utilization is the node's dominant share after placement:
/// the larger of its cpu and memory fractions, in per mille. (Measured on
/// random workloads, the dominant share packs tighter than the mean of the two.)
pub fn score(node: &NodeView, req: &Request, strategy: Strategy) -> i64 {
    let after = node.allocated.plus(req.resources);
    let frac = |used: u64, cap: u64| -> i64 {
        used.saturating_mul(1000).checked_div(cap).unwrap_or(1000) as i64
    };
    let util = frac(after.cpus as u64, node.capacity.cpus as u64)
        .max(frac(after.memory_mib, node.capacity.memory_mib));
    let base = match strategy {
        Strategy::BinPack => util,
        Strategy::Spread => 1000 - util,
    };
    let warm = match &req.image_digest {
        Some(d) if node.warm_templates.contains(d) => WARM_TEMPLATE_BONUS,
        _ => 0,
    };
    base + warm
}

/// Picks the node for `req`: the highest score among nodes that pass the
/// filter, ties broken by node order (earliest wins), so the answer is a
/// deterministic function of the inputs.
pub fn place<'a>(
    nodes: &'a [NodeView],
    req: &Request,
    strategy: Strategy,
) -> Result<&'a NodeView, Unschedulable> {
    let ctx = Context::of(nodes);
    let mut best: Option<(i64, &NodeView)> = None;
    for n in nodes {
        if check(n, req, &ctx).is_none() {
            let s = score(n, req, strategy);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, n));
            }
        }
    }
    if let Some((_, n)) = best {
        return Ok(n);
    }
    let rejections = nodes
        .iter()
        .filter_map(|n| check(n, req, &ctx).map(|f| (n.id.clone(), explain(f, n, req))))
        .collect();
    Err(Unschedulable { rejections })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cpus: u32, mem: u64) -> NodeView {
        NodeView::new(id, Resources::new(cpus, mem, 100_000), Accel::Tcg)
    }

    fn req(cpus: u32, mem: u64) -> Request {
        Request {
            resources: Resources::new(cpus, mem, 1_000),
            ..Default::default()
        }
    }

    #[test]
    fn too_large_sandbox_lists_each_nodes_reason() {
        let mut nodes = vec![node("a", 2, 1024), node("b", 4, 2048), node("c", 8, 8192)];
        nodes[2].cordoned = true;
        let err = place(&nodes, &req(16, 512), Strategy::BinPack).unwrap_err();
        assert_eq!(err.rejections.len(), 3);
        assert!(
            matches!(err.rejections[0].1, Rejection::Insufficient { ref resource, .. } if resource == "cpus")
        );
        assert_eq!(err.rejections[2].1, Rejection::Cordoned);
        let msg = err.to_string();
        assert!(
            msg.contains("a: not enough cpus: wants 16, 2 free of 2"),
            "{msg}"
        );
    }

    #[test]
    fn bin_pack_fills_the_fullest_node_and_spread_the_emptiest() {
        let mut nodes = vec![node("a", 8, 8192), node("b", 8, 8192)];
        nodes[1].allocated = Resources::new(4, 4096, 0);
        assert_eq!(
            place(&nodes, &req(1, 256), Strategy::BinPack).unwrap().id,
            "b"
        );
        assert_eq!(
            place(&nodes, &req(1, 256), Strategy::Spread).unwrap().id,
            "a"
        );
    }

    #[test]
    fn warm_template_bonus_attracts_the_sandbox() {
        let mut nodes = vec![node("a", 8, 8192), node("b", 8, 8192)];
        nodes[1].warm_templates.insert("sha256:x".into());
        let mut r = req(1, 256);
        r.image_digest = Some("sha256:x".into());
        assert_eq!(place(&nodes, &r, Strategy::BinPack).unwrap().id, "b");
    }

    #[test]
    fn selector_kvm_volume_and_group_constrain_the_node() {
        let mut nodes = vec![node("a", 8, 8192), node("b", 8, 8192), node("c", 8, 8192)];
        nodes[1].labels.insert("zone".into(), "z1".into());
        nodes[2].labels.insert("zone".into(), "z1".into());
        nodes[2].accel = Accel::Kvm;
        let mut r = req(1, 256);
        r.selector.insert("zone".into(), "z1".into());
        assert_eq!(place(&nodes, &r, Strategy::Spread).unwrap().id, "b");
        r.require_kvm = true;
        assert_eq!(place(&nodes, &r, Strategy::Spread).unwrap().id, "c");

        nodes[0].volumes.insert("data".into());
        let mut v = req(1, 256);
        v.volumes.push("data".into());
        assert_eq!(place(&nodes, &v, Strategy::Spread).unwrap().id, "a");
        // A volume nobody holds yet constrains nothing.
        v.volumes = vec!["fresh".into()];
        assert!(place(&nodes, &v, Strategy::Spread).is_ok());

        nodes[2].groups.insert("web".into());
        let mut g = req(1, 256);
        g.group = Some("web".into());
        assert_eq!(place(&nodes, &g, Strategy::Spread).unwrap().id, "c");
    }

    #[test]
    fn no_nodes_is_unschedulable_with_a_clear_message() {
        let err = place(&[], &req(1, 1), Strategy::BinPack).unwrap_err();
        assert!(err.to_string().contains("no nodes are registered"));
    }
}
