//! The two address families as types. A [`Family`] says which maps a packet of its family
//! uses and where that family's headers keep their fields; the load-balancing logic, the
//! rewrites and the forwarding are written once, generic over it, and each program
//! instantiates them for [`V4`] and [`V6`] after looking at the EtherType.

use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap};
use nodeport_common::{
    Addr, Affinity, AffinityKey, Backend, Config, CtEntry, FlowKey, FrontendKey, Ip6, NodeAddr,
    RevNat, Service, SrcRange,
};

use crate::maps::{
    AFFINITY, AFFINITY6, BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6, NODE_ADDRS, NODE_ADDRS6,
    REVNAT, REVNAT6, SERVICES, SERVICES6, SRC_RANGES, SRC_RANGES6,
};

/// Start of the IP header: XDP handles untagged Ethernet only.
pub const L3: usize = 14;

pub trait Family: 'static {
    type A: Addr;
    /// IPv6 (no header checksum, a hop limit byte, a pseudo-header in the ICMP checksum).
    const IS_V6: bool;
    /// Address family for `bpf_fib_lookup` (AF_INET, AF_INET6).
    const AF: u8;
    /// Offset of the transport header when the IP header has its minimal form (the only
    /// shape XDP translates; see `packet::parse`).
    const L4: usize;
    /// Offsets of the source and destination addresses from the start of the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// Offset of the TTL / hop limit from the start of the IP header.
    const TTL: usize;
    /// ICMP's protocol number in this family (1, 58).
    const PROTO_ICMP: u8;
    /// In an ICMP error at [`Self::L4`]: the quoted IP header and its transport header.
    const INNER_L3: usize;
    const INNER_L4: usize;

    fn services() -> &'static HashMap<FrontendKey<Self::A>, Service>;
    fn backends() -> &'static Array<Backend<Self::A>>;
    fn conntrack() -> &'static LruHashMap<FlowKey<Self::A>, CtEntry<Self::A>>;
    fn revnat() -> &'static HashMap<FlowKey<Self::A>, RevNat<Self::A>>;
    fn node_addrs() -> &'static HashMap<Self::A, NodeAddr>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::A>, Affinity<Self::A>>;
    fn src_ranges() -> &'static LpmTrie<SrcRange<Self::A>, u32>;
    /// The SNAT source for frontends that are not node addresses.
    fn snat_addr(cfg: &Config) -> Self::A;
    /// The pod network's tunnel device (ifindex, 0 for none) and its address.
    fn tunnel(cfg: &Config) -> (u32, Self::A);
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type A = u32;
    const IS_V6: bool = false;
    const AF: u8 = 2;
    const L4: usize = L3 + 20;
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const TTL: usize = 8;
    const PROTO_ICMP: u8 = 1;
    const INNER_L3: usize = Self::L4 + 8;
    const INNER_L4: usize = Self::INNER_L3 + 20;

    #[inline(always)]
    fn services() -> &'static HashMap<FrontendKey, Service> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend> {
        &BACKENDS
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey, CtEntry> {
        &CONNTRACK
    }
    #[inline(always)]
    fn revnat() -> &'static HashMap<FlowKey, RevNat> {
        &REVNAT
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<u32, NodeAddr> {
        &NODE_ADDRS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, Affinity> {
        &AFFINITY
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRange, u32> {
        &SRC_RANGES
    }
    #[inline(always)]
    fn snat_addr(cfg: &Config) -> u32 {
        cfg.snat_addr
    }
    #[inline(always)]
    fn tunnel(cfg: &Config) -> (u32, u32) {
        (cfg.tun_ifindex, cfg.tun_addr)
    }
}

impl Family for V6 {
    type A = Ip6;
    const IS_V6: bool = true;
    const AF: u8 = 10;
    const L4: usize = L3 + 40;
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const TTL: usize = 7;
    const PROTO_ICMP: u8 = 58;
    const INNER_L3: usize = Self::L4 + 8;
    const INNER_L4: usize = Self::INNER_L3 + 40;

    #[inline(always)]
    fn services() -> &'static HashMap<FrontendKey<Ip6>, Service> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<Ip6>> {
        &BACKENDS6
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey<Ip6>, CtEntry<Ip6>> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn revnat() -> &'static HashMap<FlowKey<Ip6>, RevNat<Ip6>> {
        &REVNAT6
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<Ip6, NodeAddr> {
        &NODE_ADDRS6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Ip6>, Affinity<Ip6>> {
        &AFFINITY6
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRange<Ip6>, u32> {
        &SRC_RANGES6
    }
    #[inline(always)]
    fn snat_addr(cfg: &Config) -> Ip6 {
        cfg.snat_addr6
    }
    #[inline(always)]
    fn tunnel(cfg: &Config) -> (u32, Ip6) {
        (cfg.tun_ifindex6, cfg.tun_addr6)
    }
}
