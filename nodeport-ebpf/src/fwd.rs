//! Forwarding of translated packets with the kernel FIB (`bpf_fib_lookup`): XDP_TX out of
//! the receiving interface, XDP_REDIRECT into another interface of ours, and otherwise the
//! stack (TC then finishes with `bpf_redirect_neigh`, which resolves neighbours). A
//! client's packet too big for the route to its backend is not forwarded: the caller
//! answers it with a path MTU error ([`TooBig`]).

use core::{
    mem::{size_of, MaybeUninit},
    ptr::null_mut,
};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nodeport_common::{
    reject::{PTB4_MIN_MTU, PTB4_QUOTE, PTB6_MIN_MTU},
    Addr, Backend, Stat, PROTO_TCP,
};

use crate::{
    family::{Family, L3},
    lb::{IcmpNat, Nat},
    maps::{DEVICES, FIB_BUF},
    nat::{rewrite_icmp, rewrite_tc, rewrite_xdp},
    packet::{Bounds, Flow, IcmpError, PacketBytes, Skb},
};

/// Fill FIB lookup parameters in place, as sixteen volatile 32-bit stores. Plain struct
/// initialisation let LLVM merge the zero fields into a `memset` call (a byte loop the
/// verifier refuses without CAP_PERFMON), and the helper must not read uninitialised
/// bytes. Layout: include/uapi/linux/bpf.h, struct bpf_fib_lookup (64 bytes).
#[inline(always)]
fn fill_params<F: Family>(
    p: *mut FibParams,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    ifindex: u32,
    tot_len: u16,
) {
    let w = p.cast::<u32>();
    let [s0, s1] = nat.sport.to_ne_bytes();
    let [d0, d1] = nat.dport.to_ne_bytes();
    let [t0, t1] = tot_len.to_ne_bytes();
    let (src, dst) = (nat.saddr.fib_words(), nat.daddr.fib_words());
    let words: [u32; 16] = [
        u32::from_ne_bytes([F::AF, f.proto, s0, s1]), // family, l4_protocol, sport
        u32::from_ne_bytes([d0, d1, t0, t1]),         // dport, tot_len
        ifindex,
        0,      // tos / flowinfo / rt_metric
        src[0], // ipv4_src, or ipv6_src
        src[1],
        src[2],
        src[3],
        dst[0], // ipv4_dst, or ipv6_dst
        dst[1],
        dst[2],
        dst[3],
        0, // vlan / tbid
        0, // smac, dmac (filled by the helper)
        0,
        0,
    ];
    let mut i = 0;
    while i < 16 {
        // SAFETY: `p` points to a 64-byte bpf_fib_lookup on our stack; `i` < 16.
        unsafe { w.add(i).write_volatile(words[i]) };
        i += 1;
    }
}

/// `bpf_fib_lookup` towards the translated destination; the parameters stay in the
/// caller's stack (`p`), and the helper's return code comes back. `tot_len` is the
/// length the helper checks against the route's MTU; 0 from TC, where the helper checks
/// the socket buffer itself, GSO packets by their segments (net/core/filter.c,
/// bpf_skb_fib_lookup, is_skb_forwardable): a GRO-merged or TSO packet's total length
/// would fail the check.
#[inline(always)]
fn fib_lookup<F: Family, C: EbpfContext>(
    ctx: &C,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    ingress: u32,
    tot_len: u16,
    p: &mut MaybeUninit<FibParams>,
) -> u32 {
    fill_params::<F>(p.as_mut_ptr(), f, nat, ingress, tot_len);
    // SAFETY: ctx and params are valid for the helper; size is the struct's.
    unsafe {
        bpf_fib_lookup(
            ctx.as_ptr().cast(),
            p.as_mut_ptr(),
            size_of::<FibParams>() as i32,
            0,
        ) as u32
    }
}

