//! The programs. Each turns one packet into exactly one counted verdict. The EtherType
//! picks the family; everything after is one generic path instantiated for IPv4 ([`V4`])
//! and IPv6 ([`V6`]).
//!
//! A family's path is split into BPF functions, each with its own stack frame: inlined
//! together, IPv6's keys and values took the frame past the verifier's 512 bytes (the
//! limit holds for the frames of a call chain added up). XDP calls, one after the other,
//! the conntrack half of the decision (established flows and replies, carried out in the
//! same function), the frontend half for new flows (backend choice, SNAT port search,
//! binding, carrying out) and ICMP errors; TC the same halves from one function. IPv4
//! runs each half inline; IPv6 runs each step as a function of its own (`*_step`,
//! `xdp_act`), the flow and the decision kept in the caller's frame.
//!
//! XDP and TC ingress exist twice: the plain programs, and `_debug` variants that can log
//! every packet through aya-log when the runtime switch (`CFG_F_DEBUG`) is on. aya-log's
//! argument encoding does stack pointer arithmetic that the verifier only accepts with
//! CAP_PERFMON, so the agent loads the debug variants only for `--debug-datapath` and the
//! plain ones verify with CAP_BPF and CAP_NET_ADMIN alone.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::info;
use nodeport_common::{Ip6, Stat, CFG_F_DEBUG};

use crate::{
    family::{Family, V4, V6},
    frag,
    fwd::{tc_forward, tc_route, xdp_forward, xdp_route, Rewrite, TC_NEXT},
    lb::{
        bind, config, icmp_error, known, open, reply, snat, through_tunnel, tunnel_question,
        Choice, Decision, IcmpDecision, Known, VIA_OTHER, VIA_TUNNEL, VIA_UNASKED,
    },
    maps::DEVICES,
    nat::{rewrite_icmp, rewrite_tc, rewrite_xdp},
    packet::{
        ether, parse, parse_icmp_error, xdp_bounds, Bounds, Ether, Flow, PacketBytes, Skb,
        FRAG_LATER,
    },
    reject,
    stats::{count, count_index},
};

/// XDP on the node's interfaces.
#[xdp]
pub fn np_xdp(ctx: XdpContext) -> u32 {
    xdp_program::<false>(&ctx)
}

/// `np_xdp` with per-packet logs behind the runtime debug switch.
#[xdp]
pub fn np_xdp_debug(ctx: XdpContext) -> u32 {
    xdp_program::<true>(&ctx)
}

#[inline(always)]
fn bounds(ctx: &XdpContext) -> Bounds {
    xdp_bounds(ctx)
}

/// A verdict (action, counter index) in one register. The BPF functions below return
/// it as a scalar: a struct comes back through a hidden pointer, and LLVM may leave a
/// stack pointer in R0, which the verifier refuses ("cannot return stack pointer").
#[derive(Clone, Copy)]
struct Verdict(u64);

impl Verdict {
    /// Not ours / not handled here.
    const NONE: Verdict = Verdict(u64::MAX);
    /// No live flow: the frontends decide (with a new choice for a flow whose backend is
    /// gone, `RESELECT`).
    const OPEN: Verdict = Verdict(u64::MAX - 1);
    const RESELECT: Verdict = Verdict(u64::MAX - 2);
    /// TC ingress: neither TCP nor UDP; ICMP errors are looked at next, in a BPF function
    /// called from the program itself (nested deeper, its frame exceeds the stack limit).
    const OTHER_PROTO: Verdict = Verdict(u64::MAX - 3);
    /// The service has no endpoint: refuse (`xdp_refuse`, `tc_refuse`), from a BPF
    /// function called by the program itself, whose frame the packet path's do not hold.
    const REFUSE: Verdict = Verdict(u64::MAX - 4);
    /// High word of [`Verdict::too_big`].
    const TOO_BIG_TAG: u64 = 0xffff_fffe;

    /// A client's packet too big for the route to its backend: answer with a path MTU
    /// error reporting `mtu` (`xdp_frag_needed`, `tc_frag_needed`, BPF functions called
    /// by the program itself, like the refusals).
    #[inline(always)]
    fn too_big(mtu: u32) -> Verdict {
        Verdict((Verdict::TOO_BIG_TAG << 32) | mtu as u64)
    }
    /// For `too_big`: the MTU to report.
    #[inline(always)]
    fn mtu(self) -> Option<u32> {
        (self.0 >> 32 == Verdict::TOO_BIG_TAG).then_some(self.0 as u32)
    }

