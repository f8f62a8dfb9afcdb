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
    lb::Nat,
    packet::{
        Bounds, Flow, IP_CHECK, IP_DADDR, IP_SADDR, IP_TTL_PROTO, L3, L4, L4_DPORT, L4_SPORT,
        TCP_CHECK, UDP_CHECK,
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
            let old_tp = tp.read_unaligned();
            let mut bytes = old_tp.to_ne_bytes();
            bytes[0] = bytes[0].wrapping_sub(1);
            let new_tp = u16::from_ne_bytes(bytes);
            tp.write_unaligned(new_tp);
            ip_check = csum::replace2(ip_check, old_tp, new_tp);
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
