//! The two-node cluster of test-network.md, built in network namespaces: a `lan` bridge with
//! a client and the nodes, pods behind each node in the routed (Calico-like) or bridged
//! (bridge-CNI/flannel-like) shape, pod CIDRs routed node-to-node over the lan.
//!
//! ```text
//!  client 198.18.0.10 ─┐  lan: bridge br0 in namespace np-<id>-lan, 198.18.0.0/24
//!  node1  198.18.0.11 ─┤    node1 pods (routed):  pa1 198.19.1.10, pa2 198.19.1.11
//!  node2  198.18.0.12 ─┘    node2 pods (bridged): pb1 198.19.2.10 on cni0 198.19.2.1/24
//! ```
//! The cluster is dual-stack: every address above has an IPv6 twin in fd00::/8.
//! ```text
//!  client fd00:18::10 ─┐  lan fd00:18::/64
//!  node1  fd00:18::11 ─┤    node1 pods (routed):  pa1 fd00:19:1::a, pa2 fd00:19:1::b,
//!  node2  fd00:18::12 ─┘                          default via fe80::1 (the host veth's own)
//!                           node2 pods (bridged): pb1 fd00:19:2::a on cni0 fd00:19:2::1/64
//! ```
//! A pod's IPv6 address is its node's IPv6 pod prefix plus the last octet of its IPv4
//! address (198.19.1.10 -> fd00:19:1::a) unless the spec says otherwise. As for IPv4, the
//! client has routes only to the lan prefix, never to pod prefixes. Duplicate address
//! detection is off in every namespace of the cluster, so addresses work at once.
//!
//! Every node's lan interface is `lan0`; every pod's is `eth0`. Namespaces are
//! `np-<id>-lan`, `np-<id>-client`, `np-<id>-<node>`, `np-<id>-<pod>`.
//!
//! `NP_PODNET=vxlan` ([`PodNet::Vxlan`]) carries pod traffic between nodes in flannel's
//! default VXLAN overlay instead of routing pod CIDRs over the lan (see [`PodNet`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::netns::{require_tool, run_id, run_in, sh, Child, Netns, RunLease, TempDir};

/// The gateway address routed pods use (Calico's choice); the node answers ARP for it by
/// proxy ARP on the pod's host-side veth.
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of routed pods: a link-local address that the pod's host-side veth
/// holds itself, so the node answers neighbour solicitations for it without proxy NDP.
pub const ROUTED_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Port the echo servers listen on in every pod (TCP and UDP); the Service's targetPort.
pub const ECHO_PORT: u16 = 80;

/// An address family, to pick the IPv4 or the IPv6 address of a node, pod or client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The Kubernetes spelling (`spec.ipFamilies`, EndpointSlice `addressType`).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// `a` when `family` is IPv4, else `b`.
fn pick(family: IpFamily, a: Ipv4Addr, b: Ipv6Addr) -> IpAddr {
    match family {
        IpFamily::V4 => a.into(),
        IpFamily::V6 => b.into(),
    }
}

/// `net` plus `n` (an IPv6 host in a prefix).
fn ip6_plus(net: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net) + n)
}

/// The IPv6 twin of pod address `ip` in the IPv6 pod prefix `net6`: the prefix plus the
/// last octet.
fn pod_ip6(net6: Ipv6Addr, ip: Ipv4Addr) -> Ipv6Addr {
    ip6_plus(net6, u128::from(ip.octets()[3]))
}

/// How a node connects its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodShape {
    /// One veth per pod, pod side `eth0` with a /32 and a default route via
    /// [`ROUTED_GATEWAY`] (onlink); host side has proxy ARP and a /32 route to the pod.
    /// IPv6: a /128 on `eth0`, default via [`ROUTED_GATEWAY6`], which the host side holds;
    /// the host has a /128 route to the pod.
    Routed,
    /// Pod veths on a `cni0` bridge holding the first address of the pod CIDR (of each
    /// family), which is the pods' default gateway.
    Bridged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Short name (at most 11 chars: the host-side veth is `veth<name>`).
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node name, also the Kubernetes node name (at most 8 chars).
    pub name: String,
    /// The node's address on the lan.
    pub ip: Ipv4Addr,
    /// The node's IPv6 address on the lan.
    pub ip6: Ipv6Addr,
    /// Pod CIDR network address and prefix length, e.g. 198.19.1.0/24.
    pub pod_cidr: (Ipv4Addr, u8),
    /// IPv6 pod CIDR, e.g. fd00:19:1::/64.
    pub pod_cidr6: (Ipv6Addr, u8),
    pub shape: PodShape,
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    /// The `cni0` gateway of a bridged node: the first address of the pod CIDR.
    pub fn bridge_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr.0) + 1)
    }

    /// The IPv6 twin of pod address `ip` on this node: the IPv6 pod prefix plus the last
    /// octet (198.19.1.10 -> fd00:19:1::a).
    pub fn pod_ip6_for(&self, ip: Ipv4Addr) -> Ipv6Addr {
        pod_ip6(self.pod_cidr6.0, ip)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// What the lan's veths are like.
    pub lan: LanKind,
    /// How pod traffic crosses from node to node.
    pub podnet: PodNet,
    pub client_ip: Ipv4Addr,
    pub client_ip6: Ipv6Addr,
    /// Prefix length of the lan (198.18.0.0/24).
    pub lan_prefix: u8,
    /// Prefix length of the IPv6 lan (fd00:18::/64).
    pub lan_prefix6: u8,
    pub nodes: Vec<NodeSpec>,
}

