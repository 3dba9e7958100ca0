//! Egress NAT with nftables: one `ip hearth` table whose postrouting chain
//! masquerades sources in the `sandboxes` set when they leave through anything
//! but a sandbox tap. A sandbox is NATed exactly while its address is in the set.
//! A forward rule drops new TCP flows from taps that do not start with a SYN.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// An nft invocation failed.
#[derive(Debug, thiserror::Error)]
#[error("nft {what}: {reason}")]
pub struct NatError {
    pub what: String,
    pub reason: String,
}

fn nft(what: &str, script: &str) -> Result<String, NatError> {
    let err = |reason: String| NatError {
        what: what.into(),
        reason,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run nft ({e}); install nftables")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the table, the set, the masquerade rule and the forward guard,
/// each unless it exists (other agents on the host may share the table).
pub fn ensure(tap_prefix: &str) -> Result<(), NatError> {
    let base = "add table ip hearth\nadd set ip hearth sandboxes { type ipv4_addr; }\n";
    let chains = [
        (
            "postrouting",
            format!(
                "add chain ip hearth postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
                 add rule ip hearth postrouting ip saddr @sandboxes oifname != \"{tap_prefix}*\" masquerade\n"
            ),
        ),
        (
            // why: the policy program checks only SYNs; conntrack would otherwise
            // pick up (and NAT) a flow a guest starts with a bare ACK.
            "forward",
            format!(
                "add chain ip hearth forward {{ type filter hook forward priority filter; policy accept; }}\n\
                 add rule ip hearth forward iifname \"{tap_prefix}*\" ct state new tcp flags & (syn | ack) != syn drop\n"
            ),
        ),
    ];
    for (chain, script) in chains {
        if nft("list", &format!("list chain ip hearth {chain}\n")).is_ok() {
            continue;
        }
        nft(&format!("create {chain}"), &format!("{base}{script}"))?;
    }
    Ok(())
}

pub fn add(ip: Ipv4Addr) -> Result<(), NatError> {
    nft(
        "add element",
        &format!("add element ip hearth sandboxes {{ {ip} }}\n"),
    )
    .map(|_| ())
}

/// Removes the address from the set; absent is fine.
pub fn remove(ip: Ipv4Addr) -> Result<(), NatError> {
    match nft(
        "delete element",
        &format!("delete element ip hearth sandboxes {{ {ip} }}\n"),
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.reason.contains("No such file") || e.reason.contains("does not exist") => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The addresses in the set now (every agent's on this host).
pub fn members() -> Result<Vec<Ipv4Addr>, NatError> {
    let out = nft("list set", "list set ip hearth sandboxes\n")?;
    Ok(parse_members(&out))
}

/// The addresses of `nft list set` output (`elements = { a, b, ... }`).
fn parse_members(listing: &str) -> Vec<Ipv4Addr> {
    let Some(start) = listing.find("elements = {") else {
        return Vec::new();
    };
    let rest = &listing[start + "elements = {".len()..];
    let body = rest.split('}').next().unwrap_or("");
    body.split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn set_listings_are_parsed_across_lines() {
        let l = "table ip hearth {\n\tset sandboxes {\n\t\ttype ipv4_addr\n\t\telements = { 10.1.0.2, 10.1.0.3,\n\t\t\t     10.2.0.9 }\n\t}\n}\n";
        let v: Vec<String> = super::parse_members(l)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(v, ["10.1.0.2", "10.1.0.3", "10.2.0.9"]);
        assert!(
            super::parse_members("table ip hearth { set sandboxes { type ipv4_addr } }").is_empty()
        );
    }
}
