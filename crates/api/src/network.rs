//! Wire types of sandbox networking: the network a sandbox asks for, its egress
//! and ingress policy (`/v1/sandboxes/{id}/policy`), policy counters and ingress
//! access.

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
    /// Ingress rules enforced on the sandbox's tap (traffic to the sandbox).
    #[serde(default)]
    pub ingress: IngressPolicy,
}

/// How a VM's network device is connected to its tap. Recorded with a
/// sandbox's snapshots and sent with a migration, because the guest's device
/// state depends on it: a restore or an incoming VM must rebuild the same one.
///
/// `tap`: the tap is the device's direct backend (QEMU `vnet_hdr=on`), so the
/// guest negotiated checksum and segmentation offloads; its state loads only
/// onto a tap again (a hub offers no offloads and QEMU refuses the saved
/// feature set). `hub`: the device sits on QEMU's hub 0 and works with or
/// without a tap, at the cost of the offloads (templates and their warm pools,
/// whose QEMU starts before their tap exists).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicMode {
    #[default]
    Hub,
    Tap,
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

/// An ingress policy (traffic to the sandbox): rules are `CIDR[:PORTS[:PROTO]]`
/// matching the *source* address and the sandbox's destination port. Replies
/// to the sandbox's own allowed connections always pass. The node itself (the
/// ingress proxy) passes whatever `default` says, unless an explicit deny rule
/// of a CIDR containing its address matches it (then that deny wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressPolicy {
    /// `allow` or `deny`: what happens to new inbound flows no rule matches.
    #[serde(default = "default_allow")]
    pub default: String,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

impl Default for IngressPolicy {
    fn default() -> IngressPolicy {
        IngressPolicy {
            default: default_allow(),
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// `GET|PUT /v1/sandboxes/{id}/policy`: both directions. A PUT replaces the
/// whole policy atomically; a direction left out gets its defaults (allow, no
/// rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub egress: EgressPolicy,
    #[serde(default)]
    pub ingress: IngressPolicy,
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
    /// How to reach the sandbox's ports through the ingress that serves it
    /// (absent when the server you asked runs none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<SandboxIngress>,
}

/// The ingress a server runs (`ingress` of `GET /v1/info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IngressInfo {
    /// Domain of the host-name form: `<port>-<sandbox>.<domain>`.
    pub domain: String,
    /// Address the ingress listens on (`IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// Where one sandbox's ports are reached through the ingress. `{port}`
/// stands for the sandbox's TCP port in every template; send the sandbox's
/// `ingress_token` with the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxIngress {
    pub domain: String,
    /// `Host` header of the host-name form: `{port}-<sandbox>.<domain>`.
    pub host: String,
    /// Path prefix of the path form: `/sandboxes/<sandbox>/ports/{port}/`.
    pub path: String,
    /// Address the ingress listens on (`IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `http://<listen>/sandboxes/<sandbox>/ports/{port}/`: the path form's
    /// URL, when the listen address is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl SandboxIngress {
    /// The templates for sandbox `id` (its id as the serving API knows it)
    /// behind ingress `info`.
    pub fn new(id: &str, info: &IngressInfo) -> SandboxIngress {
        let path = format!("/sandboxes/{id}/ports/{{port}}/");
        SandboxIngress {
            domain: info.domain.clone(),
            host: format!("{{port}}-{id}.{}", info.domain),
            url: info.listen.as_ref().map(|l| format!("http://{l}{path}")),
            path,
            listen: info.listen.clone(),
        }
    }
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
    /// Counted by the eBPF program since the last policy change, per rule of
    /// either direction (labels start with `egress`/`ingress`): an allow rule
    /// counts every packet and byte of the flows it allowed, both directions
    /// (opening packet, replies, data); a deny rule the packets it dropped.
    /// Plus the fixed counters (spoofed, defaults, replies, packets dropped for
    /// having no flow, host addresses).
    pub counters: Vec<PolicyCounter>,
}
