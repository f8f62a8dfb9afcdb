//! Refusals for Services without any endpoint (kube-proxy's REJECT): a TCP RST for a SYN,
//! an ICMP (ICMPv6) port unreachable for UDP, sent back from the frontend address. The
//! headers are built here, whole and with their checksums, from values the datapath read;
//! the datapath resizes the frame and these functions rewrite it in place (XDP on packet
//! memory, TC on a copy it stores back). Pure code, tested on the host.
//!
//! Frames, Ethernet header first, once the datapath has resized them:
//! - RST: `eth | IP | TCP (20 bytes)`: the client's own headers, cut after the first 20
//!   bytes of TCP header, turned around.
//! - Port unreachable: `eth | IP | ICMP header (8) | the client's IP header | the first 8
//!   bytes of its UDP header` (the quote: what the client's stack matches its socket with);
//!   the datapath makes room for the new headers in front of the client's.
//! - Path MTU errors (ICMP fragmentation needed, ICMPv6 packet too big) for a packet too
//!   big for the next hop towards a remote backend: `eth | IP | ICMP header (8) | as much
//!   of the client's packet as keeps the error within 576 (IPv4) / 1280 (IPv6) bytes`. The
//!   datapath sums the long quote with `bpf_csum_diff` and passes the sum in.

/// Header lengths.
pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
/// Bytes of the client's transport header quoted after its IP header.
pub const QUOTE_L4: usize = 8;

/// Frame lengths of the refusals.
pub const RST4_FRAME: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
pub const RST6_FRAME: usize = ETH_HLEN + IPV6_HLEN + TCP_HLEN;
pub const UNREACH4_FRAME: usize = ETH_HLEN + 2 * IPV4_HLEN + ICMP_HLEN + QUOTE_L4;
pub const UNREACH6_FRAME: usize = ETH_HLEN + 2 * IPV6_HLEN + ICMP_HLEN + QUOTE_L4;
/// Room an unreachable needs in front of the client's IP header (new IP and ICMP headers).
pub const UNREACH4_ROOM: usize = IPV4_HLEN + ICMP_HLEN;
pub const UNREACH6_ROOM: usize = IPV6_HLEN + ICMP_HLEN;

/// Bytes of the client's packet a path MTU error quotes: as much as keeps the error within
/// the datagram every host takes, 576 bytes for IPv4 (RFC 1812 4.3.2.3; Linux `icmp_send`
/// quotes as much), 1280 for IPv6 (RFC 4443 2.4 (c)). Multiples of 4, as `bpf_csum_diff`
/// needs; IPv4 packets shorter than that are not answered (no route MTU below it exists
/// in practice: the kernel's smallest learnt path MTU is 552).
pub const PTB4_QUOTE: usize = 576 - IPV4_HLEN - ICMP_HLEN;
pub const PTB6_QUOTE: usize = 1280 - IPV6_HLEN - ICMP_HLEN;
/// Frame lengths of the path MTU errors (room in front of the quote as for unreachables).
pub const PTB4_FRAME: usize = ETH_HLEN + UNREACH4_ROOM + PTB4_QUOTE;
pub const PTB6_FRAME: usize = ETH_HLEN + UNREACH6_ROOM + PTB6_QUOTE;
/// The path MTU reported when the kernel does not say which it found (before 5.12,
/// `bpf_fib_lookup` returns FRAG_NEEDED without `mtu_result`): the minimum every path
/// takes, so the client's next packets fit whatever the real one is.
pub const PTB4_MIN_MTU: u16 = 576;
pub const PTB6_MIN_MTU: u16 = 1280;

/// Refusals each CPU may send per second, and the burst it may save up (the kernel's own
/// ICMP rate limit defaults: `icmp_msgs_per_sec` 1000, `icmp_msgs_burst` 50).
pub const REJECT_PER_SEC: u64 = 1000;
pub const REJECT_BURST: u64 = 50;

/// NP_REJECT value (per CPU): the token bucket of refusals, in nanoseconds of credit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBucket {
    /// Credit saved up, at most `REJECT_BURST` refusals' worth.
    pub credit_ns: u64,
    /// When the credit was last topped up.
    pub last_ns: u64,
}

const NS_PER_REJECT: u64 = 1_000_000_000 / REJECT_PER_SEC;

