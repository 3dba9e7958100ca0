//! Wire types of sandbox networking: the network a sandbox asks for, its egress
//! policy (`/v1/sandboxes/{id}/policy`), policy counters and ingress access.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `network` of a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// `none` gives the sandbox no network device at all.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Egress rules enforced on the sandbox's tap.
    #[serde(default)]
    pub egress: EgressPolicy,
}

/// Whether a sandbox has a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A tap, an address from the node's pool, NAT, and the egress policy.
    #[default]
    Default,
    /// No network device.
    None,
}

/// An egress policy as the user writes it. Rules are `CIDR[:PORTS[:PROTO]]`
/// (`10.0.0.0/8`, `192.168.1.5/32:443`, `0.0.0.0/0:53:udp`, `10.0.0.0/8:8000-8100`).
/// The most specific CIDR containing a destination decides; host, loopback and
/// link-local (metadata) addresses are denied unless a rule allows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// `allow` or `deny`: what happens to traffic no rule matches.
    #[serde(default = "default_allow")]
    pub default: String,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

fn default_allow() -> String {
    "allow".into()
}

impl Default for EgressPolicy {
    fn default() -> EgressPolicy {
        EgressPolicy {
            default: default_allow(),
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// A sandbox's network as reported by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxNetwork {
    /// The sandbox's IPv4 address.
    pub ip: String,
    pub mac: String,
    /// Host tap interface.
    pub tap: String,
    /// Token the ingress proxy requires (`X-Hearth-Token` header,
    /// `hearth_token` query parameter or cookie).
    pub ingress_token: String,
}

/// One counter of `GET /v1/sandboxes/{id}/policy/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyCounter {
    /// The rule (`allow 10.0.0.0/8:443`) or fixed counter (`spoofed source dropped`).
    pub label: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `GET /v1/sandboxes/{id}/policy/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyStats {
    pub sandbox: String,
    /// Counted by the eBPF program: new flows (TCP SYN, UDP datagrams, ICMP echo)
    /// per rule, plus the fixed counters.
    pub counters: Vec<PolicyCounter>,
}
