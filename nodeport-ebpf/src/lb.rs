//! The load-balancing decision: frontend lookup, conntrack, Maglev backend choice and SNAT
//! port allocation for forward packets; reverse-NAT lookup for replies. Map logic: it
//! decides the new addresses and ports (asking `fwd` only which interface reaches a remote
//! backend, when a tunnel is configured); `nat` rewrites and `fwd` forwards. Written once
//! for both families: `F` picks the maps (NP_CT or NP_CT6, ...).

use core::{mem::MaybeUninit, num::NonZeroU32};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::{c_long, c_void},
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_loop},
    maps::lpm_trie::Key,
    EbpfContext,
};
use nodeport_common::{
    ct::{bound_to, revnat_owner, Timeouts},
    hash::flow_hash,
    Addr, Affinity, AffinityKey, Backend, Config, CtEntry, FlowKey, FrontendKey, RevNat, Service,
    SrcRange, Stat, BE_F_DRAINING, BE_F_LOCAL, CT_F_AFFINITY, CT_F_BACKEND_SEQ, CT_F_CLOSING,
    CT_F_REPLIED, CT_F_SNAT, CT_F_STREAM, CT_F_SYN_ONLY, MAGLEV_SLOTS_PER_ENTRY, PROTO_TCP,
    SNAT_PROBES, SRC_RANGE_SVC_BITS, SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_REJECT, SVC_F_SRC_RANGES,
};

