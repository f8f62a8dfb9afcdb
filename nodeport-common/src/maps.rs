//! Map names, keys and values of the datapath. A change of a value's meaning at the same
//! size bumps the `_V<n>` suffix of the map name so that a pinned map of an older layout is
//! never reused by mistake; a change of size keeps the name: the agent compares a pinned
//! map's layout with this build's and replaces it (`datapath::layout_mismatch`), where a
//! new name would leave the old pin behind, unused.

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// TCP header flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv6 address as four raw network-order words (`u32::from_ne_bytes` of each group of
/// four octets), the way the datapath reads it from packet memory.
pub type Ip6 = [u32; 4];

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for super::Ip6 {}
}

/// The raw address of one family: `u32` for IPv4, [`Ip6`] for IPv6. Every key and value
/// that holds an address is generic over it; the `*6` aliases name the IPv6 layouts, and
/// the IPv6 maps are separate (`NP_*6_V1`), so IPv4 keys stay as small as before.
pub trait Addr:
    sealed::Sealed
    + 'static
    + Copy
    + Default
    + PartialEq
    + Eq
    + PartialOrd
    + Ord
    + core::hash::Hash
    + core::fmt::Debug
{
    /// Filler that rounds [`Affinity`] to a multiple of 8 bytes without implicit padding:
    /// four bytes for IPv4, none for IPv6.
    type Pad: Copy + Default + PartialEq + Eq + core::fmt::Debug;
    /// Address length in bits (the LPM prefix of a whole address).
    const BITS: u32;
    /// The address folded to 32 bits for the flow hash (IPv4: itself).
    fn fold(self) -> u32;
    /// The unspecified address (also "no backend" in an NP_BE element).
    fn is_zero(&self) -> bool;
    /// `check` updated for this address changing from `old` to `new` (RFC 1624).
    fn csum_replace(check: u16, old: Self, new: Self) -> u16;
    /// The address as the 16-byte address union of `bpf_fib_lookup` holds it (IPv4 in the
    /// first word).
    fn fib_words(self) -> [u32; 4];
    /// Set to the unspecified address in place, a word at a time: LLVM turns a zeroed
    /// 16-byte value into a `memset` loop, which the verifier refuses without CAP_PERFMON.
    fn clear(&mut self);
}

impl Addr for u32 {
    type Pad = u32;
    const BITS: u32 = 32;
    #[inline(always)]
    fn fold(self) -> u32 {
        self
    }
    #[inline(always)]
    fn is_zero(&self) -> bool {
        *self == 0
    }
    #[inline(always)]
    fn csum_replace(check: u16, old: Self, new: Self) -> u16 {
        crate::csum::replace4(check, old, new)
    }
    #[inline(always)]
    fn fib_words(self) -> [u32; 4] {
        [self, 0, 0, 0]
    }
    #[inline(always)]
    fn clear(&mut self) {
        *self = 0;
    }
}

impl Addr for Ip6 {
    type Pad = ();
    const BITS: u32 = 128;
    #[inline(always)]
    fn fold(self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }
    #[inline(always)]
    fn is_zero(&self) -> bool {
        (self[0] | self[1] | self[2] | self[3]) == 0
    }
    #[inline(always)]
    fn csum_replace(check: u16, old: Self, new: Self) -> u16 {
        let mut c = crate::csum::replace4(check, old[0], new[0]);
        c = crate::csum::replace4(c, old[1], new[1]);
        c = crate::csum::replace4(c, old[2], new[2]);
        crate::csum::replace4(c, old[3], new[3])
    }
    #[inline(always)]
    fn fib_words(self) -> [u32; 4] {
        self
    }
    #[inline(always)]
    fn clear(&mut self) {
        for w in self.iter_mut() {
            // SAFETY: a write to a live `u32`.
            unsafe { core::ptr::write_volatile(w, 0) };
        }
    }
}

