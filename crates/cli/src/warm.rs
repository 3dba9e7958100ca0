//! `hearth template ...`, `hearth snapshot ...`, `hearth fork`.

use anyhow::Result;
use clap::Subcommand;
use hearth_api::{
    CreateSnapshot, CreateTemplate, ForkSandbox, Sandbox, SetPool, Snapshot, Template,
};

use crate::client::Client;
use crate::enc;

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Boot IMAGE once to a ready guest and snapshot it; `hearth run IMAGE` then
    /// restores instead of booting.
    Create {
        image: String,
        /// Template name (default: derived from the image reference).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest memory in MiB (default 128).
        #[arg(long)]
        memory: Option<u32>,
        /// Restored-and-paused VMs to keep ready.
        #[arg(long)]
        pool: Option<u32>,
    },
    /// List templates and their warm pools.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (and its pool).
    Rm { name: String },
    /// Set the warm pool size of a template.
    Pool {
        name: String,
        #[arg(long)]
        size: u32,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (refused while sandboxes restored from it run).
    Rm { name: String },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub cmd: Option<SnapshotCmd>,
    /// The running sandbox to snapshot (pause, save memory + devices + disk, resume).
    #[arg(required = true)]
    pub sandbox: Option<String>,
    /// Snapshot name.
    #[arg(long, required = true)]
    pub name: Option<String>,
}

fn mb(bytes: u64) -> String {
    format!("{}MB", bytes / 1_000_000)
}

pub async fn template(c: &Client, cmd: TemplateCmd) -> Result<u8> {
    match cmd {
        TemplateCmd::Create {
            image,
            name,
            cpus,
            memory,
            pool,
        } => {
            eprintln!("booting {image} and snapshotting it ...");
            let t: Template = c
                .post_json(
                    "/v1/templates",
                    &CreateTemplate {
                        image,
                        name,
                        cpus,
                        memory_mib: memory,
                        pool_size: pool,
                    },
                )
                .await?;
            println!("{}", t.name);
        }
        TemplateCmd::Ls { json } => {
            let list: Vec<Template> = c.get_json("/v1/templates").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<24} {:<24} {:>4} {:>7} {:>9} {:>6} {:>8}",
                "NAME", "IMAGE", "CPUS", "MEMORY", "POOL", "IN USE", "SIZE"
            );
            for t in list {
                println!(
                    "{:<24} {:<24} {:>4} {:>6}M {:>9} {:>6} {:>8}",
                    t.name,
                    t.image,
                    t.cpus,
                    t.memory_mib,
                    format!("{}/{}", t.pool_ready, t.pool_size),
                    t.in_use,
                    mb(t.size_bytes)
                );
            }
        }
        TemplateCmd::Rm { name } => {
            c.delete(&format!("/v1/templates/{}", enc(&name))).await?;
            println!("{name}");
        }
        TemplateCmd::Pool { name, size } => {
            let t: Template = c
                .post_json(
                    &format!("/v1/templates/{}/pool", enc(&name)),
                    &SetPool { size },
                )
                .await?;
            println!("{} pool {}/{}", t.name, t.pool_ready, t.pool_size);
        }
    }
    Ok(0)
}

pub async fn snapshot(c: &Client, a: SnapshotArgs) -> Result<u8> {
    match (a.cmd, a.sandbox, a.name) {
        (Some(SnapshotCmd::Ls { json }), _, _) => {
            let list: Vec<Snapshot> = c.get_json("/v1/snapshots").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<32} {:<14} {:<20} {:>6} {:>8}",
                "NAME", "SANDBOX", "IMAGE", "IN USE", "SIZE"
            );
            for s in list {
                println!(
                    "{:<32} {:<14} {:<20} {:>6} {:>8}",
                    s.name,
                    s.sandbox,
                    s.image,
                    s.in_use,
                    mb(s.size_bytes)
                );
            }
        }
        (Some(SnapshotCmd::Rm { name }), _, _) => {
            c.delete(&format!("/v1/snapshots/{}", enc(&name))).await?;
            println!("{name}");
        }
        (None, Some(sandbox), Some(name)) => {
            let s: Snapshot = c
                .post_json(
                    &format!("/v1/sandboxes/{}/snapshot", enc(&sandbox)),
                    &CreateSnapshot { name },
                )
                .await?;
            println!("{}", s.name);
        }
        _ => anyhow::bail!("give a sandbox and --name, or a subcommand (ls, rm)"),
    }
    Ok(0)
}

pub async fn fork(c: &Client, sandbox: &str, count: u32) -> Result<u8> {
    let list: Vec<Sandbox> = c
        .post_json(
            &format!("/v1/sandboxes/{}/fork", enc(sandbox)),
            &ForkSandbox { count },
        )
        .await?;
    for s in list {
        println!("{}", s.id);
    }
    Ok(0)
}
