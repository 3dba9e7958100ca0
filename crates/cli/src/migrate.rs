//! `hearth migrate SANDBOX --to NODE|auto` (through the control plane),
//! `hearth migrate SANDBOX --to URL` (agent to agent),
//! `hearth migrate --status SANDBOX` and `hearth migrate --abort SANDBOX`.

use anyhow::{bail, Context, Result};
use hearth_api::migration::{MigrateSandbox, MigrationStatus};

use crate::client::Client;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Show the progress of the sandbox's current or last migration instead.
    #[arg(long)]
    status: bool,
    /// Abort the sandbox's migration in progress (through the control plane):
    /// its source cancels it unless its commit was sent, and keeps running it.
    #[arg(long, conflicts_with_all = ["status", "to"])]
    abort: bool,
    /// Target: a node id or `auto` (the control plane picks and drives it), or
    /// the base URL of a node's API (e.g. http://10.88.0.2:7070) to migrate
    /// agent to agent with --to-token-file.
    #[arg(long, required_unless_present_any = ["status", "abort"])]
    to: Option<String>,
    /// The target's API token (only with a URL --to).
    #[arg(long, env = "HEARTH_TARGET_TOKEN", hide_env_values = true)]
    to_token: Option<String>,
    /// File holding the target's API token (its DATA_DIR/api-token).
    #[arg(long, env = "HEARTH_TARGET_TOKEN_FILE")]
    to_token_file: Option<std::path::PathBuf>,
    /// Largest switch-over pause in milliseconds.
    #[arg(long, default_value_t = DEFAULT_DOWNTIME_MS, value_parser = clap::value_parser!(u64).range(1..))]
    downtime_ms: u64,
    /// Bandwidth cap of the migration stream in MiB/s.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    bandwidth_mib: Option<u64>,
    /// Give up after this many seconds of pre-copy (the sandbox keeps running here); 1 to 3600.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    give_up_secs: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    sandbox: String,
}

fn print(s: &MigrationStatus, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    println!("sandbox:      {}", s.sandbox);
    if let Some(from) = &s.from {
        println!("from:         {from}");
    }
    println!("target:       {}", s.target);
    println!("phase:        {}", s.phase);
    println!("elapsed:      {} ms", s.elapsed_ms);
    println!(
        "sent:         {:.1} MiB (memory {:.1} MiB total, {:.1} MiB dirty; disk {:.1} MiB)",
        s.bytes_sent as f64 / 1048576.0,
        s.ram_total as f64 / 1048576.0,
        s.ram_remaining as f64 / 1048576.0,
        s.disk_transferred as f64 / 1048576.0
    );
    println!("dirty rate:   {} pages/s", s.dirty_pages_rate);
    println!("iterations:   {}", s.iterations);
    println!(
        "throughput:   {:.1} MiB/s",
        s.throughput_bps as f64 / 1048576.0
    );
    println!("cpu throttle: {}%", s.cpu_throttle_percent);
    println!("downtime:     {} (as QEMU measured it)", ms(s.downtime_ms));
    println!(
        "guest paused: {} (source stopped to target resumed)",
        ms(s.paused_ms)
    );
    println!("handover:     {}", ms(s.handover_ms));
    if let Some(e) = &s.error {
        println!("error:        {e}");
    }
    Ok(())
}

pub async fn run(c: &Client, a: MigrateArgs) -> Result<u8> {
    let path = crate::enc(&a.sandbox);
    if a.status {
        let s: MigrationStatus = c
            .get_json(&format!("/v1/sandboxes/{path}/migration"))
            .await?;
        print(&s, a.json)?;
        return Ok(0);
    }
    if a.abort {
        let s: MigrationStatus = match c
            .post_json(
                &format!("/v1/sandboxes/{path}/migration/abort"),
                &serde_json::json!({}),
            )
            .await
        {
            Err(crate::client::CliError::Api(e)) if e.message.starts_with("no API route") => bail!(
                "--abort goes through the control plane (HEARTH_API must name a control-plane member); this API is a standalone node's, which has no aborting of an agent-to-agent migration: it ends on its own ({})",
                e.message
            ),
            r => r?,
        };
        print(&s, a.json)?;
        if s.phase != "aborted" {
            eprintln!(
                "the migration of sandbox {} was not aborted: it ended {} (it runs on {})",
                s.sandbox, s.phase, s.target
            );
            return Ok(1);
        }
        return Ok(0);
    }
    let Some(target) = a.to else {
        bail!("give the target with --to NODE, --to auto or --to URL");
    };
    let by_url = target.starts_with("http://") || target.starts_with("https://");
    let token = match (a.to_token, a.to_token_file) {
        _ if !by_url => String::new(),
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("reading the target token from {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!(
            "the target's API token is needed: --to-token-file PATH (its DATA_DIR/api-token) or HEARTH_TARGET_TOKEN"
        ),
    };
    if let Some(w) = low_cap_warning(a.bandwidth_mib, a.downtime_ms) {
        eprintln!("warning: {w}");
    }
    let req = MigrateSandbox {
        target,
        target_token: token,
        target_owner: None,
        downtime_limit_ms: Some(a.downtime_ms),
        max_bandwidth_mib: a.bandwidth_mib,
        max_iterations: None,
        give_up_after_secs: a.give_up_secs,
        attempt: None,
        policy: None,
        policy_version: None,
    };
    let s: MigrationStatus = c
        .post_json(&format!("/v1/sandboxes/{path}/migrate"), &req)
        .await?;
    print(&s, a.json)?;
    Ok(0)
}

/// The downtime budget a migration gets when none is given: the agents'
/// default (`hearth_vmm::migration::DEFAULT_DOWNTIME_LIMIT`, which a drain
/// without `--downtime-ms` gets).
pub(crate) const DEFAULT_DOWNTIME_MS: u64 = 100;

/// A warning when the bandwidth cap cannot send one dirty disk chunk (QEMU
/// tracks written disk blocks in 1 MiB chunks) within the downtime budget: a
/// guest that writes its disk then never fits the budget and the pre-copy
/// gives up (docs/migration.md, "Bandwidth").
pub(crate) fn low_cap_warning(bandwidth_mib: Option<u64>, downtime_ms: u64) -> Option<String> {
    // why: clap refuses a cap of 0 (`range(1..)`); filter it anyway rather than divide by it.
    let mib = bandwidth_mib.filter(|&m| m > 0)?;
    let chunk_ms = 1000_u64.div_ceil(mib);
    (chunk_ms > downtime_ms).then(|| {
        format!(
            "at {mib} MiB/s one written 1 MiB disk chunk takes {chunk_ms} ms to send, more than the {downtime_ms} ms downtime budget: if the sandbox writes its disk during the move, the pre-copy may not converge and gives up (it keeps running here); --downtime-ms {} or more avoids that",
            chunk_ms * 2
        )
    })
}

#[cfg(test)]
mod low_cap_tests {
    use super::low_cap_warning;

    #[test]
    fn a_cap_too_low_for_one_disk_chunk_in_the_budget_is_warned_about() {
        let w = low_cap_warning(Some(2), 100).expect("2 MiB/s cannot send 1 MiB in 100 ms");
        assert!(
            w.contains("500 ms") && w.contains("--downtime-ms 1000"),
            "{w}"
        );
        assert!(low_cap_warning(Some(2), 3000).is_none());
        assert!(low_cap_warning(Some(10), 100).is_none());
        assert!(low_cap_warning(None, 100).is_none());
        // why: rounded up: 1 MiB at 3 MiB/s is 333.3 ms, over a 333 ms budget.
        assert!(low_cap_warning(Some(3), 333).is_some());
    }
}