/// Map names (the kernel keeps 15 characters). Pinned under the agent's `--pin-path`.
pub const MAP_SERVICES: &str = "NP_SVC_V1";
pub const MAP_BACKENDS: &str = "NP_BE_V1";
pub const MAP_MAGLEV: &str = "NP_MAGLEV_V1";
pub const MAP_CONNTRACK: &str = "NP_CT_V1";
pub const MAP_REVNAT: &str = "NP_RNAT_V1";
pub const MAP_NODE_ADDRS: &str = "NP_NODEADDR_V1";
pub const MAP_CONFIG: &str = "NP_CONFIG_V1";
pub const MAP_STATS: &str = "NP_STATS_V1";
pub const MAP_DEVICES: &str = "NP_DEV_V1";
pub const MAP_AFFINITY: &str = "NP_AFF_V1";
pub const MAP_SRC_RANGES: &str = "NP_SRCRANGE_V1";
pub const MAP_REJECT: &str = "NP_REJECT_V1";
/// The IPv6 counterparts (same layouts with [`Ip6`] addresses). NP_MAGLEV, NP_CONFIG,
/// NP_STATS and NP_DEV are shared; backend ids are one space over NP_BE and NP_BE6.
pub const MAP_SERVICES6: &str = "NP_SVC6_V1";
pub const MAP_BACKENDS6: &str = "NP_BE6_V1";
pub const MAP_CONNTRACK6: &str = "NP_CT6_V1";
pub const MAP_REVNAT6: &str = "NP_RNAT6_V1";
pub const MAP_NODE_ADDRS6: &str = "NP_NODEADDR6_V1";
pub const MAP_AFFINITY6: &str = "NP_AFF6_V1";
pub const MAP_SRC_RANGES6: &str = "NP_SRCRANGE6_V1";

/// Program names in the eBPF object.
pub const PROG_XDP: &str = "np_xdp";
pub const PROG_TC_INGRESS: &str = "np_tc_in";
pub const PROG_TC_EGRESS: &str = "np_tc_out";
/// Variants of `np_xdp` and `np_tc_in` that log per packet (aya-log) when the runtime
/// debug switch is on; they need CAP_PERFMON to pass the verifier.
pub const PROG_XDP_DEBUG: &str = "np_xdp_debug";
pub const PROG_TC_INGRESS_DEBUG: &str = "np_tc_in_debug";

/// Default capacities. The Maglev array holds every service's table back to back: 10,000
/// services of 10 backends (1,021 slots each) plus one of 5,000 backends (524,287) plus
/// room to write one replacement table aside before flipping.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAGLEV_SLOTS: u32 = 11_600_000;
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
pub const DEFAULT_MAX_NODE_ADDRS: u32 = 256;
pub const DEFAULT_MAX_DEVICES: u32 = 64;
/// (client address, service port) pairs remembered for sessionAffinity ClientIP (LRU).
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;
/// loadBalancerSourceRanges CIDRs over all services.
pub const DEFAULT_SRC_RANGES: u32 = 16_384;
/// IPv6 flows tracked (NP_CT6 and NP_RNAT6). Smaller than IPv4's by default: an IPv6 entry
/// takes about twice the memory, and the preallocated maps cost it whether used or not.
pub const DEFAULT_CT6_ENTRIES: u32 = 65_536;
pub const DEFAULT_AFFINITY6_ENTRIES: u32 = 16_384;
pub const DEFAULT_SRC_RANGES6: u32 = 4_096;

/// NP_MAGLEV packs two slots (backend ids) per 8-byte element: the kernel rounds array
/// elements up to 8 bytes, so this keeps 4 bytes per slot and lets the agent see the
/// memory-mapped array as one flat `u32` slice. Slot `s` is `entry[s / 2][s % 2]`.
pub type MaglevEntry = [u32; 2];
pub const MAGLEV_SLOTS_PER_ENTRY: u32 = 2;

/// Backend id 0 is never allocated: an empty Maglev slot holds 0.
pub const BACKEND_NONE: u32 = 0;