impl RejectBucket {
    /// Tops the credit up for the time since the last call and spends one refusal's worth
    /// if there is enough. False: over the limit.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64) -> bool {
        let earned = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns;
        let credit = self.credit_ns.saturating_add(earned);
        let credit = if credit > REJECT_BURST * NS_PER_REJECT {
            REJECT_BURST * NS_PER_REJECT
        } else {
            credit
        };
        if credit < NS_PER_REJECT {
            self.credit_ns = credit;
            return false;
        }
        self.credit_ns = credit - NS_PER_REJECT;
        true
    }
}

use crate::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMP6: u8 = 58;
const TTL: u8 = 64;

/// Write `src` into `f` at `at`, a volatile byte at a time: LLVM then cannot merge the
/// stores into a `memcpy`/`memset` call, whose loop does pointer arithmetic the verifier
/// refuses without CAP_PERFMON (in XDP, `f` is packet memory).
#[inline(always)]
fn put(f: &mut [u8], at: usize, src: &[u8]) {
    let mut i = 0;
    while i < src.len() {
        // SAFETY: a write to an element of a live slice.
        unsafe { core::ptr::write_volatile(&mut f[at + i], src[i]) };
        i += 1;
    }
}

/// The byte at `i`, read volatile (see [`put`]: no `memcpy` out of packet memory either).
#[inline(always)]
fn get(f: &[u8], i: usize) -> u8 {
    // SAFETY: a read of an element of a live slice.
    unsafe { core::ptr::read_volatile(&f[i]) }
}

/// The one's-complement sum of `b` as big-endian 16-bit words, added to `sum` (not folded).
#[inline(always)]
fn add_bytes(mut sum: u64, b: &[u8]) -> u64 {
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    sum
}

/// The checksum field for a sum (folded, complemented, big-endian).
#[inline(always)]
fn check(mut sum: u64) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// An IPv4 header without options: total length `tot_len`, protocol `proto`, with its
/// checksum. As Linux sends them: a reset with don't-fragment set, an ICMP error without
/// it and with `tos` 0xc0 (internetwork control).
#[inline(always)]
fn ipv4(h: &mut [u8], icmp: bool, tot_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    let len = tot_len.to_be_bytes();
    let (tos, df) = if icmp { (0xc0, 0) } else { (0, 0x40) };
    let head = [0x45, tos, len[0], len[1], 0, 0, df, 0, TTL, proto, 0, 0];
    put(h, 0, &head);
    put(h, 12, &src);
    put(h, 16, &dst);
    let c = check(add_bytes(0, &h[..IPV4_HLEN]));
    put(h, 10, &c);
}

/// An IPv6 header: payload length `plen`, next header `next`.
#[inline(always)]
fn ipv6(h: &mut [u8], plen: u16, next: u8, src: [u8; 16], dst: [u8; 16]) {
    let len = plen.to_be_bytes();
    put(h, 0, &[0x60, 0, 0, 0, len[0], len[1], next, TTL]);
    put(h, 8, &src);
    put(h, 24, &dst);
}

/// The pseudo-header sum of an upper-layer packet of `len` bytes, protocol `proto`.
#[inline(always)]
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
    add_bytes(add_bytes(0, src), dst) + proto as u64 + (len >> 16) as u64 + (len & 0xffff) as u64
}

/// The TCP fields of a reset answering a segment: RFC 9293 section 3.10.7.1 ("reset
/// generation"): a segment with an ACK gets `seq = its ack`, flags RST; one without gets
/// `seq = 0`, `ack = its seq + its length` (data, plus one each for SYN and FIN), flags
/// RST|ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RstFields {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: u32,
    ack: u32,
    flags: u8,
}