/// The lan's links (test-network.md, "Uplinks").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LanKind {
    /// Like a physical wire: tx checksum offload off on both ends, and GRO and an XDP
    /// program on the bridge-side ends, so frames sent back with XDP_TX arrive.
    Wire,
    /// Veths as kind, k3d and lab VMs have them: tx offload on (senders hand over
    /// CHECKSUM_PARTIAL packets), GRO off and no program on the bridge ports (frames sent
    /// back with XDP_TX would be dropped).
    DefaultVeth,
}

impl LanKind {
    /// `NP_LAN=veth` selects [`LanKind::DefaultVeth`] for every standard cluster (the test
    /// suite's second pass); anything else, or unset, [`LanKind::Wire`].
    pub fn from_env() -> LanKind {
        match std::env::var("NP_LAN").as_deref() {
            Ok("veth") => LanKind::DefaultVeth,
            _ => LanKind::Wire,
        }
    }
}

/// The whole pod network (every node's pod CIDR lies in it): what ip-masq and the
/// underlay filter of [`PodNet::Vxlan`] tell apart.
pub const POD_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// The IPv6 pod network.
pub const POD_NETWORK6: (Ipv6Addr, u8) = (ula(0x19, 0, 0), 32);
/// flannel's VXLAN device, network identifier and UDP port.
pub const VXLAN_DEV: &str = "flannel.1";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
/// What VXLAN over IPv4 adds to a frame (outer Ethernet is not counted: outer IPv4 20,
/// UDP 8, VXLAN 8, inner Ethernet 14): flannel.1's MTU is the uplink's minus this.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The MTU of the lan's veths.
pub const LAN_MTU: u32 = 1500;

/// How pod traffic crosses from node to node (test-network.md, "Pod networks").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNet {
    /// Pod CIDRs routed node-to-node over the lan (flannel host-gw, Calico without
    /// encapsulation): each node has a route to every other node's pod CIDR via that
    /// node's lan address.
    Routed,
    /// flannel's default VXLAN backend: a [`VXLAN_DEV`] device on every node (VNI 1, UDP
    /// port 8472, learning off, MTU [`LAN_MTU`] - [`VXLAN_OVERHEAD`]) holding the node's
    /// pod CIDR's network address (`198.19.1.0/32`, `fd00:19:1::/128`: IPv6 rides the
    /// same device over the IPv4 underlay), static neighbour and FDB entries for every
    /// other node's device MAC -> that node's lan address, and routes `<cidr> via
    /// <cidr network address> dev flannel.1 onlink`. Pods get the tunnel's MTU, as
    /// flannel's CNI gives them. ip-masq as flannel installs it (nftables, table
    /// `np_masq`): pod traffic leaving the pod network is masqueraded. The lan's bridge
    /// drops (and counts, table `np_underlay`) every frame with a pod address, as a
    /// cloud network that knows only node addresses does: pod traffic between nodes must
    /// travel in the tunnel.
    Vxlan,
}

impl PodNet {
    /// `NP_PODNET=vxlan` selects [`PodNet::Vxlan`] for every standard cluster; anything
    /// else, or unset, [`PodNet::Routed`].
    pub fn from_env() -> PodNet {
        match std::env::var("NP_PODNET").as_deref() {
            Ok("vxlan") => PodNet::Vxlan,
            _ => PodNet::Routed,
        }
    }

    /// The MTU of pod interfaces (and of `cni0`).
    pub fn pod_mtu(self) -> u32 {
        match self {
            PodNet::Routed => LAN_MTU,
            PodNet::Vxlan => LAN_MTU - VXLAN_OVERHEAD,
        }
    }
}

/// Counters of a node's [`VXLAN_DEV`] ([`Cluster::tunnel_counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelCounters {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// The MAC address of node number `i`'s [`VXLAN_DEV`] (flannel derives one at random and
/// publishes it in the Node's annotations; fixed here so that peers can be written at once).
fn vxlan_mac(i: usize) -> String {
    format!("0e:6e:70:00:00:{:02x}", i + 1)
}

