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

use crate::durable::{self, DirSync};
use crate::sandbox::{lock, Entry};
use crate::{Agent, AgentError};

/// In a migrated sandbox's directory: the slice its address is leased from.
pub(crate) const HOLDER_FILE: &str = "lease-holder.json";
/// In the data dir: sandboxes that migrated away with an address leased
/// from this node's slice.
const MOVED_FILE: &str = "moved-leases.json";

/// In a sandbox's directory on the source: its address lease moved away
/// with it (written before the commit is sent, removed only when the
/// migration is aborted), so no path that settles this copy releases it.
pub(crate) const MOVED_MARKER: &str = "lease-moved";

static MOVED_LOCK: Mutex<()> = Mutex::new(());

/// How the address of a sandbox that ends on this node is given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AddressRelease {
    /// It migrated away (or may have): the node that runs it releases it;
    /// only the local network is removed here.
    Keep,
    /// It migrated here: released in the slice that leases it.
    Held(LeaseHolder),
    /// Leased in this node's slice.
    Own,
}

/// The release decision for the sandbox in `dir`: the moved marker wins
/// over everything else.
pub(crate) fn release_decision(dir: &Path) -> AddressRelease {
    if dir.join(MOVED_MARKER).symlink_metadata().is_ok() {
        AddressRelease::Keep
    } else if let Some(h) = load_holder(dir) {
        AddressRelease::Held(h)
    } else {
        AddressRelease::Own
    }
}

/// Source, before the commit is sent: records durably that the address of
/// the networked sandbox in `dir` moves away (the marker in `dir`, and on
/// the node whose slice leases it, the id in `moved-leases.json` for the
/// start-up sync once `dir` is gone).
pub(crate) fn mark_lease_moved(
    data_dir: &Path,
    dir: &Path,
    id: &str,
    networked: bool,
) -> Result<(), String> {
    if !networked {
        return Ok(());
    }
    if load_holder(dir).is_none() {
        note_moved(data_dir, id).map_err(|e| {
            format!(
                "cannot note the lease of sandbox {id} in {}: {e}",
                data_dir.join(MOVED_FILE).display()
            )
        })?;
    }
    durable::write(
        &dir.join(MOVED_MARKER),
        b"",
        durable::MODE_DEFAULT,
        DirSync::Now,
    )
    .map_err(|e| format!("cannot write {}: {e}", dir.join(MOVED_MARKER).display()))
}

/// Source, when the migration is aborted (the sandbox runs here): its
/// address is released here again when it ends.
pub(crate) fn clear_lease_moved(data_dir: &Path, dir: &Path, id: &str) {
    // why: `mark_lease_moved` notes the id before it writes the marker; a
    // crash between the two leaves the id noted and no marker (review14 F5).
    forget_moved(data_dir, id);
    let marker = dir.join(MOVED_MARKER);
    if marker.symlink_metadata().is_err() {
        return;
    }
    if let Err(e) = std::fs::remove_file(&marker) {
        tracing::warn!(sandbox = id, "cannot remove {}: {e}", marker.display());
    }
}

/// Takes `id` off `moved-leases.json`: its address is this node's again (an
/// aborted move, or the sandbox migrated back home), so the start-up sync no
/// longer keeps its lease once the sandbox is gone.
pub(crate) fn forget_moved(data_dir: &Path, id: &str) {
    let _g = lock(&MOVED_LOCK);
    let mut ids = moved_leases(data_dir);
    let n = ids.len();
    ids.retain(|i| i != id);
    if ids.len() != n {
        let r = serde_json::to_vec(&ids)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                durable::write(
                    &data_dir.join(MOVED_FILE),
                    &b,
                    durable::MODE_DEFAULT,
                    DirSync::Now,
                )
            });
        if let Err(e) = r {
            tracing::warn!(sandbox = id, "cannot update {MOVED_FILE}: {e}");
        }
    }
}

