//! Answers turned around in place: refusals for Services without any endpoint
//! (kube-proxy's REJECT) and path MTU errors for packets too big for the route to their
//! remote backend. The headers come from `nodeport_common::reject` (built from the
//! client's own headers, checksums included); here the frame is resized around them and
//! sent back out of the interface it came in on: XDP_TX in XDP, `bpf_redirect` to the same
//! interface's egress in TC. Each CPU spends from a token bucket (NP_REJECT), so a flood
//! cannot turn the node into a reflector.

use core::{mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_RECOMPUTE_CSUM},
    helpers::generated::{
        bpf_csum_diff, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use nodeport_common::reject::{
    frag_needed4, rst4, rst6, too_big6, unreach4, unreach6, ETH_HLEN, PTB4_FRAME, PTB4_QUOTE,
    PTB6_FRAME, PTB6_QUOTE, RST4_FRAME, RST6_FRAME, UNREACH4_FRAME, UNREACH4_ROOM, UNREACH6_FRAME,
    UNREACH6_ROOM,
};

use crate::{
    maps::{REJECT, REJECT_BUF, REJECT_BUF_LEN},
    packet::{xdp_bounds, PacketBytes, Skb},
};

/// Whether this CPU may send one more refusal now.
#[inline(always)]
pub fn budget() -> bool {
    let Some(b) = REJECT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: helper without arguments; the per-CPU value is this CPU's alone.
    unsafe { (*b).take(bpf_ktime_get_coarse_ns()) }
}

/// One kind of answer in one family: the frame it becomes, the room it needs in front of
/// the client's IP header, and the rewrite (`macs`: the Ethernet addresses as received;
/// `mtu`: the path MTU a path MTU error reports, unused by refusals).
pub trait Shape {
    type Frame: Copy;
    const LEN: usize;
    const ROOM: usize;
    /// IPv4: the client's header has no options (the only form refused).
    const V4: bool;
    fn fill(f: &mut Self::Frame, macs: &[u8; 12], mtu: u16);
}

pub struct Rst4;
pub struct Rst6;
pub struct Unreach4;
pub struct Unreach6;
pub struct FragNeeded4;
pub struct TooBig6;

impl Shape for Rst4 {
    type Frame = [u8; RST4_FRAME];
    const LEN: usize = RST4_FRAME;
    const ROOM: usize = 0;
    const V4: bool = true;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, _: &[u8; 12], _: u16) {
        rst4(f)
    }
}

impl Shape for Rst6 {
    type Frame = [u8; RST6_FRAME];
    const LEN: usize = RST6_FRAME;
    const ROOM: usize = 0;
    const V4: bool = false;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, _: &[u8; 12], _: u16) {
        rst6(f)
    }
}

impl Shape for Unreach4 {
    type Frame = [u8; UNREACH4_FRAME];
    const LEN: usize = UNREACH4_FRAME;
    const ROOM: usize = UNREACH4_ROOM;
    const V4: bool = true;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12], _: u16) {
        unreach4(f, macs)
    }
}

impl Shape for Unreach6 {
    type Frame = [u8; UNREACH6_FRAME];
    const LEN: usize = UNREACH6_FRAME;
    const ROOM: usize = UNREACH6_ROOM;
    const V4: bool = false;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12], _: u16) {
        unreach6(f, macs)
    }
}

impl Shape for FragNeeded4 {
    type Frame = [u8; PTB4_FRAME];
    const LEN: usize = PTB4_FRAME;
    const ROOM: usize = UNREACH4_ROOM;
    const V4: bool = true;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12], mtu: u16) {
        let quote = quote_sum::<PTB4_QUOTE>(f, ETH_HLEN + UNREACH4_ROOM);
        frag_needed4(f, macs, mtu, quote)
    }
}

impl Shape for TooBig6 {
    type Frame = [u8; PTB6_FRAME];
    const LEN: usize = PTB6_FRAME;
    const ROOM: usize = UNREACH6_ROOM;
    const V4: bool = false;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12], mtu: u16) {
        let quote = quote_sum::<PTB6_QUOTE>(f, ETH_HLEN + UNREACH6_ROOM);
        too_big6(f, macs, mtu, quote)
    }
}

