//! The network of a migrating sandbox.
//!
//! The sandbox keeps its address, guest MAC, policy and ingress token. The
//! target builds the same link before its incoming VM starts: a tap for the
//! same address with the source tap's MAC (the guest's neighbour entry for
//! its gateway stays valid, so its traffic flows again as soon as it runs),
//! the /32 route, the policy program, the host map and NAT entries, and a VM
//! network device laid out as the source's (on the hub or on the tap).
//!
//! The address lease does not move: it stays in the control plane, in the
//! slice of the node the sandbox was started on, held by the sandbox id.
//! * The source removes its tap, route, program and NAT entry after a
//!   successful move but does not release the lease; it notes the id in
//!   `DATA_DIR/moved-leases.json`, which its start-up sync keeps (a restart
//!   does not free an address that runs elsewhere).
//! * The target records the address in its local IPAM (outside its pool,
//!   so its start-up sync does not claim it in its own slice) and the slice
//!   that holds it in `sandboxes/ID/lease-holder.json`; that file moves on
//!   with a further migration.
//! * Whichever node finally removes the sandbox releases the lease in that
//!   slice, once.

use std::path::Path;
use std::sync::Mutex;

use hearth_api::migration::{IncomingNet, IncomingOffer, LeaseHolder};

use crate::sandbox::{lock, write_durable, Entry};
use crate::{Agent, AgentError};

/// In a migrated sandbox's directory: the slice its address is leased from.
pub(crate) const HOLDER_FILE: &str = "lease-holder.json";
/// In the data dir: sandboxes that migrated away with an address leased
/// from this node's slice.
const MOVED_FILE: &str = "moved-leases.json";

static MOVED_LOCK: Mutex<()> = Mutex::new(());