    #[inline(always)]
    fn new(action: u32, stat: Stat) -> Verdict {
        Verdict(((action as u64) << 32) | stat as u64)
    }
    #[inline(always)]
    fn of((action, stat): (u32, Stat)) -> Verdict {
        Verdict::new(action, stat)
    }
    #[inline(always)]
    fn of_tc((action, stat): (i32, Stat)) -> Verdict {
        Verdict::new(action as u32, stat)
    }
    #[inline(always)]
    fn is_none(self) -> bool {
        self.0 == u64::MAX
    }
    #[inline(always)]
    fn open(reselect: bool) -> Verdict {
        if reselect {
            Verdict::RESELECT
        } else {
            Verdict::OPEN
        }
    }
    /// For `OPEN`/`RESELECT`: whether to reselect.
    #[inline(always)]
    fn reselect(self) -> Option<bool> {
        match self.0 {
            x if x == Verdict::OPEN.0 => Some(false),
            x if x == Verdict::RESELECT.0 => Some(true),
            _ => None,
        }
    }
    #[inline(always)]
    fn action(self) -> u32 {
        (self.0 >> 32) as u32
    }
    #[inline(always)]
    fn stat(self) -> u32 {
        self.0 as u32
    }
}

#[inline(always)]
fn xdp_program<const DEBUG: bool>(ctx: &XdpContext) -> u32 {
    let v = match ether(&bounds(ctx)) {
        Ok(Ether::Ipv4) => xdp_family::<V4>(ctx),
        Ok(Ether::Ipv6) => xdp_family::<V6>(ctx),
        Err(stat) => Verdict::new(xdp_action::XDP_PASS, stat),
    };
    count_index(v.stat());
    if DEBUG && config().flags & CFG_F_DEBUG != 0 {
        log_packet(ctx, &bounds(ctx), v.stat());
    }
    v.action()
}

/// A family's path. IPv4 parses, decides and acts in one BPF function. IPv6 returns from
/// it when the frontends must decide (a new flow), and that half runs from the program
/// (`xdp_new`), so its steps' frames do not add to the first half's. ICMP errors take a
/// function of their own.
#[inline(always)]
fn xdp_family<F: Family>(ctx: &XdpContext) -> Verdict {
    let v = xdp_known::<F>(ctx);
    if v.is_none() {
        return xdp_icmp::<F>(ctx);
    }
    let v = match v.reselect() {
        Some(reselect) if F::IS_V6 => xdp_new::<F>(ctx, reselect),
        _ => v,
    };
    if v.0 == Verdict::REFUSE.0 {
        return xdp_refuse::<F>(ctx);
    }
    if let Some(mtu) = v.mtu() {
        return xdp_frag_needed::<F>(ctx, mtu);
    }
    v
}

/// The IP protocol of a parsed packet of family `F` (minimal IP header).
#[inline(always)]
fn ip_proto<F: Family>(b: &impl PacketBytes) -> u8 {
    let off = if F::IS_V6 { 6 } else { 9 };
    b.load::<u8>(crate::family::L3 + off).unwrap_or(0)
}

/// An answer of shape `S` (reporting `mtu`, for path MTU errors) back out of the
/// receiving interface with XDP_TX, within this CPU's budget, counted `sent`; a frame
/// that cannot be turned is dropped, counted `failed`.
#[inline(always)]
fn xdp_answer<S: reject::Shape>(ctx: &XdpContext, mtu: u32, sent: Stat, failed: Stat) -> Verdict {
    if !reject::budget() {
        return Verdict::new(xdp_action::XDP_DROP, Stat::DropRejectRate);
    }
    if reject::xdp::<S>(ctx, mtu) {
        Verdict::new(xdp_action::XDP_TX, sent)
    } else {
        Verdict::new(xdp_action::XDP_DROP, failed)
    }
}

