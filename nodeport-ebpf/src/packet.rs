//! Bounds-checked packet access and the one parse of Ethernet / IPv4|IPv6 / TCP|UDP into a
//! [`Flow`]. Anything this parser does not fully understand is reported as a pass reason,
//! and the packet goes to the kernel stack untouched.

use core::mem::size_of;

use nodeport_common::{Addr, Stat, PROTO_TCP, PROTO_UDP};

use crate::family::{Family, L3, V4, V6};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// IPv4 header field offsets (from the start of the IP header); the addresses' and the
/// TTL's are the family's (`Family::SADDR`, ...).
pub const IP_TTL_PROTO: usize = 8;
pub const IP_CHECK: usize = 10;
/// L4 field offsets (from the start of the TCP/UDP header).
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
/// Offset of the sequence number (the acknowledgment number follows).
pub const TCP_SEQ: usize = 4;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

pub use nodeport_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Transport offsets when the IP header has its minimal form (IPv4 without options, IPv6
/// without extension headers): the only shape XDP translates. Unprivileged-Spectre rules
/// (no CAP_PERFMON) allow packet pointer arithmetic only with immediate constants
/// (kernel/bpf/verifier.c: sanitize_ptr_alu, retrieve_ptr_limit), so XDP touches packet
/// memory at literal offsets only: these, and the family's (`Family::L4`, ...).
pub const L4_V4: usize = V4::L4;
pub const L4_V6: usize = V6::L4;

/// ICMP errors: destination unreachable (ICMP type 3, which includes fragmentation
/// needed; ICMPv6 type 1) and ICMPv6 packet too big (type 2). The ICMP checksum sits at
/// `Family::L4 + 2` in both families.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP_CHECK: usize = 2;

/// The IP family of an untagged Ethernet frame.
pub enum Ether {
    Ipv4,
    Ipv6,
}

/// The family by EtherType: `PassMalformed` for a runt, `PassNotIp` for anything else
/// (ARP, 802.1Q/802.1ad tagged: attach to the VLAN device instead).
#[inline(always)]
pub fn ether(b: &impl PacketBytes) -> Result<Ether, Stat> {
    match b.load::<u16>(12).map(u16::from_be) {
        Some(ETH_P_IPV4) => Ok(Ether::Ipv4),
        Some(ETH_P_IPV6) => Ok(Ether::Ipv6),
        Some(_) => Err(Stat::PassNotIp),
        None => Err(Stat::PassMalformed),
    }
}

/// Access to a packet: direct (XDP, constant offsets) or through `bpf_skb_load_bytes` and
/// `bpf_skb_store_bytes` (TC, any offset, no pointer arithmetic).
pub trait PacketBytes {
    /// The value of type `T` at `off`, if it lies inside the packet.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    /// Write `v` at `off`; false if it does not lie inside the packet. Checksums are the
    /// caller's business.
    fn store<T: Copy>(&self, off: usize, v: T) -> bool;
    /// Length of the whole packet.
    fn len(&self) -> usize;
}

/// Packet memory of one XDP invocation: `[start, end)`, and the frame length from
/// `bpf_xdp_get_buff_len` (subtracting packet pointers needs CAP_PERFMON).
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
    pub len: usize,
}

impl Bounds {
    /// A pointer to a `T` at `off`, if the whole `T` lies inside the packet. Callers pass
    /// constant offsets (see [`L3`]).
    #[inline(always)]
    pub fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        let p = self.start + off;
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }
}

/// The packet memory of an XDP context.
#[inline(always)]
pub fn xdp_bounds(ctx: &aya_ebpf::programs::XdpContext) -> Bounds {
    // SAFETY: helper on the program's own context.
    let len = unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
        len,
    }
}