impl RstFields {
    /// From the client's TCP header `t` (20 bytes) and its data length.
    #[inline(always)]
    fn answer(t: &[u8], data_len: u32) -> Self {
        let flags = t[13];
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        let len = data_len + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        let (seq, ack, flags) = if flags & TCP_ACK != 0 {
            (ack, 0, TCP_RST)
        } else {
            (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
        };
        RstFields {
            sport: [t[2], t[3]],
            dport: [t[0], t[1]],
            seq,
            ack,
            flags,
        }
    }
    #[inline(always)]
    fn write(&self, t: &mut [u8], pseudo_sum: u64) {
        let (seq, ack) = (self.seq.to_be_bytes(), self.ack.to_be_bytes());
        put(t, 0, &self.sport);
        put(t, 2, &self.dport);
        put(t, 4, &seq);
        put(t, 8, &ack);
        put(t, 12, &[5 << 4, self.flags, 0, 0, 0, 0, 0, 0]);
        let c = check(add_bytes(pseudo_sum, &t[..TCP_HLEN]));
        put(t, 16, &c);
    }
}

/// The data length of a TCP segment whose IP packet carries `l4_len` bytes after the IP
/// header, TCP header `t`.
#[inline(always)]
fn tcp_data_len(l4_len: u16, t: &[u8]) -> u32 {
    (l4_len as u32).saturating_sub(((t[12] >> 4) as u32) * 4)
}

#[inline(always)]
fn addr4(h: &[u8], off: usize) -> [u8; 4] {
    let g = |i| get(h, off + i);
    [g(0), g(1), g(2), g(3)]
}

#[inline(always)]
fn addr6(h: &[u8], off: usize) -> [u8; 16] {
    let g = |i| get(h, off + i);
    [
        g(0),
        g(1),
        g(2),
        g(3),
        g(4),
        g(5),
        g(6),
        g(7),
        g(8),
        g(9),
        g(10),
        g(11),
        g(12),
        g(13),
        g(14),
        g(15),
    ]
}

/// The Ethernet header of a frame going back to `macs` (destination, source as received).
#[inline(always)]
fn eth_back(f: &mut [u8], macs: &[u8; 12], ethertype: u16) {
    let m = macs;
    let t = ethertype.to_be_bytes();
    put(
        f,
        0,
        &[
            m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5], t[0], t[1],
        ],
    );
}

#[inline(always)]
fn macs(f: &[u8]) -> [u8; 12] {
    let g = |i| get(f, i);
    [
        g(0),
        g(1),
        g(2),
        g(3),
        g(4),
        g(5),
        g(6),
        g(7),
        g(8),
        g(9),
        g(10),
        g(11),
    ]
}

const L3: usize = ETH_HLEN;

/// Turn the client's IPv4 TCP segment (IP header without options, the first 20 bytes of
/// its TCP header) into the reset answering it, from the frontend.
#[inline(always)]
pub fn rst4(f: &mut [u8; RST4_FRAME]) {
    let m = macs(f);
    eth_back(f, &m, 0x0800);
    let (client, frontend) = (addr4(f, L3 + 12), addr4(f, L3 + 16));
    let l4 = u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]).saturating_sub(IPV4_HLEN as u16);
    let t = L3 + IPV4_HLEN;
    let r = RstFields::answer(&f[t..], tcp_data_len(l4, &f[t..]));
    let len = (IPV4_HLEN + TCP_HLEN) as u16;
    ipv4(&mut f[L3..t], false, len, PROTO_TCP, frontend, client);
    r.write(
        &mut f[t..],
        pseudo(&frontend, &client, PROTO_TCP, TCP_HLEN as u32),
    );
}

/// [`rst4`] for IPv6 (no extension headers).
#[inline(always)]
pub fn rst6(f: &mut [u8; RST6_FRAME]) {
    let m = macs(f);
    eth_back(f, &m, 0x86dd);
    let (client, frontend) = (addr6(f, L3 + 8), addr6(f, L3 + 24));
    let l4 = u16::from_be_bytes([f[L3 + 4], f[L3 + 5]]);
    let t = L3 + IPV6_HLEN;
    let r = RstFields::answer(&f[t..], tcp_data_len(l4, &f[t..]));
    ipv6(&mut f[L3..t], TCP_HLEN as u16, PROTO_TCP, frontend, client);
    r.write(
        &mut f[t..],
        pseudo(&frontend, &client, PROTO_TCP, TCP_HLEN as u32),
    );
}

/// Fill in an ICMP error from the frontend to the client in front of the quote at
/// `L3 + UNREACH4_ROOM` (the client's IP header first): `head` is the ICMP header with a
/// zero checksum, `quote` the one's-complement sum of the quote as big-endian words.
#[inline(always)]
fn error4(f: &mut [u8], macs: &[u8; 12], head: [u8; ICMP_HLEN], quote: u64) {
    const Q: usize = L3 + UNREACH4_ROOM;
    const I: usize = L3 + IPV4_HLEN;
    eth_back(f, macs, 0x0800);
    let (client, frontend) = (addr4(f, Q + 12), addr4(f, Q + 16));
    let tot = (f.len() - L3) as u16;
    ipv4(&mut f[L3..I], true, tot, PROTO_ICMP, frontend, client);
    put(f, I, &head);
    put(f, I + 2, &check(add_bytes(quote, &head)));
}