/// [`xdp_answer`] in TC: redirected to the receiving interface's egress.
#[inline(always)]
fn tc_answer<S: reject::Shape>(ctx: &TcContext, mtu: u32, sent: Stat, failed: Stat) -> Verdict {
    if !reject::budget() {
        return Verdict::new(TC_ACT_SHOT as u32, Stat::DropRejectRate);
    }
    match reject::tc::<S>(ctx, mtu) {
        action if action >= 0 => Verdict::new(action as u32, sent),
        _ => Verdict::new(TC_ACT_SHOT as u32, failed),
    }
}

/// A TCP RST or ICMP port unreachable back out of the receiving interface.
#[inline(never)]
fn xdp_refuse<F: Family>(ctx: &XdpContext) -> Verdict {
    let tcp = ip_proto::<F>(&bounds(ctx)) == nodeport_common::PROTO_TCP;
    let (sent, failed) = (Stat::RejectNoEndpoints, Stat::DropNoBackend);
    match (F::IS_V6, tcp) {
        (false, true) => xdp_answer::<reject::Rst4>(ctx, 0, sent, failed),
        (false, false) => xdp_answer::<reject::Unreach4>(ctx, 0, sent, failed),
        (true, true) => xdp_answer::<reject::Rst6>(ctx, 0, sent, failed),
        (true, false) => xdp_answer::<reject::Unreach6>(ctx, 0, sent, failed),
    }
}

/// `xdp_refuse` in TC.
#[inline(never)]
fn tc_refuse<F: Family>(ctx: &TcContext) -> Verdict {
    let tcp = ip_proto::<F>(&Skb(ctx)) == nodeport_common::PROTO_TCP;
    let (sent, failed) = (Stat::RejectNoEndpoints, Stat::DropNoBackend);
    match (F::IS_V6, tcp) {
        (false, true) => tc_answer::<reject::Rst4>(ctx, 0, sent, failed),
        (false, false) => tc_answer::<reject::Unreach4>(ctx, 0, sent, failed),
        (true, true) => tc_answer::<reject::Rst6>(ctx, 0, sent, failed),
        (true, false) => tc_answer::<reject::Unreach6>(ctx, 0, sent, failed),
    }
}

/// A path MTU error (ICMP fragmentation needed, ICMPv6 packet too big) in place of a
/// client's packet too big for the route to its backend. Never for an ICMP error: only
/// TCP and UDP flows come here. A frame that cannot be turned is dropped (`drop_fib`).
#[inline(never)]
fn xdp_frag_needed<F: Family>(ctx: &XdpContext, mtu: u32) -> Verdict {
    let (sent, failed) = (Stat::IcmpFragNeeded, Stat::DropFib);
    if F::IS_V6 {
        xdp_answer::<reject::TooBig6>(ctx, mtu, sent, failed)
    } else {
        xdp_answer::<reject::FragNeeded4>(ctx, mtu, sent, failed)
    }
}

/// `xdp_frag_needed` in TC.
#[inline(never)]
fn tc_frag_needed<F: Family>(ctx: &TcContext, mtu: u32) -> Verdict {
    let (sent, failed) = (Stat::IcmpFragNeeded, Stat::DropFib);
    if F::IS_V6 {
        tc_answer::<reject::TooBig6>(ctx, mtu, sent, failed)
    } else {
        tc_answer::<reject::FragNeeded4>(ctx, mtu, sent, failed)
    }
}

/// Parse, the conntrack half of the decision, for IPv4 also the frontend half, and
/// acting on it. IPv6 runs each step as a function of its own (its keys and values do not
/// fit one frame). `Verdict::NONE`: not TCP or UDP; `Verdict::open` (IPv6 only): no live
/// flow.
#[inline(never)]
fn xdp_known<F: Family>(ctx: &XdpContext) -> Verdict {
    let mut f = MaybeUninit::uninit();
    let parsed = if F::IS_V6 {
        xdp_parse::<F>(ctx, &mut f)
    } else {
        parse_into::<F>(ctx, &mut f)
    };
    match parsed {
        Ok(()) => {}
        Err(Stat::PassOtherProto) => return Verdict::NONE,
        Err(stat) => return Verdict::new(xdp_action::XDP_PASS, stat),
    }
    // SAFETY: the parse wrote the flow when it returned Ok.
    let f = unsafe { f.assume_init_ref() };
    let mut d = Decision::Drop(Stat::PassNoMatch);
    let open = if F::IS_V6 {
        known_step::<F>(f, &mut d)
    } else {
        known_into::<F>(f, &mut d)
    };
    match open {
        // IPv6: the frontend half runs from the program (`xdp_new`), so its steps' frames
        // do not add to this one's.
        Some(reselect) if F::IS_V6 => Verdict::open(reselect),
        Some(reselect) => {
            if !open_decide::<F>(None, f, reselect, &mut d) {
                return Verdict::new(xdp_action::XDP_PASS, Stat::PassNoMatch);
            }
            xdp_act_inline::<F>(ctx, &bounds(ctx), f, &d)
        }
        None if F::IS_V6 => xdp_act::<F>(ctx, f, &d),
        None => xdp_act_inline::<F>(ctx, &bounds(ctx), f, &d),
    }
}

