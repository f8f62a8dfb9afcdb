//! The benchmark topology: generator namespace -> node namespace -> sink namespace, joined
//! by two veth pairs, and a third pair from the sink back to the generator over which the
//! frames return to be rewritten and sent again (they circulate). Fixed addresses and
//! permanent neighbours, so nothing but the measured frames crosses the links.
//!
//! ```text
//!  gen: gen0 198.18.0.2 --- ngen 198.18.0.1   node   nsink 198.18.255.1 --- sink0 198.18.255.2: sink
//!       gret <------------------------------------------------------------------ sret
//!  sources 198.18.16.0/20, fd00:b:1::/64 (via gen)   backends 198.19.0.0/16, fd00:b:19::/64 (via sink)
//! ```
//! Every veth that frames are redirected into has NAPI on its receiving end, or the
//! frames would be dropped (measuring.md): gret and sink0 carry the generator's and the
//! sink's XDP programs, and ngen gets GRO, since the netfilter configurations attach no
//! XDP program there. IPv6 is on only on the node's two veths (its addresses are added
//! without duplicate detection; forwarding on means no router solicitations).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::netns::{run_in, Netns};

pub const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const NODE_GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const NODE_SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
pub const SINK_RET_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x01];
pub const GEN_RET_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x02];
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
pub const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 2);
/// The node's IPv6 addresses (towards the generator and the sink) and its neighbours'.
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 1);
pub const GEN_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 2);
pub const NODE_SINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0xff, 0, 0, 0, 0, 1);
pub const SINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0xff, 0, 0, 0, 0, 2);
/// First of the generator's source addresses (a /20 of them).
pub const SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
/// The generator's IPv6 sources: this /64, counting up in the last 32 bits.
pub const SRC_BASE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 1, 0, 0, 0, 0, 0);
pub const SRC_COUNT: u32 = 4096;
/// Backends live in this /16 (IPv6: this /64), behind the sink.
pub const BACKEND_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
pub const BACKEND_NET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0x19, 0, 0, 0, 0, 0);

/// Interface names inside the namespaces.
pub const GEN_IF: &str = "gen0";
pub const GEN_RET_IF: &str = "gret";
pub const NODE_GEN_IF: &str = "ngen";
pub const NODE_SINK_IF: &str = "nsink";
pub const SINK_IF: &str = "sink0";
pub const SINK_RET_IF: &str = "sret";

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
    /// ifindexes: gen0 in gen, nsink in node, sret in sink.
    pub gen_ifindex: u32,
    pub node_sink_ifindex: u32,
    pub sink_ret_ifindex: u32,
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
        sink.ip(&format!(
            "link add {SINK_RET_IF} type veth peer name {GEN_RET_IF} netns {}",
            gen.name()
        ));
        for (ns, ifname, m) in [
            (&gen, GEN_IF, GEN_MAC),
            (&gen, GEN_RET_IF, GEN_RET_MAC),
            (&node, NODE_GEN_IF, NODE_GEN_MAC),
            (&node, NODE_SINK_IF, NODE_SINK_MAC),
            (&sink, SINK_IF, SINK_MAC),
            (&sink, SINK_RET_IF, SINK_RET_MAC),
        ] {
            // IPv6 only where the node needs it: router solicitations and MLD reports
            // of the other ends would join the circulating frames.
            if ns.name() != node.name() {
                ns.sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1");
            }
            ns.ip(&format!("link set {ifname} address {}", mac(m)));
        }
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        for (ns, ifname) in [
            (&gen, GEN_IF),
            (&gen, GEN_RET_IF),
            (&node, NODE_GEN_IF),
            (&node, NODE_SINK_IF),
            (&sink, SINK_IF),
            (&sink, SINK_RET_IF),
        ] {
            ns.ip(&format!("link set {ifname} up"));
        }
        gen.ip(&format!("addr add {GEN_ADDR}/24 dev {GEN_IF}"));
        node.ip(&format!("addr add {NODE_ADDR}/24 dev {NODE_GEN_IF}"));
        node.ip(&format!("addr add {NODE_SINK_ADDR}/24 dev {NODE_SINK_IF}"));
        node.ip(&format!("addr add {NODE_ADDR6}/64 dev {NODE_GEN_IF} nodad"));
        node.ip(&format!(
            "addr add {NODE_SINK_ADDR6}/64 dev {NODE_SINK_IF} nodad"
        ));
        sink.ip(&format!("addr add {SINK_ADDR}/24 dev {SINK_IF}"));
        for (addr, m, ifname) in [
            (GEN_ADDR.to_string(), GEN_MAC, NODE_GEN_IF),
            (SINK_ADDR.to_string(), SINK_MAC, NODE_SINK_IF),
            (GEN_ADDR6.to_string(), GEN_MAC, NODE_GEN_IF),
            (SINK_ADDR6.to_string(), SINK_MAC, NODE_SINK_IF),
        ] {
            node.ip(&format!(
                "neigh replace {addr} lladdr {} dev {ifname} nud permanent",
                mac(m)
            ));
        }
        node.ip(&format!("route add {SRC_BASE}/20 via {GEN_ADDR}"));
        node.ip(&format!("route add {BACKEND_NET}/16 via {SINK_ADDR}"));
        node.ip(&format!("-6 route add {SRC_BASE6}/64 via {GEN_ADDR6}"));
        node.ip(&format!("-6 route add {BACKEND_NET6}/64 via {SINK_ADDR6}"));
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
        let sink_ret_ifindex = ifindex(&sink, SINK_RET_IF);
        Topology {
            gen,
            node,
            sink,
            gen_ifindex,
            node_sink_ifindex,
            sink_ret_ifindex,
        }
    }
}