/// The slice a migrated sandbox's address is leased from, if it came here by
/// a migration.
pub(crate) fn load_holder(dir: &Path) -> Option<LeaseHolder> {
    let bytes = std::fs::read(dir.join(HOLDER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn store_holder(dir: &Path, h: &LeaseHolder) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(h).map_err(std::io::Error::other)?;
    durable::write(
        &dir.join(HOLDER_FILE),
        &bytes,
        durable::MODE_DEFAULT,
        DirSync::Now,
    )
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
    durable::write(
        &data_dir.join(MOVED_FILE),
        &bytes,
        durable::MODE_DEFAULT,
        DirSync::Now,
    )
}

/// What the target knows of its own host, to check an offered address.
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    /// This node's name (`--node`).
    pub node: String,
    /// This node's address pool.
    pub pool: hearth_net::Cidr,
    /// The host's own IPv4 addresses (and broadcast addresses).
    pub addrs: Vec<std::net::Ipv4Addr>,
    /// The host's routes other than the default and sandbox taps' ones.
    pub routes: Vec<hearth_net::Cidr>,
}

impl HostFacts {
    fn read(node: &str, pool: hearth_net::Cidr) -> HostFacts {
        HostFacts {
            node: node.to_string(),
            pool,
            addrs: hearth_net::host_addresses(),
            routes: std::fs::read_to_string("/proc/net/route")
                .map(|t| parse_routes(&t))
                .unwrap_or_default(),
        }
    }
}

/// The non-default routes of `/proc/net/route`, except those of sandbox
/// taps (`hth*`: a /32 per sandbox, which the tap setup checks itself).
fn parse_routes(text: &str) -> Vec<hearth_net::Cidr> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| std::net::Ipv4Addr::from(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[0].starts_with("hth") {
                return None;
            }
            let (dest, mask) = (hex(f[1])?, hex(f[7])?);
            let len = u32::from(mask).count_ones() as u8;
            (len > 0).then(|| hearth_net::Cidr::new(dest, len))
        })
        .collect()
}

