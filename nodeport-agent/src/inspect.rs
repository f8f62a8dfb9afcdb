//! `nodeport-agent inspect`: what the pinned maps hold, for people (tables) and scripts
//! (`--json`), with no agent running. The views are built from plain map contents by pure
//! functions; `datapath::MapReader` does the reading, and the service names beside the
//! `svc_id`s come from the names the agent keeps in the pin directory ([`crate::names`]).

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use nodeport_common::{
    Backend, CtEntry, FlowKey, FrontendKey, Service, BE_F_LOCAL, CT_F_CLOSING, CT_F_SNAT,
    CT_F_SYN_ONLY, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_LOCAL,
};
use serde::Serialize;

use crate::family::{endpoint_name, Family, RawAddr};

fn proto(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

/// A frontend as `inspect` shows it: `*:30080/TCP` for a nodePort on every IPv4 address of
/// the node, `[*]:30080/TCP` on every IPv6 one, `192.0.2.1:80/TCP`, `[2001:db8::1]:80/TCP`.
pub fn frontend_name<A: RawAddr>(fe: &FrontendKey<A>) -> String {
    let addr = match (fe.addr.is_zero(), A::FAMILY) {
        (true, Family::V4) => format!("*:{}", u16::from_be(fe.port)),
        (true, Family::V6) => format!("[*]:{}", u16::from_be(fe.port)),
        (false, _) => endpoint_name(fe.addr, fe.port),
    };
    format!("{addr}/{}", proto(fe.proto))
}

/// The names of the `svc_id`s ([`crate::names::read`]); `None`: the pin directory has none
/// (an agent from before they were written).
pub type Names = Option<BTreeMap<u32, String>>;

/// The name of `svc_id`, e.g. `default/web:http/TCP` (`None`: not known).
fn service_name(names: &Names, svc_id: u32) -> Option<String> {
    names.as_ref()?.get(&svc_id).cloned()
}

/// A name for the tables: `?` when unknown.
fn or_unknown(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or("?")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub local: bool,
    /// Maglev slots this backend owns in the service's table.
    pub slots: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    pub frontend: String,
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    pub svc_id: u32,
    /// The service port, `namespace/name[:port]/protocol[/IPv6]`; `null` when the agent
    /// left no name for this id.
    pub service: Option<String>,
    pub policy: &'static str,
    pub affinity: bool,
    pub table_size: u32,
    pub backends: Vec<BackendView>,
}

/// Frontends of one family with their backends (NP_SVC with NP_BE, or NP_SVC6 with NP_BE6)
/// and service names; `slots(offset, len)` reads a service's table.
pub fn frontends<A: RawAddr>(
    services: &[(FrontendKey<A>, Service)],
    backends: &[(u32, Backend<A>)],
    names: &Names,
    mut slots: impl FnMut(u32, u32) -> Vec<u32>,
) -> Vec<FrontendView> {
    let by_id: BTreeMap<u32, &Backend<A>> = backends.iter().map(|(id, b)| (*id, b)).collect();
    let mut tables: BTreeMap<(u32, u32), BTreeMap<u32, u32>> = BTreeMap::new();
    let mut out: Vec<FrontendView> = services
        .iter()
        .map(|(fe, svc)| {
            let counts = tables
                .entry((svc.table_off, svc.table_size))
                .or_insert_with(|| {
                    let mut c = BTreeMap::new();
                    for id in slots(svc.table_off, svc.table_size) {
                        *c.entry(id).or_insert(0) += 1;
                    }
                    c
                });
            let backends = counts
                .iter()
                .map(|(id, n)| match by_id.get(id) {
                    Some(b) => BackendView {
                        id: *id,
                        address: endpoint_name(b.addr, b.port),
                        local: b.flags & BE_F_LOCAL != 0,
                        slots: *n,
                    },
                    None => BackendView {
                        id: *id,
                        address: "(missing)".into(),
                        local: false,
                        slots: *n,
                    },
                })
                .collect();
            FrontendView {
                frontend: frontend_name(fe),
                family: A::FAMILY.as_str(),
                svc_id: svc.svc_id,
                service: service_name(names, svc.svc_id),
                policy: if svc.flags & SVC_F_LOCAL != 0 {
                    "Local"
                } else {
                    "Cluster"
                },
                affinity: svc.flags & SVC_F_AFFINITY != 0,
                table_size: svc.table_size,
                backends,
            }
        })
        .collect();
    out.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    out
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// Source address towards the backend (the client's, or this node's when SNATed).
    pub via: String,
    pub backend_id: u32,
    pub svc_id: u32,
    /// The service port, as in [`FrontendView::service`].
    pub service: Option<String>,
    pub state: &'static str,
    /// Seconds since the flow's last packet.
    pub idle_s: u64,
}

/// Which conntrack entries to show.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// Frontend port (nodePort or LB port).
    pub port: Option<u16>,
    pub svc_id: Option<u32>,
    pub client: Option<IpAddr>,
}

