//! Header rewrites for a [`Nat`] decision. XDP writes packet memory directly and updates
//! checksums incrementally (frames from a wire carry complete checksums). TC goes through
//! the kernel's store and checksum helpers, which also handle CHECKSUM_PARTIAL skbs of
//! locally generated traffic (net/core/filter.c: bpf_l4_csum_replace).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nodeport_common::{csum, PROTO_TCP, PROTO_UDP};

use crate::{
    lb::{IcmpNat, Nat},
    packet::{
        Bounds, Flow, IcmpError, PacketBytes, ICMP_CHECK, INNER_L3, INNER_L4, IP_CHECK, IP_DADDR,
        IP_SADDR, IP_TTL_PROTO, L3, L4, L4_DPORT, L4_SPORT, TCP_CHECK, UDP_CHECK,
    },
};

/// Rewrite addresses and ports in place. `dec_ttl` when this node routes the packet.
/// XDP only translates option-less IPv4 (`packet::L3`, `packet::L4`), so every offset is
/// a constant: one instantiation per checksum position. Returns false only if the headers
/// are not in bounds (cannot happen after `parse`).
#[inline(always)]
pub fn rewrite_xdp(b: &Bounds, f: &Flow, nat: &Nat, dec_ttl: bool) -> bool {
    if f.proto == PROTO_TCP {
        rewrite_at::<{ L4 + TCP_CHECK }>(b, f, nat, dec_ttl)
    } else {
        rewrite_at::<{ L4 + UDP_CHECK }>(b, f, nat, dec_ttl)
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

#[inline(always)]
fn rewrite_at<const L4_CHECK: usize>(b: &Bounds, f: &Flow, nat: &Nat, dec_ttl: bool) -> bool {
    let (Some(ipc), Some(sa), Some(da), Some(sp), Some(dp), Some(l4c), Some(tp)) = (
        b.ptr::<u16>(L3 + IP_CHECK),
        b.ptr::<u32>(L3 + IP_SADDR),
        b.ptr::<u32>(L3 + IP_DADDR),
        b.ptr::<u16>(L4 + L4_SPORT),
        b.ptr::<u16>(L4 + L4_DPORT),
        b.ptr::<u16>(L4_CHECK),
        b.ptr::<u16>(L3 + IP_TTL_PROTO),
    ) else {
        return false;
    };
    // SAFETY: every pointer was bounds-checked above.
    unsafe {
        let mut ip_check = ipc.read_unaligned();
        let old_l4 = l4c.read_unaligned();
        let mut l4 = old_l4;
        if dec_ttl {
            let (new_tp, check) = decrement_ttl(tp.read_unaligned(), ip_check);
            tp.write_unaligned(new_tp);
            ip_check = check;
        }
        let (os, od) = (sa.read_unaligned(), da.read_unaligned());
        ip_check = csum::replace4(ip_check, os, nat.saddr);
        ip_check = csum::replace4(ip_check, od, nat.daddr);
        l4 = csum::replace4(l4, os, nat.saddr);
        l4 = csum::replace4(l4, od, nat.daddr);
        l4 = csum::replace2(l4, sp.read_unaligned(), nat.sport);
        l4 = csum::replace2(l4, dp.read_unaligned(), nat.dport);
        if f.proto == PROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        sa.write_unaligned(nat.saddr);
        da.write_unaligned(nat.daddr);
        sp.write_unaligned(nat.sport);
        dp.write_unaligned(nat.dport);
        ipc.write_unaligned(ip_check);
        l4c.write_unaligned(l4);
    }
    true
}

/// Rewrite an ICMP error at the constant offsets of `packet::INNER_L3`: the outer
/// addresses (and TTL), the quoted packet's addresses and ports, and the checksums: outer
/// IPv4, ICMP (over the quoted bytes), quoted IPv4, and the quoted L4 checksum when the
/// quote reaches it (UDP's always does; TCP's only if the sender quoted 20 bytes of TCP).
/// The same code for XDP (packet memory) and TC (skb helpers): ICMP errors are complete
/// packets with checksums computed in software, so plain incremental updates are right in
/// both. Returns false if a header was out of bounds or a store failed.
#[inline(always)]
pub fn rewrite_icmp(p: &impl PacketBytes, e: &IcmpError, n: &IcmpNat, dec_ttl: bool) -> bool {
    if e.proto == PROTO_TCP {
        icmp_at::<{ INNER_L4 + TCP_CHECK }>(p, e, n, dec_ttl)
    } else {
        icmp_at::<{ INNER_L4 + UDP_CHECK }>(p, e, n, dec_ttl)
    }
}

#[inline(always)]
fn icmp_at<const L4_CHECK: usize>(
    p: &impl PacketBytes,
    e: &IcmpError,
    n: &IcmpNat,
    dec_ttl: bool,
) -> bool {
    let (Some(mut ip), Some(mut tp), Some(mut icmp), Some(old_iipc)) = (
        p.load::<u16>(L3 + IP_CHECK),
        p.load::<u16>(L3 + IP_TTL_PROTO),
        p.load::<u16>(ICMP_CHECK),
        p.load::<u16>(INNER_L3 + IP_CHECK),
    ) else {
        return false;
    };
    let m = &n.inner;
    // The quoted L4 checksum covers the quoted pseudo-header and ports; the ICMP checksum
    // covers every quoted byte, that checksum included.
    // (Computed whether or not it is there: a value defined on one path only may be read
    // from an unwritten stack slot, which the verifier refuses without CAP_PERFMON.)
    let quoted_l4 = p.load::<u16>(L4_CHECK);
    let old = quoted_l4.unwrap_or(0);
    let mut l4 = csum::replace4(old, e.saddr, m.saddr);
    l4 = csum::replace4(l4, e.daddr, m.daddr);
    l4 = csum::replace2(l4, e.sport, m.sport);
    l4 = csum::replace2(l4, e.dport, m.dport);
    if e.proto == PROTO_UDP {
        l4 = csum::udp_fixup(old, l4);
    }
    if quoted_l4.is_some() {
        icmp = csum::replace2(icmp, old, l4);
    }
    let mut inner_ip = csum::replace4(old_iipc, e.saddr, m.saddr);
    inner_ip = csum::replace4(inner_ip, e.daddr, m.daddr);
    icmp = csum::replace4(icmp, e.saddr, m.saddr);
    icmp = csum::replace4(icmp, e.daddr, m.daddr);
    icmp = csum::replace2(icmp, e.sport, m.sport);
    icmp = csum::replace2(icmp, e.dport, m.dport);
    icmp = csum::replace2(icmp, old_iipc, inner_ip);
    if dec_ttl {
        (tp, ip) = decrement_ttl(tp, ip);
    }
    ip = csum::replace4(ip, e.outer.saddr, n.outer_saddr);
    ip = csum::replace4(ip, e.outer.daddr, n.outer_daddr);
    (quoted_l4.is_none() || p.store(L4_CHECK, l4))
        && p.store(INNER_L3 + IP_SADDR, m.saddr)
        && p.store(INNER_L3 + IP_DADDR, m.daddr)
        && p.store(INNER_L4 + L4_SPORT, m.sport)
        && p.store(INNER_L4 + L4_DPORT, m.dport)
        && p.store(INNER_L3 + IP_CHECK, inner_ip)
        && p.store(ICMP_CHECK, icmp)
        && (!dec_ttl || p.store(L3 + IP_TTL_PROTO, tp))
        && p.store(L3 + IP_SADDR, n.outer_saddr)
        && p.store(L3 + IP_DADDR, n.outer_daddr)
        && p.store(L3 + IP_CHECK, ip)
}

/// The same rewrite through TC helpers. Returns false when a helper failed.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, f: &Flow, nat: &Nat, dec_ttl: bool) -> bool {
    let l4_flags = if f.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let ip_check = f.l3 + IP_CHECK;
    let l4_check = f.l4_check_off();
    if dec_ttl {
        let old = u16::from_ne_bytes([f.ttl, f.proto]);
        let new = u16::from_ne_bytes([f.ttl.wrapping_sub(1), f.proto]);
        if ctx.store(f.l3 + IP_TTL_PROTO, &new, 0).is_err()
            || ctx
                .l3_csum_replace(ip_check, old as u64, new as u64, 2)
                .is_err()
        {
            return false;
        }
    }
    let addr = |off: usize, old: u32, new: u32| -> bool {
        old == new
            || (ctx
                .l4_csum_replace(
                    l4_check,
                    old as u64,
                    new as u64,
                    l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
                )
                .is_ok()
                && ctx
                    .l3_csum_replace(ip_check, old as u64, new as u64, 4)
                    .is_ok()
                && ctx.store(off, &new, 0).is_ok())
    };
    let port = |off: usize, old: u16, new: u16| -> bool {
        old == new
            || (ctx
                .l4_csum_replace(l4_check, old as u64, new as u64, l4_flags | 2)
                .is_ok()
                && ctx.store(off, &new, 0).is_ok())
    };
    addr(f.l3 + IP_SADDR, f.saddr, nat.saddr)
        && addr(f.l3 + IP_DADDR, f.daddr, nat.daddr)
        && port(f.l4 + L4_SPORT, f.sport, nat.sport)
        && port(f.l4 + L4_DPORT, f.dport, nat.dport)
}