/// Target: may an offer route `ip` into a tap here? Before any control-plane
/// check: a private sandbox address, none of this host's, inside this
/// node's pool only when its lease is this node's; without a lease holder
/// (no control plane) only inside the source's pool and outside every
/// route of this host. `Err`: why not.
pub(crate) fn check_moved_address(
    ip: std::net::Ipv4Addr,
    holder: Option<&LeaseHolder>,
    source_pool: Option<&str>,
    host: &HostFacts,
) -> Result<(), String> {
    if !(hearth_net::CLUSTER_CIDR.contains(ip) || ip.is_private())
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_unspecified()
    {
        return Err(format!(
            "{ip} is not a sandbox address (it must lie in the cluster range {} or a private range)",
            hearth_net::CLUSTER_CIDR
        ));
    }
    if host.addrs.contains(&ip) {
        return Err(format!("{ip} is an address of this host"));
    }
    if host.pool.contains(ip) && holder.is_none_or(|h| h.node != host.node) {
        return Err(format!(
            "{ip} lies in this node's pool {} but is not leased from this node's slice",
            host.pool
        ));
    }
    if holder.is_none() {
        let pool: Option<hearth_net::Cidr> = source_pool.and_then(|p| p.parse().ok());
        if !pool.is_some_and(|p| p.contains(ip)) {
            return Err(format!(
                "without a control plane the address must lie in the source node's pool, and {ip} does not ({})",
                source_pool.unwrap_or("none given")
            ));
        }
        if let Some(r) = host.routes.iter().find(|r| r.contains(ip)) {
            return Err(format!("{ip} lies in {r}, a network this host routes"));
        }
    }
    Ok(())
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
            // why: a device without a network sits on QEMU's hub with nothing
            // behind it (a template's device set); the offer's machine layout
            // carries it and the target builds the same. One directly on a
            // tap cannot exist without a network, and could not be built there.
            if nic && entry.nic_mode() == crate::restore::NicMode::Tap {
                return Err(AgentError::Conflict(format!(
                    "sandbox '{}' has no network but its VM's network device is directly on a tap; it cannot migrate",
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
            policy_version: sn.policy_version,
            tap_mac: mac_string(tap_mac),
            nic_mode: entry.nic_mode(),
            lease_holder,
            source_pool: Some(node.pool().to_string()),
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
        self.check_offered_lease(&sb.id, ip, net, node.pool())
            .await?;
        if let Some(h) = &net.lease_holder {
            store_holder(dir, h).map_err(|source| AgentError::Io {
                what: format!("write {}", dir.join(HOLDER_FILE).display()),
                source,
            })?;
        }
        let id = sb.id.clone();
        let n2 = node.clone();
        let version = net.policy_version;
        let built =
            tokio::task::spawn_blocking(move || n2.setup_moved(&id, ip, policy, version, tap_mac))
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

    /// Target: refuses an offered address this node must not route (see
    /// [`check_moved_address`]) or, with a control plane, one the named slice
    /// does not lease to exactly this sandbox.
    async fn check_offered_lease(
        &self,
        id: &str,
        ip: std::net::Ipv4Addr,
        net: &IncomingNet,
        pool: hearth_net::Cidr,
    ) -> Result<(), AgentError> {
        let me = &self.inner.cfg.node;
        let refuse = |why: String| {
            AgentError::InvalidArgument(format!(
                "node {me} refuses the address {ip} of incoming sandbox '{id}': {why}"
            ))
        };
        let host = HostFacts::read(me, pool);
        check_moved_address(
            ip,
            net.lease_holder.as_ref(),
            net.source_pool.as_deref(),
            &host,
        )
        .map_err(&refuse)?;
        let Some(h) = &net.lease_holder else {
            return Ok(());
        };
        let Some(auth) = &self.inner.cfg.leases else {
            return Err(refuse(format!(
                "the offer says node {}'s slice leases it, and this node has no control plane to check that; start it with one",
                h.node
            )));
        };
        match auth.held_by(id, &h.node, &h.instance).await {
            Ok(Some(got)) if got == ip => Ok(()),
            Ok(Some(got)) => Err(refuse(format!(
                "the control plane leases {got} to it in node {}'s slice, not {ip}",
                h.node
            ))),
            Ok(None) => Err(refuse(format!(
                "the control plane has no lease for it in node {}'s slice (agent instance {})",
                h.node, h.instance
            ))),
            Err(e) => Err(AgentError::Conflict(format!(
                "node {me} cannot check the address lease of incoming sandbox '{id}': {e}; retry the migration"
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

    /// Gives the address of a sandbox that ended here back, as
    /// [`release_decision`] says (the local network is already removed).
    pub(crate) async fn release_lease(&self, dir: &Path, id: &str) {
        let h = match release_decision(dir) {
            AddressRelease::Keep => {
                tracing::info!(sandbox = id, "keeping the address lease: the sandbox migrated to another node, which releases it");
                return;
            }
            AddressRelease::Own => return self.release_address(id).await,
            AddressRelease::Held(h) => h,
        };
        let Some(auth) = &self.inner.cfg.leases else {
            return;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder() -> LeaseHolder {
        LeaseHolder {
            node: "node-a".into(),
            instance: "inst-a".into(),
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            node: "node-b".into(),
            pool: "10.88.2.0/24".parse().unwrap(),
            addrs: vec!["192.168.1.10".parse().unwrap()],
            routes: vec!["192.168.1.0/24".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> std::net::Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn an_offered_address_of_another_slice_or_pool_is_accepted() {
        let h = holder();
        assert_eq!(
            check_moved_address(ip("10.88.1.7"), Some(&h), None, &host()),
            Ok(())
        );
        assert_eq!(
            check_moved_address(ip("10.88.1.7"), None, Some("10.88.1.0/24"), &host()),
            Ok(())
        );
        // Back home: inside this node's pool, leased from this node's slice.
        let home = LeaseHolder {
            node: "node-b".into(),
            instance: "i".into(),
        };
        assert_eq!(
            check_moved_address(ip("10.88.2.7"), Some(&home), None, &host()),
            Ok(())
        );
    }

    #[test]
    fn an_offered_address_that_is_no_sandbox_address_is_refused() {
        let h = holder();
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "169.254.1.1",
            "8.8.8.8",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
        ] {
            let r = check_moved_address(ip(bad), Some(&h), None, &host());
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.contains("not a sandbox address")),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn an_offered_address_of_this_host_is_refused() {
        let r = check_moved_address(ip("192.168.1.10"), Some(&holder()), None, &host());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("address of this host")),
            "{r:?}"
        );
    }

    #[test]
    fn an_offered_address_of_this_nodes_pool_needs_this_nodes_lease() {
        let r = check_moved_address(ip("10.88.2.9"), Some(&holder()), None, &host());
        assert!(
            r.as_ref().is_err_and(|e| e.contains("this node's pool")),
            "{r:?}"
        );
        let r = check_moved_address(ip("10.88.2.9"), None, Some("10.88.0.0/16"), &host());
        assert!(
            r.as_ref().is_err_and(|e| e.contains("this node's pool")),
            "{r:?}"
        );
    }

    #[test]
    fn without_a_control_plane_the_address_must_be_in_the_source_pool_and_unrouted() {
        let r = check_moved_address(ip("10.88.3.9"), None, None, &host());
        assert!(
            r.as_ref().is_err_and(|e| e.contains("source node's pool")),
            "{r:?}"
        );
        let r = check_moved_address(ip("10.88.3.9"), None, Some("10.88.1.0/24"), &host());
        assert!(
            r.as_ref().is_err_and(|e| e.contains("source node's pool")),
            "{r:?}"
        );
        let r = check_moved_address(ip("192.168.1.20"), None, Some("192.168.1.0/24"), &host());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("network this host routes")),
            "{r:?}"
        );
    }

    #[test]
    fn routes_are_read_without_the_default_and_sandbox_taps() {
        let text =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
hthabc\t0701580A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        if cfg!(target_endian = "little") {
            assert_eq!(routes, vec!["192.168.1.0/24".parse().unwrap()]);
        }
    }

    #[test]
    fn an_address_is_released_in_its_own_slice_unless_it_came_or_moved() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(release_decision(t.path()), AddressRelease::Own);
        store_holder(t.path(), &holder()).unwrap();
        assert_eq!(release_decision(t.path()), AddressRelease::Held(holder()));
    }

    #[test]
    fn a_lease_marked_moved_is_kept_by_every_release_until_the_abort_clears_it() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("sandboxes/sb1");
        std::fs::create_dir_all(&dir).unwrap();
        mark_lease_moved(data.path(), &dir, "sb1", true).unwrap();
        assert_eq!(release_decision(&dir), AddressRelease::Keep);
        // The start-up sync keeps it once the directory is gone.
        assert_eq!(moved_leases(data.path()), vec!["sb1".to_string()]);
        clear_lease_moved(data.path(), &dir, "sb1");
        assert_eq!(release_decision(&dir), AddressRelease::Own);
        assert!(moved_leases(data.path()).is_empty());
    }

    #[test]
    fn a_sandbox_back_home_is_no_longer_kept_as_moved_away() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("sandboxes/sb3");
        std::fs::create_dir_all(&dir).unwrap();
        mark_lease_moved(data.path(), &dir, "sb3", true).unwrap();
        mark_lease_moved(data.path(), &dir, "other", true).unwrap();
        // The commit of its move back here.
        forget_moved(data.path(), "sb3");
        assert_eq!(moved_leases(data.path()), vec!["other".to_string()]);
    }

    #[test]
    fn a_middle_node_marks_the_directory_only_and_keeps_the_holders_lease() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("sandboxes/sb2");
        std::fs::create_dir_all(&dir).unwrap();
        store_holder(&dir, &holder()).unwrap();
        mark_lease_moved(data.path(), &dir, "sb2", true).unwrap();
        assert_eq!(release_decision(&dir), AddressRelease::Keep);
        assert!(moved_leases(data.path()).is_empty());
        clear_lease_moved(data.path(), &dir, "sb2");
        assert_eq!(release_decision(&dir), AddressRelease::Held(holder()));
    }

    #[test]
    fn a_sandbox_without_a_network_marks_nothing() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("sb3");
        std::fs::create_dir_all(&dir).unwrap();
        mark_lease_moved(data.path(), &dir, "sb3", false).unwrap();
        assert_eq!(release_decision(&dir), AddressRelease::Own);
        assert!(moved_leases(data.path()).is_empty());
    }
}
