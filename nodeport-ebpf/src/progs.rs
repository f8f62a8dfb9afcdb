//! The programs. Each wraps a `try_` function returning (action, counter) and turns it
//! into exactly one counted verdict.
//!
//! XDP and TC ingress exist twice: the plain programs, and `_debug` variants that can log
//! every packet through aya-log when the runtime switch (`CFG_F_DEBUG`) is on. aya-log's
//! argument encoding does stack pointer arithmetic that the verifier only accepts with
//! CAP_PERFMON, so the agent loads the debug variants only for `--debug-datapath` and the
//! plain ones verify with CAP_BPF and CAP_NET_ADMIN alone.

use aya_ebpf::helpers::generated::bpf_xdp_get_buff_len;
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::info;
use nodeport_common::{Stat, CFG_F_DEBUG};

use crate::{
    fwd::{tc_forward, xdp_forward, xdp_route, Rewrite},
    lb::{config, decide, icmp_error, reply, Decision, IcmpDecision, Nat},
    nat::{rewrite_icmp, rewrite_tc, rewrite_xdp},
    packet::{parse, parse_icmp_error, Bounds, Flow, Skb},
    stats::count,
};

/// XDP on the node's interfaces.
#[xdp]
pub fn np_xdp(ctx: XdpContext) -> u32 {
    let (action, stat) = try_xdp::<false>(&ctx);
    count(stat);
    action
}

/// `np_xdp` with per-packet logs behind the runtime debug switch.
#[xdp]
pub fn np_xdp_debug(ctx: XdpContext) -> u32 {
    let (action, stat) = try_xdp::<true>(&ctx);
    count(stat);
    action
}

#[inline(always)]
fn try_xdp<const DEBUG: bool>(ctx: &XdpContext) -> (u32, Stat) {
    // SAFETY: helper on the program's own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
        len,
    };
    let f = match parse::<false>(&b) {
        Ok(f) => f,
        Err(Stat::PassOtherProto) => return xdp_icmp(ctx, &b),
        Err(stat) => return (xdp_action::XDP_PASS, stat),
    };
    let cfg = config();
    let Some(decision) = decide(&f, &cfg) else {
        return (xdp_action::XDP_PASS, Stat::PassNoMatch);
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
    if DEBUG && cfg.flags & CFG_F_DEBUG != 0 {
        log_flow(ctx, &f, stat);
    }
    (action, stat)
}

/// An ICMP error about a translated flow is translated too (path-MTU discovery and
/// unreachable reports work through the balancer); any other packet that is neither TCP
/// nor UDP passes untouched.
#[inline(always)]
fn xdp_icmp(ctx: &XdpContext, b: &Bounds) -> (u32, Stat) {
    let pass = (xdp_action::XDP_PASS, Stat::PassOtherProto);
    let Some(e) = parse_icmp_error(b) else {
        return pass;
    };
    let Some(decision) = icmp_error(&e) else {
        return pass;
    };
    let (action, stat) = match decision {
        IcmpDecision::Local(n) => {
            if rewrite_icmp(b, &e, &n, false) {
                (xdp_action::XDP_PASS, Stat::LocalDeliver)
            } else {
                (xdp_action::XDP_PASS, Stat::PassMalformed)
            }
        }
        IcmpDecision::Route(n) => {
            let to = Nat {
                saddr: n.outer_saddr,
                daddr: n.outer_daddr,
                sport: 0,
                dport: 0,
            };
            xdp_route(ctx, b, &e.outer, &to, Rewrite::Icmp(&e, &n))
        }
    };
    if matches!(stat, Stat::Tx | Stat::Redirect | Stat::LocalDeliver) {
        count(Stat::IcmpNat);
    }
    (action, stat)
}

#[inline(never)]
fn log_flow<C: aya_ebpf::EbpfContext>(ctx: &C, f: &Flow, stat: Stat) {
    info!(
        ctx,
        "np {:i}:{} -> {:i}:{} proto {} {}",
        u32::from_be(f.saddr),
        u16::from_be(f.sport),
        u32::from_be(f.daddr),
        u16::from_be(f.dport),
        f.proto,
        stat.name()
    );
}

/// TC ingress: finishes translations XDP passed to the stack. Only its own actions are
/// counted (XDP already counted the packet's pass reason).
#[classifier]
pub fn np_tc_in(ctx: TcContext) -> i32 {
    tc_in::<false>(&ctx)
}

/// `np_tc_in` with per-packet logs behind the runtime debug switch.
#[classifier]
pub fn np_tc_in_debug(ctx: TcContext) -> i32 {
    tc_in::<true>(&ctx)
}

#[inline(always)]
fn tc_in<const DEBUG: bool>(ctx: &TcContext) -> i32 {
    let Ok(f) = parse::<true>(&Skb(&ctx)) else {
        return TC_ACT_OK;
    };
    let cfg = config();
    let Some(decision) = decide(&f, &cfg) else {
        return TC_ACT_OK;
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
    if DEBUG && cfg.flags & CFG_F_DEBUG != 0 {
        log_flow(ctx, &f, stat);
    }
    action
}

/// TC egress: replies of backends on this node leave through the stack; give them back
/// the frontend address and port the client talked to. So do their ICMP errors about a
/// client's packet (port unreachable, fragmentation needed).
#[classifier]
pub fn np_tc_out(ctx: TcContext) -> i32 {
    let f = match parse::<true>(&Skb(&ctx)) {
        Ok(f) => f,
        Err(Stat::PassOtherProto) => return tc_out_icmp(&ctx),
        Err(_) => return TC_ACT_OK,
    };
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

/// An ICMP error a backend on this node sends to a client about the client's translated
/// packet: the client must see it come from the frontend, quoting its own packet to the
/// frontend, or its socket never learns of it.
#[inline(always)]
fn tc_out_icmp(ctx: &TcContext) -> i32 {
    let skb = Skb(ctx);
    let Some(e) = parse_icmp_error(&skb) else {
        return TC_ACT_OK;
    };
    // Only errors already on their way to the client (a reverse-NAT hit): the stack routed
    // them; nothing else leaving this node is ours to touch.
    let Some(IcmpDecision::Route(n)) = icmp_error(&e) else {
        return TC_ACT_OK;
    };
    if n.outer_daddr != e.outer.daddr {
        return TC_ACT_OK;
    }
    if rewrite_icmp(&skb, &e, &n, false) {
        count(Stat::TcNat);
        count(Stat::IcmpNat);
        TC_ACT_OK
    } else {
        count(Stat::DropMapFull);
        TC_ACT_SHOT
    }
}
