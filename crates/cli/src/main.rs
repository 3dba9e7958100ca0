//! `hearth`: the command-line client. Every command is a call to the public HTTP
//! API (see `hearth_api`), so anything it does an SDK can do too.
//!
//! Exit status: a workload's own status for `run` and `exec` (128+N when killed
//! by signal N); 125 when Hearth itself failed (bad request, unknown image, VM
//! failure); 2 for a command-line usage error.

mod client;
mod cluster;
mod migrate;
mod policy;
mod pull;
mod warm;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use client::{CliError, Client};
use hearth_api::stream::{Decoder, Record};
use hearth_api::{CreateSandbox, ExecRequest, ImportImage, Sandbox};

/// Status when Hearth itself failed, as docker does.
const EXIT_HEARTH_FAILED: u8 = 125;

#[derive(Parser)]
#[command(name = "hearth", version, about = "Run OCI images in microVMs")]
struct Cli {
    /// URL of the Hearth API.
    #[arg(
        long,
        global = true,
        env = "HEARTH_API",
        default_value = "http://127.0.0.1:7070"
    )]
    api: String,
    /// API token (default: read from --token-file).
    #[arg(long, global = true, env = "HEARTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token (hearthd writes DATA_DIR/api-token).
    #[arg(
        long,
        global = true,
        env = "HEARTH_TOKEN_FILE",
        default_value = "/var/lib/hearth/api-token"
    )]
    token_file: std::path::PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command in a new sandbox.
    Run(Box<RunArgs>),
    /// List sandboxes.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's output (stdout to stdout, stderr to stderr).
    Logs {
        /// Keep streaming until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
        sandbox: String,
    },
    /// Run another command in a running sandbox.
    Exec(ExecArgs),
    /// Stop sandboxes: SIGTERM, then power off after the timeout.
    Stop {
        /// Seconds to wait after SIGTERM.
        #[arg(short, long, default_value_t = 10)]
        timeout: u64,
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Remove sandboxes.
    Rm {
        /// Kill a running sandbox first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
    /// Wait for a sandbox to end and exit with its status.
    Wait { sandbox: String },
    /// Show a sandbox as JSON.
    Inspect { sandbox: String },
    /// Show the backend, accelerator and versions.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Live-migrate a running sandbox to another node (or show its progress with --status).
    Migrate(migrate::MigrateArgs),
    /// Cluster nodes: list, cordon, uncordon, drain, remove.
    #[command(subcommand)]
    Node(cluster::NodeCmd),
    /// The control-plane group: status and membership.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Show or change a sandbox's network policy (egress and ingress), or read its counters.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Store credentials for a registry on the daemon's host (used by later pulls).
    Login {
        /// HOST[:PORT] of the registry, e.g. registry.example:5000 or docker.io.
        registry: String,
        #[arg(short, long)]
        username: String,
        /// The password; without it, it is read from stdin (first line).
        #[arg(short, long)]
        password: Option<String>,
    },
    /// Manage templates (images booted once and snapshotted) and their warm pools.
    #[command(subcommand)]
    Template(warm::TemplateCmd),
    /// Snapshot a running sandbox (`hearth snapshot SANDBOX --name S`), or `ls` / `rm`.
    Snapshot(warm::SnapshotArgs),
    /// Start copies of a running sandbox from this instant.
    Fork {
        sandbox: String,
        /// How many copies.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import an image from a root-filesystem directory, an OCI image-layout
    /// directory or a docker-archive tarball (a path on the daemon's host).
    Import {
        #[arg(long)]
        name: String,
        path: std::path::PathBuf,
    },
    /// List images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image.
    Rm { reference: String },
    /// Pull an image from a registry (REGISTRY/REPOSITORY[:TAG] or ...@sha256:DIGEST).
    Pull { reference: String },
    /// Delete root filesystems and cached registry blobs that no image uses.
    Prune,
}

#[derive(clap::Args)]
struct RunArgs {
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (name, uid, name:group or uid:gid).
    #[arg(short, long)]
    user: Option<String>,
    /// Sandbox name.
    #[arg(long)]
    name: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Start it and print its id instead of streaming its output.
    #[arg(short, long)]
    detach: bool,
    /// Forward stdin (the default when stdin is not a terminal).
    #[arg(short, long)]
    interactive: bool,
    /// Remove the sandbox when it ends.
    #[arg(long)]
    rm: bool,
    #[command(flatten)]
    net: policy::NetArgs,
    /// Boot even when a template for the image exists.
    #[arg(long)]
    cold: bool,
    /// Start from a snapshot instead of an image; without a command, the
    /// snapshot's workload continues.
    #[arg(long, conflicts_with = "cold")]
    from_snapshot: Option<String>,
    #[arg(required_unless_present = "from_snapshot")]
    image: Option<String>,
    /// The command and its arguments (default: the image's).
    #[arg(last = true)]
    cmd: Vec<String>,
}

#[derive(clap::Args)]
struct ExecArgs {
    #[arg(short, long = "env")]
    env: Vec<String>,
    #[arg(short, long)]
    workdir: Option<String>,
    #[arg(short, long)]
    user: Option<String>,
    /// Forward stdin (the default when stdin is not a terminal).
    #[arg(short, long)]
    interactive: bool,
    sandbox: String,
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_HEARTH_FAILED);
        }
    };
    let code = rt.block_on(async move {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("hearth: {e:#}");
                EXIT_HEARTH_FAILED
            }
        }
    });
    // why: exit without waiting for the blocking stdin reader thread.
    std::process::exit(i32::from(code));
}