/// NP_SVC: a frontend the datapath answers on. `addr == 0` means "any address of this
/// node" (a nodePort); a non-zero `addr` is a LoadBalancer or external IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FrontendKey<A: Addr = u32> {
    /// Address, network order; 0 (unspecified) for nodePorts.
    pub addr: A,
    /// Port, network order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub pad: u8,
}

/// Service flag: externalTrafficPolicy Local (only local backends, client address kept).
pub const SVC_F_LOCAL: u16 = 1 << 0;
/// Service flag: sessionAffinity ClientIP.
pub const SVC_F_AFFINITY: u16 = 1 << 1;
/// Frontend flag: a LoadBalancer ingress IP frontend whose clients must match one of
/// the service's loadBalancerSourceRanges (NP_SRCRANGE). Never set on nodePorts or external IPs.
pub const SVC_F_SRC_RANGES: u16 = 1 << 2;
/// Service flag: the service has no endpoint anywhere (none ready, none serving while
/// terminating): new flows are refused, not dropped (kube-proxy's REJECT). Under Local
/// with endpoints on other nodes only, the flag is clear and such traffic is dropped.
pub const SVC_F_REJECT: u16 = 1 << 3;

/// NP_SVC value: where the service's Maglev table lives in NP_MAGLEV.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// First slot of the table in NP_MAGLEV.
    pub table_off: u32,
    /// Number of slots (a prime), 0 when the service has no usable backend.
    pub table_size: u32,
    /// Agent-assigned service id (stable for the life of the service port).
    pub svc_id: u32,
    /// `SVC_F_*` flags.
    pub flags: u16,
    pub pad: u16,
    /// sessionAffinity timeout in seconds (when `SVC_F_AFFINITY`).
    pub affinity_timeout_s: u32,
    pub pad2: u32,
}

/// Backend flag: the endpoint runs on this node (no SNAT, handed to the local stack).
pub const BE_F_LOCAL: u8 = 1 << 0;
/// Backend flag: the endpoint is still listed in an EndpointSlice but takes no new flows
/// (not ready, terminating, or another node's under Local): it is in no Maglev table and
/// session affinity does not stick to it; the flows already on it keep it (draining).
pub const BE_F_DRAINING: u8 = 1 << 1;

/// NP_BE value (key: backend id, `u32`): one endpoint address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend<A: Addr = u32> {
    /// Address, network order; all zero for a free id.
    pub addr: A,
    /// Target port, network order.
    pub port: u16,
    /// `BE_F_*` flags.
    pub flags: u8,
    pub pad: u8,
}

/// A directional 5-tuple. NP_CT is keyed by the client's tuple towards the frontend;
/// NP_RNAT by the tuple of a reply as it reaches this node (backend towards client or
/// towards this node's SNAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FlowKey<A: Addr = u32> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Padding as scalars: a `[u8; 3]` made LLVM zero keys with a `memset` loop, which the
    /// verifier refuses without CAP_PERFMON.
    pub pad: u8,
    pub pad2: u16,
}

impl<A: Addr> FlowKey<A> {
    #[inline(always)]
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: 0,
            pad2: 0,
        }
    }
}

/// Conntrack flag: a FIN or RST that passed the sequence check was seen; the entry expires
/// after the closing timeout, and a new SYN on its tuple opens a fresh flow.
pub const CT_F_CLOSING: u16 = 1 << 0;
/// Conntrack flag: the flow was source-NATed (remote backend).
pub const CT_F_SNAT: u16 = 1 << 1;
/// Conntrack flag: only a SYN has been seen so far.
pub const CT_F_SYN_ONLY: u16 = 1 << 2;
/// Conntrack flag: the service had sessionAffinity when the flow was opened (its packets
/// keep the client's NP_AFF entry fresh).
pub const CT_F_AFFINITY: u16 = 1 << 3;
/// Conntrack flag: `backend_seq` holds a sequence number of the backend's (learnt from a
/// reply that acknowledged the client's data).
pub const CT_F_BACKEND_SEQ: u16 = 1 << 4;
/// Conntrack flag: a reply of the backend's was translated back.
pub const CT_F_REPLIED: u16 = 1 << 5;
/// Conntrack flag: the client sent again after a reply: for UDP, a stream rather than one
/// exchange (netfilter's "assured" UDP), which gets the longer timeout and is spared when
/// a sweep under pressure ends unassured flows.
pub const CT_F_STREAM: u16 = 1 << 6;

