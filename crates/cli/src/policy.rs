//! Network flags of `hearth run` and the `hearth policy` commands.

use anyhow::Result;
use hearth_api::network::{EgressPolicy, NetworkMode, NetworkSpec, PolicyStats};

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

/// `hearth run` network flags.
#[derive(clap::Args, Default)]
pub struct NetArgs {
    /// `none` runs the sandbox without a network device.
    #[arg(long, value_parser = ["default", "none"], default_value = "default")]
    pub network: String,
    #[command(flatten)]
    pub egress: EgressArgs,
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
        }
    }
}

#[derive(clap::Subcommand)]
pub enum PolicyCmd {
    /// Replace a sandbox's whole egress policy (takes effect at once, no restart).
    Set {
        sandbox: String,
        #[command(flatten)]
        egress: EgressArgs,
    },
    /// Show a sandbox's egress policy.
    Show {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Per-rule packet and byte counters.
    Stats {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
}

fn path(sandbox: &str, tail: &str) -> String {
    format!("/v1/sandboxes/{}/policy{tail}", crate::enc(sandbox))
}

fn print_policy(p: &EgressPolicy) {
    println!("default {}", p.default);
    for r in &p.allow {
        println!("allow   {r}");
    }
    for r in &p.deny {
        println!("deny    {r}");
    }
}

pub async fn run(c: &Client, cmd: PolicyCmd) -> Result<u8> {
    match cmd {
        PolicyCmd::Set { sandbox, egress } => {
            let p: EgressPolicy = c.put_json(&path(&sandbox, ""), &egress.policy()).await?;
            print_policy(&p);
        }
        PolicyCmd::Show { sandbox, json } => {
            let p: EgressPolicy = c.get_json(&path(&sandbox, "")).await?;
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