/// Forward stdin when asked, or when it is a pipe or file rather than a terminal.
fn want_stdin(flag: bool) -> bool {
    flag || !std::io::stdin().is_terminal()
}

async fn run(cli: Cli) -> Result<u8> {
    let token = cli.token.clone().or_else(|| {
        std::fs::read_to_string(&cli.token_file)
            .ok()
            .map(|t| t.trim().to_string())
    });
    let c = Client::new(&cli.api, token);
    match cli.cmd {
        Cmd::Node(n) => cluster::node(&c, n).await,
        Cmd::Cluster(n) => cluster::cluster(&c, n).await,
        Cmd::Run(a) => cmd_run(&c, *a).await,
        Cmd::Ps { json } => {
            let list: Vec<Sandbox> = c.get_json("/v1/sandboxes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<14} {:<16} {:<24} {:<10} {:<6} {:<9} COMMAND",
                    "ID", "NAME", "IMAGE", "STATUS", "EXIT", "START"
                );
                for s in list {
                    let start = s
                        .start_path
                        .and_then(|p| serde_json::to_value(p).ok())
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<14} {:<16} {:<24} {:<10} {:<6} {:<9} {}",
                        s.id,
                        s.name.as_deref().unwrap_or("-"),
                        s.image,
                        status_word(&s),
                        s.exit
                            .map(|e| e.code.to_string())
                            .unwrap_or_else(|| "-".into()),
                        start,
                        s.argv.join(" ")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Logs { follow, sandbox } => {
            let url = format!("/v1/sandboxes/{}/output?follow={follow}", enc(&sandbox));
            let resp = c.get_stream(&url).await?;
            let (_, err) = print_stream(resp, !follow).await?;
            Ok(if err { EXIT_HEARTH_FAILED } else { 0 })
        }
        Cmd::Exec(a) => cmd_exec(&c, a).await,
        Cmd::Migrate(a) => migrate::run(&c, a).await,
        Cmd::Stop { timeout, sandboxes } => {
            for s in sandboxes {
                let _: Sandbox = c
                    .post_json(
                        &format!("/v1/sandboxes/{}/stop?timeout={timeout}", enc(&s)),
                        &serde_json::json!({}),
                    )
                    .await?;
                println!("{s}");
            }
            Ok(0)
        }
        Cmd::Rm { force, sandboxes } => {
            for s in sandboxes {
                c.delete(&format!("/v1/sandboxes/{}?force={force}", enc(&s)))
                    .await?;
                println!("{s}");
            }
            Ok(0)
        }
        Cmd::Wait { sandbox } => {
            let s: Sandbox = c
                .post_json(
                    &format!("/v1/sandboxes/{}/wait", enc(&sandbox)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{}", status_word(&s));
            Ok(s.exit.map(|e| e.code as u8).unwrap_or(EXIT_HEARTH_FAILED))
        }
        Cmd::Policy(cmd) => policy::run(&c, cmd).await,
        Cmd::Inspect { sandbox } => {
            let s: Sandbox = c
                .get_json(&format!("/v1/sandboxes/{}", enc(&sandbox)))
                .await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(0)
        }
        Cmd::Info { json } => {
            let i: hearth_api::Info = c.get_json("/v1/info").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                println!("version:      {}", i.version);
                println!("node:         {}", i.node);
                println!("backend:      {} ({})", i.backend, i.backend_version);
                println!(
                    "accelerator:  {}{}",
                    i.accel,
                    if i.hardware_isolation {
                        ""
                    } else {
                        " (software emulation: NOT hardware isolation)"
                    }
                );
                println!("  reason:     {}", i.accel_reason);
                println!("kernel:       {}", i.kernel);
                println!("initrd:       {}", i.initrd);
                println!("data dir:     {}", i.data_dir);
                println!(
                    "host:         {} cpus, {} MiB",
                    i.host_cpus, i.host_memory_mib
                );
                match &i.ingress {
                    Some(g) => println!(
                        "ingress:      {} (<port>-<sandbox>.{}, /sandboxes/<sandbox>/ports/<port>/)",
                        g.listen.as_deref().unwrap_or("?"),
                        g.domain
                    ),
                    None => println!("ingress:      none"),
                }
            }
            Ok(0)
        }
        Cmd::Image(ImageCmd::Import { name, path }) => {
            let abs = std::path::absolute(&path)?;
            eprintln!("importing {} as {name} ...", abs.display());
            let img: hearth_api::Image = c
                .post_json(
                    "/v1/images/import",
                    &ImportImage {
                        name,
                        path: abs.display().to_string(),
                    },
                )
                .await?;
            println!("{} {}", img.name, img.digest);
            Ok(0)
        }
        Cmd::Image(ImageCmd::Ls { json }) => {
            let list: Vec<hearth_api::Image> = c.get_json("/v1/images").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} {:<20} {:>10}", "NAME", "DIGEST", "SIZE");
                for i in list {
                    let short = i.digest.get(..19).unwrap_or(&i.digest).to_string();
                    println!(
                        "{:<32} {:<20} {:>8}MB",
                        i.name,
                        short,
                        i.size_bytes / 1_000_000
                    );
                }
            }
            Ok(0)
        }
        Cmd::Image(ImageCmd::Pull { reference }) => {
            let img = pull::pull(&c, &reference).await?;
            println!("{} {}", img.name, img.digest);
            Ok(0)
        }
        Cmd::Image(ImageCmd::Prune) => {
            let r: hearth_api::PruneReport = c
                .post_json("/v1/images/prune", &serde_json::json!({}))
                .await?;
            println!(
                "removed {} root filesystems and {} cached blobs ({:.1} MB)",
                r.rootfs_removed,
                r.blobs_removed,
                r.bytes_freed as f64 / 1e6
            );
            Ok(0)
        }
        Cmd::Login {
            registry,
            username,
            password,
        } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            c.post_json_no_content(
                "/v1/registries/login",
                &hearth_api::RegistryLogin {
                    registry: registry.clone(),
                    username,
                    password,
                },
            )
            .await?;
            println!("login stored for {registry}");
            Ok(0)
        }
        Cmd::Template(t) => warm::template(&c, t).await,
        Cmd::Snapshot(a) => warm::snapshot(&c, a).await,
        Cmd::Fork { sandbox, count } => warm::fork(&c, &sandbox, count).await,
        Cmd::Image(ImageCmd::Rm { reference }) => {
            c.delete(&format!("/v1/images/{}", enc(&reference))).await?;
            println!("{reference}");
            Ok(0)
        }
    }
}