/// Whether a FIB answer was FRAG_NEEDED for a packet a path MTU error must answer, and
/// the MTU it reports. The answer: `(mtu, Stat::IcmpFragNeeded)` in place of `(action,
/// stat)` from [`xdp_route`] and [`tc_route`] (asked with `pmtu`); the program then turns
/// the packet into the error (`reject::FragNeeded4`, `reject::TooBig6`). Not every packet
/// too big is answered: IPv4 without don't-fragment may be fragmented on the way (not
/// here: see `tc_route`), and an IPv4 packet shorter than the quote is left to the
/// stack.
pub struct TooBig;

impl TooBig {
    /// The MTU to report for packet `b`, checked at `tot_len` bytes, when FIB answer `rc`
    /// (parameters `p`) asks for a path MTU error.
    #[inline(always)]
    fn mtu<F: Family>(rc: u32, b: &impl PacketBytes, tot_len: u16, p: &FibParams) -> Option<u32> {
        if rc != BPF_FIB_LKUP_RET_FRAG_NEEDED {
            return None;
        }
        if !F::IS_V6 {
            // Don't-fragment, in the high byte of the fragment field (offset 6).
            let df = b.load::<u8>(L3 + 6)? & 0x40 != 0;
            if !df || (tot_len as usize) < PTB4_QUOTE {
                return None;
            }
        }
        // SAFETY: the helper wrote the union's output member (net/core/filter.c,
        // bpf_ipv4_fib_lookup: `params->mtu_result = mtu`, since 5.12); before that it
        // still holds `tot_len`.
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        let floor = if F::IS_V6 { PTB6_MIN_MTU } else { PTB4_MIN_MTU };
        Some(if mtu == 0 || mtu >= tot_len {
            floor
        } else {
            mtu
        } as u32)
    }
}

/// The interface the FIB sends remote backend `be` out of, for new flow `f` arriving on
/// `ingress`; 0 when there is no usable route. The parameters live in a per-CPU map value
/// (NP_FIB_BUF), not on the stack: 64 more bytes took the call chain past the verifier's
/// 512.
#[inline(always)]
pub fn egress_ifindex<F: Family, C: EbpfContext>(
    ctx: &C,
    ingress: u32,
    f: &Flow<F::A>,
    be: &Backend<F::A>,
) -> u32 {
    let nat = Nat {
        saddr: f.daddr,
        daddr: be.addr,
        sport: f.sport,
        dport: be.port,
    };
    let Some(p) = FIB_BUF.get_ptr_mut(0) else {
        return 0;
    };
    fill_params::<F>(p, f, &nat, ingress, 0);
    // SAFETY: `p` is this CPU's map value, as large as the parameters, filled above.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr().cast(), p, size_of::<FibParams>() as i32, 0) as u32 };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return 0;
    }
    // SAFETY: written by the helper.
    unsafe { (*p).ifindex }
}

#[inline(always)]
fn unreachable(rc: u32) -> bool {
    rc == BPF_FIB_LKUP_RET_BLACKHOLE
        || rc == BPF_FIB_LKUP_RET_UNREACHABLE
        || rc == BPF_FIB_LKUP_RET_PROHIBIT
}

/// Translate and send a packet that this node routes (to a remote backend, or a reply
/// back to the client). Untouched `XDP_PASS` whenever the stack has to help. `pmtu`: a
/// client's packet to its backend, answered with a path MTU error when too big
/// ([`TooBig`]).
#[inline(always)]
pub fn xdp_forward<F: Family>(
    ctx: &XdpContext,
    b: &Bounds,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    pmtu: bool,
) -> (u32, Stat) {
    xdp_route::<F>(ctx, b, f, nat, Rewrite::Flow, pmtu)
}

/// The header rewrite [`xdp_route`] applies once the FIB has answered. (An enum rather
/// than a closure: LLVM kept the closure as a BPF subprogram, whose stack frame adds to
/// the caller's in the verifier's 512-byte limit.)
pub enum Rewrite<'a, A: Addr> {
    /// The packet's own addresses and ports, as `nat` says.
    Flow,
    /// An ICMP error: outer and quoted headers.
    Icmp(&'a IcmpError<A>, &'a IcmpNat<A>),
}

