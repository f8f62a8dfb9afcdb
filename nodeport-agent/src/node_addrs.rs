//! Which addresses of this node take nodePort traffic (NP_NODEADDR, NP_NODEADDR6), chosen
//! as a pure function of the interfaces' addresses, the Node object's addresses and the
//! flags. The same addresses are the SNAT sources of flows to them, so an address left out
//! here is neither served nor used as a source.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

pub use crate::family::usable_node_addr;
use crate::family::{Family, IpCidr};

/// `--exclude-interfaces` default: devices whose addresses are not addresses of the node
/// that clients use.
/// - `kube-ipvs0`: kube-proxy's IPVS mode binds every ClusterIP, external IP and
///   LoadBalancer IP there (kube-proxy's IPVS mode leaves it out of its own node addresses);
/// - `kube-dummy-if`: the same for kube-router's service proxy;
/// - `nodelocaldns`: NodeLocal DNSCache's listen addresses (169.254.20.10 and, in some
///   setups, the kube-dns ClusterIP);
/// - `cilium_*`: Cilium's host-side devices (the router address of the pod CIDR).
pub const DEFAULT_EXCLUDE_INTERFACES: &str = "kube-ipvs0,kube-dummy-if,nodelocaldns,cilium_*";

/// One address of one interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceAddr {
    pub interface: String,
    pub addr: IpAddr,
}

impl InterfaceAddr {
    pub fn new(interface: impl Into<String>, addr: IpAddr) -> Self {
        Self {
            interface: interface.into(),
            addr,
        }
    }
}

/// A list of interface name patterns, glob style: `*` matches any run of characters, `?`
/// one character, anything else itself. Written comma-separated; empty: no pattern.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfacePatterns(Vec<String>);

impl InterfacePatterns {
    /// Whether interface `name` matches one of the patterns.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for InterfacePatterns {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            // Linux interface names: at most 15 bytes, no '/', no whitespace
            // (net/core/dev.c, dev_valid_name). A pattern may be longer only by its
            // wildcards, which is not worth a rule: just refuse what can never match.
            if let Some(c) = p.chars().find(|c| *c == '/' || c.is_whitespace()) {
                return Err(format!(
                    "interface pattern {p:?}: {c:?} cannot appear in an interface name"
                ));
            }
            out.push(p.to_string());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for InterfacePatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Glob match of `name` against `pat` (`*`, `?`), iterative with one backtrack point.
fn glob(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Position after the last `*` in the pattern, and where in `name` it started matching.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p + 1, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and retry.
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// The rules of the choice (from the agent's flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddrRules {
    /// `--exclude-interfaces`: the addresses of matching interfaces are left out.
    pub exclude_interfaces: InterfacePatterns,
    /// `--nodeport-addresses`: when not empty, only addresses inside one of them.
    pub cidrs: Vec<IpCidr>,
    /// `--max-node-addresses`: the capacity of NP_NODEADDR and of NP_NODEADDR6, each.
    pub max_per_family: usize,
    /// `--interface`: the uplinks, whose addresses come right after the Node object's when
    /// not every address fits.
    pub uplinks: Vec<String>,
}

impl Default for NodeAddrRules {
    fn default() -> Self {
        Self {
            exclude_interfaces: DEFAULT_EXCLUDE_INTERFACES
                .parse()
                .expect("the default patterns parse"),
            cidrs: Vec::new(),
            max_per_family: nodeport_common::DEFAULT_MAX_NODE_ADDRS as usize,
            uplinks: Vec::new(),
        }
    }
}

/// What [`choose`] chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    /// The addresses that take nodePort traffic, both families.
    pub chosen: BTreeSet<IpAddr>,
    /// Addresses that qualify but did not fit in their family's map (sorted).
    pub left_out: Vec<IpAddr>,
}