/// NP_CT value: the backend a flow is bound to and how it was translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry<A: Addr = u32> {
    /// Last packet of the flow, `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE).
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub svc_id: u32,
    /// Backend address and port at the time of binding (detects a reused backend id).
    pub backend_addr: A,
    /// Source address used towards the backend: the client's, or this node's (SNAT).
    pub nat_addr: A,
    pub backend_port: u16,
    /// Source port used towards the backend: the client's, or the allocated SNAT port.
    pub nat_port: u16,
    /// `CT_F_*` flags.
    pub flags: u16,
    pub pad: u16,
    /// TCP: a recent sequence number of the client's, host order (the flow's first seen
    /// packet's, then moved along as the client's data goes by). A FIN or RST from the
    /// client changes the state only near it.
    pub client_seq: u32,
    /// TCP: a recent sequence number of the backend's, host order, once `CT_F_BACKEND_SEQ`
    /// is set; the same check for the backend's FIN or RST.
    pub backend_seq: u32,
}

/// NP_RNAT value: how to rewrite a reply so the client sees the frontend it talked to.
/// Together with the key's protocol it also names the NP_CT entry that owns it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat<A: Addr = u32> {
    /// Frontend address the client used, network order (the reply's new source).
    pub fe_addr: A,
    /// Client address (the reply's new destination).
    pub client_addr: A,
    pub fe_port: u16,
    pub client_port: u16,
}

/// NP_NODEADDR value (key: an address of this node, `u32` network order; NP_NODEADDR6: `Ip6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeAddr {
    pub flags: u32,
}

/// NP_AFF key: one client address towards one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey<A: Addr = u32> {
    /// Client address, network order.
    pub client_addr: A,
    pub svc_id: u32,
}

/// NP_AFF value: the backend a client sticks to (sessionAffinity ClientIP) and when the
/// client last opened or used a flow of the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Affinity<A: Addr = u32> {
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow or refreshed flow.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    /// Backend address and port when bound (detects a reused backend id).
    pub backend_addr: A,
    pub backend_port: u16,
    pub pad: u16,
    pub pad2: A::Pad,
}

/// NP_SRCRANGE key data (LPM trie, value `u32` unused): the prefix length of an entry is
/// 32 (all of `svc_id_be`) plus the CIDR's prefix length; a lookup uses the client address
/// with prefix length 32 + `A::BITS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SrcRange<A: Addr = u32> {
    /// Service port id, big-endian: the trie compares key bytes in memory order.
    pub svc_id_be: u32,
    /// Address, network order.
    pub addr: A,
}

/// The IPv6 layouts.
pub type FrontendKey6 = FrontendKey<Ip6>;
pub type Backend6 = Backend<Ip6>;
pub type FlowKey6 = FlowKey<Ip6>;
pub type CtEntry6 = CtEntry<Ip6>;
pub type RevNat6 = RevNat<Ip6>;
pub type AffinityKey6 = AffinityKey<Ip6>;
pub type Affinity6 = Affinity<Ip6>;
pub type SrcRange6 = SrcRange<Ip6>;

/// Bits of an NP_SRCRANGE key taken by the service id.
pub const SRC_RANGE_SVC_BITS: u32 = 32;

/// Config flag: log per packet through aya-log (runtime debug switch).
pub const CFG_F_DEBUG: u32 = 1 << 0;