/// Route packet `f` as translated by `nat` (the FIB sees the new addresses and ports):
/// on success `rewrite` is applied, then the Ethernet addresses are set and the
/// frame goes out with XDP_TX or XDP_REDIRECT. Untouched `XDP_PASS` whenever the stack
/// has to help; `(mtu, Stat::IcmpFragNeeded)` for a packet too big under `pmtu`.
#[inline(always)]
pub fn xdp_route<F: Family>(
    ctx: &XdpContext,
    b: &Bounds,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    rewrite: Rewrite<F::A>,
    pmtu: bool,
) -> (u32, Stat) {
    if f.ttl <= 1 {
        // The stack answers with ICMP time exceeded.
        return (xdp_action::XDP_PASS, Stat::FibPass);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let mut p = MaybeUninit::<FibParams>::uninit();
    let rc = fib_lookup::<F, _>(ctx, f, nat, ingress, f.tot_len, &mut p);
    // SAFETY: every byte was written by fill_params (and then by the helper).
    let p = unsafe { p.assume_init_ref() };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let out = p.ifindex;
        let same = out == ingress;
        if !same && DEVICES.get(out).is_none() {
            return (xdp_action::XDP_PASS, Stat::FibPass);
        }
        // The Ethernet addresses as 32- and 16-bit words: a 6-byte array copy became a
        // memcpy call, whose pointer arithmetic needs CAP_PERFMON.
        let (Some(d_hi), Some(d_lo), Some(s_hi), Some(s_lo)) = (
            b.ptr::<u32>(0),
            b.ptr::<u16>(4),
            b.ptr::<u16>(6),
            b.ptr::<u32>(8),
        ) else {
            return (xdp_action::XDP_PASS, Stat::PassMalformed);
        };
        let rewritten = match rewrite {
            Rewrite::Flow => rewrite_xdp::<F>(b, f, nat, true),
            Rewrite::Icmp(e, n) => rewrite_icmp::<F>(b, e, n, true),
        };
        if !rewritten {
            return (xdp_action::XDP_PASS, Stat::PassMalformed);
        }
        let (d, sm) = (p.dmac, p.smac);
        // SAFETY: bounds-checked Ethernet address pointers.
        unsafe {
            d_hi.write_unaligned(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]));
            d_lo.write_unaligned(u16::from_ne_bytes([d[4], d[5]]));
            s_hi.write_unaligned(u16::from_ne_bytes([sm[0], sm[1]]));
            s_lo.write_unaligned(u32::from_ne_bytes([sm[2], sm[3], sm[4], sm[5]]));
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
    if pmtu {
        if let Some(mtu) = TooBig::mtu::<F>(rc, b, f.tot_len, p) {
            return (mtu, Stat::IcmpFragNeeded);
        }
    }
    (xdp_action::XDP_PASS, Stat::FibPass)
}

/// TC's "carry on": the next program of the hook (TCX) or the next filter (clsact
/// `cls_bpf`) sees the packet, then the stack. Returned for every packet nodeport leaves
/// to the stack, translated or not, so that a CNI's or a monitoring tool's program after
/// nodeport's still sees it (TC_ACT_OK would end the chain: net/core/dev.c, tcx_run).
/// Drops and redirects stay final.
pub const TC_NEXT: i32 = TC_ACT_UNSPEC;

/// TC counterpart of [`xdp_forward`]: translate through helpers, then hand the packet to
/// `bpf_redirect_neigh` on the FIB's egress interface (it resolves the neighbour).
#[inline(always)]
pub fn tc_forward<F: Family>(
    ctx: &TcContext,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    pmtu: bool,
) -> (i32, Stat) {
    tc_route::<F>(ctx, f, nat, Rewrite::Flow, pmtu)
}