/// [`error4`] for IPv6 (the quote at `L3 + UNREACH6_ROOM`); the checksum covers the
/// pseudo-header.
#[inline(always)]
fn error6(f: &mut [u8], macs: &[u8; 12], head: [u8; ICMP_HLEN], quote: u64) {
    const Q: usize = L3 + UNREACH6_ROOM;
    const I: usize = L3 + IPV6_HLEN;
    eth_back(f, macs, 0x86dd);
    let (client, frontend) = (addr6(f, Q + 8), addr6(f, Q + 24));
    let plen = (f.len() - I) as u16;
    ipv6(&mut f[L3..I], plen, PROTO_ICMP6, frontend, client);
    put(f, I, &head);
    let sum = pseudo(&frontend, &client, PROTO_ICMP6, plen as u32) + quote;
    put(f, I + 2, &check(add_bytes(sum, &head)));
}

/// Fill in an IPv4 port unreachable (type 3, code 3), from the frontend to the client,
/// in front of the quote at `UNREACH4_FRAME - 28`; `macs` are the Ethernet addresses the
/// client's frame arrived with.
#[inline(always)]
pub fn unreach4(f: &mut [u8; UNREACH4_FRAME], macs: &[u8; 12]) {
    let quote = add_bytes(0, &f[L3 + UNREACH4_ROOM..]);
    error4(f, macs, [3, 3, 0, 0, 0, 0, 0, 0], quote);
}

/// [`unreach4`] for IPv6: ICMPv6 port unreachable (type 1, code 4).
#[inline(always)]
pub fn unreach6(f: &mut [u8; UNREACH6_FRAME], macs: &[u8; 12]) {
    let quote = add_bytes(0, &f[L3 + UNREACH6_ROOM..]);
    error6(f, macs, [1, 4, 0, 0, 0, 0, 0, 0], quote);
}

/// Fill in an ICMP fragmentation needed (type 3, code 4) with next-hop MTU `mtu`, from the
/// frontend to the client, in front of the quote (the client's packet's first
/// [`PTB4_QUOTE`] bytes); `quote` is the quote's folded one's-complement sum as big-endian
/// words ([`quote_sum`] on the host, `bpf_csum_diff` in the datapath).
#[inline(always)]
pub fn frag_needed4(f: &mut [u8; PTB4_FRAME], macs: &[u8; 12], mtu: u16, quote: u16) {
    let m = mtu.to_be_bytes();
    error4(f, macs, [3, 4, 0, 0, 0, 0, m[0], m[1]], quote as u64);
}

/// [`frag_needed4`] for IPv6: ICMPv6 packet too big (type 2, code 0) with MTU `mtu`.
#[inline(always)]
pub fn too_big6(f: &mut [u8; PTB6_FRAME], macs: &[u8; 12], mtu: u16, quote: u16) {
    let m = (mtu as u32).to_be_bytes();
    error6(f, macs, [2, 0, 0, 0, m[0], m[1], m[2], m[3]], quote as u64);
}