impl PacketBytes for Bounds {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: `ptr` checked that the value lies inside packet memory.
        self.ptr::<T>(off).map(|p| unsafe { p.read_unaligned() })
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: T) -> bool {
        // SAFETY: `ptr` checked that the value lies inside packet memory.
        self.ptr::<T>(off)
            .map(|p| unsafe { p.write_unaligned(v) })
            .is_some()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }
}

/// A TC packet read through helpers.
pub struct Skb<'a>(pub &'a aya_ebpf::programs::TcContext);

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        self.0.load::<T>(off).ok()
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: T) -> bool {
        self.0.store(off, &v, 0).is_ok()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
}

/// What the datapath needs to know about a TCP or UDP packet of one family.
#[derive(Clone, Copy)]
pub struct Flow<A: Addr> {
    /// Offset of the IP header and of the L4 header. (`u16`: with the sequence numbers
    /// the flow would outgrow the stack frames of the IPv4 path as `usize`s.)
    pub l3: u16,
    pub l4: u16,
    /// Addresses and ports as raw network-order values.
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Time to live / hop limit.
    pub ttl: u8,
    /// Length of the IP packet, headers included, host order.
    pub tot_len: u16,
    /// TCP sequence and acknowledgment numbers, host order (0 for UDP): conntrack checks
    /// a FIN or RST against the flow's recent numbers before it believes it.
    pub seq: u32,
    pub ack: u32,
    /// IPv4 fragments of UDP: 0 for a whole datagram, [`FRAG_FIRST`] or [`FRAG_LATER`]
    /// (ports filled in from NP_FRAG by `frag::track`; no transport header to rewrite).
    pub frag: u8,
    /// IPv4 identification, raw network order (0 for IPv6): NP_FRAG's key.
    pub ip_id: u16,
}

/// [`Flow::frag`]: the first fragment of a datagram (MF set, offset 0), holding its ports.
pub const FRAG_FIRST: u8 = 1;
/// [`Flow::frag`]: a later fragment (offset != 0), without a transport header.
pub const FRAG_LATER: u8 = 2;

impl<A: Addr> Flow<A> {
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 as usize + TCP_CHECK
        } else {
            self.l4 as usize + UDP_CHECK
        }
    }
}

