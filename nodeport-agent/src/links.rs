//! Interfaces come and go: which configured interfaces have the datapath attached, what to
//! do when one vanishes or comes back under another index (deleted and recreated, driver
//! reloaded), and which address of theirs is the SNAT source. The pod network's tunnel
//! devices (flannel.1, ...) are tracked beside them: found by their driver, attached (TC
//! only) when they appear, forgotten when they go, never a condition of readiness. The
//! decisions live here and are unit tested; the kernel side is [`LinkOps`], implemented by
//! the datapath.

use std::net::IpAddr;

use nodeport_common::Ip6;

use crate::{
    datapath::{ifindex_of, Attached, Datapath, XdpAttachMode},
    error::Result,
    family::{usable_node_addr, RawAddr},
};

/// What [`Links::poll`] needs from the kernel.
pub trait LinkOps {
    /// The index of `iface` now; `None` when there is no such interface.
    fn ifindex(&self, iface: &str) -> Option<u32>;
    /// Attach the programs to `iface` (a tunnel device: TC alone).
    fn attach(&mut self, iface: &str, tunnel: bool) -> Result<Attached>;
    /// Detach whatever is left of the programs on `iface`, with its pins.
    fn detach(&mut self, iface: &str);
}

/// The datapath with the `--xdp-mode` it attaches with.
pub struct DatapathLinks<'a> {
    pub dp: &'a mut Datapath,
    pub mode: XdpAttachMode,
}

impl LinkOps for DatapathLinks<'_> {
    fn ifindex(&self, iface: &str) -> Option<u32> {
        ifindex_of(iface)
    }
    fn attach(&mut self, iface: &str, tunnel: bool) -> Result<Attached> {
        // A tunnel device has no native XDP (and XDP could not redirect into it: no
        // ndo_xdp_xmit); its decapsulated packets meet TC ingress.
        let mode = if tunnel { XdpAttachMode::Tc } else { self.mode };
        self.dp.attach(iface, mode)
    }
    fn detach(&mut self, iface: &str) {
        self.dp.detach(iface);
    }
}

/// A transition of one configured interface, reported once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The interface is gone; what was left of the attachment was removed. A tunnel is
    /// then forgotten (found again if it comes back).
    Vanished {
        iface: String,
        ifindex: u32,
        tunnel: bool,
    },
    /// The interface exists under a new index (recreated, driver reloaded); the old
    /// attachment was removed.
    Recreated { iface: String, old: u32, new: u32 },
    /// Attached again after [`Event::Vanished`] or [`Event::Recreated`], or a tunnel
    /// device attached for the first time.
    Attached {
        iface: String,
        how: Attached,
        tunnel: bool,
    },
    /// Attaching failed; reported again only when the error changes. Retried every poll.
    AttachFailed { iface: String, error: String },
}

#[derive(Clone, Debug, Default)]
struct IfState {
    /// The index the programs are attached at; `None` while unattached.
    attached: Option<u32>,
    /// The last attach error reported.
    failing: Option<String>,
    /// A tunnel device found by [`Links::add_tunnels`], not a configured interface.
    tunnel: bool,
}

/// Drivers (as ethtool names them) of the tunnel devices that overlay pod networks use:
/// flannel's `flannel.1`, Calico's `vxlan.calico`, Antrea's `antrea-gw0` peers, ...
pub const TUNNEL_DRIVERS: &[&str] = &["vxlan", "geneve"];

/// Whether a device with `driver` is a pod network tunnel ([`TUNNEL_DRIVERS`]).
pub fn is_tunnel_driver(driver: Option<&str>) -> bool {
    driver.is_some_and(|d| TUNNEL_DRIVERS.contains(&d))
}

/// The configured interfaces and their attachment state.
#[derive(Clone, Debug)]
pub struct Links {
    ifaces: Vec<(String, IfState)>,
}

impl Links {
    /// `configured` (the `--interface` list), none attached yet.
    pub fn new(configured: &[String]) -> Self {
        Self {
            ifaces: configured
                .iter()
                .map(|i| (i.clone(), IfState::default()))
                .collect(),
        }
    }