/// The folded one's-complement sum, as big-endian words, of the `N` bytes of `f` from `at`
/// (`N` a multiple of 4): `bpf_csum_diff` in chunks of at most 512 bytes (its limit,
/// net/core/filter.c), so no loop reads packet memory at a variable offset. The helper
/// sums native (little-endian) words; the folded sum swapped is the big-endian one.
#[inline(always)]
fn quote_sum<const N: usize>(f: &mut [u8], at: usize) -> u16 {
    let mut sum: u64 = 0;
    let mut off = 0;
    while off < N {
        let n = if N - off > 512 { 512 } else { N - off };
        // SAFETY: `at + off + n <= at + N`, inside `f` (a frame the caller checked lies in
        // packet memory, or the scratch buffer); the helper only reads it.
        let r = unsafe {
            bpf_csum_diff(
                null_mut(),
                0,
                f.as_mut_ptr().add(at + off).cast(),
                n as u32,
                sum as u32,
            )
        };
        sum = if r < 0 { 0 } else { r as u64 };
        off += n;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u16).swap_bytes()
}

/// Turn the XDP frame into the answer, in packet memory; the caller returns XDP_TX.
/// False: the frame could not be resized (it is dropped). A BPF function of its own per
/// shape.
#[inline(never)]
pub fn xdp<S: Shape>(ctx: &XdpContext, mtu: u32) -> bool {
    let b = xdp_bounds(ctx);
    let Some(macs) = b.load::<[u8; 12]>(0) else {
        return false;
    };
    let mut len = b.len;
    if S::ROOM > 0 {
        // SAFETY: helper on the program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(S::ROOM as i32)) } != 0 {
            return false;
        }
        len += S::ROOM;
    }
    let delta = S::LEN as i32 - len as i32;
    // SAFETY: as above; the frame is at least as long as what was parsed from it.
    if delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return false;
    }
    let Some(f) = xdp_bounds(ctx).ptr::<S::Frame>(0) else {
        return false;
    };
    // SAFETY: `ptr` checked that the whole frame lies inside packet memory.
    S::fill(unsafe { &mut *f }, &macs, mtu as u16);
    true
}

/// Turn the TC packet into the answer (a copy rewritten and stored back) and redirect it
/// to the egress of the interface it arrived on. Returns the redirect's action, negative
/// when the packet could not be turned (it is dropped): one scalar, as BPF functions
/// return. `BPF_F_RECOMPUTE_CSUM` keeps a CHECKSUM_COMPLETE packet's sum true. The tail
/// is cut before room is made: cutting ends a GSO packet's GSO state (net/core/filter.c,
/// `__bpf_skb_change_tail` calls `skb_gso_reset`), and room made first in a GSO packet
/// would shrink its segment size instead.
#[inline(never)]
pub fn tc<S: Shape>(ctx: &TcContext, mtu: u32) -> i64 {
    tc_inline::<S>(ctx, mtu as u16).map_or(-1, |a| a as i64)
}

#[inline(always)]
fn tc_inline<S: Shape>(ctx: &TcContext, mtu: u16) -> Option<i32> {
    let skb = Skb(ctx);
    if S::V4 && skb.load::<u8>(ETH_HLEN)? != 0x45 {
        return None;
    }
    let macs = skb.load::<[u8; 12]>(0)?;
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (S::LEN - S::ROOM) as u32, 0) } != 0 {
        return None;
    }
    if S::ROOM > 0 {
        ctx.adjust_room(S::ROOM as i32, BPF_ADJ_ROOM_MAC, 0).ok()?;
    }
    const { assert!(size_of::<S::Frame>() <= REJECT_BUF_LEN) };
    let buf = REJECT_BUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch value, large enough for any frame (asserted above); the
    // helper writes every byte of it before it is read.
    let f = unsafe { &mut *(buf as *mut S::Frame) };
    // SAFETY: the helper fills `f` from the packet (an error leaves it unread).
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            f as *mut _ as *mut _,
            S::LEN as u32,
        )
    };
    if rc != 0 {
        return None;
    }
    S::fill(f, &macs, mtu);
    ctx.store(0, f, BPF_F_RECOMPUTE_CSUM as u64).ok()?;
    // SAFETY: reading the skb's interface; plain helper call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
