//! Bounds-checked packet access and the one parse of Ethernet / IPv4 / TCP|UDP into a
//! [`Flow`]. Anything this parser does not fully understand is reported as a pass reason,
//! and the packet goes to the kernel stack untouched.

use core::mem::size_of;

use nodeport_common::{Stat, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// IPv4 header field offsets (from the start of the IP header).
pub const IP_TTL_PROTO: usize = 8;
pub const IP_CHECK: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// L4 field offsets (from the start of the TCP/UDP header).
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets of the IPv4 and L4 headers when the IPv4 header has no options: the only shape
/// XDP translates. Unprivileged-Spectre rules (no CAP_PERFMON) allow packet pointer
/// arithmetic only with immediate constants (kernel/bpf/verifier.c: sanitize_ptr_alu,
/// retrieve_ptr_limit), so XDP touches packet memory at these literal offsets only.
pub const L3: usize = ETH_HLEN;
pub const L4: usize = ETH_HLEN + IPV4_MIN_HLEN;

/// An ICMP error (both IPv4 headers option-less, as XDP handles them): the ICMP header at
/// [`L4`], the quoted IPv4 header at [`INNER_L3`] and its first L4 bytes at [`INNER_L4`].
pub const PROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_CHECK: usize = L4 + 2;
pub const INNER_L3: usize = L4 + 8;
pub const INNER_L4: usize = INNER_L3 + IPV4_MIN_HLEN;

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

/// What the datapath needs to know about a TCP or UDP over IPv4 packet.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Offset of the IPv4 header and of the L4 header.
    pub l3: usize,
    pub l4: usize,
    /// Addresses and ports as raw network-order values.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Time to live.
    pub ttl: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
}

impl Flow {
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + TCP_CHECK
        } else {
            self.l4 + UDP_CHECK
        }
    }
}

/// Parse Ethernet / IPv4 / TCP|UDP. `OPTIONS`: whether an IPv4 header with options is
/// accepted (TC) or passed on as `PassIpOptions` (XDP, which then works at the constant
/// offsets [`L3`] and [`L4`]). Promises, in order:
/// - not Ethernet+IPv4 (ARP, IPv6, 802.1Q/802.1ad tagged): `PassNotIp`;
/// - truncated headers, version != 4, IHL < 5, total length shorter than the headers or
///   longer than the frame: `PassMalformed`;
/// - fragments (MF set or non-zero offset): `PassFragment`, also the first one;
/// - neither TCP nor UDP: `PassOtherProto`.
/// IP options are accepted: the L4 header is found through the IHL.
#[inline(always)]
pub fn parse<const OPTIONS: bool>(b: &impl PacketBytes) -> Result<Flow, Stat> {
    let ethertype = u16::from_be(b.load::<u16>(12).ok_or(Stat::PassMalformed)?);
    if ethertype != ETH_P_IPV4 {
        return Err(Stat::PassNotIp);
    }
    let l3 = L3;
    let vihl: u8 = b.load(l3).ok_or(Stat::PassMalformed)?;
    if vihl >> 4 != 4 {
        return Err(Stat::PassMalformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Stat::PassMalformed);
    }
    // The fixed header must be there, and then the options the IHL announces.
    let tot_len = u16::from_be(b.load::<u16>(l3 + 2).ok_or(Stat::PassMalformed)?);
    let frag = u16::from_be(b.load::<u16>(l3 + 6).ok_or(Stat::PassMalformed)?);
    let ttl_proto: [u8; 2] = b.load(l3 + IP_TTL_PROTO).ok_or(Stat::PassMalformed)?;
    let saddr: u32 = b.load(l3 + IP_SADDR).ok_or(Stat::PassMalformed)?;
    let daddr: u32 = b.load(l3 + IP_DADDR).ok_or(Stat::PassMalformed)?;
    let frame_l3_len = b.len().saturating_sub(l3);
    if ihl > frame_l3_len {
        return Err(Stat::PassMalformed);
    }
    if (tot_len as usize) < ihl || tot_len as usize > frame_l3_len {
        return Err(Stat::PassMalformed);
    }
    if frag & 0x3fff != 0 {
        return Err(Stat::PassFragment);
    }
    let proto = ttl_proto[1];
    if !OPTIONS && ihl != IPV4_MIN_HLEN {
        return Err(Stat::PassIpOptions);
    }
    let l4 = if OPTIONS { l3 + ihl } else { L4 };
    let l4_len = tot_len as usize - ihl;
    let (sport, dport, tcp_flags) = match proto {
        PROTO_TCP => {
            if l4_len < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let ports: [u16; 2] = b.load(l4).ok_or(Stat::PassMalformed)?;
            let doff: u8 = b.load(l4 + 12).ok_or(Stat::PassMalformed)?;
            let flags: u8 = b.load(l4 + TCP_FLAGS).ok_or(Stat::PassMalformed)?;
            // The checksum is rewritten in place: it must be inside the frame.
            if b.load::<u16>(l4 + TCP_CHECK).is_none() || ((doff >> 4) as usize) * 4 < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            (ports[0], ports[1], flags)
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let hdr: [u16; 4] = b.load(l4).ok_or(Stat::PassMalformed)?;
            let udp_len = u16::from_be(hdr[2]) as usize;
            if udp_len < UDP_HLEN || udp_len > l4_len {
                return Err(Stat::PassMalformed);
            }
            (hdr[0], hdr[1], 0)
        }
        _ => return Err(Stat::PassOtherProto),
    };
    Ok(Flow {
        l3,
        l4,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        ttl: ttl_proto[0],
        tot_len,
    })
}