    /// Records the attachment made at start.
    pub fn set_attached(&mut self, iface: &str, ifindex: u32) {
        if let Some((_, st)) = self.ifaces.iter_mut().find(|(n, _)| n == iface) {
            st.attached = Some(ifindex);
            st.failing = None;
        }
    }

    /// Every configured interface has the programs attached (tunnels do not count).
    pub fn all_attached(&self) -> bool {
        self.ifaces
            .iter()
            .all(|(_, st)| st.tunnel || st.attached.is_some())
    }

    /// The configured interfaces without the programs.
    pub fn unattached(&self) -> Vec<&str> {
        self.ifaces
            .iter()
            .filter(|(_, st)| !st.tunnel && st.attached.is_none())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Tracks the tunnel devices in `found` that are neither tracked nor configured
    /// interfaces: the next [`Links::poll`] attaches them.
    pub fn add_tunnels(&mut self, found: &[String]) {
        for t in found {
            if !self.ifaces.iter().any(|(n, _)| n == t) {
                self.ifaces.push((
                    t.clone(),
                    IfState {
                        tunnel: true,
                        ..IfState::default()
                    },
                ));
            }
        }
    }

    /// The tunnel source of each family for NP_CONFIG (`tun_*`): the first attached
    /// tunnel (in the order found) with a usable address of that family, as (ifindex,
    /// address), (0, zero) when none has. `addrs` are (interface, address) pairs as the
    /// kernel lists them.
    pub fn tunnel_sources(&self, addrs: &[(String, IpAddr)]) -> ((u32, u32), (u32, Ip6)) {
        fn first<A: RawAddr>(links: &Links, addrs: &[(String, IpAddr)]) -> (u32, A) {
            links
                .ifaces
                .iter()
                .filter(|(_, st)| st.tunnel)
                .find_map(|(n, st)| {
                    let a: A = snat_source(std::slice::from_ref(n), addrs);
                    (!a.is_zero()).then_some((st.attached?, a))
                })
                .unwrap_or_default()
        }
        (first(self, addrs), first(self, addrs))
    }

    /// Compares every configured interface's index with the one it was attached at:
    /// detaches from one that vanished or was recreated, attaches to one that is (back)
    /// there. Returns the transitions.
    pub fn poll(&mut self, ops: &mut impl LinkOps) -> Vec<Event> {
        let mut events = Vec::new();
        for (iface, st) in &mut self.ifaces {
            let now = ops.ifindex(iface);
            match (st.attached, now) {
                (Some(old), Some(new)) if old == new => continue,
                (Some(old), None) => {
                    ops.detach(iface);
                    st.attached = None;
                    events.push(Event::Vanished {
                        iface: iface.clone(),
                        ifindex: old,
                        tunnel: st.tunnel,
                    });
                    continue;
                }
                (Some(old), Some(new)) => {
                    ops.detach(iface);
                    st.attached = None;
                    events.push(Event::Recreated {
                        iface: iface.clone(),
                        old,
                        new,
                    });
                }
                (None, None) => continue,
                (None, Some(_)) => {}
            }
            match ops.attach(iface, st.tunnel) {
                Ok(how) => {
                    st.attached = Some(how.ifindex);
                    st.failing = None;
                    events.push(Event::Attached {
                        iface: iface.clone(),
                        how,
                        tunnel: st.tunnel,
                    });
                }
                Err(e) => {
                    // Nothing half-attached stays behind to be mistaken for an attachment.
                    ops.detach(iface);
                    let error = e.to_string();
                    if st.failing.as_ref() != Some(&error) {
                        st.failing = Some(error.clone());
                        events.push(Event::AttachFailed {
                            iface: iface.clone(),
                            error,
                        });
                    }
                }
            }
        }
        // A tunnel that went is forgotten; discovery finds it again if it comes back.
        self.ifaces
            .retain(|(_, st)| !st.tunnel || st.attached.is_some() || st.failing.is_some());
        events
    }
}

/// The SNAT source of family `A` for frontends that are not node addresses (LoadBalancer
/// and external IPs): the first usable address of that family on the first configured
/// interface (in `--interface` order) that has one; zero (no SNAT source) when none has.
/// `addrs` are (interface, address) pairs as the kernel lists them.
pub fn snat_source<A: RawAddr>(configured: &[String], addrs: &[(String, IpAddr)]) -> A {
    configured
        .iter()
        .find_map(|iface| {
            addrs
                .iter()
                .filter(|(n, ip)| n == iface && usable_node_addr(*ip))
                .find_map(|(_, ip)| A::from_ip(*ip))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::{
        datapath::PathMode,
        error::Error,
        family::{addr6_raw, addr_raw},
    };
    use nodeport_common::Ip6;

    /// Interfaces as the kernel would have them, and what is attached where.
    #[derive(Default)]
    struct Kernel {
        ifaces: BTreeMap<String, u32>,
        attached: BTreeMap<String, u32>,
        refuse: Option<String>,
    }

    impl LinkOps for Kernel {
        fn ifindex(&self, iface: &str) -> Option<u32> {
            self.ifaces.get(iface).copied()
        }
        fn attach(&mut self, iface: &str, _tunnel: bool) -> Result<Attached> {
            if let Some(e) = &self.refuse {
                return Err(Error::Kernel(e.clone()));
            }
            let ifindex = self.ifaces[iface];
            assert!(
                self.attached.insert(iface.into(), ifindex).is_none(),
                "attached twice"
            );
            Ok(Attached {
                ifindex,
                path: PathMode::Tc,
                why: "test",
                tc: "tcx".into(),
                replaced: false,
                stale_pins: false,
            })
        }
        fn detach(&mut self, iface: &str) {
            self.attached.remove(iface);
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn kinds(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Vanished { iface, ifindex, .. } => format!("vanished {iface} {ifindex}"),
                Event::Recreated { iface, old, new } => format!("recreated {iface} {old}->{new}"),
                Event::Attached { iface, how, .. } => format!("attached {iface} {}", how.ifindex),
                Event::AttachFailed { iface, .. } => format!("failed {iface}"),
            })
            .collect()
    }

    fn started(k: &mut Kernel) -> Links {
        k.ifaces = BTreeMap::from([("eth0".into(), 2), ("eth1".into(), 3)]);
        let mut links = Links::new(&names(&["eth0", "eth1"]));
        for i in ["eth0", "eth1"] {
            let how = k.attach(i, false).unwrap();
            links.set_attached(i, how.ifindex);
        }
        links
    }

    #[test]
    fn nothing_changes_nothing_happens() {
        let mut k = Kernel::default();
        let mut links = started(&mut k);
        assert!(links.poll(&mut k).is_empty());
        assert!(links.all_attached());
    }

    #[test]
    fn a_vanished_interface_is_detached_once_and_reattached_when_back() {
        let mut k = Kernel::default();
        let mut links = started(&mut k);
        k.ifaces.remove("eth1");
        assert_eq!(kinds(&links.poll(&mut k)), ["vanished eth1 3"]);
        assert!(!links.all_attached());
        assert_eq!(links.unattached(), ["eth1"]);
        assert!(!k.attached.contains_key("eth1"));
        // Still gone: nothing more to say.
        assert!(links.poll(&mut k).is_empty());
        k.ifaces.insert("eth1".into(), 9);
        assert_eq!(kinds(&links.poll(&mut k)), ["attached eth1 9"]);
        assert!(links.all_attached());
        assert_eq!(k.attached["eth1"], 9);
        assert!(links.poll(&mut k).is_empty());
    }

    #[test]
    fn an_interface_recreated_between_polls_is_moved_to_its_new_index() {
        let mut k = Kernel::default();
        let mut links = started(&mut k);
        k.ifaces.insert("eth0".into(), 12);
        assert_eq!(
            kinds(&links.poll(&mut k)),
            ["recreated eth0 2->12", "attached eth0 12"]
        );
        assert_eq!(k.attached["eth0"], 12);
        assert!(links.all_attached());
    }

    #[test]
    fn a_failing_attach_is_reported_once_per_error_and_retried() {
        let mut k = Kernel::default();
        let mut links = started(&mut k);
        k.ifaces.insert("eth0".into(), 12);
        k.refuse = Some("EBUSY".into());
        assert_eq!(
            kinds(&links.poll(&mut k)),
            ["recreated eth0 2->12", "failed eth0"]
        );
        assert!(links.poll(&mut k).is_empty(), "the same error again");
        k.refuse = Some("ENOMEM".into());
        assert_eq!(kinds(&links.poll(&mut k)), ["failed eth0"]);
        assert!(!links.all_attached());
        k.refuse = None;
        assert_eq!(kinds(&links.poll(&mut k)), ["attached eth0 12"]);
        assert!(links.all_attached());
    }

    #[test]
    fn tunnels_attach_when_found_leave_readiness_alone_and_are_forgotten_when_gone() {
        let mut k = Kernel::default();
        let mut links = started(&mut k);
        assert!(is_tunnel_driver(Some("vxlan")) && is_tunnel_driver(Some("geneve")));
        assert!(!is_tunnel_driver(Some("veth")) && !is_tunnel_driver(None));
        let a = |n: &str, ip: &str| (n.to_string(), ip.parse::<IpAddr>().unwrap());
        let addrs = vec![
            a("eth0", "198.18.0.11"),
            a("flannel.1", "198.19.1.0"),
            a("flannel.1", "fd00:19:1::"),
        ];
        // Not attached yet: no tunnel source.
        links.add_tunnels(&names(&["flannel.1"]));
        assert_eq!(links.tunnel_sources(&addrs), ((0, 0), (0, [0; 4])));
        k.ifaces.insert("flannel.1".into(), 7);
        assert_eq!(kinds(&links.poll(&mut k)), ["attached flannel.1 7"]);
        assert_eq!(k.attached["flannel.1"], 7);
        // Found again: tracked once.
        links.add_tunnels(&names(&["flannel.1", "eth0"]));
        assert!(links.poll(&mut k).is_empty());
        assert_eq!(
            links.tunnel_sources(&addrs),
            (
                (7, addr_raw(Ipv4Addr::new(198, 19, 1, 0))),
                (7, addr6_raw("fd00:19:1::".parse().unwrap()))
            )
        );
        // Gone: detached and forgotten, readiness untouched.
        k.ifaces.remove("flannel.1");
        assert_eq!(kinds(&links.poll(&mut k)), ["vanished flannel.1 7"]);
        assert!(links.all_attached());
        assert!(links.unattached().is_empty());
        assert!(!k.attached.contains_key("flannel.1"));
        assert_eq!(links.tunnel_sources(&addrs), ((0, 0), (0, [0; 4])));
        // Back under a new index: found and attached anew.
        k.ifaces.insert("flannel.1".into(), 8);
        links.add_tunnels(&names(&["flannel.1"]));
        assert_eq!(kinds(&links.poll(&mut k)), ["attached flannel.1 8"]);
    }

    #[test]
    fn snat_source_follows_the_first_configured_interface_with_an_address() {
        let conf = names(&["eth0", "eth1"]);
        let a = |n: &str, ip: &str| (n.to_string(), ip.parse::<IpAddr>().unwrap());
        // No address yet: no source.
        assert_eq!(snat_source::<u32>(&conf, &[]), 0);
        assert_eq!(
            snat_source::<u32>(&conf, &[a("lo", "127.0.0.1"), a("eth9", "198.18.0.9")]),
            0
        );
        // Only eth1 has one, then eth0 gets one: eth0's wins.
        let mut addrs = vec![a("eth1", "198.18.1.11"), a("eth1", "fd00:18::11")];
        assert_eq!(
            snat_source::<u32>(&conf, &addrs),
            addr_raw(Ipv4Addr::new(198, 18, 1, 11))
        );
        addrs.push(a("eth0", "fe80::1"));
        addrs.push(a("eth0", "198.18.0.11"));
        assert_eq!(
            snat_source::<u32>(&conf, &addrs),
            addr_raw(Ipv4Addr::new(198, 18, 0, 11))
        );
        // IPv6: eth0 has only a link-local address, so eth1's global one.
        let six: Ip6 = snat_source(&conf, &addrs);
        assert_eq!(six, addr6_raw("fd00:18::11".parse().unwrap()));
    }
}