/// Conntrack entries of one family (NP_CT or NP_CT6) matching `filter`, with their
/// service names; `now_ns` is CLOCK_MONOTONIC_COARSE.
pub fn flows<A: RawAddr>(
    entries: &[(FlowKey<A>, CtEntry<A>)],
    filter: &FlowFilter,
    names: &Names,
    now_ns: u64,
) -> Vec<FlowView> {
    let mut out: Vec<FlowView> = entries
        .iter()
        .filter(|(k, v)| {
            filter.port.is_none_or(|p| u16::from_be(k.dport) == p)
                && filter.svc_id.is_none_or(|s| v.svc_id == s)
                && filter.client.is_none_or(|c| k.saddr.to_ip() == c)
        })
        .map(|(k, v)| FlowView {
            protocol: proto(k.proto),
            client: endpoint_name(k.saddr, k.sport),
            frontend: endpoint_name(k.daddr, k.dport),
            backend: endpoint_name(v.backend_addr, v.backend_port),
            via: endpoint_name(v.nat_addr, v.nat_port),
            backend_id: v.backend_id,
            svc_id: v.svc_id,
            service: service_name(names, v.svc_id),
            state: if v.flags & CT_F_CLOSING != 0 {
                "closing"
            } else if v.flags & CT_F_SYN_ONLY != 0 {
                "syn"
            } else if v.flags & CT_F_SNAT != 0 {
                "snat"
            } else {
                "direct"
            },
            idle_s: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        })
        .collect();
    out.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    out
}

/// The frontends table.
pub fn frontends_table(views: &[FrontendView]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:>6} {:<32} {:<8} {:>6}  BACKENDS (id address slots)",
        "FRONTEND", "SVC", "SERVICE", "POLICY", "SLOTS"
    );
    for v in views {
        let bes: Vec<String> = v
            .backends
            .iter()
            .map(|b| {
                format!(
                    "#{} {}{} {}",
                    b.id,
                    b.address,
                    if b.local { " (local)" } else { "" },
                    b.slots
                )
            })
            .collect();
        let policy = if v.affinity {
            format!("{}+aff", v.policy)
        } else {
            v.policy.to_string()
        };
        let bes = if bes.is_empty() {
            "(none: traffic dropped)".to_string()
        } else {
            bes.join(", ")
        };
        let _ = writeln!(
            s,
            "{:<24} {:>6} {:<32} {:<8} {:>6}  {}",
            v.frontend,
            v.svc_id,
            or_unknown(&v.service),
            policy,
            v.table_size,
            bes
        );
    }
    s
}

/// The conntrack table.
pub fn flows_table(views: &[FlowView]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:<22} {:<22} {:<32} {:<22} {:<22} {:<8} {:>6}",
        "PROTO", "CLIENT", "FRONTEND", "SERVICE", "BACKEND", "VIA", "STATE", "IDLE"
    );
    for v in views {
        let _ = writeln!(
            s,
            "{:<5} {:<22} {:<22} {:<32} {:<22} {:<22} {:<8} {:>5}s",
            v.protocol,
            v.client,
            v.frontend,
            or_unknown(&v.service),
            v.backend,
            v.via,
            v.state,
            v.idle_s
        );
    }
    s
}

/// The counters table.
pub fn counters_table(counters: &[(&str, u64)]) -> String {
    let mut s = String::new();
    for (name, v) in counters {
        let _ = writeln!(s, "{name:<24} {v}");
    }
    s
}

/// An interface the datapath is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceView {
    pub interface: String,
    /// `xdp+tc` (XDP in the driver, TC for what it leaves to the stack) or `tc` (TC alone).
    pub path: &'static str,
    /// How TC is attached: `tcx` links or `cls_bpf` filters (kernels before 6.6).
    pub tc: &'static str,
}