/// NP_CONFIG value (array of one): runtime settings of the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Source address for SNAT when the frontend is not a node address (LB/external IPs).
    pub snat_addr: u32,
    /// The same for IPv6 frontends.
    pub snat_addr6: Ip6,
    /// `CFG_F_*` flags.
    pub flags: u32,
    /// SNAT source port range, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub tcp_syn_timeout_s: u32,
    /// UDP stream (`CT_F_STREAM`: the client sent again after a reply).
    pub udp_timeout_s: u32,
    /// UDP flow that is no stream (yet): unanswered, or one request and its reply. Such
    /// flows hold their SNAT port this long.
    pub udp_unreplied_timeout_s: u32,
    /// The pod network's tunnel device for IPv4 (flannel.1, vxlan.calico, ...); 0: none.
    /// A new flow to a remote backend that the FIB reaches through it gets `tun_addr` as
    /// SNAT source (the address the route through the tunnel prefers), so that replies
    /// come back through the tunnel instead of onto a network that knows no pod addresses.
    pub tun_ifindex: u32,
    /// The tunnel device's IPv4 address, network order.
    pub tun_addr: u32,
    /// The same for IPv6 (a device of its own, as flannel's flannel-v6.1, or the same).
    pub tun_ifindex6: u32,
    pub tun_addr6: Ip6,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            snat_addr: 0,
            snat_addr6: [0; 4],
            flags: 0,
            snat_port_min: DEFAULT_SNAT_PORT_MIN,
            snat_port_max: DEFAULT_SNAT_PORT_MAX,
            tcp_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            tcp_syn_timeout_s: 60,
            udp_timeout_s: 60,
            udp_unreplied_timeout_s: 30,
            tun_ifindex: 0,
            tun_addr: 0,
            tun_ifindex6: 0,
            tun_addr6: [0; 4],
        }
    }
}

/// The default SNAT source port range: 20,000 ports between the well-known ports most
/// daemons and tunnels listen on (below 10,000: 4789 and 8472 VXLAN, 6081 Geneve, 6443,
/// 2379) and Kubernetes' default nodePort range (30000-32767), outside Linux's default
/// ephemeral range (32768-60999), so the node's own connections never pick these ports.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 10_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 29_999;

/// How many SNAT ports a new remote flow tries before it is dropped as exhausted.
pub const SNAT_PROBES: u32 = 32;

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(FrontendKey, 8);
assert_size!(FrontendKey6, 20);
assert_size!(Service, 24);
assert_size!(Backend, 8);
assert_size!(Backend6, 20);
assert_size!(FlowKey, 16);
assert_size!(FlowKey6, 40);
assert_size!(CtEntry, 40);
assert_size!(CtEntry6, 64);
assert_size!(RevNat, 12);
assert_size!(RevNat6, 36);
assert_size!(NodeAddr, 4);
assert_size!(Config, 76);
assert_size!(AffinityKey, 8);
assert_size!(AffinityKey6, 20);
assert_size!(Affinity, 24);
assert_size!(Affinity6, 32);
assert_size!(SrcRange, 8);
assert_size!(SrcRange6, 20);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, made of integers, with explicit padding fields
    // so no byte is uninitialised.
    // The size assertions above hold for both address types (`Addr` is sealed), so no
    // instance has implicit padding.
    unsafe impl<A: Addr> aya::Pod for FrontendKey<A> {}
    unsafe impl aya::Pod for Service {}
    unsafe impl<A: Addr> aya::Pod for Backend<A> {}
    unsafe impl<A: Addr> aya::Pod for FlowKey<A> {}
    unsafe impl<A: Addr> aya::Pod for CtEntry<A> {}
    unsafe impl<A: Addr> aya::Pod for RevNat<A> {}
    unsafe impl aya::Pod for NodeAddr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl<A: Addr> aya::Pod for AffinityKey<A> {}
    unsafe impl<A: Addr> aya::Pod for Affinity<A> {}
    unsafe impl<A: Addr> aya::Pod for SrcRange<A> {}
}
