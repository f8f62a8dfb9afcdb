//! Header rewrites for a [`Nat`] decision, for both families. XDP writes packet memory
//! directly and updates checksums incrementally (frames from a wire carry complete
//! checksums). TC goes through the kernel's store and checksum helpers, which also handle
//! CHECKSUM_PARTIAL skbs of locally generated traffic (net/core/filter.c:
//! bpf_l4_csum_replace). IPv4 has a header checksum and a TTL inside it; IPv6 has neither
//! (its hop limit is a plain byte), but its ICMP checksum covers a pseudo-header.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nodeport_common::{csum, Addr, PROTO_TCP, PROTO_UDP};

use crate::{
    family::{Family, L3},
    lb::{IcmpNat, Nat},
    packet::{
        Bounds, Flow, IcmpError, PacketBytes, Skb, FRAG_LATER, ICMP_CHECK, IP_CHECK, IP_TTL_PROTO,
        L4_DPORT, L4_SPORT, L4_V4, L4_V6, TCP_CHECK, UDP_CHECK,
    },
};

/// Rewrite addresses and ports in place. `dec_ttl` when this node routes the packet.
/// XDP only translates minimal IP headers, so every offset is a constant: one
/// instantiation per family and checksum position. Returns false only if the headers are
/// not in bounds (cannot happen after `parse`).
#[inline(always)]
pub fn rewrite_xdp<F: Family>(b: &Bounds, f: &Flow<F::A>, nat: &Nat<F::A>, dec_ttl: bool) -> bool {
    if f.frag == FRAG_LATER {
        return rewrite_addrs::<F>(b, f, nat, dec_ttl);
    }
    match (F::IS_V6, f.proto == PROTO_TCP) {
        (false, true) => rewrite_at::<F, { L4_V4 + TCP_CHECK }>(b, f, nat, dec_ttl),
        (false, false) => rewrite_at::<F, { L4_V4 + UDP_CHECK }>(b, f, nat, dec_ttl),
        (true, true) => rewrite_at::<F, { L4_V6 + TCP_CHECK }>(b, f, nat, dec_ttl),
        (true, false) => rewrite_at::<F, { L4_V6 + UDP_CHECK }>(b, f, nat, dec_ttl),
    }
}

/// The (TTL, protocol) word `tp` with the TTL decremented, and the IPv4 checksum `check`
/// updated for it.
#[inline(always)]
fn decrement_ttl(tp: u16, check: u16) -> (u16, u16) {
    let mut bytes = tp.to_ne_bytes();
    bytes[0] = bytes[0].wrapping_sub(1);
    let new = u16::from_ne_bytes(bytes);
    (new, csum::replace2(check, tp, new))
}

/// The IP header's share of a rewrite: IPv4's checksum for the new addresses (`from` ->
/// `to`, source then destination) and its TTL; IPv6's hop limit. Through `p`, so XDP and
/// TC share it for packets with a minimal header (TC's own path uses helpers instead).
#[inline(always)]
fn rewrite_l3<F: Family>(
    p: &impl PacketBytes,
    from: [F::A; 2],
    to: [F::A; 2],
    dec_ttl: bool,
) -> bool {
    if F::IS_V6 {
        let Some(hop) = p.load::<u8>(L3 + F::TTL) else {
            return false;
        };
        return !dec_ttl || p.store(L3 + F::TTL, hop.wrapping_sub(1));
    }
    let (Some(mut ip), Some(mut tp)) = (
        p.load::<u16>(L3 + IP_CHECK),
        p.load::<u16>(L3 + IP_TTL_PROTO),
    ) else {
        return false;
    };
    if dec_ttl {
        (tp, ip) = decrement_ttl(tp, ip);
    }
    ip = F::A::csum_replace(ip, from[0], to[0]);
    ip = F::A::csum_replace(ip, from[1], to[1]);
    (!dec_ttl || p.store(L3 + IP_TTL_PROTO, tp)) && p.store(L3 + IP_CHECK, ip)
}

/// A later fragment's rewrite: the IP header alone (addresses, TTL, IPv4 checksum). It
/// holds no transport header; the datagram's UDP checksum is in the first fragment, whose
/// rewrite already folded in the new addresses and ports. XDP and TC alike (IPv4's
/// header starts at `L3` whatever its options).
#[inline(always)]
fn rewrite_addrs<F: Family>(
    p: &impl PacketBytes,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    dec_ttl: bool,
) -> bool {
    rewrite_l3::<F>(p, [f.saddr, f.daddr], [nat.saddr, nat.daddr], dec_ttl)
        && p.store(L3 + F::SADDR, nat.saddr)
        && p.store(L3 + F::DADDR, nat.daddr)
}

