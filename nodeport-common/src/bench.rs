//! Settings and counters of the benchmark programs (nodeport-ebpf/src/bench.rs): the packet
//! generator, the bare forwarder and the sink of `np-pktbench`; and the name of the tests'
//! neighbour program. The agent never loads these programs nor writes these maps.
//!
//! Frames circulate: a fixed population, injected once, goes generator -> node -> sink ->
//! back to the generator, which rewrites every header of every frame on each lap.

/// Program names.
pub const PROG_GEN: &str = "bench_gen";
pub const PROG_FWD: &str = "bench_fwd";
pub const PROG_SINK: &str = "bench_sink";

/// The tests' stand-in for another tool's TC program (nodeport-ebpf/src/neighbour.rs)
/// and its packet counter (per-CPU array of one `u64`).
pub const PROG_NEIGHBOUR: &str = "test_neighbour";
pub const MAP_NEIGHBOUR_CNT: &str = "NPT_CNT";

/// Map names (not `NP_`: the agent pins only its own maps).
pub const MAP_GEN: &str = "NPB_GEN";
pub const MAP_FWD: &str = "NPB_FWD";
pub const MAP_CNT: &str = "NPB_CNT";
pub const MAP_SINK: &str = "NPB_SINK";

/// NPB_CNT slots (per-CPU u64).
/// Frames the generator wrote; also its sequence number (run it pinned to one CPU).
pub const CNT_GEN: u32 = 0;
/// Frames the bare forwarder redirected.
pub const CNT_FWD: u32 = 1;
/// Frames the sink counted (and returned to the generator or dropped).
pub const CNT_SINK: u32 = 2;
/// Frames the generator dropped because it was told to stop (the population draining).
pub const CNT_GEN_STOPPED: u32 = 3;
pub const CNT_SLOTS: u32 = 4;

/// Generator flag: drop every arriving frame (ends a run: the population drains).
pub const GEN_F_STOP: u32 = 1;

/// NPB_GEN value (array of one): what the generator writes into every frame.
///
/// Frame `n` (the generator's sequence number) belongs to flow `f = n` when `flows` is 0
/// (every frame a new flow) and to `f = n % flows` otherwise (a fixed set, cycled). Flow
/// `f` goes to destination port `dst_port + f % dst_ports`, from source address
/// `src_addr + (f / dst_ports) % src_count` and source port
/// `1024 + (f / dst_ports / src_count) % 64512`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GenConfig {
    /// Ethernet source and destination (the generator's veth, the node's veth).
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 1: IPv6, 0: IPv4.
    pub ipv6: u8,
    /// 6 (TCP SYN) or 17 (UDP).
    pub proto: u8,
    /// Whole frame length, as passed in `data_in` (the IP and UDP lengths follow from it).
    pub frame_len: u16,
    /// First source address (IPv4: the first four bytes), network order.
    pub src_addr: [u8; 16],
    /// Destination address (IPv4: the first four bytes), network order.
    pub dst_addr: [u8; 16],
    /// How many source addresses (the last 32 bits of `src_addr` are incremented), >= 1.
    pub src_count: u32,
    /// 0: every frame a new flow; else the number of flows cycled.
    pub flows: u32,
    /// First destination port, host order.
    pub dst_port: u16,
    /// How many destination ports (services), >= 1.
    pub dst_ports: u16,
    /// Where written frames go: the generator's veth towards the node (XDP_REDIRECT).
    pub out_ifindex: u32,
    /// `GEN_F_*`.
    pub flags: u32,
}

/// Forwarder flag: rewrite the Ethernet addresses (else redirect the frame untouched).
pub const FWD_F_REWRITE: u32 = 1;

/// NPB_FWD value (array of one): where the bare forwarder sends frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwdConfig {
    /// Egress interface (in the forwarder's namespace).
    pub ifindex: u32,
    /// `FWD_F_*`.
    pub flags: u32,
    /// New Ethernet source (the egress veth) and destination (the sink).
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Sink flag: send counted frames back to the generator (else drop them).
pub const SINK_F_RETURN: u32 = 1;

/// NPB_SINK value (array of one): what the sink does with the frames it counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SinkConfig {
    /// The sink's veth back to the generator (in the sink's namespace).
    pub ifindex: u32,
    /// `SINK_F_*`.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<GenConfig>() == 68);
const _: () = assert!(core::mem::size_of::<FwdConfig>() == 20);
const _: () = assert!(core::mem::size_of::<SinkConfig>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), Copy, integers and byte arrays, explicit padding (sizes asserted).
    unsafe impl aya::Pod for GenConfig {}
    unsafe impl aya::Pod for FwdConfig {}
    unsafe impl aya::Pod for SinkConfig {}
}
