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

/// Packet memory of one program invocation: `[start, end)` is directly readable; `len` is
/// the whole packet's length (larger in TC when the skb is non-linear).
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
    pub len: usize,
}

impl Bounds {
    /// A pointer to a `T` at `off`, if the whole `T` lies inside the packet.
    #[inline(always)]
    pub fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        let p = self.start + off;
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }

    #[inline(always)]
    pub fn read<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: `ptr` checked that the value lies inside packet memory.
        self.ptr::<T>(off).map(|p| unsafe { p.read_unaligned() })
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

/// Parse Ethernet / IPv4 / TCP|UDP. Promises, in order:
/// - not Ethernet+IPv4 (ARP, IPv6, 802.1Q/802.1ad tagged): `PassNotIpv4`;
/// - truncated headers, version != 4, IHL < 5, total length shorter than the headers or
///   longer than the frame: `PassMalformed`;
/// - fragments (MF set or non-zero offset): `PassFragment`, also the first one;
/// - neither TCP nor UDP: `PassOtherProto`.
/// IP options are accepted: the L4 header is found through the IHL.
#[inline(always)]
pub fn parse(b: &Bounds) -> Result<Flow, Stat> {
    let ethertype = u16::from_be(b.read::<u16>(12).ok_or(Stat::PassMalformed)?);
    if ethertype != ETH_P_IPV4 {
        return Err(Stat::PassNotIpv4);
    }
    let l3 = ETH_HLEN;
    let vihl: u8 = b.read(l3).ok_or(Stat::PassMalformed)?;
    if vihl >> 4 != 4 {
        return Err(Stat::PassMalformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Stat::PassMalformed);
    }
    // The fixed header must be there, and then the options the IHL announces.
    let tot_len = u16::from_be(b.read::<u16>(l3 + 2).ok_or(Stat::PassMalformed)?);
    let frag = u16::from_be(b.read::<u16>(l3 + 6).ok_or(Stat::PassMalformed)?);
    let ttl_proto: [u8; 2] = b.read(l3 + IP_TTL_PROTO).ok_or(Stat::PassMalformed)?;
    let saddr: u32 = b.read(l3 + IP_SADDR).ok_or(Stat::PassMalformed)?;
    let daddr: u32 = b.read(l3 + IP_DADDR).ok_or(Stat::PassMalformed)?;
    if b.ptr::<u8>(l3 + ihl - 1).is_none() {
        return Err(Stat::PassMalformed);
    }
    let frame_l3_len = b.len.saturating_sub(l3);
    if (tot_len as usize) < ihl || tot_len as usize > frame_l3_len {
        return Err(Stat::PassMalformed);
    }
    if frag & 0x3fff != 0 {
        return Err(Stat::PassFragment);
    }
    let proto = ttl_proto[1];
    let l4 = l3 + ihl;
    let l4_len = tot_len as usize - ihl;
    let (sport, dport, tcp_flags) = match proto {
        PROTO_TCP => {
            if l4_len < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let ports: [u16; 2] = b.read(l4).ok_or(Stat::PassMalformed)?;
            let doff: u8 = b.read(l4 + 12).ok_or(Stat::PassMalformed)?;
            let flags: u8 = b.read(l4 + TCP_FLAGS).ok_or(Stat::PassMalformed)?;
            // The checksum is rewritten in place: it must be inside the frame.
            if b.ptr::<u16>(l4 + TCP_CHECK).is_none() || ((doff >> 4) as usize) * 4 < TCP_HLEN {
                return Err(Stat::PassMalformed);
            }
            (ports[0], ports[1], flags)
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN {
                return Err(Stat::PassMalformed);
            }
            let hdr: [u16; 4] = b.read(l4).ok_or(Stat::PassMalformed)?;
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