/// The interfaces and paths that the pinned link names (`<if>-xdp`, `<if>-tc-in`,
/// `<if>-tc-out`) show.
pub fn interfaces(link_names: &[String]) -> Vec<InterfaceView> {
    // Interface -> (XDP link, cls_bpf filters).
    let mut by_if: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for name in link_names {
        if let Some(i) = name.strip_suffix("-xdp") {
            by_if.entry(i).or_default().0 = true;
        } else if let Some(i) = name.strip_suffix("-tc-legacy") {
            by_if.entry(i).or_default().1 = true;
        } else if let Some(i) = ["-tc-in", "-tc-out"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
        {
            by_if.entry(i).or_default();
        }
    }
    by_if
        .into_iter()
        .map(|(i, (xdp, legacy))| InterfaceView {
            interface: crate::datapath::iface_of_pin(i),
            path: if xdp { "xdp+tc" } else { "tc" },
            tc: if legacy { "cls_bpf" } else { "tcx" },
        })
        .collect()
}

/// The interfaces table.
pub fn interfaces_table(views: &[InterfaceView]) -> String {
    let mut s = format!("{:<16} {:<8} TC\n", "INTERFACE", "PATH");
    for v in views {
        let _ = writeln!(s, "{:<16} {:<8} {}", v.interface, v.path, v.tc);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_from_link_pins() {
        let names: Vec<String> = [
            "eth0-xdp",
            "eth0-tc-in",
            "eth0-tc-out",
            "veth9-tc-in",
            "veth9-tc-out",
            "lan0-tc-legacy",
            "lan0-clsact",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let v = interfaces(&names);
        assert_eq!(
            v.iter()
                .map(|v| (v.interface.as_str(), v.path, v.tc))
                .collect::<Vec<_>>(),
            [
                ("eth0", "xdp+tc", "tcx"),
                ("lan0", "tc", "cls_bpf"),
                ("veth9", "tc", "tcx")
            ]
        );
        assert!(interfaces_table(&v).contains("veth9            tc       tcx"));
    }

    fn raw(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn frontends_show_backends_and_their_slots() {
        let fe = FrontendKey {
            addr: 0,
            port: 30080u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        };
        let svc = Service {
            table_off: 10,
            table_size: 5,
            svc_id: 7,
            ..Default::default()
        };
        let bes = vec![
            (
                1,
                Backend {
                    addr: raw([198, 19, 1, 10]),
                    port: 80u16.to_be(),
                    flags: BE_F_LOCAL,
                    pad: 0,
                },
            ),
            (
                2,
                Backend {
                    addr: raw([198, 19, 2, 10]),
                    port: 80u16.to_be(),
                    flags: 0,
                    pad: 0,
                },
            ),
        ];
        let views = frontends(&[(fe, svc)], &bes, &None, |off, len| {
            assert_eq!((off, len), (10, 5));
            vec![1, 2, 1, 1, 2]
        });
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].frontend, "*:30080/TCP");
        assert_eq!(
            views[0].backends[0],
            BackendView {
                id: 1,
                address: "198.19.1.10:80".into(),
                local: true,
                slots: 3
            }
        );
        assert_eq!(views[0].backends[1].slots, 2);
        assert!(frontends_table(&views).contains("#2 198.19.2.10:80 2"));
    }

    #[test]
    fn ipv6_frontends_backends_and_flows_in_standard_notation() {
        use nodeport_common::{Backend6, CtEntry6, FlowKey6, FrontendKey6};

        use crate::family::addr6_raw;
        let a6 = |s: &str| addr6_raw(s.parse().unwrap());
        let np = FrontendKey6 {
            addr: [0; 4],
            port: 30080u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        };
        let lb = FrontendKey6 {
            addr: a6("2001:db8::80"),
            ..np
        };
        let svc = Service {
            table_off: 0,
            table_size: 2,
            svc_id: 9,
            flags: SVC_F_LOCAL,
            ..Default::default()
        };
        let bes = vec![(
            4,
            Backend6 {
                addr: a6("fd00::4"),
                port: 8080u16.to_be(),
                flags: BE_F_LOCAL,
                pad: 0,
            },
        )];
        let views = frontends(&[(np, svc), (lb, svc)], &bes, &None, |_, _| vec![4, 4]);
        let names: Vec<&str> = views.iter().map(|v| v.frontend.as_str()).collect();
        assert_eq!(names, ["[*]:30080/TCP", "[2001:db8::80]:30080/TCP"]);
        assert_eq!(views[0].family, "IPv6");
        assert_eq!(views[0].backends[0].address, "[fd00::4]:8080");
        assert_eq!(views[0].policy, "Local");

        let key = FlowKey6::new(
            a6("2001:db8:c::1"),
            a6("2001:db8::80"),
            40000u16.to_be(),
            30080u16.to_be(),
            PROTO_TCP,
        );
        let ct = CtEntry6 {
            svc_id: 9,
            backend_id: 4,
            backend_addr: a6("fd00::4"),
            backend_port: 8080u16.to_be(),
            nat_addr: a6("2001:db8:c::1"),
            nat_port: 40000u16.to_be(),
            ..Default::default()
        };
        let filter = FlowFilter {
            client: Some("2001:db8:c::1".parse().unwrap()),
            ..Default::default()
        };
        let v = flows(&[(key, ct)], &filter, &None, 0);
        assert_eq!(v.len(), 1);
        assert_eq!(
            (
                v[0].client.as_str(),
                v[0].frontend.as_str(),
                v[0].backend.as_str()
            ),
            (
                "[2001:db8:c::1]:40000",
                "[2001:db8::80]:30080",
                "[fd00::4]:8080"
            )
        );
        let other = FlowFilter {
            client: Some("198.18.0.10".parse().unwrap()),
            ..Default::default()
        };
        assert!(flows(&[(key, ct)], &other, &None, 0).is_empty());
    }

    #[test]
    fn flows_filter_by_port_service_and_client() {
        let key = |c: [u8; 4], port: u16| {
            FlowKey::new(
                raw(c),
                raw([198, 18, 0, 11]),
                40000u16.to_be(),
                port.to_be(),
                PROTO_TCP,
            )
        };
        let ct = |svc: u32| CtEntry {
            svc_id: svc,
            flags: CT_F_SNAT,
            last_seen_ns: 1_000_000_000,
            ..Default::default()
        };
        let entries = vec![
            (key([198, 18, 0, 10], 30080), ct(1)),
            (key([198, 18, 0, 20], 30081), ct(2)),
        ];
        assert_eq!(
            flows(&entries, &FlowFilter::default(), &None, 5_000_000_000).len(),
            2
        );
        let by_port = flows(
            &entries,
            &FlowFilter {
                port: Some(30081),
                ..Default::default()
            },
            &None,
            0,
        );
        assert_eq!(by_port.len(), 1);
        assert_eq!(by_port[0].client, "198.18.0.20:40000");
        let by_client = flows(
            &entries,
            &FlowFilter {
                client: Some(IpAddr::from([198, 18, 0, 10])),
                ..Default::default()
            },
            &None,
            3_000_000_000,
        );
        assert_eq!(
            (by_client.len(), by_client[0].idle_s, by_client[0].state),
            (1, 2, "snat")
        );
        assert_eq!(
            flows(
                &entries,
                &FlowFilter {
                    svc_id: Some(2),
                    ..Default::default()
                },
                &None,
                0
            )
            .len(),
            1
        );
    }

    #[test]
    fn tables_name_the_service_beside_its_id_and_say_when_they_cannot() {
        let fe = FrontendKey {
            addr: 0,
            port: 30080u16.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        };
        let svc = |svc_id| Service {
            table_off: 0,
            table_size: 1,
            svc_id,
            ..Default::default()
        };
        let be = vec![(
            1,
            Backend {
                addr: raw([198, 19, 1, 10]),
                port: 80u16.to_be(),
                flags: 0,
                pad: 0,
            },
        )];
        let lb = FrontendKey {
            addr: raw([192, 0, 2, 1]),
            port: 80u16.to_be(),
            ..fe
        };
        let names: Names = Some(BTreeMap::from([(3, "default/sample-nodeport/TCP".into())]));
        let views = frontends(&[(fe, svc(3)), (lb, svc(4))], &be, &names, |_, _| vec![1]);
        assert_eq!(
            views[0].service.as_deref(),
            Some("default/sample-nodeport/TCP")
        );
        assert_eq!(
            views[1].service.as_deref(),
            None,
            "svc_id 4 has no name (a port programmed by an older agent)"
        );
        let table = frontends_table(&views);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains(" SVC SERVICE "), "{table}");
        assert!(
            lines[1].starts_with("*:30080/TCP")
                && lines[1].contains("     3 default/sample-nodeport/TCP "),
            "{table}"
        );
        assert!(lines[2].contains("     4 ?  "), "{table}");
        // No names directory at all: every service is `?`, the ids still show.
        let bare = frontends_table(&frontends(&[(fe, svc(3))], &be, &None, |_, _| vec![1]));
        assert!(
            bare.lines().nth(1).unwrap().contains("     3 ?  "),
            "{bare}"
        );

        let key = FlowKey::new(
            raw([198, 18, 0, 10]),
            raw([198, 18, 0, 11]),
            40000u16.to_be(),
            30080u16.to_be(),
            PROTO_TCP,
        );
        let ct = CtEntry {
            svc_id: 3,
            backend_addr: raw([198, 19, 1, 10]),
            backend_port: 80u16.to_be(),
            ..Default::default()
        };
        let v = flows(&[(key, ct)], &FlowFilter::default(), &names, 0);
        assert_eq!(v[0].service.as_deref(), Some("default/sample-nodeport/TCP"));
        let table = flows_table(&v);
        assert!(
            table.lines().next().unwrap().contains(" SERVICE "),
            "{table}"
        );
        assert!(
            table
                .contains("198.18.0.11:30080      default/sample-nodeport/TCP      198.19.1.10:80"),
            "{table}"
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json[0]["service"], "default/sample-nodeport/TCP");
        assert_eq!(json[0]["svc_id"], 3);
    }
}