/// fd00:<a>:<b>::<h>
const fn ula(a: u16, b: u16, h: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, h)
}

impl ClusterSpec {
    /// The cluster of test-network.md: node1 routed with pa1, pa2; node2 bridged with pb1.
    pub fn standard() -> ClusterSpec {
        ClusterSpec {
            lan: LanKind::from_env(),
            podnet: PodNet::from_env(),
            client_ip: Ipv4Addr::new(198, 18, 0, 10),
            client_ip6: ula(0x18, 0, 0x10),
            lan_prefix: 24,
            lan_prefix6: 64,
            nodes: vec![
                NodeSpec {
                    name: "node1".into(),
                    ip: Ipv4Addr::new(198, 18, 0, 11),
                    ip6: ula(0x18, 0, 0x11),
                    pod_cidr: (Ipv4Addr::new(198, 19, 1, 0), 24),
                    pod_cidr6: (ula(0x19, 1, 0), 64),
                    shape: PodShape::Routed,
                    pods: vec![
                        PodSpec {
                            name: "pa1".into(),
                            ip: Ipv4Addr::new(198, 19, 1, 10),
                            ip6: ula(0x19, 1, 0xa),
                        },
                        PodSpec {
                            name: "pa2".into(),
                            ip: Ipv4Addr::new(198, 19, 1, 11),
                            ip6: ula(0x19, 1, 0xb),
                        },
                    ],
                },
                NodeSpec {
                    name: "node2".into(),
                    ip: Ipv4Addr::new(198, 18, 0, 12),
                    ip6: ula(0x18, 0, 0x12),
                    pod_cidr: (Ipv4Addr::new(198, 19, 2, 0), 24),
                    pod_cidr6: (ula(0x19, 2, 0), 64),
                    shape: PodShape::Bridged,
                    pods: vec![PodSpec {
                        name: "pb1".into(),
                        ip: Ipv4Addr::new(198, 19, 2, 10),
                        ip6: ula(0x19, 2, 0xa),
                    }],
                },
            ],
        }
    }

    /// Adds a pod to node `node` (builder style); its IPv6 address is derived from `ip`
    /// ([`NodeSpec::pod_ip6_for`]).
    pub fn with_pod(mut self, node: &str, name: &str, ip: Ipv4Addr) -> ClusterSpec {
        let n = self.node_mut(node);
        let ip6 = n.pod_ip6_for(ip);
        n.pods.push(PodSpec {
            name: name.into(),
            ip,
            ip6,
        });
        self
    }

    /// Sets the pod shape of node `node` (builder style).
    pub fn with_shape(mut self, node: &str, shape: PodShape) -> ClusterSpec {
        self.node_mut(node).shape = shape;
        self
    }

    fn node_mut(&mut self, node: &str) -> &mut NodeSpec {
        self.nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node:?} in the cluster spec"))
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub pod_cidr: (Ipv4Addr, u8),
    pub pod_cidr6: (Ipv6Addr, u8),
    pub shape: PodShape,
    ns: Netns,
}

impl Node {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The node's lan address of `family`.
    pub fn addr(&self, family: IpFamily) -> IpAddr {
        pick(family, self.ip, self.ip6)
    }

    /// The `cni0` gateway of a bridged node: the first address of the pod CIDR.
    pub fn bridge_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr.0) + 1)
    }

    /// The IPv6 `cni0` gateway of a bridged node: the first address of the IPv6 pod CIDR.
    pub fn bridge_gateway6(&self) -> Ipv6Addr {
        ip6_plus(self.pod_cidr6.0, 1)
    }

    /// The node's [`VXLAN_DEV`] address of `family` under [`PodNet::Vxlan`]: its pod
    /// CIDR's network address.
    pub fn tunnel_addr(&self, family: IpFamily) -> IpAddr {
        pick(family, self.pod_cidr.0, self.pod_cidr6.0)
    }
}

/// A running pod.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// Name of the node it runs on.
    pub node: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    ns: Netns,
    /// The echo server, killed before the namespace goes.
    echo: Option<Child>,
}

impl Pod {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The pod's address of `family`.
    pub fn addr(&self, family: IpFamily) -> IpAddr {
        pick(family, self.ip, self.ip6)
    }

    /// The pod's echo address (`ip:80`).
    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, ECHO_PORT))
    }

    /// The pod's echo address of `family` (`ip:80` or `[ip6]:80`).
    pub fn echo_addr_in(&self, family: IpFamily) -> SocketAddr {
        SocketAddr::new(self.addr(family), ECHO_PORT)
    }
}