fn status_word(s: &Sandbox) -> String {
    serde_json::to_value(s.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Percent-encodes a path segment.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn cmd_run(c: &Client, a: RunArgs) -> Result<u8> {
    let stdin = !a.detach && want_stdin(a.interactive);
    let req = CreateSandbox {
        image: a.image.unwrap_or_default(),
        cmd: if a.cmd.is_empty() { None } else { Some(a.cmd) },
        entrypoint: a.entrypoint.map(|e| vec![e]),
        env: a.env,
        workdir: a.workdir,
        user: a.user,
        cpus: a.cpus,
        memory_mib: a.memory,
        name: a.name,
        stdin: stdin || (a.detach && a.interactive),
        cold: a.cold,
        from_snapshot: a.from_snapshot,
        network: a.net.spec(),
        owner: None,
    };
    let sb: Sandbox = match c.post_json("/v1/sandboxes", &req).await {
        // Like docker: a registry reference that is not here yet is pulled, then run.
        Err(CliError::Api(e))
            if e.code == hearth_api::ErrorCode::ImageNotFound
                && hearth_api::names_registry(&req.image) =>
        {
            let img = pull::pull(c, &req.image).await?;
            let req = CreateSandbox {
                image: img.name,
                ..req
            };
            c.post_json("/v1/sandboxes", &req).await?
        }
        other => other?,
    };
    if a.detach {
        println!("{}", sb.id);
        return Ok(0);
    }
    if stdin {
        let c2 = c.clone();
        let url = format!("/v1/sandboxes/{}/stdin", sb.id);
        tokio::spawn(async move {
            if let Err(e) = c2.post_stdin(&url).await {
                eprintln!("hearth: forwarding stdin: {e:#}");
            }
        });
    }
    forward_signals(c.clone(), sb.id.clone());
    let resp = c
        .get_stream(&format!("/v1/sandboxes/{}/output?follow=true", sb.id))
        .await?;
    let (code, _) = print_stream(resp, false).await?;
    if a.rm {
        if let Err(e) = c
            .delete(&format!("/v1/sandboxes/{}?force=true", sb.id))
            .await
        {
            eprintln!("hearth: removing sandbox {}: {e:#}", sb.id);
        }
    }
    Ok(code)
}

async fn cmd_exec(c: &Client, a: ExecArgs) -> Result<u8> {
    let stdin = want_stdin(a.interactive);
    let req = ExecRequest {
        cmd: a.cmd,
        env: a.env,
        workdir: a.workdir,
        user: a.user,
        stdin,
    };
    let resp = c
        .post_stream(&format!("/v1/sandboxes/{}/exec", enc(&a.sandbox)), &req)
        .await?;
    if stdin {
        if let Some(exec_id) = resp
            .headers()
            .get("x-hearth-exec-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        {
            let c2 = c.clone();
            let url = format!("/v1/sandboxes/{}/execs/{exec_id}/stdin", enc(&a.sandbox));
            tokio::spawn(async move {
                if let Err(e) = c2.post_stdin(&url).await {
                    eprintln!("hearth: forwarding stdin: {e:#}");
                }
            });
        }
    }
    let (code, _) = print_stream(resp, false).await?;
    Ok(code)
}

/// Forwards SIGINT, SIGTERM and SIGHUP received by the CLI to the workload, so
/// Ctrl-C reaches it as it would a local process; its exit status still comes
/// back through the output stream.
fn forward_signals(c: Client, id: String) {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, num) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ] {
        let Ok(mut sig) = signal(kind) else {
            continue;
        };
        let (c, id) = (c.clone(), id.clone());
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                let url = format!("/v1/sandboxes/{id}/kill?signal={num}");
                if let Err(e) = c.post_empty(&url).await {
                    eprintln!("hearth: forwarding signal {num} to sandbox {id}: {e}");
                }
            }
        });
    }
}

