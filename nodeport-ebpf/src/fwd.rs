//! Forwarding of translated packets with the kernel FIB (`bpf_fib_lookup`): XDP_TX out of
//! the receiving interface, XDP_REDIRECT into another interface of ours, and otherwise the
//! stack (TC then finishes with `bpf_redirect_neigh`, which resolves neighbours).

use core::{mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nodeport_common::Stat;

use crate::{
    lb::Nat,
    maps::DEVICES,
    nat::{rewrite_tc, rewrite_xdp},
    packet::{Bounds, Flow},
};

const AF_INET: u8 = 2;

#[inline(always)]
fn params(f: &Flow, nat: &Nat, ifindex: u32) -> FibParams {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain integers and unions).
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = f.proto;
    p.sport = nat.sport;
    p.dport = nat.dport;
    p.__bindgen_anon_1.tot_len = f.tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = nat.saddr;
    p.__bindgen_anon_4.ipv4_dst = nat.daddr;
    p
}

#[inline(always)]
fn unreachable(rc: u32) -> bool {
    rc == BPF_FIB_LKUP_RET_BLACKHOLE
        || rc == BPF_FIB_LKUP_RET_UNREACHABLE
        || rc == BPF_FIB_LKUP_RET_PROHIBIT
}

/// Translate and send a packet that this node routes (to a remote backend, or a reply
/// back to the client). Untouched `XDP_PASS` whenever the stack has to help.
#[inline(always)]
pub fn xdp_forward(ctx: &XdpContext, b: &Bounds, f: &Flow, nat: &Nat) -> (u32, Stat) {
    if f.ttl <= 1 {
        // The stack answers with ICMP time exceeded.
        return (xdp_action::XDP_PASS, Stat::FibPass);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let mut p = params(f, nat, ingress);
    // SAFETY: ctx and params are valid for the helper; size is the struct's.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut p, size_of::<FibParams>() as i32, 0) as u32 };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let out = p.ifindex;
        let same = out == ingress;
        if !same && DEVICES.get(out).is_none() {
            return (xdp_action::XDP_PASS, Stat::FibPass);
        }
        let (Some(dst), Some(src)) = (b.ptr::<[u8; 6]>(0), b.ptr::<[u8; 6]>(6)) else {
            return (xdp_action::XDP_PASS, Stat::PassMalformed);
        };
        if !rewrite_xdp(b, f, nat, true) {
            return (xdp_action::XDP_PASS, Stat::PassMalformed);
        }
        // SAFETY: bounds-checked Ethernet address pointers.
        unsafe {
            dst.write_unaligned(p.dmac);
            src.write_unaligned(p.smac);
        }
        if same {
            return (xdp_action::XDP_TX, Stat::Tx);
        }
        return match DEVICES.redirect(out, 0) {
            Ok(action) => (action, Stat::Redirect),
            Err(_) => (xdp_action::XDP_DROP, Stat::DropFib),
        };
    }
    if unreachable(rc) {
        return (xdp_action::XDP_DROP, Stat::DropFib);
    }
    (xdp_action::XDP_PASS, Stat::FibPass)
}

/// TC counterpart: translate through helpers, then hand the packet to
/// `bpf_redirect_neigh` on the FIB's egress interface (it resolves the neighbour).
#[inline(always)]
pub fn tc_forward(ctx: &TcContext, f: &Flow, nat: &Nat) -> (i32, Stat) {
    if f.ttl <= 1 {
        return (TC_ACT_OK, Stat::FibPass);
    }
    // SAFETY: reading the ingress ifindex of the skb context.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut p = params(f, nat, ingress);
    // SAFETY: ctx and params are valid for the helper.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut p, size_of::<FibParams>() as i32, 0) as u32 };
    if unreachable(rc) {
        return (TC_ACT_SHOT, Stat::DropFib);
    }
    if !rewrite_tc(ctx, f, nat, true) {
        return (TC_ACT_SHOT, Stat::DropMapFull);
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: plain helper call; a null neighbour means "use the FIB's".
        let act = unsafe { bpf_redirect_neigh(p.ifindex, null_mut(), 0, 0) } as i32;
        return (act, Stat::TcNat);
    }
    (TC_ACT_OK, Stat::TcNat)
}