/// The running cluster; dropping it stops the echo servers and deletes every namespace
/// (which deletes the veths and the bridge with them).
#[derive(Debug)]
pub struct Cluster {
    run_id: String,
    spec: ClusterSpec,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    client: Netns,
    lan: Netns,
    /// Logs of the echo servers (np-<id>-logs in $TMPDIR).
    logs: TempDir,
    /// XDP links of the bridge-side veth ends (see `wire`); detached when dropped.
    wire_links: Vec<std::os::fd::OwnedFd>,
    /// Marks the run live for concurrent cleanups; released last.
    _lease: RunLease,
}

impl Cluster {
    /// Builds `spec` with a fresh run id.
    pub fn new(spec: ClusterSpec) -> Cluster {
        Cluster::with_run_id(&run_id(), spec)
    }

    /// Builds `spec`; all names carry `run_id`. Panics (after cleaning up what it made) when
    /// a step fails.
    pub fn with_run_id(run_id: &str, spec: ClusterSpec) -> Cluster {
        require_tool("ethtool", "install it with `apt-get install ethtool`");
        require_tool("nsenter", "install util-linux");
        let lease = RunLease::new(run_id);
        for n in &spec.nodes {
            assert!(
                n.name.len() <= 8,
                "node name {:?} longer than 8 chars",
                n.name
            );
        }
        let lan = Netns::new(&format!("np-{run_id}-lan"));
        lan.ip("link add br0 type bridge");
        lan.ip("link set br0 up");
        // No multicast snooping: neighbour discovery must reach every port without relying
        // on MLD reports sent before the port was up.
        lan.ip("link set br0 type bridge mcast_snooping 0");
        let client = Netns::new(&format!("np-{run_id}-client"));
        ipv6_without_dad(&client);
        let mut cluster = Cluster {
            run_id: run_id.to_string(),
            spec: ClusterSpec {
                nodes: Vec::new(),
                ..spec.clone()
            },
            pods: Vec::new(),
            nodes: Vec::new(),
            client,
            lan,
            logs: TempDir::new(run_id, "logs"),
            wire_links: Vec::new(),
            _lease: lease,
        };
        cluster.attach_to_lan(&format!("np-{run_id}-client"), "v-client", "eth0");
        cluster.client.ip(&format!(
            "addr add {}/{} dev eth0",
            spec.client_ip, spec.lan_prefix
        ));
        cluster.client.ip(&format!(
            "addr add {}/{} dev eth0 nodad",
            spec.client_ip6, spec.lan_prefix6
        ));
        cluster.client.ip("link set eth0 up");

        for n in &spec.nodes {
            let ns = Netns::new(&format!("np-{run_id}-{}", n.name));
            ipv6_without_dad(&ns);
            cluster.attach_to_lan(ns.name(), &format!("v-{}", n.name), "lan0");
            ns.ip(&format!("addr add {}/{} dev lan0", n.ip, spec.lan_prefix));
            ns.ip(&format!(
                "addr add {}/{} dev lan0 nodad",
                n.ip6, spec.lan_prefix6
            ));
            ns.ip("link set lan0 up");
            ns.sysctl("net.ipv4.ip_forward", "1");
            ns.sysctl("net.ipv6.conf.all.forwarding", "1");
            match n.shape {
                PodShape::Bridged => {
                    ns.ip(&format!(
                        "link add cni0 mtu {} type bridge mcast_snooping 0",
                        spec.podnet.pod_mtu()
                    ));
                    ns.ip(&format!(
                        "addr add {}/{} dev cni0",
                        n.bridge_gateway(),
                        n.pod_cidr.1
                    ));
                    ns.ip(&format!(
                        "addr add {}/{} dev cni0 nodad",
                        ip6_plus(n.pod_cidr6.0, 1),
                        n.pod_cidr6.1
                    ));
                    ns.ip("link set cni0 up");
                }
                PodShape::Routed => {
                    // Proxy ARP answers only for addresses the node can route out of another
                    // interface (net/ipv4/arp.c, arp_process -> arp_fwd_proxy). Calico gets
                    // that from the host's default route; our nodes have none (nothing lies
                    // beyond the lan), so give the gateway address a route of its own.
                    ns.ip(&format!("route add {ROUTED_GATEWAY}/32 dev lo"));
                }
            }
            cluster.nodes.push(Node {
                name: n.name.clone(),
                ip: n.ip,
                ip6: n.ip6,
                pod_cidr: n.pod_cidr,
                pod_cidr6: n.pod_cidr6,
                shape: n.shape,
                ns,
            });
            cluster.spec.nodes.push(NodeSpec {
                pods: Vec::new(),
                ..n.clone()
            });
        }
        match spec.podnet {
            // Pod CIDRs are routed node-to-node over the lan; the client gets no such route.
            PodNet::Routed => {
                for n in &cluster.nodes {
                    for other in spec.nodes.iter().filter(|o| o.name != n.name) {
                        n.ns.ip(&format!(
                            "route add {}/{} via {} dev lan0",
                            other.pod_cidr.0, other.pod_cidr.1, other.ip
                        ));
                        n.ns.ip(&format!(
                            "route add {}/{} via {} dev lan0",
                            other.pod_cidr6.0, other.pod_cidr6.1, other.ip6
                        ));
                    }
                }
            }
            PodNet::Vxlan => cluster.vxlan_overlay(),
        }
        for n in &spec.nodes {
            for p in &n.pods {
                cluster.add_pod_dual(&n.name, &p.name, p.ip, p.ip6);
            }
        }
        cluster
    }