/// Writes a record stream to stdout/stderr. Returns the exit code it ended
/// with and whether it ended with an error. With `eof_ok`, a stream that ends
/// without an exit record is fine (a snapshot of a running sandbox's logs).
async fn print_stream(resp: reqwest::Response, eof_ok: bool) -> Result<(u8, bool)> {
    let mut body = resp.bytes_stream();
    let mut dec = Decoder::default();
    use futures::StreamExt;
    // why: stdout/stderr are locked only while written, never across an
    // await: a lock held while this task waits for the next chunk blocked
    // any other task's `eprintln!` (the stdin forwarder's, when a workload
    // ended at once) on its worker thread, and with it the runtime's I/O
    // driver: the CLI hung with the stream's end unread (seen in CI).
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("connection to hearthd lost: {e}"))?;
        dec.push(&chunk);
        while let Some(rec) = dec.next_record()? {
            match rec {
                Record::Stdout(b) => write_or_quit(&mut std::io::stdout().lock(), &b),
                Record::Stderr(b) => write_or_quit(&mut std::io::stderr().lock(), &b),
                Record::Exit(e) => {
                    let _ = std::io::stdout().flush();
                    return Ok(((e.code & 0xff) as u8, false));
                }
                Record::Error(m) => {
                    let _ = std::io::stdout().flush();
                    let _ = writeln!(std::io::stderr(), "hearth: {m}");
                    return Ok((EXIT_HEARTH_FAILED, true));
                }
            }
        }
        let _ = std::io::stdout().flush();
    }
    if eof_ok {
        return Ok((0, false));
    }
    Err(CliError::StreamEnded.into())
}

fn write_or_quit(w: &mut impl Write, b: &[u8]) {
    if let Err(e) = w.write_all(b) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        // why: flattened arg groups (egress and ingress flags) must not share ids.
        super::Cli::command().debug_assert();
    }
}