use crate::{
    family::Family,
    fwd::egress_ifindex,
    maps::{CONFIG, MAGLEV},
    packet::{Flow, IcmpError, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

const NS: u64 = 1_000_000_000;
/// A conntrack entry's timestamp is refreshed at most once a second (saves cache traffic).
const REFRESH_NS: u64 = NS;

/// New addresses and ports of a translated packet (network order).
#[derive(Clone, Copy)]
pub struct Nat<A: Addr> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
}

/// What to do with a TCP/UDP packet.
pub enum Decision<A: Addr> {
    /// Drop, counting this reason.
    Drop(Stat),
    /// Forward packet of a flow to a backend on this node (deliver through the stack).
    ToLocal(Nat<A>),
    /// Forward packet of a flow to a backend on another node.
    ToRemote(Nat<A>),
    /// Reply of a translated flow, back towards the client.
    Reply(Nat<A>),
}

#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) if c.snat_port_min != 0 => *c,
        _ => Config::default(),
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Find the service of a frontend: an exact (address, port) frontend (LoadBalancer or
/// external IP), else a nodePort when the destination is one of this node's addresses.
/// Returns the service and whether it matched as a nodePort (the destination is then known
/// to be a node address; for an exact match only a new remote flow needs to ask).
#[inline(always)]
fn lookup_service<F: Family>(f: &Flow<F::A>) -> Option<(Service, bool)> {
    let mut key = FrontendKey {
        addr: f.daddr,
        port: f.dport,
        proto: f.proto,
        pad: 0,
    };
    // SAFETY: values are plain data copied out immediately.
    if let Some(svc) = unsafe { F::services().get(&key) } {
        return Some((*svc, false));
    }
    unsafe { F::node_addrs().get(&f.daddr) }?;
    key.addr.clear();
    unsafe { F::services().get(&key) }.map(|svc| (*svc, true))
}

/// The conntrack timeouts of `cfg`.
#[inline(always)]
fn timeouts(cfg: &Config) -> Timeouts {
    // Field by field with volatile loads, then choices among values: LLVM turns a choice
    // among field loads into one load at a chosen offset, pointer arithmetic the verifier
    // refuses without CAP_PERFMON when the offsets come from different paths.
    // SAFETY: reads of a live reference's fields.
    unsafe {
        Timeouts {
            tcp: core::ptr::read_volatile(&cfg.tcp_timeout_s),
            tcp_syn: core::ptr::read_volatile(&cfg.tcp_syn_timeout_s),
            tcp_closing: core::ptr::read_volatile(&cfg.tcp_closing_timeout_s),
            udp: core::ptr::read_volatile(&cfg.udp_timeout_s),
            udp_unreplied: core::ptr::read_volatile(&cfg.udp_unreplied_timeout_s),
        }
    }
}

/// The timeouts read from NP_CONFIG in place, or the defaults when the agent has not
/// written it: no 48-byte copy of `Config` on the stack (TC egress has no room for one).
#[inline(always)]
fn timeouts_in_place() -> Timeouts {
    match CONFIG.get(0) {
        Some(c) if c.snat_port_min != 0 => timeouts(c),
        _ => Timeouts::of(&Config::default()),
    }
}

#[inline(always)]
fn expired<A: Addr>(cfg: &Config, proto: u8, ct: &CtEntry<A>, now: u64) -> bool {
    timeouts(cfg).expired(proto, ct, now)
}

/// How far, either way, a TCP sequence number may lie from its sender's mark (the
/// `CtEntry`'s `client_seq` or `backend_seq`) for the packet to change the flow's state.
/// A stranger who knows the 4-tuple but not the sequence numbers hits the window with
/// odds of 2^21 / 2^32 (1 in 2,048) per guess; the backend's own TCP stack checks the RST
/// against its receive window (RFC 5961, net/ipv4/tcp_input.c `tcp_validate_incoming`),
/// of the same order, and sees every guess too.
const SEQ_WINDOW: u32 = 1 << 20;
/// A sender's mark moves to a packet's sequence number once that is this far ahead, so
/// the entry is written once per 256 KiB of a direction's data, not per packet.
const SEQ_ADVANCE: u32 = SEQ_WINDOW / 4;

/// Whether `seq` lies within [`SEQ_WINDOW`] of `mark`, either way (modulo 2^32).
#[inline(always)]
fn near(seq: u32, mark: u32) -> bool {
    seq.wrapping_sub(mark).wrapping_add(SEQ_WINDOW) < 2 * SEQ_WINDOW
}

/// A SYN without ACK (nor RST): a TCP connection's first packet. (UDP has no flags.)
#[inline(always)]
fn is_syn<A: Addr>(f: &Flow<A>) -> bool {
    f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// Keep a live entry fresh and follow the TCP state the datapath cares about, for a
/// packet from the client (`forward`) or from the backend. Any packet refreshes the entry;
/// only a packet whose sequence number is [`near`] its sender's mark changes the state:
/// - the client's: near `client_seq`;
/// - the backend's: near `backend_seq`, or, before that is known, acknowledging near
///   `client_seq` (the SYN-ACK acknowledges the client's SYN), which sets `backend_seq`.
///
/// Then a FIN or RST moves the flow to CLOSING and the client's ACK ends SYN_ONLY. Any
/// packet from the backend marks the flow REPLIED, and the client's next one STREAM
/// (UDP's longer timeout). A FIN
/// or RST that fails the check is still forwarded (the endpoint's TCP validates it) and
/// counted (`event_tcp_out_of_window`); the flow keeps its timeout.
#[inline(always)]
fn touch<A: Addr>(ct: *mut CtEntry<A>, f: &Flow<A>, forward: bool, now: u64) {
    let closes = f.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // SAFETY: `ct` points into a map value; racing writers only store whole fields.
    unsafe {
        let old = (*ct).flags;
        let mut flags = old;
        let in_window = if forward {
            let mark = (*ct).client_seq;
            let ahead = f.seq.wrapping_sub(mark);
            if ahead >= SEQ_ADVANCE && ahead < SEQ_WINDOW {
                (*ct).client_seq = f.seq;
            }
            near(f.seq, mark)
        } else if old & CT_F_BACKEND_SEQ != 0 {
            let mark = (*ct).backend_seq;
            let ahead = f.seq.wrapping_sub(mark);
            if ahead >= SEQ_ADVANCE && ahead < SEQ_WINDOW {
                (*ct).backend_seq = f.seq;
            }
            near(f.seq, mark)
        } else if f.tcp_flags & TCP_ACK != 0 && near(f.ack, (*ct).client_seq) {
            (*ct).backend_seq = f.seq;
            flags |= CT_F_BACKEND_SEQ;
            true
        } else {
            false
        };
        if !forward {
            flags |= CT_F_REPLIED;
        } else if old & CT_F_REPLIED != 0 {
            flags |= CT_F_STREAM;
        }
        if in_window {
            if closes {
                flags |= CT_F_CLOSING;
            } else if forward && f.tcp_flags & TCP_ACK != 0 {
                flags &= !CT_F_SYN_ONLY;
            }
        } else if closes {
            count(Stat::TcpOutOfWindow);
        }
        if flags != old {
            (*ct).flags = flags;
        }
        if flags != old || now.saturating_sub((*ct).last_seen_ns) >= REFRESH_NS {
            (*ct).last_seen_ns = now;
        }
    }
}

#[inline(always)]
fn client_key<A: Addr>(f: &Flow<A>) -> FlowKey<A> {
    FlowKey::new(f.saddr, f.daddr, f.sport, f.dport, f.proto)
}

/// What conntrack knows of a packet arriving at the node: the first half of the decision,
/// which settles established flows and replies.
pub enum Known<A: Addr> {
    Decided(Decision<A>),
    /// No live flow: [`open`] decides from the frontends. `reselect`: the flow's backend is
    /// gone and a new one is to be chosen.
    Unknown {
        reselect: bool,
    },
}

/// Decide for a packet arriving at the node, in two halves so that a program may run
/// them as separate BPF functions (each with its own 512-byte stack):
///
/// 1. [`known`], conntrack first: a live entry whose backend is unchanged decides alone,
///    so an established packet costs one hash lookup (its flow) and an array index (its
///    backend), not the frontend lookups and the node-address check besides. On a miss,
///    a packet to a port of the SNAT range is looked up in NP_RNAT: the reply of a
///    source-NATed flow.
/// 2. [`open`], the frontends: a new flow, or a new choice for a flow whose backend is
///    gone. `None`: the packet is not ours. The frontend's settings apply when a flow
///    opens: loadBalancerSourceRanges like kube-proxy's iptables rules, which see only a
///    connection's first packet.
#[inline(always)]
pub fn known<F: Family>(f: &Flow<F::A>, cfg: &Config) -> Known<F::A> {
    let key = client_key(f);
    let now = now_ns();
    if let Some(ct) = F::conntrack().get_ptr_mut(&key) {
        // SAFETY: a map value pointer; fields are read where needed rather than the
        // whole (IPv6: 56-byte) entry copied to the stack.
        let entry = unsafe { &*ct };
        let flags = entry.flags;
        if expired(cfg, f.proto, entry, now) {
            return Known::Unknown { reselect: false };
        }
        // A new connection on the tuple of one that is closing (the client reuses its
        // port): a fresh flow with a fresh choice, as after expiry.
        if flags & CT_F_CLOSING != 0 && is_syn(f) {
            count(Stat::TcpReopen);
            return Known::Unknown { reselect: false };
        }
        if let Some(be) = F::backends().get(entry.backend_id) {
            if be.addr == entry.backend_addr && be.port == entry.backend_port {
                if flags & CT_F_AFFINITY != 0 {
                    refresh_affinity::<F>(f.saddr, entry.svc_id, entry.backend_id, now);
                }
                let nat = Nat {
                    saddr: entry.nat_addr,
                    sport: entry.nat_port,
                    daddr: be.addr,
                    dport: be.port,
                };
                touch(ct, f, true, now);
                count(Stat::Established);
                return Known::Decided(if flags & CT_F_SNAT != 0 {
                    Decision::ToRemote(nat)
                } else {
                    Decision::ToLocal(nat)
                });
            }
        }
        return Known::Unknown { reselect: true };
    }
    if maybe_snat_reply(f, cfg) {
        if let Some(d) = reply::<F>(f) {
            return Known::Decided(d);
        }
    }
    Known::Unknown { reselect: false }
}

/// A new flow's backend, chosen by [`open`], given a source by [`snat`] and bound by
/// [`bind`].
#[derive(Clone, Copy)]
pub struct Choice<A: Addr> {
    pub svc_id: u32,
    /// The service's `SVC_F_*` flags.
    pub svc_flags: u16,
    /// The frontend matched as a nodePort (its address is one of this node's).
    pub node_port: bool,
    pub backend_id: u32,
    /// Source address and port towards the backend: the client's own, unless [`snat`]
    /// gave the flow a source of this node (remote backend).
    pub snat_addr: A,
    pub snat_port: u16,
    /// The flow hash (Maglev slot, SNAT port search start) and the time of the choice,
    /// computed once for the three steps.
    pub hash: u32,
    pub now_ns: u64,
}

/// The second half of the decision (see [`known`]): the frontend and the backend for a
/// new flow, into `c`. `None`: the packet is not ours.
#[inline(always)]
pub fn open<F: Family>(
    f: &Flow<F::A>,
    reselect: bool,
    c: &mut MaybeUninit<Choice<F::A>>,
) -> Option<Result<(), Stat>> {
    let (svc, node_port) = lookup_service::<F>(f)?;
    if svc.flags & SVC_F_SRC_RANGES != 0 && !source_allowed::<F>(f, &svc) {
        return Some(Err(Stat::DropSourceRange));
    }
    if reselect {
        count(Stat::Reselect);
    }
    if svc.table_size == 0 {
        return Some(Err(if refuses(f, &svc) {
            Stat::RejectNoEndpoints
        } else {
            Stat::DropNoBackend
        }));
    }
    let now = now_ns();
    let hash = flow_hash(f.saddr.fold(), f.sport, f.dport, f.proto);
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = AffinityKey {
        client_addr: f.saddr,
        svc_id: svc.svc_id,
    };
    // Only the id leaves the two branches (then one lookup): merging a whole backend value
    // kept the verifier from pruning the rest of the path, past its limit without
    // CAP_PERFMON.
    let backend_id = match affinity
        .then(|| sticky_backend::<F>(&akey, &svc, now))
        .flatten()
    {
        Some(id) => {
            count(Stat::AffinityHit);
            id
        }
        None => {
            let slot = svc.table_off.wrapping_add(hash % svc.table_size);
            let pair = MAGLEV.get(slot / MAGLEV_SLOTS_PER_ENTRY)?;
            pair[(slot & 1) as usize]
        }
    };
    c.write(Choice {
        svc_id: svc.svc_id,
        svc_flags: svc.flags,
        node_port,
        backend_id,
        snat_addr: f.saddr,
        snat_port: f.sport,
        hash,
        now_ns: now,
    });
    Some(Ok(()))
}

/// Whether a packet to a service without a table is refused rather than dropped: the
/// service has no endpoint anywhere (`SVC_F_REJECT`; under Local with endpoints on other
/// nodes only, traffic is dropped, as kube-proxy does), and the packet would open a flow
/// (UDP, or a TCP SYN without ACK: anything else of an old flow is dropped, and a RST is
/// never answered).
#[inline(always)]
fn refuses<A: Addr>(f: &Flow<A>, svc: &Service) -> bool {
    svc.flags & SVC_F_REJECT != 0 && (f.proto != PROTO_TCP || is_syn(f))
}

/// The reverse-NAT value of a new flow: what its replies get back.
#[inline(always)]
fn rev_nat<A: Addr>(f: &Flow<A>) -> RevNat<A> {
    RevNat {
        fe_addr: f.daddr,
        client_addr: f.saddr,
        fe_port: f.dport,
        client_port: f.sport,
    }
}

/// The chosen backend, if its id still holds one (an all-zero element is a free id: the
/// agent clears removed backends), and whether the flow is delivered on this node.
#[inline(always)]
fn chosen_backend<F: Family>(c: &Choice<F::A>) -> Option<(Backend<F::A>, bool)> {
    let be = F::backends().get(c.backend_id).copied()?;
    let local = be.flags & BE_F_LOCAL != 0 || c.svc_flags & SVC_F_LOCAL != 0;
    (!be.addr.is_zero()).then_some((be, local))
}

/// What the FIB said of a remote backend, for [`snat`]: not asked (XDP, whose frames have
/// no room for the question).
pub const VIA_UNASKED: u32 = 0;
/// Not through the pod network's tunnel (or no tunnel configured).
pub const VIA_OTHER: u32 = 1;
/// Through the pod network's tunnel device.
pub const VIA_TUNNEL: u32 = 2;

/// The source a new flow to a remote backend gets: the tunnel's address when `via` is
/// [`VIA_TUNNEL`] (the FIB reaches the backend through the pod network's tunnel device,
/// `tun_*` in NP_CONFIG: replies must come back through the tunnel, as they do for
/// kube-proxy's MASQUERADE, which picks that address too); else the address the client
/// used when it is this node's (always for nodePorts; an external IP may be one too),
/// else the configured node address; and a free port of the SNAT range, whose reply tuple
/// this claims in NP_RNAT; recorded in `c`. Nothing to do for a local backend. With a
/// tunnel configured and the FIB not asked (`VIA_UNASKED`), `Stat::FibPass`: TC decides.
#[inline(always)]
pub fn snat<F: Family>(f: &Flow<F::A>, c: &mut Choice<F::A>, via: u32) -> Result<(), Stat> {
    let (be, local) = chosen_backend::<F>(c).ok_or(Stat::DropNoBackend)?;
    if local {
        return Ok(());
    }
    let cfg = config();
    let (tun, tun_addr) = F::tunnel(&cfg);
    if tun != 0 && via == VIA_UNASKED {
        return Err(Stat::FibPass);
    }
    // SAFETY: plain data.
    let is_node_addr = c.node_port || unsafe { F::node_addrs().get(&f.daddr) }.is_some();
    let snat_addr = if via == VIA_TUNNEL {
        tun_addr
    } else if is_node_addr {
        f.daddr
    } else {
        F::snat_addr(&cfg)
    };
    c.snat_port =
        alloc_snat_port::<F>(f, &cfg, &be, snat_addr, c.hash).ok_or(Stat::DropSnatExhausted)?;
    c.snat_addr = snat_addr;
    Ok(())
}

/// The tunnel device of family `F` (`tun_ifindex` in NP_CONFIG; 0: none) when the chosen
/// backend is remote: whether the SNAT source needs the FIB's word (see [`snat`]). A BPF
/// function of its own: inlined, its backend copy grew the frames of IPv6's new-flow
/// path past the verifier's 512 bytes for the call chain.
#[inline(never)]
pub fn tunnel_question<F: Family>(c: &Choice<F::A>) -> u32 {
    // A reference into the map value: a copy of the whole config would grow the frame.
    let tun = CONFIG.get(0).map_or(0, |cfg| F::tunnel(cfg).0);
    match chosen_backend::<F>(c) {
        Some((_, false)) => tun,
        _ => 0,
    }
}

/// Whether the FIB sends the chosen backend of `c` out of tunnel device `tun` (a
/// remote backend, see [`tunnel_question`]). `ingress`: the receiving interface.
#[inline(always)]
pub fn through_tunnel<F: Family, C: EbpfContext>(
    ctx: &C,
    ingress: u32,
    f: &Flow<F::A>,
    c: &Choice<F::A>,
    tun: u32,
) -> bool {
    match chosen_backend::<F>(c) {
        Some((be, false)) => egress_ifindex::<F, C>(ctx, ingress, f, &be) == tun,
        _ => false,
    }
}

/// Bind a new flow to the chosen backend, with the source [`snat`] gave it: conntrack
/// (and for a local backend reverse-NAT) entries, the client's affinity. The translation,
/// and whether the backend is on this node.
#[inline(always)]
pub fn bind<F: Family>(f: &Flow<F::A>, c: &Choice<F::A>) -> Result<(Nat<F::A>, bool), Stat> {
    let (be, local) = chosen_backend::<F>(c).ok_or(Stat::DropNoBackend)?;
    let id = c.backend_id;
    let now = c.now_ns;
    let affinity = c.svc_flags & SVC_F_AFFINITY != 0;
    let mut entry = CtEntry {
        last_seen_ns: now,
        backend_id: id,
        svc_id: c.svc_id,
        backend_addr: be.addr,
        nat_addr: c.snat_addr,
        backend_port: be.port,
        nat_port: c.snat_port,
        flags: if f.proto == PROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            CT_F_SYN_ONLY
        } else {
            0
        } | if affinity { CT_F_AFFINITY } else { 0 },
        pad: 0,
        client_seq: f.seq,
        backend_seq: 0,
    };
    if local {
        let rkey = FlowKey::new(be.addr, f.saddr, be.port, f.sport, f.proto);
        if F::revnat().insert(&rkey, &rev_nat(f), 0).is_err() {
            return Err(Stat::DropMapFull);
        }
    } else {
        entry.flags |= CT_F_SNAT;
    }
    if F::conntrack().insert(&client_key(f), &entry, 0).is_err() {
        return Err(Stat::DropMapFull);
    }
    if affinity {
        let akey = AffinityKey {
            client_addr: f.saddr,
            svc_id: c.svc_id,
        };
        let stick = Affinity {
            last_seen_ns: now,
            backend_id: id,
            backend_addr: be.addr,
            backend_port: be.port,
            pad: 0,
            pad2: Default::default(),
        };
        // Best effort: a full LRU map evicts the least recently used client.
        let _ = F::affinity().insert(&akey, &stick, 0);
    }
    count(Stat::NewFlow);
    let nat = Nat {
        saddr: entry.nat_addr,
        sport: entry.nat_port,
        daddr: be.addr,
        dport: be.port,
    };
    Ok((nat, local))
}

/// Whether the client may use this LoadBalancer/external-IP frontend: its address lies in
/// one of the service's loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed<F: Family>(f: &Flow<F::A>, svc: &Service) -> bool {
    let key = Key::new(
        SRC_RANGE_SVC_BITS + F::A::BITS,
        SrcRange {
            svc_id_be: svc.svc_id.to_be(),
            addr: f.saddr,
        },
    );
    F::src_ranges().get(&key).is_some()
}

/// The backend a client of an affinity service is stuck to, if it was used within the
/// timeout and is still a backend the service may choose (same id, address and port, not
/// draining; on this node under Local).
#[inline(always)]
fn sticky_backend<F: Family>(akey: &AffinityKey<F::A>, svc: &Service, now: u64) -> Option<u32> {
    // SAFETY: plain data. Field by field: copying the whole value (with its padding)
    // became a memmove, whose pointer arithmetic needs CAP_PERFMON.
    let a = unsafe { F::affinity().get(akey) }?;
    let (last_seen, id, addr, port) =
        (a.last_seen_ns, a.backend_id, a.backend_addr, a.backend_port);
    if now.saturating_sub(last_seen) > svc.affinity_timeout_s as u64 * NS {
        return None;
    }
    let be = F::backends().get(id)?;
    let usable = be.addr == addr
        && be.port == port
        && be.flags & BE_F_DRAINING == 0
        && (svc.flags & SVC_F_LOCAL == 0 || be.flags & BE_F_LOCAL != 0);
    usable.then_some(id)
}

/// An established flow of an affinity service to the client's sticky backend counts as
/// use: push the client's expiry.
#[inline(always)]
fn refresh_affinity<F: Family>(client_addr: F::A, svc_id: u32, backend_id: u32, now: u64) {
    let akey = AffinityKey {
        client_addr,
        svc_id,
    };
    if let Some(a) = F::affinity().get_ptr_mut(&akey) {
        // SAFETY: map value pointer; a racing writer stores whole fields too.
        unsafe {
            if (*a).backend_id == backend_id && now.saturating_sub((*a).last_seen_ns) >= REFRESH_NS
            {
                (*a).last_seen_ns = now;
            }
        }
    }
}

/// Pick a source port towards `be` from the SNAT range whose reply tuple is free. Tries
/// `SNAT_PROBES` ports starting at a hash of the flow; `None` when all are taken.
///
/// A port is claimed by creating its NP_RNAT entry with BPF_NOEXIST, which one CPU wins;
/// nothing here takes over an entry of another flow, stale or not: NP_RNAT is no LRU map,
/// and only the agent's sweep deletes an entry, once its flow is gone (`ct::revnat_live`).
/// So two flows never share a reply tuple, and no entry vanishes under a live flow.
///
/// The probes run under `bpf_loop`: the verifier checks the body once instead of once per
/// unrolled probe (without CAP_PERFMON it also walks every speculative branch, and 32
/// inline probes alone took np_xdp near its 1M-instruction limit).
#[inline(always)]
fn alloc_snat_port<F: Family>(
    f: &Flow<F::A>,
    cfg: &Config,
    be: &Backend<F::A>,
    snat_addr: F::A,
    hash: u32,
) -> Option<u16> {
    if snat_addr.is_zero() || cfg.snat_port_max < cfg.snat_port_min {
        return None;
    }
    let Some(range) = NonZeroU32::new((cfg.snat_port_max - cfg.snat_port_min) as u32 + 1) else {
        return None;
    };
    let mut probe = SnatProbe {
        rkey: FlowKey::new(be.addr, snat_addr, be.port, 0, f.proto),
        rev: rev_nat(f),
        port_min: cfg.snat_port_min as u32,
        start: hash.rotate_left(16) % range,
        range,
        found: 0,
    };
    // SAFETY: `snat_probe` matches the callback ABI and only touches `probe` through the
    // context pointer, which outlives the call.
    unsafe {
        bpf_loop(
            SNAT_PROBES,
            snat_probe::<F> as *const () as *mut c_void,
            (&raw mut probe).cast(),
            0,
        );
    }
    (probe.found != 0).then_some(probe.rkey.dport)
}

/// The SNAT port search's state, shared with each `snat_probe` call.
#[repr(C)]
struct SnatProbe<A: Addr> {
    /// The reply tuple (backend -> SNAT address); `dport` is the port being tried.
    rkey: FlowKey<A>,
    rev: RevNat<A>,
    /// The range's first port; the search starts `start` ports into it. (Not a copy of
    /// the whole `Config`: this struct lives on the stack with IPv6 keys in it.)
    port_min: u32,
    start: u32,
    range: NonZeroU32,
    /// Non-zero once `rkey.dport` is ours.
    found: u32,
}

/// One probe of [`alloc_snat_port`]: claim port `start + i` (mod the range) when its reply
/// tuple is free. Returns 1 (stop) once claimed.
extern "C" fn snat_probe<F: Family>(i: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `ctx` is the `SnatProbe` on alloc_snat_port's stack.
    let p = unsafe { &mut *ctx.cast::<SnatProbe<F::A>>() };
    let port = p
        .port_min
        .wrapping_add((p.start.wrapping_add(i as u32)) % p.range);
    p.rkey.dport = (port as u16).to_be();
    if F::revnat()
        .insert(&p.rkey, &p.rev, BPF_NOEXIST as u64)
        .is_ok()
    {
        p.found = 1;
        return 1;
    }
    // A port held by this very tuple's previous flow (a SYN reopening a closing flow) is
    // ours again: the entry already holds exactly what the new flow would write. The
    // backend then sees the tuple again, as it would if the client reused its port
    // without NAT in between.
    // SAFETY: plain data.
    let own = match unsafe { F::revnat().get(&p.rkey) } {
        Some(held) => {
            held.client_addr == p.rev.client_addr
                && held.client_port == p.rev.client_port
                && held.fe_addr == p.rev.fe_addr
                && held.fe_port == p.rev.fe_port
        }
        None => false,
    };
    if own {
        p.found = 1;
        return 1;
    }
    0
}

/// Reverse translation of a reply: the tuple as it arrives, looked up in NP_RNAT, for a
/// live flow only: the NP_CT entry it names exists, has not expired and is still bound
/// to this tuple (not reopened towards another backend or SNAT port). Anything else is
/// not ours (`None`) and passes untouched: an NP_RNAT entry outlives its flow until it is
/// evicted or its SNAT port reclaimed.
#[inline(always)]
pub fn reply<F: Family>(f: &Flow<F::A>) -> Option<Decision<F::A>> {
    let key = client_key(f);
    // SAFETY: plain data.
    let rev = (unsafe { F::revnat().get(&key) }).copied()?;
    let ct = F::conntrack().get_ptr_mut(&revnat_owner(&key, &rev))?;
    let now = now_ns();
    // SAFETY: a map value pointer, read field by field.
    let entry = unsafe { &*ct };
    if timeouts_in_place().expired(f.proto, entry, now) || !bound_to(entry, &key) {
        return None;
    }
    touch(ct, f, false, now);
    count(Stat::Reply);
    Some(Decision::Reply(Nat {
        saddr: rev.fe_addr,
        sport: rev.fe_port,
        daddr: rev.client_addr,
        dport: rev.client_port,
    }))
}

/// Whether an arriving packet could be the reply of a source-NATed flow: it is addressed to
/// a port of the SNAT range (cheap test before the map lookup).
#[inline(always)]
fn maybe_snat_reply<A: Addr>(f: &Flow<A>, cfg: &Config) -> bool {
    let port = u16::from_be(f.dport);
    port >= cfg.snat_port_min && port <= cfg.snat_port_max
}

/// New addresses of an ICMP error about a translated flow: the outer header's, and the
/// quoted packet's (in `inner`).
#[derive(Clone, Copy)]
pub struct IcmpNat<A: Addr> {
    pub outer_saddr: A,
    pub outer_daddr: A,
    pub inner: Nat<A>,
}

impl<A: Addr> IcmpNat<A> {
    /// The outer header's new addresses, as the FIB looks them up (no ports).
    #[inline(always)]
    pub fn outer_nat(&self) -> Nat<A> {
        Nat {
            saddr: self.outer_saddr,
            daddr: self.outer_daddr,
            sport: 0,
            dport: 0,
        }
    }
}

/// Where a translated ICMP error goes.
pub enum IcmpDecision<A: Addr> {
    /// Routed by this node (to the client, or to a backend on another node).
    Route(IcmpNat<A>),
    /// To a backend on this node, through the stack.
    Local(IcmpNat<A>),
}

/// Translate an ICMP error whose quoted packet belongs to a translated flow; `None` for
/// every other ICMP error (to the node itself, unknown flows), which passes untouched.
/// The quoted packet, reversed, is the key of both maps:
/// - NP_RNAT: it quotes a packet this node sent to a backend (a router between node and
///   backend, or the backend, reports it to the SNAT address): the client gets it, quoting
///   its own packet to the frontend, from the frontend when the backend sent it;
/// - NP_CT: it quotes a reply this node sent to the client (say, fragmentation needed on
///   the client's side, sent to the frontend): the backend gets it, quoting its own reply.
#[inline(always)]
pub fn icmp_error<F: Family>(e: &IcmpError<F::A>) -> Option<IcmpDecision<F::A>> {
    let key = FlowKey::new(e.daddr, e.saddr, e.dport, e.sport, e.proto);
    // SAFETY: plain data.
    if let Some(rev) = (unsafe { F::revnat().get(&key) }).copied() {
        let outer_saddr = if e.outer.saddr == e.daddr {
            rev.fe_addr
        } else {
            e.outer.saddr
        };
        return Some(IcmpDecision::Route(IcmpNat {
            outer_saddr,
            outer_daddr: rev.client_addr,
            inner: Nat {
                saddr: rev.client_addr,
                sport: rev.client_port,
                daddr: rev.fe_addr,
                dport: rev.fe_port,
            },
        }));
    }
    // SAFETY: plain data.
    let ct = (unsafe { F::conntrack().get(&key) }).copied()?;
    let snat = ct.flags & CT_F_SNAT != 0;
    let n = IcmpNat {
        outer_saddr: if snat { ct.nat_addr } else { e.outer.saddr },
        outer_daddr: ct.backend_addr,
        inner: Nat {
            saddr: ct.backend_addr,
            sport: ct.backend_port,
            daddr: ct.nat_addr,
            dport: ct.nat_port,
        },
    };
    Some(if snat {
        IcmpDecision::Route(n)
    } else {
        IcmpDecision::Local(n)
    })
}