/// The addresses of this node that take nodePort traffic:
/// - the interface addresses, except those of interfaces matching `exclude_interfaces`,
///   and the Node object's `InternalIP`/`ExternalIP` addresses (`node_object`);
/// - only [`usable_node_addr`] ones, and with `cidrs`, only those inside one;
/// - at most `max_per_family` of each family. When more qualify, the Node object's come
///   first, then the uplinks' (in `uplinks` order), then the other interfaces' (by name),
///   each in address order; the rest are `left_out`, never dropped silently.
pub fn choose(
    interfaces: &[InterfaceAddr],
    node_object: impl IntoIterator<Item = IpAddr>,
    rules: &NodeAddrRules,
) -> NodeAddrs {
    let qualifies = |a: IpAddr| {
        usable_node_addr(a) && (rules.cidrs.is_empty() || rules.cidrs.iter().any(|c| c.contains(a)))
    };
    // (rank, interface, address): 0 the Node object, 1 + i the i-th uplink, then the rest.
    let rest = rules.uplinks.len() + 1;
    let mut ranked: Vec<(usize, &str, IpAddr)> = node_object
        .into_iter()
        .map(|a| (0, "", a))
        .chain(
            interfaces
                .iter()
                .filter(|ia| !rules.exclude_interfaces.matches(&ia.interface))
                .map(|ia| {
                    let rank = rules
                        .uplinks
                        .iter()
                        .position(|u| *u == ia.interface)
                        .map_or(rest, |i| i + 1);
                    (rank, ia.interface.as_str(), ia.addr)
                }),
        )
        .filter(|(_, _, a)| qualifies(*a))
        .collect();
    ranked.sort();
    let mut out = NodeAddrs::default();
    let mut count = [0usize; 2];
    for (_, _, a) in ranked {
        if out.chosen.contains(&a) {
            continue;
        }
        let n = &mut count[usize::from(Family::of(a) == Family::V6)];
        if *n < rules.max_per_family {
            *n += 1;
            out.chosen.insert(a);
        } else {
            out.left_out.push(a);
        }
    }
    out.left_out.sort();
    out.left_out.dedup();
    out.left_out.retain(|a| !out.chosen.contains(a));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ia(interface: &str, addr: &str) -> InterfaceAddr {
        InterfaceAddr::new(interface, addr.parse().unwrap())
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn rules() -> NodeAddrRules {
        NodeAddrRules {
            uplinks: vec!["eth0".into()],
            ..NodeAddrRules::default()
        }
    }

    /// An IPVS node: kube-ipvs0 holds a ClusterIP and a LoadBalancer IP,
    /// nodelocaldns its link-local address and the kube-dns ClusterIP, cilium_host a pod
    /// CIDR router address; eth0 has IPv4, IPv6 global and link-local addresses.
    fn ipvs_node() -> Vec<InterfaceAddr> {
        vec![
            ia("eth0", "192.168.1.10"),
            ia("eth0", "2001:db8::10"),
            ia("eth0", "fe80::1"),
            ia("eth1", "169.254.3.3"),
            ia("eth1", "10.20.0.5"),
            ia("kube-ipvs0", "10.96.0.1"),
            ia("kube-ipvs0", "203.0.113.7"),
            ia("nodelocaldns", "169.254.20.10"),
            ia("nodelocaldns", "10.96.0.10"),
            ia("cilium_host", "10.0.0.1"),
        ]
    }

    #[test]
    fn default_rules_leave_out_service_devices_and_link_local() {
        let got = choose(&ipvs_node(), [], &rules());
        assert_eq!(
            got.chosen,
            ips(&["192.168.1.10", "2001:db8::10", "10.20.0.5"])
        );
        assert!(got.left_out.is_empty());
    }

    #[test]
    fn no_patterns_take_every_interface_but_never_link_local() {
        let r = NodeAddrRules {
            exclude_interfaces: "".parse().unwrap(),
            ..rules()
        };
        let got = choose(&ipvs_node(), [], &r);
        assert_eq!(
            got.chosen,
            ips(&[
                "192.168.1.10",
                "2001:db8::10",
                "10.20.0.5",
                "10.96.0.1",
                "203.0.113.7",
                "10.96.0.10",
                "10.0.0.1"
            ])
        );
    }

    #[test]
    fn patterns_are_globs() {
        let p: InterfacePatterns = "kube-ipvs0, cilium_*,veth?x,*dns".parse().unwrap();
        for yes in [
            "kube-ipvs0",
            "cilium_host",
            "cilium_",
            "vethax",
            "nodelocaldns",
            "dns",
        ] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in [
            "kube-ipvs00",
            "xcilium_host",
            "vethx",
            "vethabx",
            "dnsx",
            "eth0",
        ] {
            assert!(!p.matches(no), "{no}");
        }
        let e = "eth0,bad/name".parse::<InterfacePatterns>().unwrap_err();
        assert!(e.contains("\"bad/name\""), "{e}");
        assert!("".parse::<InterfacePatterns>().unwrap().is_empty());
        assert_eq!(p.to_string(), "kube-ipvs0,cilium_*,veth?x,*dns");
    }

    #[test]
    fn nodeport_addresses_narrow_the_choice_node_object_included() {
        let r = NodeAddrRules {
            cidrs: vec![
                "192.168.0.0/16".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..rules()
        };
        let node_object = [
            "192.168.1.11".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        ];
        let got = choose(&ipvs_node(), node_object, &r);
        assert_eq!(
            got.chosen,
            ips(&["192.168.1.10", "192.168.1.11", "2001:db8::10"])
        );
    }

    #[test]
    fn a_full_map_keeps_the_node_objects_and_uplinks_addresses_and_names_the_rest() {
        // Many addresses on a secondary interface sort before the uplink's: with room for
        // two IPv4 addresses, the Node object's and the uplink's are kept.
        let mut ifs: Vec<InterfaceAddr> = (1..=5)
            .map(|i| ia("aaa0", &format!("10.0.0.{i}")))
            .collect();
        ifs.push(ia("eth0", "192.168.1.10"));
        ifs.push(ia("eth0", "2001:db8::10"));
        let r = NodeAddrRules {
            max_per_family: 2,
            ..rules()
        };
        let got = choose(&ifs, ["172.16.0.9".parse().unwrap()], &r);
        assert_eq!(
            got.chosen,
            ips(&["172.16.0.9", "192.168.1.10", "2001:db8::10"])
        );
        assert_eq!(
            got.left_out,
            ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
                .into_iter()
                .collect::<Vec<_>>()
        );
        // Each family has its own map: IPv6 addresses do not take IPv4 room.
        let r = NodeAddrRules {
            max_per_family: 1,
            ..rules()
        };
        let got = choose(&ifs, [], &r);
        assert_eq!(got.chosen, ips(&["192.168.1.10", "2001:db8::10"]));
        assert_eq!(got.left_out.len(), 5);
    }

    #[test]
    fn an_address_on_two_interfaces_or_also_on_the_node_object_counts_once() {
        let ifs = [ia("eth0", "192.168.1.10"), ia("br0", "192.168.1.10")];
        let r = NodeAddrRules {
            max_per_family: 1,
            ..rules()
        };
        let got = choose(&ifs, ["192.168.1.10".parse().unwrap()], &r);
        assert_eq!(got.chosen, ips(&["192.168.1.10"]));
        assert!(got.left_out.is_empty());
    }
}
