//! Map names, keys and values of the datapath. A layout change bumps the `_V<n>` suffix of
//! the map name so that a pinned map of an older layout is never reused by mistake.

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

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
pub struct FrontendKey {
    /// IPv4 address, network order; 0 for nodePorts.
    pub addr: u32,
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
/// Frontend flag: a LoadBalancer or external IP frontend whose clients must match one of
/// the service's loadBalancerSourceRanges (NP_SRCRANGE). Never set on nodePorts.
pub const SVC_F_SRC_RANGES: u16 = 1 << 2;

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

/// NP_BE value (key: backend id, `u32`): one endpoint address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    /// IPv4 address, network order.
    pub addr: u32,
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
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Padding as scalars: a `[u8; 3]` made LLVM zero keys with a `memset` loop, which the
    /// verifier refuses without CAP_PERFMON.
    pub pad: u8,
    pub pad2: u16,
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
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

/// Conntrack flag: a FIN or RST was seen; the entry expires after the closing timeout.
pub const CT_F_CLOSING: u16 = 1 << 0;
/// Conntrack flag: the flow was source-NATed (remote backend).
pub const CT_F_SNAT: u16 = 1 << 1;
/// Conntrack flag: only a SYN has been seen so far.
pub const CT_F_SYN_ONLY: u16 = 1 << 2;
/// Conntrack flag: the service had sessionAffinity when the flow was opened (its packets
/// keep the client's NP_AFF entry fresh).
pub const CT_F_AFFINITY: u16 = 1 << 3;

/// NP_CT value: the backend a flow is bound to and how it was translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// Last packet of the flow, `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE).
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub svc_id: u32,
    /// Backend address and port at the time of binding (detects a reused backend id).
    pub backend_addr: u32,
    /// Source address used towards the backend: the client's, or this node's (SNAT).
    pub nat_addr: u32,
    pub backend_port: u16,
    /// Source port used towards the backend: the client's, or the allocated SNAT port.
    pub nat_port: u16,
    /// `CT_F_*` flags.
    pub flags: u16,
    pub pad: u16,
}

/// NP_RNAT value: how to rewrite a reply so the client sees the frontend it talked to.
/// Together with the key's protocol it also names the NP_CT entry that owns it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    /// Frontend address the client used, network order (the reply's new source).
    pub fe_addr: u32,
    /// Client address (the reply's new destination).
    pub client_addr: u32,
    pub fe_port: u16,
    pub client_port: u16,
}

/// NP_NODEADDR value (key: IPv4 address of this node, `u32` network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeAddr {
    pub flags: u32,
}

/// NP_AFF key: one client address towards one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Client IPv4 address, network order.
    pub client_addr: u32,
    pub svc_id: u32,
}

/// NP_AFF value: the backend a client sticks to (sessionAffinity ClientIP) and when the
/// client last opened or used a flow of the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Affinity {
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow or refreshed flow.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    /// Backend address and port when bound (detects a reused backend id).
    pub backend_addr: u32,
    pub backend_port: u16,
    pub pad: u16,
    pub pad2: u32,
}

/// NP_SRCRANGE key data (LPM trie, value `u32` unused): the prefix length of an entry is
/// 32 (all of `svc_id_be`) plus the CIDR's prefix length; a lookup uses the client address
/// with prefix length 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SrcRange {
    /// Service port id, big-endian: the trie compares key bytes in memory order.
    pub svc_id_be: u32,
    /// IPv4 address, network order.
    pub addr: u32,
}

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
    /// `CFG_F_*` flags.
    pub flags: u32,
    /// SNAT source port range, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub tcp_syn_timeout_s: u32,
    pub udp_timeout_s: u32,
    pub pad: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            snat_addr: 0,
            flags: 0,
            snat_port_min: 61_000,
            snat_port_max: 65_535,
            tcp_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            tcp_syn_timeout_s: 60,
            udp_timeout_s: 60,
            pad: 0,
        }
    }
}

/// How many SNAT ports a new remote flow tries before it is dropped as exhausted.
pub const SNAT_PROBES: u32 = 32;

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(FrontendKey, 8);
assert_size!(Service, 24);
assert_size!(Backend, 8);
assert_size!(FlowKey, 16);
assert_size!(CtEntry, 32);
assert_size!(RevNat, 12);
assert_size!(NodeAddr, 4);
assert_size!(Config, 32);
assert_size!(AffinityKey, 8);
assert_size!(Affinity, 24);
assert_size!(SrcRange, 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, made of integers, with explicit padding fields
    // so no byte is uninitialised.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for NodeAddr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for SrcRange {}
}