/// IPv6 next-header values that are extension headers (RFC 8200 section 4, and the
/// IANA list): hop-by-hop, routing, fragment, ESP, AH, destination options, mobility,
/// HIP, shim6, experimental.
#[inline(always)]
fn ipv6_ext(nexthdr: u8) -> bool {
    matches!(
        nexthdr,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// Parse the IP header of family `F` (the EtherType was checked) and the TCP|UDP header
/// after it. `OPTIONS`: whether an IPv4 header with options is accepted (TC) or passed on
/// as `PassIpOptions` (XDP, which then works at constant offsets). Promises, in order:
/// - truncated headers, a version that is not the family's, IHL < 5, a length shorter than
///   the headers or longer than the frame: `PassMalformed`;
/// - IPv4 fragments of UDP: the first (MF set, offset 0) is parsed like a datagram, its
///   UDP length (the whole datagram's) allowed beyond the fragment (`FRAG_FIRST`); a later
///   one (offset != 0) comes back with ports 0 (`FRAG_LATER`, see `frag::track`). IPv4
///   fragments of other protocols: `PassFragment`, also the first one;
/// - IPv6 with an extension header first (the fragment header included): `PassIpv6Ext`.
///   The chain is not walked: such packets go to the stack untouched;
/// - neither TCP nor UDP: `PassOtherProto`.
#[inline(always)]
pub fn parse<F: Family, const OPTIONS: bool>(b: &impl PacketBytes) -> Result<Flow<F::A>, Stat> {
    let l3 = L3;
    let frame_l3_len = b.len().saturating_sub(l3);
    let vihl: u8 = b.load(l3).ok_or(Stat::PassMalformed)?;
    let saddr: F::A = b.load(l3 + F::SADDR).ok_or(Stat::PassMalformed)?;
    let daddr: F::A = b.load(l3 + F::DADDR).ok_or(Stat::PassMalformed)?;
    let (l4, l4_len, proto, ttl, tot_len, frag, ip_id) = if F::IS_V6 {
        let hdr: [u16; 4] = b.load(l3).ok_or(Stat::PassMalformed)?;
        let payload_len = u16::from_be(hdr[2]) as usize;
        let [nexthdr, hop_limit] = hdr[3].to_ne_bytes();
        if vihl >> 4 != 6 || IPV6_HLEN + payload_len > frame_l3_len {
            return Err(Stat::PassMalformed);
        }
        if ipv6_ext(nexthdr) {
            return Err(Stat::PassIpv6Ext);
        }
        let tot_len = (IPV6_HLEN + payload_len) as u16;
        (F::L4, payload_len, nexthdr, hop_limit, tot_len, 0, 0)
    } else {
        if vihl >> 4 != 4 {
            return Err(Stat::PassMalformed);
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < IPV4_MIN_HLEN {
            return Err(Stat::PassMalformed);
        }
        // The fixed header must be there, and then the options the IHL announces.
        let tot_len = u16::from_be(b.load::<u16>(l3 + 2).ok_or(Stat::PassMalformed)?);
        let ip_id: u16 = b.load(l3 + 4).ok_or(Stat::PassMalformed)?;
        let frag = u16::from_be(b.load::<u16>(l3 + 6).ok_or(Stat::PassMalformed)?);
        let ttl_proto: [u8; 2] = b.load(l3 + IP_TTL_PROTO).ok_or(Stat::PassMalformed)?;
        if ihl > frame_l3_len || (tot_len as usize) < ihl || tot_len as usize > frame_l3_len {
            return Err(Stat::PassMalformed);
        }
        let frag = if frag & 0x1fff != 0 {
            FRAG_LATER
        } else if frag & 0x2000 != 0 {
            FRAG_FIRST
        } else {
            0
        };
        if frag != 0 && ttl_proto[1] != PROTO_UDP {
            return Err(Stat::PassFragment);
        }
        if !OPTIONS && ihl != IPV4_MIN_HLEN {
            return Err(Stat::PassIpOptions);
        }
        let l4 = if OPTIONS { l3 + ihl } else { F::L4 };
        (
            l4,
            tot_len as usize - ihl,
            ttl_proto[1],
            ttl_proto[0],
            tot_len,
            frag,
            ip_id,
        )
    };
    let (sport, dport, tcp_flags, seq, ack) = match proto {
        // No transport header: the ports come from the first fragment (`frag::track`).
        _ if frag == FRAG_LATER => (0, 0, 0, 0, 0),
        PROTO_TCP => {
            if l4_len < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let ports: [u16; 2] = b.load(l4).ok_or(Stat::PassMalformed)?;
            let doff: u8 = b.load(l4 + 12).ok_or(Stat::PassMalformed)?;
            let flags: u8 = b.load(l4 + TCP_FLAGS).ok_or(Stat::PassMalformed)?;
            let seq_ack: [u32; 2] = b.load(l4 + TCP_SEQ).ok_or(Stat::PassMalformed)?;
            // The checksum is rewritten in place: it must be inside the frame.
            if b.load::<u16>(l4 + TCP_CHECK).is_none() || ((doff >> 4) as usize) * 4 < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            (
                ports[0],
                ports[1],
                flags,
                u32::from_be(seq_ack[0]),
                u32::from_be(seq_ack[1]),
            )
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let hdr: [u16; 4] = b.load(l4).ok_or(Stat::PassMalformed)?;
            let udp_len = u16::from_be(hdr[2]) as usize;
            // A first fragment's UDP length is the whole datagram's.
            if udp_len < UDP_HLEN || (udp_len > l4_len && frag != FRAG_FIRST) {
                return Err(Stat::PassMalformed);
            }
            (hdr[0], hdr[1], 0, 0, 0)
        }
        _ => return Err(Stat::PassOtherProto),
    };
    Ok(Flow {
        l3: l3 as u16,
        l4: l4 as u16,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        ttl,
        tot_len,
        seq,
        ack,
        frag,
        ip_id,
    })
}

/// An ICMP error quoting a TCP or UDP packet: the outer addresses and the quoted packet's
/// tuple, raw network order.
#[derive(Clone, Copy)]
pub struct IcmpError<A: Addr> {
    /// The ICMP packet itself as a flow for the FIB (proto ICMP, no ports).
    pub outer: Flow<A>,
    /// The quoted packet's tuple, as it was sent.
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parse an ICMP error after [`parse`] returned `PassOtherProto` (so the outer header is
/// of family `F` with a consistent length, and IPv4 is not a fragment). `None`: an outer
/// IPv4 header with options or IPv6 extension headers, or not a destination-unreachable
/// (or ICMPv6 packet-too-big) quoting a minimal-header, unfragmented-or-first TCP/UDP
/// packet with its ports.
#[inline(always)]
pub fn parse_icmp_error<F: Family>(b: &impl PacketBytes) -> Option<IcmpError<F::A>> {
    let vihl: u8 = b.load(L3)?;
    let inner_vihl: u8 = b.load(F::INNER_L3)?;
    let icmp_type: u8 = b.load(F::L4)?;
    let (ip_len, proto, ttl, quoted) = if F::IS_V6 {
        let hdr: [u16; 4] = b.load(L3)?;
        let [nexthdr, hop_limit] = hdr[3].to_ne_bytes();
        let inner_nexthdr: u8 = b.load(F::INNER_L3 + 6)?;
        let quoted = vihl >> 4 == 6
            && inner_vihl >> 4 == 6
            && (icmp_type == ICMP6_DEST_UNREACH || icmp_type == ICMP6_PACKET_TOO_BIG)
            && (inner_nexthdr == PROTO_TCP || inner_nexthdr == PROTO_UDP);
        let len = IPV6_HLEN + u16::from_be(hdr[2]) as usize;
        (len, nexthdr, hop_limit, quoted.then_some(inner_nexthdr))
    } else {
        let ttl_proto: [u8; 2] = b.load(L3 + IP_TTL_PROTO)?;
        let inner_frag = u16::from_be(b.load::<u16>(F::INNER_L3 + 6)?);
        let inner_proto: u8 = b.load(F::INNER_L3 + IP_TTL_PROTO + 1)?;
        let quoted = vihl == 0x45
            && inner_vihl == 0x45
            && icmp_type == ICMP_DEST_UNREACH
            && inner_frag & 0x1fff == 0
            && (inner_proto == PROTO_TCP || inner_proto == PROTO_UDP);
        let len = u16::from_be(b.load::<u16>(L3 + 2)?) as usize;
        (
            len,
            ttl_proto[1],
            ttl_proto[0],
            quoted.then_some(inner_proto),
        )
    };
    let inner_proto = quoted?;
    if proto != F::PROTO_ICMP || ip_len < F::INNER_L4 + 8 - L3 {
        return None;
    }
    let ports: [u16; 2] = b.load(F::INNER_L4)?;
    Some(IcmpError {
        outer: Flow {
            l3: L3 as u16,
            l4: F::L4 as u16,
            saddr: b.load(L3 + F::SADDR)?,
            daddr: b.load(L3 + F::DADDR)?,
            sport: 0,
            dport: 0,
            proto,
            tcp_flags: 0,
            ttl,
            tot_len: ip_len as u16,
            seq: 0,
            ack: 0,
            frag: 0,
            ip_id: 0,
        },
        saddr: b.load(F::INNER_L3 + F::SADDR)?,
        daddr: b.load(F::INNER_L3 + F::DADDR)?,
        sport: ports[0],
        dport: ports[1],
        proto: inner_proto,
    })
}