#[inline(always)]
fn rewrite_at<F: Family, const L4_CHECK: usize>(
    b: &Bounds,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    dec_ttl: bool,
) -> bool {
    let (Some(sa), Some(da), Some(sp), Some(dp), Some(l4c)) = (
        b.ptr::<F::A>(L3 + F::SADDR),
        b.ptr::<F::A>(L3 + F::DADDR),
        b.ptr::<u16>(F::L4 + L4_SPORT),
        b.ptr::<u16>(F::L4 + L4_DPORT),
        b.ptr::<u16>(L4_CHECK),
    ) else {
        return false;
    };
    if !rewrite_l3::<F>(b, [f.saddr, f.daddr], [nat.saddr, nat.daddr], dec_ttl) {
        return false;
    }
    // SAFETY: every pointer was bounds-checked above.
    unsafe {
        let old_l4 = l4c.read_unaligned();
        let mut l4 = F::A::csum_replace(old_l4, f.saddr, nat.saddr);
        l4 = F::A::csum_replace(l4, f.daddr, nat.daddr);
        l4 = csum::replace2(l4, sp.read_unaligned(), nat.sport);
        l4 = csum::replace2(l4, dp.read_unaligned(), nat.dport);
        if f.proto == PROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        sa.write_unaligned(nat.saddr);
        da.write_unaligned(nat.daddr);
        sp.write_unaligned(nat.sport);
        dp.write_unaligned(nat.dport);
        l4c.write_unaligned(l4);
    }
    true
}

/// Rewrite an ICMP error at the family's constant offsets (`Family::INNER_L3`): the outer
/// addresses (and TTL), the quoted packet's addresses and ports, and the checksums: ICMP
/// (over the quoted bytes, and for ICMPv6 over the outer addresses too), the quoted L4
/// checksum when the quote reaches it (UDP's always does; TCP's only if the sender quoted
/// 20 bytes of TCP), and for IPv4 the outer and quoted header checksums.
/// The same code for XDP (packet memory) and TC (skb helpers): ICMP errors are complete
/// packets with checksums computed in software, so plain incremental updates are right in
/// both. Returns false if a header was out of bounds or a store failed.
#[inline(always)]
pub fn rewrite_icmp<F: Family>(
    p: &impl PacketBytes,
    e: &IcmpError<F::A>,
    n: &IcmpNat<F::A>,
    dec_ttl: bool,
) -> bool {
    // The quoted transport header starts at V4::INNER_L4 = L4_V4 + 28 or at
    // V6::INNER_L4 = L4_V6 + 48.
    match (F::IS_V6, e.proto == PROTO_TCP) {
        (false, true) => icmp_at::<F, { L4_V4 + 28 + TCP_CHECK }>(p, e, n, dec_ttl),
        (false, false) => icmp_at::<F, { L4_V4 + 28 + UDP_CHECK }>(p, e, n, dec_ttl),
        (true, true) => icmp_at::<F, { L4_V6 + 48 + TCP_CHECK }>(p, e, n, dec_ttl),
        (true, false) => icmp_at::<F, { L4_V6 + 48 + UDP_CHECK }>(p, e, n, dec_ttl),
    }
}

