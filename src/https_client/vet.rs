//! Where an outbound client may connect: the SSRF guard of Web Push, whose endpoints come from
//! browsers (anyone). A host name passes `push_hosts` by its *name*; this checks what it
//! resolves to. crier resolves the name itself, keeps only the addresses the policy allows and
//! hands exactly those to the connector (no second lookup that a rebinding DNS server could
//! answer differently), and refuses IP literals and ports the same way.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::dns::Name;
use ipnet::IpNet;

/// What a vetted client may reach.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    /// Addresses allowed although not public (a private push service; tests).
    pub allow: Vec<IpNet>,
    /// Ports an endpoint may name (Web Push services use 443).
    pub ports: Vec<u16>,
    /// Fixed answers for names, like /etc/hosts, vetted like any other answer.
    pub fixed: HashMap<String, Vec<IpAddr>>,
}

impl AddressPolicy {
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }

    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// What can be told from the URL alone: its port, and its host when that is an address.
    pub fn check_uri(&self, uri: &http::Uri) -> Result<(), String> {
        let port = uri.port_u16().unwrap_or(443);
        if !self.allows_port(port) {
            return Err(format!(
                "port {port} is not allowed (webpush.push_ports: {:?})",
                self.ports
            ));
        }
        let host = uri.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            if !self.allows_ip(ip) {
                return Err(format!(
                    "{ip} is not a public address (webpush.allow_addresses to allow it)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `ip` is a global unicast address: not loopback, private, link-local (cloud
/// metadata at 169.254.169.254 is), unique-local, shared (CGNAT), unspecified, broadcast,
/// multicast, documentation or reserved; IPv4 inside IPv6 (mapped, NAT64) counts as its IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96, NAT64: the IPv4 address is the last 32 bits.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated) fec0::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)
                || s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible ::a.b.c.d (deprecated)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || (a == 100 && (b & 0xc0) == 64) // shared address space 100.64/10 (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18/15
        || a >= 240) // reserved
}

/// The resolver of crier's outbound clients. With a policy it resolves and vets; without one
/// (webhooks, whose URLs the operator wrote) it only resolves.
#[derive(Clone, Default)]
pub struct Resolver {
    policy: Option<Arc<ArcSwap<AddressPolicy>>>,
}

impl Resolver {
    pub fn vetting(policy: Arc<ArcSwap<AddressPolicy>>) -> Resolver {
        Resolver {
            policy: Some(policy),
        }
    }
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.as_ref().map(|p| p.load_full());
        Box::pin(async move {
            let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
            let fixed = policy.as_ref().and_then(|p| p.fixed.get(&host).cloned());
            let found: Vec<SocketAddr> = match fixed {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                // The port is the connector's to set; getaddrinfo runs on a blocking thread.
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let Some(policy) = policy else {
                return Ok(found.into_iter());
            };
            let (allowed, refused): (Vec<_>, Vec<_>) =
                found.into_iter().partition(|a| policy.allows_ip(a.ip()));
            if allowed.is_empty() {
                let list: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{host} resolves only to addresses that are not public ({}); \
                         webpush.allow_addresses to allow them",
                        list.join(", ")
                    ),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_not() {
        for s in [
            "8.8.8.8",
            "142.250.74.106",
            "2a00:1450:4001:82b::200a",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(s.parse().expect("ip")), "{s} is public");
        }
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(s.parse().expect("ip")), "{s} is not public");
        }
    }

    #[test]
    fn literals_and_ports() {
        let p = AddressPolicy {
            allow: vec!["10.9.0.0/16".parse().expect("net")],
            ports: vec![443],
            fixed: HashMap::new(),
        };
        let check = |u: &str| p.check_uri(&u.parse().expect("uri"));
        assert!(check("https://fcm.googleapis.com/x").is_ok());
        assert!(check("https://8.8.8.8/x").is_ok());
        assert!(check("https://10.9.1.1/x").is_ok(), "allowed explicitly");
        assert!(check("https://127.0.0.1/x").is_err());
        assert!(check("https://[::1]/x").is_err());
        assert!(check("https://[::ffff:7f00:1]/x").is_err());
        assert!(check("https://fcm.googleapis.com:8443/x").is_err());
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_allowed_answers() {
        use tower_service::Service;
        let mut fixed = HashMap::new();
        fixed.insert(
            "push.test".to_string(),
            vec!["127.0.0.1".parse().expect("ip")],
        );
        fixed.insert(
            "mixed.test".to_string(),
            vec![
                "10.0.0.1".parse().expect("ip"),
                "8.8.4.4".parse().expect("ip"),
            ],
        );
        let policy = Arc::new(ArcSwap::from_pointee(AddressPolicy {
            allow: vec![],
            ports: vec![443],
            fixed,
        }));
        let mut r = Resolver::vetting(policy.clone());
        let name = |s: &str| s.parse::<Name>().expect("name");
        let e = r.call(name("push.test")).await.expect_err("loopback only");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        let got: Vec<_> = r
            .call(name("mixed.test"))
            .await
            .expect("one public")
            .collect();
        assert_eq!(got, vec!["8.8.4.4:0".parse::<SocketAddr>().expect("addr")]);
        // A reload that allows loopback applies to the next lookup.
        let mut allowing = (**policy.load()).clone();
        allowing.allow.push("127.0.0.0/8".parse().expect("net"));
        policy.store(Arc::new(allowing));
        let got: Vec<_> = r.call(name("push.test")).await.expect("allowed").collect();
        assert_eq!(got.len(), 1);
        // localhost through the system resolver is refused too.
        let mut strict = Resolver::vetting(Arc::new(ArcSwap::from_pointee(AddressPolicy {
            allow: vec![],
            ports: vec![443],
            fixed: HashMap::new(),
        })));
        assert!(strict.call(name("localhost")).await.is_err());
    }
}
