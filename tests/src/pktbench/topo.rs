//! The benchmark topology: generator namespace -> node namespace -> sink namespace, joined
//! by two veth pairs, with fixed addresses and permanent neighbours so nothing but the
//! measured packets crosses the links.
//!
//! ```text
//!  gen: gen0 198.18.0.2 --- ngen 198.18.0.1  node  nsink 198.18.255.1 --- sink0 198.18.255.2: sink
//!  sources 198.18.16.0/20 (via gen)              backends 198.19.0.0/16 (via sink)
//! ```
//! The sink's XDP program gives sink0 NAPI, so frames the node redirects or transmits into
//! nsink are received (measuring.md); ngen gets GRO for the same reason, since the
//! netfilter configurations attach no XDP program on it.

use std::net::Ipv4Addr;

use crate::netns::{run_in, Netns};

pub const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const NODE_GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const NODE_SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
pub const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 2);
/// Destination of the generator's IPv6 frames (no address is configured: IPv6 is off).
pub const NODE_ADDR6: &str = "fd00:b::1";
/// First of the generator's source addresses (a /20 of them).
pub const SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
pub const SRC_COUNT: u32 = 4096;
/// Backends live in this /16, behind the sink.
pub const BACKEND_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);

/// Interface names inside the namespaces.
pub const GEN_IF: &str = "gen0";
pub const NODE_GEN_IF: &str = "ngen";
pub const NODE_SINK_IF: &str = "nsink";
pub const SINK_IF: &str = "sink0";

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The three namespaces; dropping it deletes them (and with them the veths).
pub struct Topology {
    pub gen: Netns,
    pub node: Netns,
    pub sink: Netns,
    /// ifindexes: gen0 in gen, nsink in node.
    pub gen_ifindex: u32,
    pub node_sink_ifindex: u32,
}

impl Topology {
    /// Builds it under names `np-<run_id>-b{g,n,s}`.
    pub fn new(run_id: &str) -> Topology {
        let gen = Netns::new(&format!("np-{run_id}-bg"));
        let node = Netns::new(&format!("np-{run_id}-bn"));
        let sink = Netns::new(&format!("np-{run_id}-bs"));
        node.ip(&format!(
            "link add {NODE_GEN_IF} type veth peer name {GEN_IF} netns {}",
            gen.name()
        ));
        node.ip(&format!(
            "link add {NODE_SINK_IF} type veth peer name {SINK_IF} netns {}",
            sink.name()
        ));
        // No IPv6 on the links: router solicitations and MLD reports would be counted
        // with the measured frames. (IPv6 frames of the generator are measured alone.)
        for (ns, ifname, m) in [
            (&gen, GEN_IF, GEN_MAC),
            (&node, NODE_GEN_IF, NODE_GEN_MAC),
            (&node, NODE_SINK_IF, NODE_SINK_MAC),
            (&sink, SINK_IF, SINK_MAC),
        ] {
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1");
            ns.ip(&format!("link set {ifname} address {}", mac(m)));
            ns.ip(&format!("link set {ifname} up"));
        }
        gen.ip(&format!("addr add {GEN_ADDR}/24 dev {GEN_IF}"));
        node.ip(&format!("addr add {NODE_ADDR}/24 dev {NODE_GEN_IF}"));
        node.ip(&format!("addr add {NODE_SINK_ADDR}/24 dev {NODE_SINK_IF}"));
        sink.ip(&format!("addr add {SINK_ADDR}/24 dev {SINK_IF}"));
        node.ip(&format!(
            "neigh replace {GEN_ADDR} lladdr {} dev {NODE_GEN_IF} nud permanent",
            mac(GEN_MAC)
        ));
        node.ip(&format!(
            "neigh replace {SINK_ADDR} lladdr {} dev {NODE_SINK_IF} nud permanent",
            mac(SINK_MAC)
        ));
        node.ip(&format!("route add {SRC_BASE}/20 via {GEN_ADDR}"));
        node.ip(&format!("route add {BACKEND_NET}/16 via {SINK_ADDR}"));
        node.sysctl("net.ipv4.conf.all.forwarding", "1");
        node.sysctl("net.ipv4.conf.all.rp_filter", "0");
        node.sysctl("net.ipv4.conf.default.rp_filter", "0");
        for ifname in [NODE_GEN_IF, NODE_SINK_IF] {
            node.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0");
        }
        node.ethtool_k(NODE_GEN_IF, &["gro", "on"]);
        let ifindex = |ns: &Netns, name: &str| {
            let name = name.to_string();
            run_in(ns, move || {
                nix::net::if_::if_nametoindex(name.as_str())
                    .unwrap_or_else(|e| panic!("ifindex of {name}: {e}"))
            })
        };
        let gen_ifindex = ifindex(&gen, GEN_IF);
        let node_sink_ifindex = ifindex(&node, NODE_SINK_IF);
        Topology {
            gen,
            node,
            sink,
            gen_ifindex,
            node_sink_ifindex,
        }
    }
}