/// IPv6's new flows (or flows whose backend is gone): the frontends decide, in steps.
#[inline(never)]
fn xdp_new<F: Family>(ctx: &XdpContext, reselect: bool) -> Verdict {
    let mut f = MaybeUninit::uninit();
    if xdp_parse::<F>(ctx, &mut f).is_err() {
        return Verdict::new(xdp_action::XDP_PASS, Stat::PassMalformed);
    }
    // SAFETY: xdp_parse wrote the flow when it returned Ok.
    let f = unsafe { f.assume_init_ref() };
    let mut d = Decision::Drop(Stat::PassNoMatch);
    if !open_decide::<F>(None, f, reselect, &mut d) {
        return Verdict::new(xdp_action::XDP_PASS, Stat::PassNoMatch);
    }
    if F::IS_V6 {
        xdp_act::<F>(ctx, f, &d)
    } else {
        xdp_act_inline::<F>(ctx, &bounds(ctx), f, &d)
    }
}

/// The whole decision into `d`, as steps in BPF functions of their own (TC). False: the
/// packet is not ours.
#[inline(always)]
fn decide<F: Family>(ctx: &TcContext, f: &Flow<F::A>, d: &mut Decision<F::A>) -> bool {
    match known_step::<F>(f, d) {
        None => true,
        Some(reselect) => open_decide::<F>(Some(ctx), f, reselect, d),
    }
}

