//! Network flags of `hearth run` and the `hearth policy` commands.

use anyhow::Result;
use hearth_api::network::{
    EgressPolicy, IngressPolicy, NetworkMode, NetworkPolicy, NetworkSpec, PolicyStats,
};

use crate::client::Client;

/// Egress rules: `CIDR[:PORTS[:PROTO]]`, e.g. `10.0.0.0/8`, `1.2.3.4/32:443`,
/// `0.0.0.0/0:53:udp`, `10.0.0.0/8:8000-8100:tcp`.
#[derive(clap::Args, Default)]
pub struct EgressArgs {
    /// Allow egress to CIDR[:PORTS[:PROTO]] (repeatable).
    #[arg(long = "egress-allow", value_name = "CIDR[:PORTS[:PROTO]]")]
    pub allow: Vec<String>,
    /// Deny egress to CIDR[:PORTS[:PROTO]] (repeatable).
    #[arg(long = "egress-deny", value_name = "CIDR[:PORTS[:PROTO]]")]
    pub deny: Vec<String>,
    /// What happens to traffic no rule matches.
    #[arg(long = "egress-default", value_parser = ["allow", "deny"], default_value = "allow")]
    pub default: String,
}

impl EgressArgs {
    pub fn policy(self) -> EgressPolicy {
        EgressPolicy {
            default: self.default,
            allow: self.allow,
            deny: self.deny,
        }
    }
}

/// Ingress rules (traffic to the sandbox): `CIDR[:PORTS[:PROTO]]` matching the
/// source address and the sandbox's port, e.g. `192.168.0.0/16:8080`.
#[derive(clap::Args, Default)]
pub struct IngressArgs {
    /// Allow new inbound flows from CIDR[:PORTS[:PROTO]] (repeatable).
    #[arg(
        long = "ingress-allow",
        id = "ingress_allow",
        value_name = "CIDR[:PORTS[:PROTO]]"
    )]
    pub allow: Vec<String>,
    /// Deny new inbound flows from CIDR[:PORTS[:PROTO]] (repeatable).
    #[arg(
        long = "ingress-deny",
        id = "ingress_deny",
        value_name = "CIDR[:PORTS[:PROTO]]"
    )]
    pub deny: Vec<String>,
    /// What happens to new inbound flows no rule matches (replies to the
    /// sandbox's own connections pass; so does the node itself, the ingress
    /// proxy, unless an explicit --ingress-deny of a CIDR containing it).
    #[arg(long = "ingress-default", id = "ingress_default", value_parser = ["allow", "deny"], default_value = "allow")]
    pub default: String,
}

impl IngressArgs {
    pub fn policy(self) -> IngressPolicy {
        IngressPolicy {
            default: self.default,
            allow: self.allow,
            deny: self.deny,
        }
    }
}

/// `hearth run` network flags.
#[derive(clap::Args, Default)]
pub struct NetArgs {
    /// `none` runs the sandbox without a network device.
    #[arg(long, value_parser = ["default", "none"], default_value = "default")]
    pub network: String,
    #[command(flatten)]
    pub egress: EgressArgs,
    #[command(flatten)]
    pub ingress: IngressArgs,
}

impl NetArgs {
    pub fn spec(self) -> NetworkSpec {
        NetworkSpec {
            mode: if self.network == "none" {
                NetworkMode::None
            } else {
                NetworkMode::Default
            },
            egress: self.egress.policy(),
            ingress: self.ingress.policy(),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum PolicyCmd {
    /// Replace a sandbox's whole policy, both directions (atomic, takes effect
    /// at once, no restart; a direction without flags gets allow and no rules).
    Set {
        sandbox: String,
        #[command(flatten)]
        egress: EgressArgs,
        #[command(flatten)]
        ingress: IngressArgs,
    },
    /// Show a sandbox's egress and ingress policy.
    Show {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Per-rule packet and byte counters (an allow rule: every packet of the
    /// flows it allowed, both directions; a deny rule: the packets it dropped;
    /// since the last policy change), and the fixed counters.
    Stats {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
}

fn path(sandbox: &str, tail: &str) -> String {
    format!("/v1/sandboxes/{}/policy{tail}", crate::enc(sandbox))
}

fn print_policy(p: &NetworkPolicy) {
    let e = &p.egress;
    let i = &p.ingress;
    for (dir, default, allow, deny) in [
        ("egress", &e.default, &e.allow, &e.deny),
        ("ingress", &i.default, &i.allow, &i.deny),
    ] {
        println!("{dir:<8}default {default}");
        for r in allow {
            println!("{dir:<8}allow   {r}");
        }
        for r in deny {
            println!("{dir:<8}deny    {r}");
        }
    }
}

pub async fn run(c: &Client, cmd: PolicyCmd) -> Result<u8> {
    match cmd {
        PolicyCmd::Set {
            sandbox,
            egress,
            ingress,
        } => {
            let want = NetworkPolicy {
                egress: egress.policy(),
                ingress: ingress.policy(),
            };
            let p: NetworkPolicy = c.put_json(&path(&sandbox, ""), &want).await?;
            print_policy(&p);
        }
        PolicyCmd::Show { sandbox, json } => {
            let p: NetworkPolicy = c.get_json(&path(&sandbox, "")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print_policy(&p);
            }
        }
        PolicyCmd::Stats { sandbox, json } => {
            let s: PolicyStats = c.get_json(&path(&sandbox, "/stats")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{:>10} {:>12}  RULE", "PACKETS", "BYTES");
                for k in &s.counters {
                    println!("{:>10} {:>12}  {}", k.packets, k.bytes, k.label);
                }
            }
        }
    }
    Ok(0)
}