    /// [`PodNet::Vxlan`]: flannel's device, peers and routes on every node, its ip-masq
    /// rules, and the underlay filter on the lan's bridge.
    fn vxlan_overlay(&self) {
        require_tool("nft", "install it with `apt-get install nftables`");
        require_tool("bridge", "install iproute2");
        let (net, len) = POD_NETWORK;
        let (net6, len6) = POD_NETWORK6;
        for (i, n) in self.nodes.iter().enumerate() {
            n.ns.ip(&format!(
                "link add {VXLAN_DEV} address {} mtu {} type vxlan id {VXLAN_VNI} local {} \
                 dev lan0 dstport {VXLAN_PORT} nolearning",
                vxlan_mac(i),
                LAN_MTU - VXLAN_OVERHEAD,
                n.ip
            ));
            n.ns.ip(&format!("addr add {}/32 dev {VXLAN_DEV}", n.pod_cidr.0));
            n.ns.ip(&format!(
                "addr add {}/128 dev {VXLAN_DEV} nodad",
                n.pod_cidr6.0
            ));
            n.ns.ip(&format!("link set {VXLAN_DEV} up"));
            for (j, o) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let mac = vxlan_mac(j);
                for gw in [IpAddr::from(o.pod_cidr.0), IpAddr::from(o.pod_cidr6.0)] {
                    n.ns.ip(&format!(
                        "neigh replace {gw} lladdr {mac} dev {VXLAN_DEV} nud permanent"
                    ));
                }
                n.ns.exec(&[
                    "bridge",
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    VXLAN_DEV,
                    "dst",
                    &o.ip.to_string(),
                    "self",
                    "permanent",
                ]);
                n.ns.ip(&format!(
                    "route add {}/{} via {} dev {VXLAN_DEV} onlink",
                    o.pod_cidr.0, o.pod_cidr.1, o.pod_cidr.0
                ));
                n.ns.ip(&format!(
                    "route add {}/{} via {} dev {VXLAN_DEV} onlink",
                    o.pod_cidr6.0, o.pod_cidr6.1, o.pod_cidr6.0
                ));
            }
            // flannel's ip-masq rules (its MasqRules), for both families.
            let (cidr, clen) = n.pod_cidr;
            let (cidr6, clen6) = n.pod_cidr6;
            n.ns.nft(&format!(
                "table inet np_masq {{
                   chain post {{
                     type nat hook postrouting priority srcnat; policy accept
                     ip saddr {net}/{len} ip daddr {net}/{len} return
                     ip saddr {net}/{len} ip daddr != 224.0.0.0/4 masquerade
                     ip saddr != {net}/{len} ip daddr {cidr}/{clen} return
                     ip saddr != {net}/{len} ip daddr {net}/{len} masquerade
                     ip6 saddr {net6}/{len6} ip6 daddr {net6}/{len6} return
                     ip6 saddr {net6}/{len6} ip6 daddr != ff00::/8 masquerade
                     ip6 saddr != {net6}/{len6} ip6 daddr {cidr6}/{clen6} return
                     ip6 saddr != {net6}/{len6} ip6 daddr {net6}/{len6} masquerade
                   }}
                 }}"
            ));
        }
        self.lan.nft(&format!(
            "table bridge np_underlay {{
               chain forward {{
                 type filter hook forward priority 0; policy accept
                 ip saddr {net}/{len} counter drop
                 ip daddr {net}/{len} counter drop
                 ip6 saddr {net6}/{len6} counter drop
                 ip6 daddr {net6}/{len6} counter drop
               }}
             }}"
        ));
    }

    /// Packets the lan's bridge dropped because they carried a pod address
    /// ([`PodNet::Vxlan`]'s underlay filter; 0 for other pod networks).
    pub fn underlay_drops(&self) -> u64 {
        if self.spec.podnet != PodNet::Vxlan {
            return 0;
        }
        let out = self
            .lan
            .exec(&["nft", "-j", "list", "table", "bridge", "np_underlay"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["rule"]["expr"].as_array())
            .flatten()
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .sum()
    }

    /// What `node`'s [`VXLAN_DEV`] sent and received so far (`ip -s link`'s counters; a
    /// GSO packet counts once). Panics unless the cluster runs [`PodNet::Vxlan`].
    pub fn tunnel_counters(&self, node: &str) -> TunnelCounters {
        assert_eq!(
            self.spec.podnet,
            PodNet::Vxlan,
            "no tunnel without NP_PODNET=vxlan"
        );
        let out = self
            .node(node)
            .ns
            .exec(&["ip", "-s", "-j", "link", "show", "dev", VXLAN_DEV]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        let get = |dir: &str, what: &str| {
            v[0]["stats64"][dir][what]
                .as_u64()
                .unwrap_or_else(|| panic!("no {dir} {what} in `ip -s -j link`: {v}"))
        };
        TunnelCounters {
            tx_packets: get("tx", "packets"),
            rx_packets: get("rx", "packets"),
            tx_bytes: get("tx", "bytes"),
            rx_bytes: get("rx", "bytes"),
        }
    }

    /// The source address `node`'s own traffic to another node's pods carries, and so
    /// what a remote backend sees of a flow the node translated with SNAT (Cluster
    /// policy): the node's lan address, or under [`PodNet::Vxlan`] its tunnel's (the
    /// address the route through `flannel.1` prefers, as kube-proxy's MASQUERADE picks it).
    pub fn remote_pod_source(&self, node: &str, family: IpFamily) -> IpAddr {
        let n = self.node(node);
        match self.spec.podnet {
            PodNet::Routed => n.addr(family),
            PodNet::Vxlan => n.tunnel_addr(family),
        }
    }

    /// Creates a veth `bridge_side` (in the lan, on br0) <-> `inner` (in namespace `ns`).
    ///
    /// The lan emulates a physical wire: tx checksum offload is off on both ends, so frames
    /// on the lan carry complete checksums as a real NIC sends them (a veth with tx offload
    /// passes CHECKSUM_PARTIAL packets whose checksum field holds only the pseudo-header
    /// sum, which an XDP program on the receiving end would see and forward as is). GRO is
    /// on at the bridge-side ends, and they carry the `wire` XDP_PASS program, because
    /// XDP_TX/XDP_REDIRECT into a veth only delivers when the receiving peer has NAPI
    /// (drivers/net/veth.c, veth_xdp_xmit); measured here, GRO alone left XDP_TX frames
    /// unflushed until the next packet, the XDP program does not. Pod veths keep the
    /// defaults a CNI leaves (GRO off, offloads on): the agent must cope with those. A
    /// [`LanKind::DefaultVeth`] lan leaves its veths as created.
    fn attach_to_lan(&mut self, ns: &str, bridge_side: &str, inner: &str) {
        assert!(
            bridge_side.len() <= 15,
            "interface name {bridge_side:?} too long"
        );
        self.lan.ip(&format!(
            "link add {bridge_side} type veth peer name {inner} netns {ns}"
        ));
        self.lan.ip(&format!("link set {bridge_side} master br0"));
        self.lan.ip(&format!("link set {bridge_side} up"));
        if self.spec.lan == LanKind::DefaultVeth {
            return;
        }
        self.lan.ethtool_k(bridge_side, &["tx", "off", "gro", "on"]);
        let name = bridge_side.to_string();
        let link = crate::netns::run_in(&self.lan, move || {
            let ifindex =
                nix::net::if_::if_nametoindex(name.as_str()).expect("bridge port ifindex");
            let prog = crate::wire::load_xdp_pass().expect("loading the wire XDP program");
            crate::wire::attach_xdp(&prog, ifindex).expect("attaching the wire XDP program")
        });
        self.wire_links.push(link);
        let netns = format!("--net={}/{ns}", crate::netns::NETNS_DIR);
        sh(&["nsenter", &netns, "--", "ethtool", "-K", inner, "tx", "off"]);
    }

    /// Deletes `node`'s uplink `lan0` (and with it its peer on the lan bridge), as when a
    /// NIC's driver unloads or a CNI deletes the link. Returns its MAC address, so that
    /// [`Cluster::recreate_uplink`] can give the new link the same one (a NIC keeps its
    /// permanent address; the client's and the other node's neighbour entries stay right).
    pub fn delete_uplink(&self, node: &str) -> String {
        let ns = self.node(node).ns();
        // (`nsenter --net` keeps the host's /sys: ask `ip`.)
        let out = ns.exec(&["ip", "-o", "link", "show", "dev", "lan0"]);
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac = shown
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("lan0 of {node} has no MAC address: {shown}"))
            .to_string();
        ns.ip("link del lan0");
        mac
    }

    /// Creates `node`'s uplink `lan0` again (after [`Cluster::delete_uplink`]), on the lan
    /// bridge as before, with MAC address `mac`, up, without addresses: see
    /// [`Cluster::configure_uplink`].
    pub fn recreate_uplink(&mut self, node: &str, mac: &str) {
        let ns_name = self.node(node).ns().name().to_string();
        self.attach_to_lan(&ns_name, &format!("v-{node}"), "lan0");
        let ns = self.node(node).ns();
        ns.ip(&format!("link set lan0 address {mac}"));
        ns.ip("link set lan0 up");
    }

    /// Gives `node`'s `lan0` its address of `family` and the routes to the other nodes'
    /// pod CIDRs of that family, as networkd or a CNI does for a new link (deleting a
    /// link's last IPv4 address also removes the routes through it).
    pub fn configure_uplink(&self, node: &str, family: IpFamily) {
        let n = self.node(node);
        match family {
            IpFamily::V4 => n.ns.ip(&format!(
                "addr replace {}/{} dev lan0",
                n.ip, self.spec.lan_prefix
            )),
            IpFamily::V6 => n.ns.ip(&format!(
                "addr replace {}/{} dev lan0 nodad",
                n.ip6, self.spec.lan_prefix6
            )),
        }
        for other in self.nodes.iter().filter(|o| o.name != n.name) {
            let (cidr, len, via) = match family {
                IpFamily::V4 => (
                    IpAddr::from(other.pod_cidr.0),
                    other.pod_cidr.1,
                    IpAddr::from(other.ip),
                ),
                IpFamily::V6 => (
                    IpAddr::from(other.pod_cidr6.0),
                    other.pod_cidr6.1,
                    IpAddr::from(other.ip6),
                ),
            };
            n.ns.ip(&format!("route replace {cidr}/{len} via {via} dev lan0"));
        }
    }

    /// Adds pod `name` with address `ip` on node `node` (also on a running cluster; the
    /// node's shape decides the wiring), and the IPv6 address derived from `ip`
    /// ([`NodeSpec::pod_ip6_for`]). Does not start its echo server.
    pub fn add_pod(&mut self, node: &str, name: &str, ip: Ipv4Addr) -> &Pod {
        let ip6 = pod_ip6(self.node(node).pod_cidr6.0, ip);
        self.add_pod_dual(node, name, ip, ip6)
    }

    /// [`Cluster::add_pod`] with an explicit IPv6 address.
    pub fn add_pod_dual(&mut self, node: &str, name: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> &Pod {
        assert!(name.len() <= 11, "pod name {name:?} longer than 11 chars");
        assert!(
            self.pods.iter().all(|p| p.name != name),
            "pod {name} exists already"
        );
        let n = self.node(node);
        let host_if = format!("veth{name}");
        let ns = Netns::new(&format!("np-{}-{name}", self.run_id));
        ipv6_without_dad(&ns);
        n.ns.ip(&format!(
            "link add {host_if} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {}",
            ns.name(),
            mtu = self.spec.podnet.pod_mtu()
        ));
        ns.ip("link set eth0 up");
        match n.shape {
            PodShape::Routed => {
                ns.ip(&format!("addr add {ip}/32 dev eth0"));
                ns.ip(&format!("route add {ROUTED_GATEWAY} dev eth0 scope link"));
                ns.ip(&format!(
                    "route add default via {ROUTED_GATEWAY} dev eth0 onlink"
                ));
                n.ns.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1");
                n.ns.sysctl(&format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0");
                n.ns.ip(&format!("link set {host_if} up"));
                n.ns.ip(&format!("route add {ip}/32 dev {host_if}"));
                ns.ip(&format!("addr add {ip6}/128 dev eth0 nodad"));
                ns.ip(&format!("route add default via {ROUTED_GATEWAY6} dev eth0"));
                n.ns.ip(&format!(
                    "addr add {ROUTED_GATEWAY6}/64 dev {host_if} nodad"
                ));
                n.ns.ip(&format!("route add {ip6}/128 dev {host_if}"));
            }
            PodShape::Bridged => {
                ns.ip(&format!("addr add {ip}/{} dev eth0", n.pod_cidr.1));
                ns.ip(&format!("route add default via {}", n.bridge_gateway()));
                ns.ip(&format!("addr add {ip6}/{} dev eth0 nodad", n.pod_cidr6.1));
                ns.ip(&format!("route add default via {}", n.bridge_gateway6()));
                n.ns.ip(&format!("link set {host_if} master cni0"));
                n.ns.ip(&format!("link set {host_if} up"));
            }
        }
        let node_name = n.name.clone();
        self.spec
            .nodes
            .iter_mut()
            .find(|s| s.name == node_name)
            .expect("node spec")
            .pods
            .push(PodSpec {
                name: name.into(),
                ip,
                ip6,
            });
        self.pods.push(Pod {
            name: name.into(),
            node: node_name,
            ip,
            ip6,
            ns,
            echo: None,
        });
        self.pods.last().expect("just pushed")
    }

    /// Removes pod `name`: stops its echo server and deletes its namespace and veth.
    pub fn remove_pod(&mut self, name: &str) {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        let mut pod = self.pods.remove(i);
        pod.echo.take();
        for n in &mut self.spec.nodes {
            n.pods.retain(|p| p.name != name);
        }
        drop(pod);
    }

    /// Starts `echo --name POD` in pod `pod` and waits (bounded) until it accepts TCP.
    pub fn start_echo(&mut self, pod: &str, echo: &Path) {
        let log = self.logs.path().join(format!("echo-{pod}.log"));
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        assert!(p.echo.is_none(), "echo already running in {pod}");
        let echo = echo.to_str().expect("utf-8 path");
        let port = ECHO_PORT.to_string();
        let mut child = p.ns.spawn(
            &[
                echo,
                "--name",
                pod,
                "--tcp-port",
                &port,
                "--udp-port",
                &port,
            ],
            Some(&log),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let up = run_in(&p.ns, || {
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, ECHO_PORT)),
                    Duration::from_millis(200),
                )
                .is_ok()
            });
            if up {
                break;
            }
            if let Some(st) = child.try_wait() {
                panic!("echo server in {pod} exited ({st}): {}", child.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "echo server in {pod} did not listen within 5 s: {}",
                    child.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        p.echo = Some(child);
    }

    /// Starts echo servers in every pod that has none.
    pub fn start_all_echo(&mut self, echo: &Path) {
        let names: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.echo.is_none())
            .map(|p| p.name.clone())
            .collect();
        for n in names {
            self.start_echo(&n, echo);
        }
    }

    /// The log of pod `pod`'s echo server.
    pub fn echo_log(&self, pod: &str) -> String {
        self.pod(pod)
            .echo
            .as_ref()
            .map(Child::log)
            .unwrap_or_default()
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The spec of what runs now (pods added or removed since creation included).
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn lan(&self) -> &Netns {
        &self.lan
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.spec.client_ip
    }

    pub fn client_ip6(&self) -> Ipv6Addr {
        self.spec.client_ip6
    }

    /// The client's address of `family`.
    pub fn client_addr(&self, family: IpFamily) -> IpAddr {
        pick(family, self.spec.client_ip, self.spec.client_ip6)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_ip(&self, name: &str) -> Ipv4Addr {
        self.node(name).ip
    }

    pub fn node_ip6(&self, name: &str) -> Ipv6Addr {
        self.node(name).ip6
    }

    /// The node whose lan address (of either family) is `ip`.
    pub fn node_by_ip(&self, ip: impl Into<IpAddr>) -> Option<&Node> {
        let ip = ip.into();
        self.nodes.iter().find(|n| n.addr(IpFamily::of(ip)) == ip)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Name of the node pod `pod` runs on.
    pub fn pod_node(&self, pod: &str) -> &str {
        &self.pod(pod).node
    }

    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// The temp dir holding this cluster's logs.
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }
}

/// Turns duplicate address detection off in `ns` for the interfaces created from now on
/// (`default`) and for all (`all`: DAD runs unless both are off), so IPv6 addresses are
/// usable the moment they are added, link-local ones included.
fn ipv6_without_dad(ns: &Netns) {
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Echo servers first (a process keeps its namespace alive), then pods, then nodes;
        // client, lan and the log dir follow as fields.
        for p in &mut self.pods {
            p.echo.take();
        }
        self.pods.clear();
        self.nodes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_spec_matches_test_network_md() {
        let s = ClusterSpec::standard().with_pod("node2", "pb2", Ipv4Addr::new(198, 19, 2, 11));
        assert_eq!(s.nodes[0].shape, PodShape::Routed);
        assert_eq!(s.nodes[1].shape, PodShape::Bridged);
        assert_eq!(s.nodes[1].bridge_gateway(), Ipv4Addr::new(198, 19, 2, 1));
        assert_eq!(s.client_ip6.to_string(), "fd00:18::10");
        assert_eq!(s.nodes[0].ip6.to_string(), "fd00:18::11");
        assert_eq!(s.nodes[1].ip6.to_string(), "fd00:18::12");
        assert_eq!(s.nodes[0].pod_cidr6, ("fd00:19:1::".parse().unwrap(), 64));
        assert_eq!(s.nodes[1].pod_cidr6, ("fd00:19:2::".parse().unwrap(), 64));
        let ip6: Vec<String> = s
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(|p| p.ip6.to_string()))
            .collect();
        assert_eq!(
            ip6,
            [
                "fd00:19:1::a",
                "fd00:19:1::b",
                "fd00:19:2::a",
                "fd00:19:2::b"
            ]
        );
        let names: Vec<_> = s
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(|p| p.name.as_str()))
            .collect();
        assert_eq!(names, ["pa1", "pa2", "pb1", "pb2"]);
    }
}
