//! `hearth node ...` and `hearth cluster ...`: the cluster's nodes and its
//! control-plane group.

use clap::Subcommand;
use hearth_api::cluster::{AddMember, ClusterStatus, Lease, Node};

use crate::client::Client;

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List nodes with their status, capacity and allocation.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new sandboxes on a node.
    Cordon { node: String },
    /// Place sandboxes on a node again.
    Uncordon { node: String },
    /// Cordon a node and move its `restart: always` sandboxes elsewhere.
    Drain { node: String },
    /// Forget a node (its sandboxes are lost or moved).
    Rm { node: String },
    /// Sandbox addresses leased in the control-plane state, by node.
    Leases {
        /// Only this node's.
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term, commit index and each member's health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add a control-plane member (started with no --peers).
    Add { id: u64, address: String },
    /// Remove a control-plane member.
    Remove { id: u64 },
}

fn gib(mib: u64) -> String {
    format!("{:.1}G", mib as f64 / 1024.0)
}

pub async fn node(c: &Client, cmd: NodeCmd) -> anyhow::Result<u8> {
    match cmd {
        NodeCmd::Ls { json } => {
            let nodes: Vec<Node> = c.get_json("/v1/nodes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<10} {:<9} {:<5} {:>9} {:>13} {:>9} {:<22} LABELS",
                "NODE", "STATUS", "SCHEDULE", "ACCEL", "CPUS", "MEMORY", "SANDBOXES", "ADDRESS"
            );
            for n in nodes {
                let labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<16} {:<10} {:<9} {:<5} {:>9} {:>13} {:>9} {:<22} {}",
                    n.id,
                    n.status,
                    if n.cordoned { "cordoned" } else { "yes" },
                    n.accel,
                    format!("{}/{}", n.allocated.cpus, n.capacity.cpus),
                    format!(
                        "{}/{}",
                        gib(n.allocated.memory_mib),
                        gib(n.capacity.memory_mib)
                    ),
                    n.sandboxes,
                    n.address.trim_start_matches("http://"),
                    labels.join(",")
                );
            }
            Ok(0)
        }
        NodeCmd::Cordon { node } => {
            let n: Node = c
                .post_json(&format!("/v1/nodes/{node}/cordon"), &())
                .await?;
            println!("{} cordoned", n.id);
            Ok(0)
        }
        NodeCmd::Uncordon { node } => {
            let n: Node = c
                .post_json(&format!("/v1/nodes/{node}/uncordon"), &())
                .await?;
            println!("{} uncordoned", n.id);
            Ok(0)
        }
        NodeCmd::Drain { node } => {
            let d: serde_json::Value = c.post_json(&format!("/v1/nodes/{node}/drain"), &()).await?;
            let list = |k: &str| {
                d[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            };
            println!(
                "{node} cordoned; moved: [{}]; still on it: [{}]",
                list("moved"),
                list("remaining")
            );
            Ok(0)
        }
        NodeCmd::Rm { node } => {
            c.delete(&format!("/v1/nodes/{node}")).await?;
            println!("{node}");
            Ok(0)
        }
        NodeCmd::Leases { node, json } => {
            let mut leases: Vec<Lease> = c.get_json("/v1/leases").await?;
            leases.retain(|l| node.as_ref().is_none_or(|n| &l.node == n));
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<16} {:<18} {:<14} SANDBOX",
                "IP", "NODE", "SLICE", "NODE SANDBOX"
            );
            for l in leases {
                println!(
                    "{:<16} {:<16} {:<18} {:<14} {}",
                    l.ip,
                    l.node,
                    l.cidr,
                    l.agent_sandbox,
                    l.sandbox.as_deref().unwrap_or("-")
                );
            }
            Ok(0)
        }
    }
}

fn print_status(s: &ClusterStatus) {
    println!(
        "leader: {}   term: {}   commit index: {}   (answered by member {})",
        s.leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into()),
        s.term,
        s.commit_index
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into()),
        s.member
    );
    println!(
        "{:<6} {:<22} {:<12} {:<8} {:>6} {:>10} {:>10} {:>10}",
        "MEMBER", "ADDRESS", "STATE", "HEALTH", "TERM", "LAST LOG", "APPLIED", "SNAPSHOT"
    );
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for m in &s.members {
        println!(
            "{:<6} {:<22} {:<12} {:<8} {:>6} {:>10} {:>10} {:>10}{}",
            m.id,
            m.address,
            m.state,
            if m.healthy { "ok" } else { "DOWN" },
            opt(m.term),
            opt(m.last_log_index),
            opt(m.applied_index),
            opt(m.snapshot_index),
            m.error
                .as_ref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
}

pub async fn cluster(c: &Client, cmd: ClusterCmd) -> anyhow::Result<u8> {
    let s: ClusterStatus = match cmd {
        ClusterCmd::Status { json } => {
            let s: ClusterStatus = c.get_json("/v1/cluster").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(0);
            }
            s
        }
        ClusterCmd::Add { id, address } => {
            c.post_json("/v1/cluster/members", &AddMember { id, address })
                .await?
        }
        ClusterCmd::Remove { id } => c.delete_json(&format!("/v1/cluster/members/{id}")).await?,
    };
    print_status(&s);
    Ok(0)
}