/// The folded one's-complement sum of `b` as big-endian 16-bit words (`b` of even length):
/// the `quote` argument of [`frag_needed4`] and [`too_big6`].
pub fn quote_sum(b: &[u8]) -> u16 {
    let mut sum = add_bytes(0, b);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full checksum over `parts` verifies as zero (RFC 1071).
    fn verifies(parts: &[&[u8]]) -> bool {
        let sum = parts.iter().fold(0, |s, p| add_bytes(s, p));
        check(sum) == [0, 0]
    }

    const C4: [u8; 4] = [192, 0, 2, 10];
    const F4: [u8; 4] = [198, 51, 100, 1];
    const C6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10];
    const F6: [u8; 16] = [0xfd; 16];

    /// An IPv4 header (client to frontend) of `proto` carrying `l4_len` bytes.
    fn ip4(proto: u8, l4_len: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        ipv4(&mut h, false, 20 + l4_len, proto, C4, F4);
        h
    }

    fn ip6(proto: u8, l4_len: u16) -> [u8; 40] {
        let mut h = [0u8; 40];
        ipv6(&mut h, l4_len, proto, C6, F6);
        h
    }

    /// A TCP header from 40000 to 30080 with `flags`, seq 1000, ack 5000, `doff` words.
    fn tcp(flags: u8, doff: u8) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&30080u16.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[8..12].copy_from_slice(&5000u32.to_be_bytes());
        t[12] = doff << 4;
        t[13] = flags;
        t
    }

    const MACS: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];

    /// A frame: the node's and client's MACs as received, `ethertype`, then `parts`.
    fn frame<const N: usize>(ethertype: u16, parts: &[&[u8]]) -> [u8; N] {
        let mut o = [0u8; N];
        o[..12].copy_from_slice(&MACS);
        o[12..14].copy_from_slice(&ethertype.to_be_bytes());
        let mut at = 14;
        for p in parts {
            o[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        o
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn assert_back(f: &[u8], ethertype: u16) {
        assert_eq!(
            (&f[..6], &f[6..12]),
            (&MACS[6..], &MACS[..6]),
            "MACs swapped"
        );
        assert_eq!(f[12..14], ethertype.to_be_bytes());
    }

    #[test]
    fn rst4_answers_a_syn_from_the_frontend_with_valid_checksums() {
        // A SYN with 20 bytes of options (cut off by the datapath) and no data.
        let mut f: [u8; RST4_FRAME] = frame(0x0800, &[&ip4(PROTO_TCP, 40), &tcp(TCP_SYN, 10)]);
        rst4(&mut f);
        assert_back(&f, 0x0800);
        let h = &f[14..];
        assert!(verifies(&[&h[..20]]), "IP header checksum");
        assert!(
            verifies(&[&h[20..], &F4, &C4, &[0, PROTO_TCP, 0, 20]]),
            "TCP checksum"
        );
        assert_eq!((&h[12..16], &h[16..20]), (&F4[..], &C4[..]));
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 30080);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), 40000);
        assert_eq!((be32(&h[24..]), be32(&h[28..])), (0, 1001));
        assert_eq!((h[32], h[33]), (5 << 4, TCP_RST | TCP_ACK));
        assert_eq!(
            (u16::from_be_bytes([h[2], h[3]]), h[8], h[9]),
            (40, 64, PROTO_TCP)
        );
    }

    #[test]
    fn rst_acknowledges_data_and_fin_and_takes_the_ack_of_an_acking_segment() {
        // SYN carrying 100 bytes (TCP Fast Open) and FIN: ack = seq + 100 + 2.
        let mut f: [u8; RST4_FRAME] =
            frame(0x0800, &[&ip4(PROTO_TCP, 120), &tcp(TCP_SYN | TCP_FIN, 5)]);
        rst4(&mut f);
        assert_eq!(be32(&f[42..]), 1102);
        // A segment with ACK: seq = its ack, RST alone.
        let mut f: [u8; RST4_FRAME] = frame(0x0800, &[&ip4(PROTO_TCP, 20), &tcp(TCP_ACK, 5)]);
        rst4(&mut f);
        assert_eq!((be32(&f[38..]), be32(&f[42..]), f[47]), (5000, 0, TCP_RST));
    }

    #[test]
    fn rst6_checksum_includes_the_pseudo_header() {
        let mut t = tcp(TCP_SYN, 5);
        t[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut f: [u8; RST6_FRAME] = frame(0x86dd, &[&ip6(PROTO_TCP, 20), &t]);
        rst6(&mut f);
        assert_back(&f, 0x86dd);
        let h = &f[14..];
        assert!(verifies(&[
            &h[40..],
            &C6,
            &F6,
            &[0, 0, 0, 20, 0, 0, 0, PROTO_TCP]
        ]));
        assert_eq!(be32(&h[48..]), 0, "ack wraps");
        assert_eq!((&h[8..24], &h[24..40]), (&F6[..], &C6[..]));
        assert_eq!(
            (h[6], h[7], u16::from_be_bytes([h[4], h[5]])),
            (PROTO_TCP, 64, 20)
        );
    }

    #[test]
    fn unreach4_quotes_the_request_with_a_valid_checksum() {
        let udp = [0x9c, 0x40, 0x75, 0x80, 0, 12, 0xab, 0xcd];
        let (ip, room) = (ip4(17, 12), [0xee; UNREACH4_ROOM]);
        // As XDP leaves it: room in front, the old Ethernet header in it (overwritten).
        let mut f: [u8; UNREACH4_FRAME] = frame(0, &[&room, &ip, &udp]);
        unreach4(&mut f, &MACS);
        assert_back(&f, 0x0800);
        let h = &f[14..];
        assert!(verifies(&[&h[..20]]));
        assert!(verifies(&[&h[20..]]), "ICMP checksum covers the quote");
        assert_eq!((&h[12..16], &h[16..20]), (&F4[..], &C4[..]));
        assert_eq!((h[20], h[21], h[9], h[1]), (3, 3, PROTO_ICMP, 0xc0));
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 56);
        assert_eq!(
            (&h[28..48], &h[48..]),
            (&ip[..], &udp[..]),
            "the quote is untouched"
        );
    }

    #[test]
    fn unreach6_checksum_includes_the_pseudo_header() {
        let udp = [0x9c, 0x40, 0x75, 0x80, 0, 12, 0xab, 0xcd];
        let ip = ip6(17, 12);
        let mut f: [u8; UNREACH6_FRAME] = frame(0x86dd, &[&[0; UNREACH6_ROOM], &ip, &udp]);
        unreach6(&mut f, &MACS);
        assert_back(&f, 0x86dd);
        let h = &f[14..];
        assert!(verifies(&[&h[40..], &C6, &F6, &[0, 0, 0, 56, 0, 0, 0, 58]]));
        assert_eq!(
            (h[40], h[41], h[6], u16::from_be_bytes([h[4], h[5]])),
            (1, 4, 58, 56)
        );
        assert_eq!((&h[8..24], &h[24..40]), (&F6[..], &C6[..]));
        assert_eq!((&h[48..88], &h[88..]), (&ip[..], &udp[..]));
    }

    /// A 1500-byte client packet (IP header `ip` first) with a recognisable payload.
    fn big_packet(ip: &[u8]) -> [u8; 1500] {
        let mut v = [0u8; 1500];
        for (i, b) in v.iter_mut().enumerate() {
            *b = ip.get(i).copied().unwrap_or((i * 7) as u8);
        }
        v
    }

    #[test]
    fn frag_needed4_quotes_576_bytes_worth_with_the_mtu() {
        let pkt = big_packet(&ip4(PROTO_TCP, 1480));
        // As the datapath leaves it: room in front, the frame cut after the quote.
        let mut f: [u8; PTB4_FRAME] = frame(0, &[&[0xee; UNREACH4_ROOM], &pkt[..PTB4_QUOTE]]);
        frag_needed4(&mut f, &MACS, 1400, quote_sum(&pkt[..PTB4_QUOTE]));
        assert_back(&f, 0x0800);
        let h = &f[14..];
        assert_eq!(h.len(), 576);
        assert!(verifies(&[&h[..20]]), "IP header checksum");
        assert!(verifies(&[&h[20..]]), "ICMP checksum covers the quote");
        assert_eq!((&h[12..16], &h[16..20]), (&F4[..], &C4[..]));
        assert_eq!(
            (h[20], h[21], h[9], h[1], h[6]),
            (3, 4, PROTO_ICMP, 0xc0, 0)
        );
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 576);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 1400);
        assert_eq!(&h[28..], &pkt[..PTB4_QUOTE], "the quote is untouched");
    }

    #[test]
    fn too_big6_quotes_1280_bytes_worth_with_the_mtu() {
        let pkt = big_packet(&ip6(17, 1460));
        let mut f: [u8; PTB6_FRAME] = frame(0x86dd, &[&[0; UNREACH6_ROOM], &pkt[..PTB6_QUOTE]]);
        too_big6(&mut f, &MACS, 1400, quote_sum(&pkt[..PTB6_QUOTE]));
        assert_back(&f, 0x86dd);
        let h = &f[14..];
        assert_eq!(h.len(), 1280);
        let plen = (1280u32 - 40).to_be_bytes();
        assert!(verifies(&[&h[40..], &C6, &F6, &plen, &[0, 0, 0, 58]]));
        assert_eq!((h[40], h[41], h[6]), (2, 0, 58));
        assert_eq!(be32(&h[44..]), 1400);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1240);
        assert_eq!((&h[8..24], &h[24..40]), (&F6[..], &C6[..]));
        assert_eq!(&h[48..], &pkt[..PTB6_QUOTE]);
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let mut b = RejectBucket::default();
        let t0 = 10_000_000_000;
        let sent = (0..200).filter(|_| b.take(t0)).count();
        assert_eq!(sent as u64, REJECT_BURST);
        // One second later: REJECT_BURST again (the credit is capped), not 1000.
        let sent = (0..2000).filter(|_| b.take(t0 + 1_000_000_000)).count();
        assert_eq!(sent as u64, REJECT_BURST);
        // Spread over a second, 1000 pass.
        let mut b = RejectBucket::default();
        let sent = (0..4000u64).filter(|i| b.take(t0 + i * 250_000)).count();
        assert!(
            (1000..=1000 + REJECT_BURST as usize).contains(&sent),
            "{sent}"
        );
    }
}
