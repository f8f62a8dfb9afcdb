//! Every map of the datapath, declared once. Sizes are defaults the agent may override at
//! load time (`EbpfLoader::set_max_entries`); names come from `nodeport_common::maps`.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use nodeport_common::{
    frag::{FragKey, FragPorts, DEFAULT_FRAG_ENTRIES},
    reject::RejectBucket,
    stats::STAT_COUNT,
    Affinity, Affinity6, AffinityKey, AffinityKey6, Backend, Backend6, Config, CtEntry, CtEntry6,
    FlowKey, FlowKey6, FrontendKey, FrontendKey6, Ip6, MaglevEntry, NodeAddr, RevNat, RevNat6,
    Service, SrcRange, SrcRange6, DEFAULT_AFFINITY6_ENTRIES, DEFAULT_AFFINITY_ENTRIES,
    DEFAULT_CT6_ENTRIES, DEFAULT_CT_ENTRIES, DEFAULT_MAGLEV_SLOTS, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_DEVICES, DEFAULT_MAX_NODE_ADDRS, DEFAULT_MAX_SERVICES, DEFAULT_SRC_RANGES,
    DEFAULT_SRC_RANGES6, MAGLEV_SLOTS_PER_ENTRY,
};

/// NP_SVC_V1: frontend (addr or 0 for nodePorts, port, proto) -> service (Maglev table range).
#[map(name = "NP_SVC_V1")]
pub static SERVICES: HashMap<FrontendKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// NP_BE_V1: backend id -> backend address and target port. An array: the agent hands out
/// dense ids from 1, so an element per id costs 8 bytes where a hash entry took ~80, and a
/// lookup is an index the verifier inlines, not a hash. A free id reads as all zero.
#[map(name = "NP_BE_V1")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// NP_MAGLEV_V1: slot pair -> two backend ids (see `MaglevEntry`); each service owns `table_size` slots at `table_off`.
/// Memory-mappable so the agent writes whole tables without a syscall per slot.
#[map(name = "NP_MAGLEV_V1")]
pub static MAGLEV: Array<MaglevEntry> = Array::with_max_entries(
    DEFAULT_MAGLEV_SLOTS / MAGLEV_SLOTS_PER_ENTRY,
    BPF_F_MMAPABLE,
);

/// NP_CT_V1: client -> frontend tuple -> bound backend and translation.
#[map(name = "NP_CT_V1")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// NP_RNAT_V1: reply tuple as it reaches this node -> frontend and client to restore.
#[map(name = "NP_RNAT_V1")]
pub static REVNAT: HashMap<FlowKey, RevNat> = HashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// NP_NODEADDR_V1: IPv4 address of this node -> flags. Destinations that take nodePorts.
#[map(name = "NP_NODEADDR_V1")]
pub static NODE_ADDRS: HashMap<u32, NodeAddr> =
    HashMap::with_max_entries(DEFAULT_MAX_NODE_ADDRS, 0);

/// NP_CONFIG_V1: index 0 -> runtime settings.
#[map(name = "NP_CONFIG_V1")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// NP_STATS_V1: counter index (`Stat`) -> per-CPU packet count.
#[map(name = "NP_STATS_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// NP_DEV_V1: ifindex -> ifindex, the interfaces XDP may redirect into (ours, with NAPI).
/// NP_REJECT_V1: each CPU's budget of refusals (TCP RST, ICMP port unreachable) and path
/// MTU errors (ICMP fragmentation needed, ICMPv6 packet too big).
#[map(name = "NP_REJECT_V1")]
pub static REJECT: PerCpuArray<RejectBucket> = PerCpuArray::with_max_entries(1, 0);

/// NP_REJECT_BUF_V1: each CPU's scratch frame for a refusal built in TC (a copy of the
/// packet's head, rewritten and stored back; too large for the BPF stack).
#[map(name = "NP_REJECT_BUF_V1")]
pub static REJECT_BUF: PerCpuArray<[u8; REJECT_BUF_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// NP_FIB_BUF_V1: each CPU's `bpf_fib_lookup` parameters for the route question of a new
/// flow's SNAT source (`fwd::egress_ifindex`): 64 bytes that the IPv4 path's frame, which
/// holds the whole decision, has no room for.
#[map(name = "NP_FIB_BUF_V1")]
pub static FIB_BUF: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Room for the largest refusal frame (an ICMPv6 packet too big: 1294 bytes).
pub const REJECT_BUF_LEN: usize = 1296;

#[map(name = "NP_DEV_V1")]
pub static DEVICES: DevMapHash = DevMapHash::with_max_entries(DEFAULT_MAX_DEVICES, 0);

/// NP_AFF_V1: (client address, service port id) -> the backend the client sticks to.
#[map(name = "NP_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);

/// NP_SRCRANGE_V1: (service port id, client CIDR) -> unused; loadBalancerSourceRanges.
/// (aya-ebpf adds BPF_F_NO_PREALLOC, which the kernel requires of LPM tries.)
#[map(name = "NP_SRCRANGE_V1")]
pub static SRC_RANGES: LpmTrie<SrcRange, u32> = LpmTrie::with_max_entries(DEFAULT_SRC_RANGES, 0);

// The IPv6 counterparts: the same layouts with `Ip6` addresses. Backend ids are one space
// over NP_BE and NP_BE6 (an id is a backend of one family; the other array is zero there).

#[map(name = "NP_SVC6_V1")]
pub static SERVICES6: HashMap<FrontendKey6, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "NP_BE6_V1")]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "NP_CT6_V1")]
pub static CONNTRACK6: LruHashMap<FlowKey6, CtEntry6> =
    LruHashMap::with_max_entries(DEFAULT_CT6_ENTRIES, 0);

#[map(name = "NP_RNAT6_V1")]
pub static REVNAT6: HashMap<FlowKey6, RevNat6> = HashMap::with_max_entries(DEFAULT_CT6_ENTRIES, 0);

#[map(name = "NP_NODEADDR6_V1")]
pub static NODE_ADDRS6: HashMap<Ip6, NodeAddr> =
    HashMap::with_max_entries(DEFAULT_MAX_NODE_ADDRS, 0);

#[map(name = "NP_AFF6_V1")]
pub static AFFINITY6: LruHashMap<AffinityKey6, Affinity6> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY6_ENTRIES, 0);

#[map(name = "NP_SRCRANGE6_V1")]
pub static SRC_RANGES6: LpmTrie<SrcRange6, u32> = LpmTrie::with_max_entries(DEFAULT_SRC_RANGES6, 0);

/// NP_FRAG_V1: IPv4 datagram (addresses, IP id, protocol) -> the ports its first fragment
/// carried, for its later fragments (`frag.rs`).
#[map(name = "NP_FRAG_V1")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_ENTRIES, 0);