/// The interface a TC packet arrived on.
#[inline(always)]
fn tc_ingress(ctx: &TcContext) -> u32 {
    // SAFETY: reading the ingress ifindex of the skb context.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// The frontend half of the decision into `d`: backend choice, SNAT port, binding.
///
/// Where the pod network has a tunnel (`tun_*` in NP_CONFIG), a new flow to a remote
/// backend asks the FIB whether the tunnel reaches it, for its SNAT source (`lb::snat`).
/// TC asks (`tc`), in BPF functions of their own. XDP leaves such a flow to TC, untouched
/// (`lb::snat` says `Stat::FibPass`, carried out as XDP_PASS): its frames have no room
/// for the question (the verifier's 512 bytes for a call chain). Its later packets come
/// back to XDP as established, and a tunnelled one passes on anyway (XDP cannot redirect
/// into a tunnel device: it has no ndo_xdp_xmit).
#[inline(always)]
fn open_decide<F: Family>(
    tc: Option<&TcContext>,
    f: &Flow<F::A>,
    reselect: bool,
    d: &mut Decision<F::A>,
) -> bool {
    // A later fragment follows its first fragment's flow; it never opens one.
    if f.frag == FRAG_LATER {
        return false;
    }
    // Not zeroed first: LLVM makes that a memset loop, which the verifier refuses without
    // CAP_PERFMON. `open` writes every field when it returns Ok.
    // IPv4 runs the steps inline; IPv6's need frames of their own.
    let mut choice = MaybeUninit::uninit();
    let opened = if F::IS_V6 {
        open_step::<F>(f, reselect, &mut choice)
    } else {
        open::<F>(f, reselect, &mut choice)
    };
    match opened {
        None => return false,
        Some(Err(stat)) => *d = Decision::Drop(stat),
        Some(Ok(())) => {
            // SAFETY: initialised by open's Ok.
            let choice = unsafe { choice.assume_init_mut() };
            let via = match tc {
                None => VIA_UNASKED,
                Some(ctx) => match tunnel_question::<F>(choice) {
                    0 => VIA_OTHER,
                    tun => tunnel_step::<F>(ctx, f, choice, tun),
                },
            };
            let sourced = if F::IS_V6 {
                snat_step::<F>(f, choice, via)
            } else {
                snat::<F>(f, choice, via)
            };
            match sourced {
                Ok(()) if F::IS_V6 => {
                    bind_step::<F>(f, choice, d);
                }
                Ok(()) => bind_into::<F>(f, choice, d),
                Err(stat) => *d = Decision::Drop(stat),
            }
        }
    }
    true
}

#[inline(never)]
fn xdp_parse<F: Family>(ctx: &XdpContext, f: &mut MaybeUninit<Flow<F::A>>) -> Result<(), Stat> {
    parse_into::<F>(ctx, f)
}

#[inline(always)]
fn parse_into<F: Family>(ctx: &XdpContext, f: &mut MaybeUninit<Flow<F::A>>) -> Result<(), Stat> {
    let mut flow = parse::<F, false>(&bounds(ctx))?;
    frag::track(&mut flow)?;
    if flow.frag == FRAG_LATER {
        count(Stat::FragLater);
    }
    f.write(flow);
    Ok(())
}

/// `lb::known` as a step of its own.
#[inline(never)]
fn known_step<F: Family>(f: &Flow<F::A>, d: &mut Decision<F::A>) -> Option<bool> {
    known_into::<F>(f, d)
}

/// `lb::known`: `None` when it decided (into `d`), else whether to reselect.
#[inline(always)]
fn known_into<F: Family>(f: &Flow<F::A>, d: &mut Decision<F::A>) -> Option<bool> {
    match known::<F>(f, &config()) {
        Known::Decided(decided) => {
            *d = decided;
            None
        }
        Known::Unknown { reselect } => Some(reselect),
    }
}

#[inline(never)]
fn open_step<F: Family>(
    f: &Flow<F::A>,
    reselect: bool,
    choice: &mut MaybeUninit<Choice<F::A>>,
) -> Option<Result<(), Stat>> {
    open::<F>(f, reselect, choice)
}

/// The SNAT port search runs under `bpf_loop`, whose callback frame adds to this one.
#[inline(never)]
fn snat_step<F: Family>(f: &Flow<F::A>, choice: &mut Choice<F::A>, via: u32) -> Result<(), Stat> {
    snat::<F>(f, choice, via)
}

/// `lb::through_tunnel` as a step of its own (its FIB question stays out of the frames
/// of the steps after it): `VIA_TUNNEL` when tunnel `tun` reaches the chosen backend.
#[inline(never)]
fn tunnel_step<F: Family>(ctx: &TcContext, f: &Flow<F::A>, choice: &Choice<F::A>, tun: u32) -> u32 {
    if through_tunnel::<F, TcContext>(ctx, tc_ingress(ctx), f, choice, tun) {
        VIA_TUNNEL
    } else {
        VIA_OTHER
    }
}

#[inline(never)]
fn bind_step<F: Family>(f: &Flow<F::A>, choice: &Choice<F::A>, d: &mut Decision<F::A>) -> u32 {
    bind_into::<F>(f, choice, d);
    0
}

#[inline(always)]
fn bind_into<F: Family>(f: &Flow<F::A>, choice: &Choice<F::A>, d: &mut Decision<F::A>) {
    // Each variant written in place: a `Decision` built aside and copied would copy the
    // unwritten bytes of `Drop`, and the verifier refuses reads of uninitialised stack.
    match bind::<F>(f, choice) {
        Ok((nat, true)) => *d = Decision::ToLocal(nat),
        Ok((nat, false)) => *d = Decision::ToRemote(nat),
        Err(stat) => *d = Decision::Drop(stat),
    }
}

/// Carry out a decision in XDP, as a step of its own.
#[inline(never)]
fn xdp_act<F: Family>(ctx: &XdpContext, f: &Flow<F::A>, decision: &Decision<F::A>) -> Verdict {
    xdp_act_inline::<F>(ctx, &bounds(ctx), f, decision)
}

/// Carry out a decision in XDP.
#[inline(always)]
fn xdp_act_inline<F: Family>(
    ctx: &XdpContext,
    b: &Bounds,
    f: &Flow<F::A>,
    decision: &Decision<F::A>,
) -> Verdict {
    Verdict::of(match decision {
        Decision::Drop(Stat::RejectNoEndpoints) => return Verdict::REFUSE,
        // A new flow whose SNAT source TC chooses (see `open_decide`).
        Decision::Drop(Stat::FibPass) => (xdp_action::XDP_PASS, Stat::FibPass),
        Decision::Drop(stat) => (xdp_action::XDP_DROP, *stat),
        Decision::ToLocal(nat) => {
            if rewrite_xdp::<F>(b, f, nat, false) {
                (xdp_action::XDP_PASS, Stat::LocalDeliver)
            } else {
                (xdp_action::XDP_PASS, Stat::PassMalformed)
            }
        }
        Decision::ToRemote(nat) => match xdp_forward::<F>(ctx, b, f, nat, true) {
            (mtu, Stat::IcmpFragNeeded) => return Verdict::too_big(mtu),
            v => v,
        },
        Decision::Reply(nat) => xdp_forward::<F>(ctx, b, f, nat, false),
    })
}

/// An ICMP error about a translated flow is translated too (path-MTU discovery and
/// unreachable reports work through the balancer); any other packet that is neither TCP
/// nor UDP passes untouched.
#[inline(never)]
fn xdp_icmp<F: Family>(ctx: &XdpContext) -> Verdict {
    let b = &bounds(ctx);
    let pass = Verdict::new(xdp_action::XDP_PASS, Stat::PassOtherProto);
    let Some(e) = parse_icmp_error::<F>(b) else {
        return pass;
    };
    let Some(decision) = icmp_error::<F>(&e) else {
        return pass;
    };
    let (action, stat) = match decision {
        IcmpDecision::Local(n) => {
            if rewrite_icmp::<F>(b, &e, &n, false) {
                (xdp_action::XDP_PASS, Stat::LocalDeliver)
            } else {
                (xdp_action::XDP_PASS, Stat::PassMalformed)
            }
        }
        IcmpDecision::Route(n) => xdp_route::<F>(
            ctx,
            b,
            &e.outer,
            &n.outer_nat(),
            Rewrite::Icmp(&e, &n),
            false,
        ),
    };
    if matches!(stat, Stat::Tx | Stat::Redirect | Stat::LocalDeliver) {
        count(Stat::IcmpNat);
    }
    Verdict::new(action, stat)
}

/// Log a packet's tuple (after the verdict: a translated packet shows its new addresses)
/// and the verdict. A BPF function of its own, parsing again: aya-log's buffers would not
/// fit in the frames of the packet path.
#[inline(never)]
fn log_packet<C: EbpfContext>(ctx: &C, b: &impl PacketBytes, stat: u32) -> u32 {
    let Some(stat) = Stat::ALL.get(stat as usize) else {
        return 0;
    };
    match ether(b) {
        Ok(Ether::Ipv4) => {
            if let Ok(f) = parse::<V4, true>(b) {
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
        }
        Ok(Ether::Ipv6) => {
            if let Ok(f) = parse::<V6, true>(b) {
                let (s, d) = (octets(f.saddr), octets(f.daddr));
                info!(
                    ctx,
                    "np [{:i}]:{} -> [{:i}]:{} proto {} {}",
                    s,
                    u16::from_be(f.sport),
                    d,
                    u16::from_be(f.dport),
                    f.proto,
                    stat.name()
                );
            }
        }
        Err(_) => {}
    }
    0
}

#[inline(always)]
fn octets(a: Ip6) -> [u8; 16] {
    let w = |i: usize| a[i].to_ne_bytes();
    let (a0, a1, a2, a3) = (w(0), w(1), w(2), w(3));
    [
        a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3], a2[0], a2[1], a2[2], a2[3], a3[0],
        a3[1], a3[2], a3[3],
    ]
}

/// TC ingress: finishes translations XDP passed to the stack. Only its own actions are
/// counted (XDP already counted the packet's pass reason).
#[classifier]
pub fn np_tc_in(ctx: TcContext) -> i32 {
    tc_program::<false>(&ctx)
}

/// `np_tc_in` with per-packet logs behind the runtime debug switch.
#[classifier]
pub fn np_tc_in_debug(ctx: TcContext) -> i32 {
    tc_program::<true>(&ctx)
}

#[inline(always)]
fn tc_program<const DEBUG: bool>(ctx: &TcContext) -> i32 {
    let v = match ether(&Skb(ctx)) {
        Ok(Ether::Ipv4) => match tc_family::<V4>(ctx) {
            v if v.0 == Verdict::OTHER_PROTO.0 => tc_in_icmp::<V4>(ctx),
            v if v.0 == Verdict::REFUSE.0 => tc_refuse::<V4>(ctx),
            v => match v.mtu() {
                Some(mtu) => tc_frag_needed::<V4>(ctx, mtu),
                None => v,
            },
        },
        Ok(Ether::Ipv6) => match tc_family::<V6>(ctx) {
            v if v.0 == Verdict::OTHER_PROTO.0 => tc_in_icmp::<V6>(ctx),
            v if v.0 == Verdict::REFUSE.0 => tc_refuse::<V6>(ctx),
            v => match v.mtu() {
                Some(mtu) => tc_frag_needed::<V6>(ctx, mtu),
                None => v,
            },
        },
        Err(_) => Verdict::NONE,
    };
    if v.is_none() {
        return TC_NEXT;
    }
    count_index(v.stat());
    if DEBUG && config().flags & CFG_F_DEBUG != 0 {
        log_packet(ctx, &Skb(ctx), v.stat());
    }
    v.action() as i32
}

/// The same steps as XDP's (`xdp_family`); `None` when the packet is not ours.
#[inline(never)]
fn tc_family<F: Family>(ctx: &TcContext) -> Verdict {
    let mut f = MaybeUninit::uninit();
    match tc_parse::<F>(ctx, &mut f) {
        Ok(()) => {}
        Err(Stat::PassOtherProto) => return Verdict::OTHER_PROTO,
        Err(Stat::PassFragOutOfOrder) => return tc_frag_out_of_order(ctx),
        Err(_) => return Verdict::NONE,
    }
    // SAFETY: tc_parse wrote the flow when it returned Ok.
    let f = unsafe { f.assume_init_ref() };
    let mut d = Decision::Drop(Stat::PassNoMatch);
    if !decide::<F>(ctx, f, &mut d) {
        return Verdict::NONE;
    }
    tc_act::<F>(ctx, f, &d)
}

/// A later fragment without its first, in TC ingress: counted only where XDP does not
/// serve the interface (XDP counted it already, or translated it: a translated fragment's
/// datagram is known under its arriving addresses, not its new ones).
#[inline(never)]
fn tc_frag_out_of_order(ctx: &TcContext) -> Verdict {
    if xdp_served(ctx) {
        return Verdict::NONE;
    }
    Verdict::new(TC_NEXT as u32, Stat::PassFragOutOfOrder)
}

/// Whether the packet arrived on an interface XDP serves (one in NP_DEV): XDP saw it first.
#[inline(always)]
fn xdp_served(ctx: &TcContext) -> bool {
    DEVICES.get(tc_ingress(ctx)).is_some()
}

#[inline(never)]
fn tc_parse<F: Family>(ctx: &TcContext, f: &mut MaybeUninit<Flow<F::A>>) -> Result<(), Stat> {
    let mut flow = parse::<F, true>(&Skb(ctx))?;
    frag::track(&mut flow)?;
    if flow.frag == FRAG_LATER && !xdp_served(ctx) {
        count(Stat::FragLater);
    }
    f.write(flow);
    Ok(())
}

/// An ICMP error about a translated flow arriving on an interface that XDP does not serve
/// (the agent runs a veth uplink, or a driver without native XDP, on TC alone): translated
/// here as `xdp_icmp` would. Where XDP runs (the interface is in NP_DEV), it has done so.
#[inline(never)]
fn tc_in_icmp<F: Family>(ctx: &TcContext) -> Verdict {
    if xdp_served(ctx) {
        return Verdict::NONE;
    }
    let skb = Skb(ctx);
    let Some(e) = parse_icmp_error::<F>(&skb) else {
        return Verdict::NONE;
    };
    let Some(decision) = icmp_error::<F>(&e) else {
        return Verdict::NONE;
    };
    let (action, stat) = match decision {
        IcmpDecision::Local(n) => {
            if rewrite_icmp::<F>(&skb, &e, &n, false) {
                (TC_NEXT, Stat::LocalDeliver)
            } else {
                (TC_ACT_SHOT, Stat::DropMapFull)
            }
        }
        IcmpDecision::Route(n) => {
            tc_route::<F>(ctx, &e.outer, &n.outer_nat(), Rewrite::Icmp(&e, &n), false)
        }
    };
    if matches!(stat, Stat::TcNat | Stat::LocalDeliver) {
        count(Stat::IcmpNat);
    }
    Verdict::of_tc((action, stat))
}

/// Carry out a decision in TC.
#[inline(never)]
fn tc_act<F: Family>(ctx: &TcContext, f: &Flow<F::A>, decision: &Decision<F::A>) -> Verdict {
    Verdict::of_tc(match decision {
        Decision::Drop(Stat::RejectNoEndpoints) => return Verdict::REFUSE,
        Decision::Drop(stat) => (TC_ACT_SHOT, *stat),
        Decision::ToLocal(nat) => {
            if rewrite_tc::<F>(ctx, f, nat, false) {
                (TC_NEXT, Stat::TcNat)
            } else {
                (TC_ACT_SHOT, Stat::DropMapFull)
            }
        }
        Decision::ToRemote(nat) => match tc_forward::<F>(ctx, f, nat, true) {
            (mtu, Stat::IcmpFragNeeded) => return Verdict::too_big(mtu as u32),
            v => v,
        },
        Decision::Reply(nat) => tc_forward::<F>(ctx, f, nat, false),
    })
}

/// TC egress: replies of backends on this node leave through the stack; give them back
/// the frontend address and port the client talked to. So do their ICMP errors about a
/// client's packet (port unreachable, fragmentation needed, packet too big).
#[classifier]
pub fn np_tc_out(ctx: TcContext) -> i32 {
    match ether(&Skb(&ctx)) {
        Ok(Ether::Ipv4) => tc_out::<V4>(&ctx),
        Ok(Ether::Ipv6) => tc_out::<V6>(&ctx),
        Err(_) => TC_NEXT,
    }
}

#[inline(never)]
fn tc_out<F: Family>(ctx: &TcContext) -> i32 {
    let mut f = match parse::<F, true>(&Skb(ctx)) {
        Ok(f) => f,
        Err(Stat::PassOtherProto) => return tc_out_icmp::<F>(ctx),
        Err(_) => return TC_NEXT,
    };
    // The node's own traffic leaves here too: a fragment without its first is not ours
    // to count.
    if frag::track(&mut f).is_err() {
        return TC_NEXT;
    }
    if f.frag == FRAG_LATER {
        count(Stat::FragLater);
    }
    let Some(Decision::Reply(nat)) = reply::<F>(&f) else {
        return TC_NEXT;
    };
    if rewrite_tc::<F>(ctx, &f, &nat, false) {
        count(Stat::TcNat);
        TC_NEXT
    } else {
        count(Stat::DropMapFull);
        TC_ACT_SHOT
    }
}

/// An ICMP error a backend on this node sends to a client about the client's translated
/// packet: the client must see it come from the frontend, quoting its own packet to the
/// frontend, or its socket never learns of it.
#[inline(always)]
fn tc_out_icmp<F: Family>(ctx: &TcContext) -> i32 {
    let skb = Skb(ctx);
    let Some(e) = parse_icmp_error::<F>(&skb) else {
        return TC_NEXT;
    };
    // Only errors already on their way to the client (a reverse-NAT hit): the stack routed
    // them; nothing else leaving this node is ours to touch.
    let Some(IcmpDecision::Route(n)) = icmp_error::<F>(&e) else {
        return TC_NEXT;
    };
    if n.outer_daddr != e.outer.daddr {
        return TC_NEXT;
    }
    if rewrite_icmp::<F>(&skb, &e, &n, false) {
        count(Stat::TcNat);
        count(Stat::IcmpNat);
        TC_NEXT
    } else {
        count(Stat::DropMapFull);
        TC_ACT_SHOT
    }
}
