//! Refusals sent for Services without any endpoint (kube-proxy's REJECT): the headers come
//! from `nodeport_common::reject` (built from the client's own headers, checksums
//! included); here the frame is resized around them and sent back out of the interface it
//! came in on: XDP_TX in XDP, `bpf_redirect` to the same interface's egress in TC. Each
//! CPU spends from a token bucket (NP_REJECT), so a flood to such a Service cannot turn
//! the node into a reflector.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_RECOMPUTE_CSUM},
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use nodeport_common::reject::{
    rst4, rst6, unreach4, unreach6, ETH_HLEN, RST4_FRAME, RST6_FRAME, UNREACH4_FRAME,
    UNREACH4_ROOM, UNREACH6_FRAME, UNREACH6_ROOM,
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

/// One kind of refusal in one family: the frame it becomes, the room it needs in front of
/// the client's IP header, and the rewrite (`macs`: the Ethernet addresses as received).
pub trait Shape {
    type Frame: Copy;
    const LEN: usize;
    const ROOM: usize;
    /// IPv4: the client's header has no options (the only form refused).
    const V4: bool;
    fn fill(f: &mut Self::Frame, macs: &[u8; 12]);
}

pub struct Rst4;
pub struct Rst6;
pub struct Unreach4;
pub struct Unreach6;

impl Shape for Rst4 {
    type Frame = [u8; RST4_FRAME];
    const LEN: usize = RST4_FRAME;
    const ROOM: usize = 0;
    const V4: bool = true;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, _: &[u8; 12]) {
        rst4(f)
    }
}

impl Shape for Rst6 {
    type Frame = [u8; RST6_FRAME];
    const LEN: usize = RST6_FRAME;
    const ROOM: usize = 0;
    const V4: bool = false;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, _: &[u8; 12]) {
        rst6(f)
    }
}

impl Shape for Unreach4 {
    type Frame = [u8; UNREACH4_FRAME];
    const LEN: usize = UNREACH4_FRAME;
    const ROOM: usize = UNREACH4_ROOM;
    const V4: bool = true;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12]) {
        unreach4(f, macs)
    }
}

impl Shape for Unreach6 {
    type Frame = [u8; UNREACH6_FRAME];
    const LEN: usize = UNREACH6_FRAME;
    const ROOM: usize = UNREACH6_ROOM;
    const V4: bool = false;
    #[inline(always)]
    fn fill(f: &mut Self::Frame, macs: &[u8; 12]) {
        unreach6(f, macs)
    }
}

/// Turn the XDP frame into the refusal, in packet memory; the caller returns XDP_TX.
/// False: the frame could not be resized (it is dropped). A BPF function of its own per
/// shape.
#[inline(never)]
pub fn xdp<S: Shape>(ctx: &XdpContext) -> bool {
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
    S::fill(unsafe { &mut *f }, &macs);
    true
}

/// Turn the TC packet into the refusal (a copy rewritten and stored back) and redirect it
/// to the egress of the interface it arrived on. Returns the redirect's action, negative
/// when the packet could not be turned (it is dropped): one scalar, as BPF functions
/// return. `BPF_F_RECOMPUTE_CSUM` keeps a CHECKSUM_COMPLETE packet's sum true.
#[inline(never)]
pub fn tc<S: Shape>(ctx: &TcContext) -> i64 {
    tc_inline::<S>(ctx).map_or(-1, |a| a as i64)
}

#[inline(always)]
fn tc_inline<S: Shape>(ctx: &TcContext) -> Option<i32> {
    let skb = Skb(ctx);
    if S::V4 && skb.load::<u8>(ETH_HLEN)? != 0x45 {
        return None;
    }
    let macs = skb.load::<[u8; 12]>(0)?;
    if S::ROOM > 0 {
        ctx.adjust_room(S::ROOM as i32, BPF_ADJ_ROOM_MAC, 0).ok()?;
    }
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, S::LEN as u32, 0) } != 0 {
        return None;
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
    S::fill(f, &macs);
    ctx.store(0, f, BPF_F_RECOMPUTE_CSUM as u64).ok()?;
    // SAFETY: reading the skb's interface; plain helper call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
