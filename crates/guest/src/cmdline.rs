//! The `hearth.*` parameters the host passes on the kernel command line.

/// What the host asked for at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// `hearth.hostname=`; the hostname the sandbox gets.
    pub hostname: Option<String>,
    /// `hearth.probe=1`: print the probe marker and power off (accelerator probe).
    pub probe: bool,
    /// `hearth.root=`: the block device holding the root filesystem.
    pub root: String,
    /// `hearth.rootfstype=`: its filesystem type.
    pub rootfstype: String,
    /// `hearth.ip=`, `hearth.gw=`, `hearth.dns=a,b`: the sandbox's network.
    pub net: Option<NetParams>,
}

/// The guest's IPv4 setup: a /32 on eth0 and a default route via an on-link gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    pub ip: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// Default root device: the first virtio-blk disk.
pub const DEFAULT_ROOT: &str = "/dev/vda";

impl BootParams {
    /// Parses the contents of `/proc/cmdline`; unknown words are ignored.
    pub fn parse(cmdline: &str) -> BootParams {
        let mut params = BootParams {
            hostname: None,
            probe: false,
            root: DEFAULT_ROOT.to_string(),
            rootfstype: "ext4".to_string(),
            net: None,
        };
        let (mut ip, mut gw, mut dns) = (None, None, Vec::new());
        for word in cmdline.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "hearth.hostname" if !value.is_empty() => params.hostname = Some(value.to_string()),
                "hearth.probe" => params.probe = value != "0",
                "hearth.root" if !value.is_empty() => params.root = value.to_string(),
                "hearth.rootfstype" if !value.is_empty() => params.rootfstype = value.to_string(),
                "hearth.ip" => ip = value.parse().ok(),
                "hearth.gw" => gw = value.parse().ok(),
                "hearth.dns" => dns = value.split(',').filter_map(|d| d.parse().ok()).collect(),
                _ => {}
            }
        }
        if let (Some(ip), Some(gateway)) = (ip, gw) {
            params.net = Some(NetParams { ip, gateway, dns });
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_cmdline_is_understood() {
        let p = BootParams::parse(
            "console=ttyS0 quiet reboot=t panic=-1 hearth.hostname=web-1 hearth.probe=1\n",
        );
        assert_eq!(p.hostname.as_deref(), Some("web-1"));
        assert!(p.probe);
        assert_eq!(p.root, "/dev/vda");
        assert_eq!(p.rootfstype, "ext4");
    }

    #[test]
    fn missing_parameters_take_defaults() {
        let p = BootParams::parse("console=ttyS0 hearth.probe=0 hearth.hostname=");
        assert_eq!(p.hostname, None);
        assert!(!p.probe);
    }

    #[test]
    fn network_parameters_are_understood() {
        let p = BootParams::parse(
            "hearth.ip=10.88.0.2 hearth.gw=169.254.1.1 hearth.dns=1.1.1.1,9.9.9.9",
        );
        let n = p.net.unwrap();
        assert_eq!(n.ip.to_string(), "10.88.0.2");
        assert_eq!(n.gateway.to_string(), "169.254.1.1");
        assert_eq!(n.dns.len(), 2);
        assert_eq!(BootParams::parse("hearth.ip=10.88.0.2").net, None);
    }

    #[test]
    fn root_device_can_be_overridden() {
        let p = BootParams::parse("hearth.root=/dev/vdb hearth.rootfstype=erofs");
        assert_eq!(p.root, "/dev/vdb");
        assert_eq!(p.rootfstype, "erofs");
    }
}