/// The slice a migrated sandbox's address is leased from, if it came here by
/// a migration.
pub(crate) fn load_holder(dir: &Path) -> Option<LeaseHolder> {
    let bytes = std::fs::read(dir.join(HOLDER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn store_holder(dir: &Path, h: &LeaseHolder) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(h).map_err(std::io::Error::other)?;
    write_durable(&dir.join(HOLDER_FILE), &bytes)
}

/// Sandboxes that migrated away with an address of this node's slice.
pub(crate) fn moved_leases(data_dir: &Path) -> Vec<String> {
    std::fs::read(data_dir.join(MOVED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn note_moved(data_dir: &Path, id: &str) -> std::io::Result<()> {
    let _g = lock(&MOVED_LOCK);
    let mut ids = moved_leases(data_dir);
    if ids.iter().any(|i| i == id) {
        return Ok(());
    }
    ids.push(id.to_string());
    let bytes = serde_json::to_vec(&ids).map_err(std::io::Error::other)?;
    write_durable(&data_dir.join(MOVED_FILE), &bytes)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Agent {
    /// Source: what the target needs to build the sandbox's network (`None`
    /// for a sandbox without one).
    pub(crate) fn outgoing_net(&self, entry: &Entry) -> Result<Option<IncomingNet>, AgentError> {
        let rec = entry.snapshot();
        let nic = entry.nic.load(std::sync::atomic::Ordering::Relaxed);
        if rec.network.is_none() {
            if nic {
                // why: the target builds a VM without a network device for a
                // sandbox without a network, and the state of one with a device
                // (a fallback cold boot of a restore on the hub) would not load.
                return Err(AgentError::Conflict(format!(
                    "sandbox '{}' has no network but its VM has a network device (on QEMU's hub: its template restore failed and it booted cold with the template's device set); it cannot migrate; create it again to get a VM without one",
                    rec.id
                )));
            }
            return Ok(None);
        }
        if !nic {
            return Err(AgentError::Conflict(format!(
                "sandbox '{}' has a network but its VM has no network device; it cannot migrate",
                rec.id
            )));
        }
        let node = self.net().ok_or_else(|| {
            AgentError::Conflict(format!(
                "sandbox '{}' has a network but node {} runs without sandbox networking; it cannot migrate",
                rec.id, self.inner.cfg.node
            ))
        })?;
        let sn = node.get(&rec.id)?;
        let tap_mac = node.tap_mac(&rec.id)?;
        let lease_holder = load_holder(&entry.dir).or_else(|| {
            self.inner
                .cfg
                .leases
                .as_ref()
                .and_then(|a| a.holder())
                .map(|(node, instance)| LeaseHolder { node, instance })
        });
        Ok(Some(IncomingNet {
            policy: crate::network::policy_to_api(&sn.policy),
            tap_mac: mac_string(tap_mac),
            nic_mode: entry.nic_mode(),
            lease_holder,
        }))
    }

    /// Target: builds the network of an incoming sandbox in `dir` (see the
    /// module docs). Nothing is left behind on an error.
    pub(crate) async fn build_incoming_net(
        &self,
        offer: &IncomingOffer,
        dir: &Path,
    ) -> Result<Option<hearth_net::SandboxNet>, AgentError> {
        let sb = &offer.sandbox;
        let (api, net) = match (&sb.network, &offer.net) {
            (None, None) => return Ok(None),
            (Some(api), Some(net)) => (api, net),
            (Some(_), None) => {
                return Err(AgentError::InvalidArgument(format!(
                    "sandbox '{}' has a network but the offer does not describe it (a source of an older version); upgrade the source node",
                    sb.id
                )))
            }
            (None, Some(_)) => {
                return Err(AgentError::InvalidArgument(format!(
                    "the offer of sandbox '{}' describes a network the sandbox does not have",
                    sb.id
                )))
            }
        };
        let node = self.net().ok_or_else(|| {
            AgentError::Conflict(format!(
                "sandbox '{}' has a network and node {} runs without sandbox networking; migrate it to a node with networking",
                sb.id, self.inner.cfg.node
            ))
        })?;
        let bad = |what: &str| {
            AgentError::InvalidArgument(format!(
                "the offer of sandbox '{}' has an invalid {what}",
                sb.id
            ))
        };
        let ip: std::net::Ipv4Addr = api.ip.parse().map_err(|_| bad("address"))?;
        let tap_mac = hearth_net::parse_mac(&net.tap_mac).ok_or_else(|| bad("tap MAC"))?;
        let policy = crate::network::parse_policy(&net.policy)?;
        if hearth_net::mac_for(ip) != hearth_net::parse_mac(&api.mac).ok_or_else(|| bad("MAC"))? {
            return Err(bad("guest MAC (not the one of its address)"));
        }
        if let Some(h) = &net.lease_holder {
            store_holder(dir, h).map_err(|source| AgentError::Io {
                what: format!("write {}", dir.join(HOLDER_FILE).display()),
                source,
            })?;
        }
        let id = sb.id.clone();
        let n2 = node.clone();
        let built = tokio::task::spawn_blocking(move || n2.setup_moved(&id, ip, policy, tap_mac))
            .await
            .map_err(|e| AgentError::Config(format!("network setup panicked: {e}")))?;
        match built {
            Ok(sn) => Ok(Some(sn)),
            Err(e) => Err(AgentError::Conflict(format!(
                "node {} cannot give sandbox '{}' its address {ip}: {e}",
                self.inner.cfg.node, sb.id
            ))),
        }
    }

    /// Target: removes the network built for an incoming sandbox that was not
    /// committed (the lease stays where it is: the source still runs it).
    pub(crate) async fn drop_incoming_net(&self, offer: &IncomingOffer) {
        if offer.net.is_none() {
            return;
        }
        let Some(node) = self.net() else { return };
        let id = offer.sandbox.id.clone();
        let r = tokio::task::spawn_blocking(move || node.teardown(&id)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(sandbox = %offer.sandbox.id, "removing the network of an aborted incoming migration: {e}");
        }
    }

    /// Source, after the target took the sandbox over: removes the tap, route,
    /// program and NAT entry here and keeps the lease (see the module docs).
    pub(crate) async fn hand_off_net(&self, entry: &Entry) {
        let rec = entry.snapshot();
        if rec.network.is_none() {
            return;
        }
        if load_holder(&entry.dir).is_none() {
            if let Err(e) = note_moved(&self.inner.cfg.data_dir, &rec.id) {
                tracing::error!(sandbox = %rec.id, "cannot note the lease that moved away in {MOVED_FILE}; a restart of this agent would release it: {e}");
            }
        }
        let Some(node) = self.net() else { return };
        let id = rec.id.clone();
        match tokio::task::spawn_blocking(move || node.hand_off(&id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %rec.id, "removing the network of a sandbox that migrated away: {e}")
            }
            Err(e) => tracing::warn!(sandbox = %rec.id, "network hand-off panicked: {e}"),
        }
    }

    /// Releases the address of a removed sandbox that migrated here, in the
    /// slice that leases it; `false` when there is none (a local lease).
    pub(crate) async fn release_moved_address(&self, dir: &Path, id: &str) -> bool {
        let Some(h) = load_holder(dir) else {
            return false;
        };
        let Some(auth) = &self.inner.cfg.leases else {
            return true;
        };
        let r = tokio::time::timeout(
            crate::sandbox::RELEASE_WAIT,
            auth.release_held(id, &h.node, &h.instance),
        )
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(sandbox = id, node = %h.node, "releasing the address lease of a migrated sandbox: {e}; it stays leased in that node's slice until `hearth node rm` of that node")
            }
            Err(_) => {
                tracing::warn!(sandbox = id, node = %h.node, "releasing the address lease of a migrated sandbox: no answer; it stays leased in that node's slice")
            }
        }
        true
    }
}