/// An ICMP destination-unreachable (fragmentation-needed included) quoting a TCP or UDP
/// packet: the outer addresses and the quoted packet's tuple, raw network order.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// The ICMP packet itself as a flow for the FIB (proto ICMP, no ports).
    pub outer: Flow,
    /// The quoted packet's tuple, as it was sent.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parse an ICMP error after [`parse`] returned `PassOtherProto` (so the outer header is
/// IPv4, not a fragment, with a consistent length). `None`: outer IPv4 header with
/// options, or not a destination-unreachable quoting an option-less, unfragmented-or-first
/// TCP/UDP packet with its ports.
#[inline(always)]
pub fn parse_icmp_error(b: &impl PacketBytes) -> Option<IcmpError> {
    let vihl: u8 = b.load(L3)?;
    let ttl_proto: [u8; 2] = b.load(L3 + IP_TTL_PROTO)?;
    if vihl != 0x45 || ttl_proto[1] != PROTO_ICMP {
        return None;
    }
    let tot_len = u16::from_be(b.load::<u16>(L3 + 2)?);
    if (tot_len as usize) < INNER_L4 + 8 - L3 {
        return None;
    }
    let icmp_type: u8 = b.load(L4)?;
    let inner_vihl: u8 = b.load(INNER_L3)?;
    let inner_frag = u16::from_be(b.load::<u16>(INNER_L3 + 6)?);
    let inner_proto: u8 = b.load(INNER_L3 + IP_TTL_PROTO + 1)?;
    if icmp_type != ICMP_DEST_UNREACH
        || inner_vihl != 0x45
        || inner_frag & 0x1fff != 0
        || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP)
    {
        return None;
    }
    let ports: [u16; 2] = b.load(INNER_L4)?;
    Some(IcmpError {
        outer: Flow {
            l3: L3,
            l4: L4,
            saddr: b.load(L3 + IP_SADDR)?,
            daddr: b.load(L3 + IP_DADDR)?,
            sport: 0,
            dport: 0,
            proto: PROTO_ICMP,
            tcp_flags: 0,
            ttl: ttl_proto[0],
            tot_len,
        },
        saddr: b.load(INNER_L3 + IP_SADDR)?,
        daddr: b.load(INNER_L3 + IP_DADDR)?,
        sport: ports[0],
        dport: ports[1],
        proto: inner_proto,
    })
}