#[inline(always)]
fn icmp_at<F: Family, const L4_CHECK: usize>(
    p: &impl PacketBytes,
    e: &IcmpError<F::A>,
    n: &IcmpNat<F::A>,
    dec_ttl: bool,
) -> bool {
    let icmp_check = F::L4 + ICMP_CHECK;
    let inner_check = F::INNER_L3 + IP_CHECK;
    let Some(mut icmp) = p.load::<u16>(icmp_check) else {
        return false;
    };
    let m = &n.inner;
    // The quoted L4 checksum covers the quoted pseudo-header and ports; the ICMP checksum
    // covers every quoted byte, that checksum included.
    // (Computed whether or not it is there: a value defined on one path only may be read
    // from an unwritten stack slot, which the verifier refuses without CAP_PERFMON.)
    let quoted_l4 = p.load::<u16>(L4_CHECK);
    let old = quoted_l4.unwrap_or(0);
    let mut l4 = F::A::csum_replace(old, e.saddr, m.saddr);
    l4 = F::A::csum_replace(l4, e.daddr, m.daddr);
    l4 = csum::replace2(l4, e.sport, m.sport);
    l4 = csum::replace2(l4, e.dport, m.dport);
    if e.proto == PROTO_UDP {
        l4 = csum::udp_fixup(old, l4);
    }
    if quoted_l4.is_some() {
        icmp = csum::replace2(icmp, old, l4);
    }
    icmp = F::A::csum_replace(icmp, e.saddr, m.saddr);
    icmp = F::A::csum_replace(icmp, e.daddr, m.daddr);
    icmp = csum::replace2(icmp, e.sport, m.sport);
    icmp = csum::replace2(icmp, e.dport, m.dport);
    // IPv4: the quoted header has a checksum of its own, which the ICMP checksum covers.
    // IPv6: no header checksum, but the ICMPv6 checksum covers the outer addresses.
    let mut inner_ok = true;
    if F::IS_V6 {
        icmp = F::A::csum_replace(icmp, e.outer.saddr, n.outer_saddr);
        icmp = F::A::csum_replace(icmp, e.outer.daddr, n.outer_daddr);
    } else if let Some(old_iipc) = p.load::<u16>(inner_check) {
        let mut inner_ip = F::A::csum_replace(old_iipc, e.saddr, m.saddr);
        inner_ip = F::A::csum_replace(inner_ip, e.daddr, m.daddr);
        icmp = csum::replace2(icmp, old_iipc, inner_ip);
        inner_ok = p.store(inner_check, inner_ip);
    } else {
        return false;
    }
    inner_ok
        && (quoted_l4.is_none() || p.store(L4_CHECK, l4))
        && p.store(F::INNER_L3 + F::SADDR, m.saddr)
        && p.store(F::INNER_L3 + F::DADDR, m.daddr)
        && p.store(F::INNER_L4 + L4_SPORT, m.sport)
        && p.store(F::INNER_L4 + L4_DPORT, m.dport)
        && p.store(icmp_check, icmp)
        && rewrite_l3::<F>(
            p,
            [e.outer.saddr, e.outer.daddr],
            [n.outer_saddr, n.outer_daddr],
            dec_ttl,
        )
        && p.store(L3 + F::SADDR, n.outer_saddr)
        && p.store(L3 + F::DADDR, n.outer_daddr)
}

/// The same rewrite through TC helpers (any IPv4 header length). Returns false when a
/// helper failed.
#[inline(always)]
pub fn rewrite_tc<F: Family>(
    ctx: &TcContext,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    dec_ttl: bool,
) -> bool {
    if f.frag == FRAG_LATER {
        return rewrite_addrs::<F>(&Skb(ctx), f, nat, dec_ttl);
    }
    let l4_flags = if f.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let ip_check = f.l3 as usize + IP_CHECK;
    let l4_check = f.l4_check_off();
    if dec_ttl {
        if F::IS_V6 {
            if ctx
                .store(f.l3 as usize + F::TTL, &f.ttl.wrapping_sub(1), 0)
                .is_err()
            {
                return false;
            }
        } else {
            let old = u16::from_ne_bytes([f.ttl, f.proto]);
            let new = u16::from_ne_bytes([f.ttl.wrapping_sub(1), f.proto]);
            if ctx.store(f.l3 as usize + IP_TTL_PROTO, &new, 0).is_err()
                || ctx
                    .l3_csum_replace(ip_check, old as u64, new as u64, 2)
                    .is_err()
            {
                return false;
            }
        }
    }
    // An address is folded into the checksums a 32-bit word at a time: one word for IPv4
    // (transport pseudo-header and IP header), four for IPv6 (pseudo-header only).
    let addr = |off: usize, old: F::A, new: F::A| -> bool {
        if old == new {
            return true;
        }
        let (o, n) = (old.fib_words(), new.fib_words());
        let words = if F::IS_V6 { 4 } else { 1 };
        let mut i = 0;
        while i < words {
            let ok = ctx
                .l4_csum_replace(
                    l4_check,
                    o[i] as u64,
                    n[i] as u64,
                    l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
                )
                .is_ok()
                && (F::IS_V6
                    || ctx
                        .l3_csum_replace(ip_check, o[i] as u64, n[i] as u64, 4)
                        .is_ok());
            if !ok {
                return false;
            }
            i += 1;
        }
        ctx.store(off, &new, 0).is_ok()
    };
    let port = |off: usize, old: u16, new: u16| -> bool {
        old == new
            || (ctx
                .l4_csum_replace(l4_check, old as u64, new as u64, l4_flags | 2)
                .is_ok()
                && ctx.store(off, &new, 0).is_ok())
    };
    addr(f.l3 as usize + F::SADDR, f.saddr, nat.saddr)
        && addr(f.l3 as usize + F::DADDR, f.daddr, nat.daddr)
        && port(f.l4 as usize + L4_SPORT, f.sport, nat.sport)
        && port(f.l4 as usize + L4_DPORT, f.dport, nat.dport)
}
