//! The three programs. Each wraps a `try_` function returning (action, counter) and turns
//! it into exactly one counted verdict.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::info;
use nodeport_common::{Stat, CFG_F_DEBUG};

use crate::{
    fwd::{tc_forward, xdp_forward},
    lb::{config, forward, maybe_snat_reply, reply, Decision},
    nat::{rewrite_tc, rewrite_xdp},
    packet::{parse, Bounds, Flow},
    stats::count,
};

/// XDP on the node's interfaces.
#[xdp]
pub fn np_xdp(ctx: XdpContext) -> u32 {
    let (action, stat) = try_xdp(&ctx);
    count(stat);
    action
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> (u32, Stat) {
    let (start, end) = (ctx.data(), ctx.data_end());
    let b = Bounds {
        start,
        end,
        len: end - start,
    };
    let f = match parse(&b) {
        Ok(f) => f,
        Err(stat) => return (xdp_action::XDP_PASS, stat),
    };
    let cfg = config();
    let decision = match forward(&f, &cfg) {
        Some(d) => d,
        None if maybe_snat_reply(&f, &cfg) => match reply(&f) {
            Some(d) => d,
            None => return (xdp_action::XDP_PASS, Stat::PassNoMatch),
        },
        None => return (xdp_action::XDP_PASS, Stat::PassNoMatch),
    };
    let (action, stat) = match decision {
        Decision::Drop(stat) => (xdp_action::XDP_DROP, stat),
        Decision::ToLocal(nat) => {
            if rewrite_xdp(&b, &f, &nat, false) {
                (xdp_action::XDP_PASS, Stat::LocalDeliver)
            } else {
                (xdp_action::XDP_PASS, Stat::PassMalformed)
            }
        }
        Decision::ToRemote(nat) | Decision::Reply(nat) => xdp_forward(ctx, &b, &f, &nat),
    };
    if cfg.flags & CFG_F_DEBUG != 0 {
        log_flow(ctx, &f, stat);
    }
    (action, stat)
}

#[inline(never)]
fn log_flow<C: aya_ebpf::EbpfContext>(ctx: &C, f: &Flow, stat: Stat) {
    info!(
        ctx,
        "np {}:{} -> {}:{} proto {} verdict {}",
        u32::from_be(f.saddr),
        u16::from_be(f.sport),
        u32::from_be(f.daddr),
        u16::from_be(f.dport),
        f.proto,
        stat as u32
    );
}

/// Pull the headers into the linear area so direct packet access sees them.
#[inline(always)]
fn tc_bounds(ctx: &TcContext) -> Bounds {
    let want = 14 + 60 + 20;
    let len = ctx.len();
    let _ = ctx.pull_data(if len < want { len } else { want });
    Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
        len: len as usize,
    }
}

/// TC ingress: finishes translations XDP passed to the stack. Only its own actions are
/// counted (XDP already counted the packet's pass reason).
#[classifier]
pub fn np_tc_in(ctx: TcContext) -> i32 {
    let b = tc_bounds(&ctx);
    let Ok(f) = parse(&b) else { return TC_ACT_OK };
    let cfg = config();
    let decision = match forward(&f, &cfg) {
        Some(d) => d,
        None if maybe_snat_reply(&f, &cfg) => match reply(&f) {
            Some(d) => d,
            None => return TC_ACT_OK,
        },
        None => return TC_ACT_OK,
    };
    let (action, stat) = match decision {
        Decision::Drop(stat) => (TC_ACT_SHOT, stat),
        Decision::ToLocal(nat) => {
            if rewrite_tc(&ctx, &f, &nat, false) {
                (TC_ACT_OK, Stat::TcNat)
            } else {
                (TC_ACT_SHOT, Stat::DropMapFull)
            }
        }
        Decision::ToRemote(nat) | Decision::Reply(nat) => tc_forward(&ctx, &f, &nat),
    };
    count(stat);
    if cfg.flags & CFG_F_DEBUG != 0 {
        log_flow(&ctx, &f, stat);
    }
    action
}

/// TC egress: replies of backends on this node leave through the stack; give them back
/// the frontend address and port the client talked to.
#[classifier]
pub fn np_tc_out(ctx: TcContext) -> i32 {
    let b = tc_bounds(&ctx);
    let Ok(f) = parse(&b) else { return TC_ACT_OK };
    let Some(Decision::Reply(nat)) = reply(&f) else {
        return TC_ACT_OK;
    };
    if rewrite_tc(&ctx, &f, &nat, false) {
        count(Stat::TcNat);
        TC_ACT_OK
    } else {
        count(Stat::DropMapFull);
        TC_ACT_SHOT
    }
}
