//! IPv4 fragment tracking (NP_FRAG_V1): the first fragment of a datagram carries the
//! transport ports; later fragments carry none, so the datapath remembers the ports under
//! the datagram's identity (addresses, IP id, protocol: RFC 791's reassembly key) and
//! later fragments take the translation of the flow those ports name.

/// NP_FRAG_V1 map name, and its default size. Entries are small and short-lived: LRU
/// eviction, no timeout (a later fragment normally follows its first within microseconds).
pub const MAP_FRAG: &str = "NP_FRAG_V1";
pub const DEFAULT_FRAG_ENTRIES: u32 = 16_384;

/// NP_FRAG key: one IPv4 datagram as it arrived (before any translation), raw network
/// order. The same fields the kernel reassembles by (net/ipv4/ip_fragment.c, `ip4_frag_match`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification, network order.
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

/// NP_FRAG value: the transport ports the datagram's first fragment carried, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, integers only, explicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
}