/// The length of the packets the skb becomes on the wire: its IP length, or for a GSO
/// skb (GRO-merged, or TSO from a local sender) one segment's, network and transport
/// headers plus `gso_size`, as the kernel checks a GSO packet against an MTU
/// (net/core/skbuff.c, `skb_gso_network_seglen`; `is_skb_forwardable`, `bpf_check_mtu`).
#[inline(always)]
fn wire_len<F: Family>(ctx: &TcContext, f: &Flow<F::A>) -> u16 {
    // SAFETY: reading a field of the skb context.
    let gso = unsafe { (*ctx.skb.skb).gso_size };
    if gso == 0 {
        return f.tot_len;
    }
    let l4_hlen = if f.proto == PROTO_TCP {
        let doff = Skb(ctx).load::<u8>(f.l4 as usize + 12).unwrap_or(0x50);
        ((doff >> 4) as u32) * 4
    } else {
        8
    };
    let seg = (f.l4 - f.l3) as u32 + l4_hlen + gso;
    if seg > u16::MAX as u32 {
        u16::MAX
    } else {
        seg as u16
    }
}

/// TC counterpart of [`xdp_route`]: the FIB sees the translated packet, `rewrite` is
/// applied, and `bpf_redirect_neigh` sends it. The skb path delivers wherever the stack
/// would (a veth whose peer takes no XDP frames too), and the checksum helpers handle
/// CHECKSUM_PARTIAL and GSO packets.
#[inline(always)]
pub fn tc_route<F: Family>(
    ctx: &TcContext,
    f: &Flow<F::A>,
    nat: &Nat<F::A>,
    rewrite: Rewrite<F::A>,
    pmtu: bool,
) -> (i32, Stat) {
    if f.ttl <= 1 {
        return (TC_NEXT, Stat::FibPass);
    }
    // SAFETY: reading the ingress ifindex of the skb context.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut p = MaybeUninit::<FibParams>::uninit();
    // Under `pmtu` the FIB checks the wire length against the route's MTU (a route
    // metric, a learnt path MTU, the device's); otherwise, `tot_len` 0, the helper checks
    // the skb against the egress device's MTU itself.
    let len = if pmtu { wire_len::<F>(ctx, f) } else { 0 };
    let mut rc = fib_lookup::<F, _>(ctx, f, nat, ingress, len, &mut p);
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // SAFETY: every byte was written by fill_params (and then by the helper).
        if let Some(mtu) = TooBig::mtu::<F>(rc, &Skb(ctx), len, unsafe { p.assume_init_ref() }) {
            return (mtu as i32, Stat::IcmpFragNeeded);
        }
        // IPv4 without don't-fragment: sent on as before, checked against the device
        // only. This node cannot fragment it: eBPF has no helper for that, and handed to
        // the stack translated, it would be dropped as a martian (its source is this
        // node's own address; net/ipv4/fib_frontend.c, __fib_validate_source).
        rc = fib_lookup::<F, _>(ctx, f, nat, ingress, 0, &mut p);
    }
    // SAFETY: every byte was written by fill_params (and then by the helper).
    let p = unsafe { p.assume_init_ref() };
    if unreachable(rc) {
        return (TC_ACT_SHOT, Stat::DropFib);
    }
    let rewritten = match rewrite {
        Rewrite::Flow => rewrite_tc::<F>(ctx, f, nat, true),
        Rewrite::Icmp(e, n) => rewrite_icmp::<F>(&Skb(ctx), e, n, true),
    };
    if !rewritten {
        return (TC_ACT_SHOT, Stat::DropMapFull);
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: plain helper call; a null neighbour means "use the FIB's".
        let act = unsafe { bpf_redirect_neigh(p.ifindex, null_mut(), 0, 0) } as i32;
        return (act, Stat::TcNat);
    }
    (TC_NEXT, Stat::TcNat)
}
