//! Tier 1: packet tests through BPF_PROG_TEST_RUN. Each case is an input frame, the
//! verdict the datapath must return, the exact bytes it must leave (or "unchanged") and
//! the counter it must bump. Expected frames are built independently with etherparse,
//! which computes every checksum from scratch, so a byte-equal output proves the
//! datapath's incremental checksum updates.
//!
//! The programs run in a namespace of their own whose FIB mirrors node1 of the test
//! cluster: lan0 198.18.0.11/24, client 198.18.0.10 and node2 198.18.0.12 as permanent
//! neighbours, pods of node2 (198.19.2.0/24) via node2, a blackhole 198.19.9.0/24 and a
//! gateway without a neighbour entry for 198.19.3.0/24.

use std::collections::BTreeMap;

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use nodeport_agent::{
    datapath::{monotonic_coarse_ns, Datapath, KernelFlowTables, MapSizes, Variant},
    gc::{self, Swept},
    sync::Maps,
};
use nodeport_common::{
    ct::{bound_to, revnat_owner, Timeouts},
    maps as m, Backend, Backend6, Config, CtEntry, FlowKey, FrontendKey, FrontendKey6, Ip6, RevNat,
    Service, BE_F_LOCAL, CT_F_BACKEND_SEQ, CT_F_CLOSING, CT_F_SYN_ONLY, PROTO_TCP, PROTO_UDP,
    SVC_F_REJECT,
};
use tests::netns::{require_root, run_in, Netns, NodeLan};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// TC_ACT_UNSPEC: "carry on" (the next TC program, then the stack), as the test run
/// returns it.
const TC_NEXT: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const NODE1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const CLIENT: [u8; 4] = [198, 18, 0, 10];
const NODE1: [u8; 4] = [198, 18, 0, 11];
const OTHER: [u8; 4] = [198, 18, 0, 99];
const POD_LOCAL: [u8; 4] = [198, 19, 1, 10];
const POD_REMOTE: [u8; 4] = [198, 19, 2, 10];
const POD_NO_NEIGH: [u8; 4] = [198, 19, 3, 10];
const POD_BLACKHOLE: [u8; 4] = [198, 19, 9, 10];
const SNAT_PORT: u16 = 61_000;

/// An IPv4 address and port.
type Addr = ([u8; 4], u16);

const CLIENT_6: [u8; 16] = v6(0x18, 0x10);
const NODE1_6: [u8; 16] = v6(0x18, 0x11);
const NODE2_6: [u8; 16] = v6(0x18, 0x12);
const POD_REMOTE_6: [u8; 16] = [0xfd, 0, 0, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];

/// fd00:<net>::<host>
const fn v6(net: u8, host: u8) -> [u8; 16] {
    [0xfd, 0, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, host]
}

/// Raw network-order words of an IPv6 address, as in map keys.
fn ip6(a: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    })
}

fn raw(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// The test namespace with the datapath loaded and its maps filled.
struct Env {
    ns: Netns,
    _peer: Netns,
    dp: Datapath,
    lan0: u32,
    /// What NP_CONFIG holds.
    config: Config,
}

fn service(port: u16, proto: u8, off: u32, backend_ids: &[u32], dp: &mut Datapath, svc_id: u32) {
    dp.write_slots(off, backend_ids).expect("write slots");
    let svc = Service {
        table_off: off,
        table_size: backend_ids.len() as u32,
        svc_id,
        ..Default::default()
    };
    dp.set_service(
        &FrontendKey {
            addr: 0,
            port: port.to_be(),
            proto,
            pad: 0,
        },
        &svc,
    )
    .expect("set service");
}

/// IPv6 backend `id` (`addr`, port 80, on another node) as the only backend of UDP
/// nodePort `port`, its table at `off`.
fn udp6_service(dp: &mut Datapath, id: u32, addr: [u8; 16], port: u16, off: u32, svc_id: u32) {
    let be = Backend6 {
        addr: ip6(addr),
        port: 80u16.to_be(),
        flags: 0,
        pad: 0,
    };
    dp.set_backend6(id, &be).expect("set backend6");
    dp.write_slots(off, &[id]).expect("write slots");
    let key = FrontendKey6 {
        addr: [0; 4],
        port: port.to_be(),
        proto: PROTO_UDP,
        pad: 0,
    };
    let svc = Service {
        table_off: off,
        table_size: 1,
        svc_id,
        ..Default::default()
    };
    dp.set_service6(&key, &svc).expect("set service6");
}

fn backend(addr: [u8; 4], port: u16, flags: u8) -> Backend {
    Backend {
        addr: raw(addr),
        port: port.to_be(),
        flags,
        pad: 0,
    }
}

fn setup() -> Option<Env> {
    if !require_root() {
        return None;
    }
    let NodeLan { ns, peer, lan0 } = NodeLan::new("pkt");
    ns.ip("link set lo up");
    // No neighbour entry for .13: the stack has to resolve it.
    ns.ip("route add 198.19.3.0/24 via 198.18.0.13 dev lan0");
    ns.ip("route add blackhole 198.19.9.0/24");

    let sizes = MapSizes {
        services: 64,
        backends: 64,
        maglev_slots: 1024,
        conntrack: 1024,
        revnat: 1024,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load(sizes, None).expect("load datapath");
    let config = Config {
        snat_addr: raw(NODE1),
        snat_addr6: ip6(NODE1_6),
        snat_port_min: SNAT_PORT,
        snat_port_max: SNAT_PORT,
        ..Config::default()
    };
    dp.set_config(&config).expect("config");
    dp.set_node_addr(raw(NODE1)).expect("node addr");
    dp.set_backend(1, &backend(POD_REMOTE, 80, 0)).unwrap();
    dp.set_backend(2, &backend(POD_LOCAL, 80, BE_F_LOCAL))
        .unwrap();
    dp.set_backend(3, &backend(POD_NO_NEIGH, 80, 0)).unwrap();
    dp.set_backend(4, &backend(POD_BLACKHOLE, 80, 0)).unwrap();
    service(30080, PROTO_TCP, 0, &[1], &mut dp, 1); // remote backend
    service(30080, PROTO_UDP, 10, &[1], &mut dp, 2); // remote backend, UDP
    service(30081, PROTO_TCP, 20, &[2], &mut dp, 3); // local backend
    service(30081, PROTO_UDP, 30, &[2], &mut dp, 4); // local backend, UDP
    service(30082, PROTO_TCP, 40, &[3], &mut dp, 5); // gateway without neighbour
    service(30083, PROTO_TCP, 50, &[4], &mut dp, 6); // blackholed backend
    service(30084, PROTO_TCP, 60, &[], &mut dp, 7); // no endpoints

    // IPv6: node1 fd00:18::11 with the same SNAT port; backend 5 is node2's pod.
    dp.set_node_addr6(ip6(NODE1_6)).expect("node addr6");
    udp6_service(&mut dp, 5, POD_REMOTE_6, 30080, 70, 8);
    Some(Env {
        ns,
        _peer: peer,
        dp,
        lan0,
        config,
    })
}

impl Env {
    fn xdp(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let lan0 = self.lan0;
        let ebpf = self.dp.ebpf_mut();
        let prog: &mut Xdp = ebpf.program_mut(m::PROG_XDP).unwrap().try_into().unwrap();
        run_in(&self.ns, || {
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue, egress.
            let md: [u32; 6] = [0, input.len() as u32, 0, lan0, 0, 0];
            let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
            run(prog, input, Some(&ctx))
        })
    }

    fn tc(&mut self, name: &str, input: &[u8]) -> (u32, Vec<u8>) {
        self.tc_gso(name, input, 0)
    }

    /// [`Env::tc`] for a GSO skb (as GRO merges them) of segments of `gso_size` bytes of
    /// payload; 0: not GSO.
    fn tc_gso(&mut self, name: &str, input: &[u8], gso_size: u32) -> (u32, Vec<u8>) {
        let lan0 = self.lan0;
        let ebpf = self.dp.ebpf_mut();
        let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        run_in(&self.ns, || {
            // struct __sk_buff (192 bytes): ingress_ifindex at 36 and ifindex at 40, so the
            // skb looks received on lan0 as in the cluster; gso_segs at 164, gso_size at
            // 176 (net/bpf/test_run.c, convert___skb_to_skb, takes both).
            let mut ctx = vec![0u8; 192];
            ctx[36..40].copy_from_slice(&lan0.to_ne_bytes());
            ctx[40..44].copy_from_slice(&lan0.to_ne_bytes());
            if gso_size > 0 {
                let segs = (input.len() as u32).div_ceil(gso_size);
                ctx[164..168].copy_from_slice(&segs.to_ne_bytes());
                ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
            }
            run(prog, input, Some(&ctx))
        })
    }

    fn stat(&self, name: &str) -> u64 {
        self.dp.stats().expect("stats")[name]
    }
}

fn run<P>(prog: &P, input: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>)
where
    for<'a> P: TestRun<Result = aya::TestRunResult, Opts<'a> = TestRunOptions<'a>>,
{
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx;
    let res: Result<aya::TestRunResult, ProgramError> = prog.test_run(opts);
    let res = res.expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

fn tcp(
    smac: [u8; 6],
    dmac: [u8; 6],
    (src, sp): Addr,
    (dst, dp): Addr,
    ttl: u8,
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .tcp(sp, dp, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let mut v = Vec::new();
    b.write(&mut v, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    v
}

fn udp(smac: [u8; 6], dmac: [u8; 6], (src, sp): Addr, (dst, dp): Addr, ttl: u8) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .udp(sp, dp)
        .write(&mut v, b"ping")
        .unwrap();
    v
}

/// Same frame with the UDP checksum zeroed ("no checksum").
fn zero_udp_csum(mut v: Vec<u8>) -> Vec<u8> {
    v[14 + 20 + 6] = 0;
    v[14 + 20 + 7] = 0;
    v
}

#[track_caller]
fn expect(
    env: &mut Env,
    case: &str,
    got: (u32, Vec<u8>),
    verdict: u32,
    out: &[u8],
    stat: &str,
    before: u64,
) {
    if got.0 != verdict || got.1 != out {
        let stats = env.dp.stats().expect("stats");
        eprintln!(
            "{case}: counters now {:?}",
            stats.iter().filter(|(_, v)| **v > 0).collect::<Vec<_>>()
        );
    }
    assert_eq!(got.0, verdict, "{case}: verdict");
    assert_eq!(hex(&got.1), hex(out), "{case}: output bytes");
    assert_eq!(env.stat(stat), before + 1, "{case}: counter {stat}");
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

macro_rules! case {
    ($env:ident, $name:expr, $prog:expr, $input:expr, $verdict:expr, $out:expr, $stat:expr) => {{
        let before = $env.stat($stat);
        let input: Vec<u8> = $input;
        let got = match $prog {
            "xdp" => $env.xdp(&input),
            p => $env.tc(p, &input),
        };
        let out: Vec<u8> = $out;
        expect(&mut $env, $name, got, $verdict, &out, $stat, before);
    }};
}

#[test]
fn remote_backend_snat_and_reply() {
    let Some(mut env) = setup() else { return };
    // SYN to nodeIP:30080 -> DNAT to pod on node2, SNAT to node1:61000, TTL-1, out of lan0.
    case!(
        env,
        "tcp syn to remote backend",
        "xdp",
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 40000),
            (NODE1, 30080),
            64,
            true
        ),
        XDP_TX,
        tcp(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63,
            true
        ),
        "tx"
    );
    // Next packet of the flow: conntrack keeps the translation.
    case!(
        env,
        "tcp ack of established flow",
        "xdp",
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 40000),
            (NODE1, 30080),
            64,
            false
        ),
        XDP_TX,
        tcp(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63,
            false
        ),
        "event_established"
    );
    // Reply from the pod via node2 -> back to the client as nodeIP:30080.
    case!(
        env,
        "reply from remote backend",
        "xdp",
        tcp(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE, 80),
            (NODE1, SNAT_PORT),
            63,
            false
        ),
        XDP_TX,
        tcp(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30080),
            (CLIENT, 40000),
            62,
            false
        ),
        "event_reply"
    );
    // A second client needs a SNAT port towards the same backend: the range has one port,
    // held by a live flow, so this is a counted drop, never a shared tuple.
    case!(
        env,
        "snat exhaustion",
        "xdp",
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            ([198, 18, 0, 20], 40000),
            (NODE1, 30080),
            64,
            true
        ),
        XDP_DROP,
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            ([198, 18, 0, 20], 40000),
            (NODE1, 30080),
            64,
            true
        ),
        "drop_snat_exhausted"
    );
}

#[test]
fn udp_checksums() {
    let Some(mut env) = setup() else { return };
    case!(
        env,
        "udp with checksum to remote backend",
        "xdp",
        udp(CLIENT_MAC, NODE1_MAC, (CLIENT, 5353), (NODE1, 30080), 64),
        XDP_TX,
        udp(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63
        ),
        "tx"
    );
    case!(
        env,
        "udp reply",
        "xdp",
        udp(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE, 80),
            (NODE1, SNAT_PORT),
            63
        ),
        XDP_TX,
        udp(NODE1_MAC, CLIENT_MAC, (NODE1, 30080), (CLIENT, 5353), 62),
        "event_reply"
    );
    // A zero UDP checksum means "none" and must stay zero.
    case!(
        env,
        "udp without checksum to local backend",
        "xdp",
        zero_udp_csum(udp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 5354),
            (NODE1, 30081),
            64
        )),
        XDP_PASS,
        zero_udp_csum(udp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 5354),
            (POD_LOCAL, 80),
            64
        )),
        "local_deliver"
    );
}

/// A UDP datagram with `len` payload bytes from `src` to `dst` (checksum over the whole
/// datagram), cut as a sender on an MTU 1500 link cuts it: IPv4 fragments of at most 1,480
/// payload bytes, IP id `id`, MF on all but the last, each with its own header checksum.
fn udp_fragments(
    smac: [u8; 6],
    dmac: [u8; 6],
    (src, sp): Addr,
    (dst, dp): Addr,
    ttl: u8,
    id: u16,
    len: usize,
) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut whole = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .udp(sp, dp)
        .write(&mut whole, &payload)
        .unwrap();
    let l4 = &whole[14 + 20..];
    l4.chunks(1480)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = whole[..14 + 20].to_vec();
            f.extend_from_slice(chunk);
            f[16..18].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            let more = if (i + 1) * 1480 < l4.len() { 0x2000 } else { 0 };
            f[20..22].copy_from_slice(&(more | (i * 1480 / 8) as u16).to_be_bytes());
            fix_ip_csum(&mut f);
            f
        })
        .collect()
}

/// IPv4 fragments of UDP, requests and replies, through a remote backend (SNAT, XDP both
/// ways), a local backend (XDP DNAT, TC egress reply) and TC ingress alone: every fragment
/// of a datagram takes the translation of its first (the first's UDP checksum covers the
/// whole datagram; later fragments get the IP header rewrite alone, checked here against
/// the translated datagram cut the same way), and a later fragment whose first was not
/// seen passes untouched and is counted.
#[test]
fn udp_fragments_take_their_first_fragments_translation() {
    let Some(mut env) = setup() else { return };
    let frags = |smac, dmac, src, dst, ttl, id| udp_fragments(smac, dmac, src, dst, ttl, id, 4000);

    // Cluster: client -> node1:30080 -> node2's pod, SNAT to node1:61000, out with XDP_TX.
    let req = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5360),
        (NODE1, 30080),
        64,
        0x1111,
    );
    let want = frags(
        NODE1_MAC,
        NODE2_MAC,
        (NODE1, SNAT_PORT),
        (POD_REMOTE, 80),
        63,
        0x1111,
    );
    assert_eq!(req.len(), 3, "4,000 bytes at MTU 1500 make three fragments");
    for (i, (input, out)) in req.into_iter().zip(want).enumerate() {
        let later = env.stat("event_frag_later");
        case!(
            env,
            &format!("remote request fragment {i}"),
            "xdp",
            input,
            XDP_TX,
            out,
            "tx"
        );
        assert_eq!(
            env.stat("event_frag_later"),
            later + (i > 0) as u64,
            "fragment {i}"
        );
    }
    // The backend's 4,000-byte answer, fragmented by its node: back to the client from
    // node1:30080.
    let rep = frags(
        NODE2_MAC,
        NODE1_MAC,
        (POD_REMOTE, 80),
        (NODE1, SNAT_PORT),
        63,
        0x2222,
    );
    let want = frags(
        NODE1_MAC,
        CLIENT_MAC,
        (NODE1, 30080),
        (CLIENT, 5360),
        62,
        0x2222,
    );
    for (i, (input, out)) in rep.into_iter().zip(want).enumerate() {
        case!(
            env,
            &format!("remote reply fragment {i}"),
            "xdp",
            input,
            XDP_TX,
            out,
            "event_reply"
        );
    }

    // Local: DNAT to the pod, client kept, handed to the stack.
    let req = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5361),
        (NODE1, 30081),
        64,
        0x3333,
    );
    let want = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5361),
        (POD_LOCAL, 80),
        64,
        0x3333,
    );
    for (i, (input, out)) in req.into_iter().zip(want).enumerate() {
        case!(
            env,
            &format!("local request fragment {i}"),
            "xdp",
            input,
            XDP_PASS,
            out,
            "local_deliver"
        );
    }
    // The pod's answer leaves through the stack, fragmented: TC egress restores the
    // frontend on every fragment.
    let rep = frags(
        NODE1_MAC,
        CLIENT_MAC,
        (POD_LOCAL, 80),
        (CLIENT, 5361),
        63,
        0x4444,
    );
    let want = frags(
        NODE1_MAC,
        CLIENT_MAC,
        (NODE1, 30081),
        (CLIENT, 5361),
        63,
        0x4444,
    );
    for (i, (input, out)) in rep.into_iter().zip(want).enumerate() {
        case!(
            env,
            &format!("local reply fragment {i}"),
            m::PROG_TC_EGRESS,
            input,
            TC_NEXT,
            out,
            "tc_nat"
        );
    }

    // An interface served by TC alone: the same translation in TC ingress.
    let req = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5362),
        (NODE1, 30081),
        64,
        0x5555,
    );
    let want = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5362),
        (POD_LOCAL, 80),
        64,
        0x5555,
    );
    for (i, (input, out)) in req.into_iter().zip(want).enumerate() {
        case!(
            env,
            &format!("tc ingress request fragment {i}"),
            m::PROG_TC_INGRESS,
            input,
            TC_NEXT,
            out,
            "tc_nat"
        );
    }

    // Out of order: a later fragment before its first passes untouched, counted, in XDP
    // and in TC ingress; its first fragment then opens the flow as usual.
    let late = frags(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 5363),
        (NODE1, 30081),
        64,
        0x6666,
    );
    for prog in ["xdp", m::PROG_TC_INGRESS] {
        let verdict = if prog == "xdp" { XDP_PASS } else { TC_NEXT };
        case!(
            env,
            &format!("{prog}: fragment before its first"),
            prog,
            late[1].clone(),
            verdict,
            late[1].clone(),
            "pass_frag_out_of_order"
        );
    }
    // Fragments of other protocols still pass untouched.
    let mut tcp_first = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40100),
        (NODE1, 30081),
        64,
        true,
    );
    tcp_first[20] = 0x20;
    fix_ip_csum(&mut tcp_first);
    case!(
        env,
        "tcp first fragment",
        "xdp",
        tcp_first.clone(),
        XDP_PASS,
        tcp_first,
        "pass_fragment"
    );
}

/// An ICMP destination-unreachable from `src` to `dst` quoting `quoted` (a whole frame
/// whose Ethernet header is dropped), `mtu` set for fragmentation-needed, else port
/// unreachable.
fn icmp_unreach(
    smac: [u8; 6],
    dmac: [u8; 6],
    (src, dst): ([u8; 4], [u8; 4]),
    ttl: u8,
    mtu: Option<u16>,
    quoted: &[u8],
) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader as U, Icmpv4Type};
    let code = match mtu {
        Some(next_hop_mtu) => U::FragmentationNeeded { next_hop_mtu },
        None => U::Port,
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .icmpv4(Icmpv4Type::DestinationUnreachable(code))
        .write(&mut v, &quoted[14..])
        .unwrap();
    v
}

#[test]
fn icmp_errors_about_translated_flows() {
    let Some(mut env) = setup() else { return };
    const NODE2: [u8; 4] = [198, 18, 0, 12];
    // A UDP flow to the backend on node2: client:5353 -> node1:30080 -> node1:61000 -> pod.
    case!(
        env,
        "udp to remote backend",
        "xdp",
        udp(CLIENT_MAC, NODE1_MAC, (CLIENT, 5353), (NODE1, 30080), 64),
        XDP_TX,
        udp(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63
        ),
        "tx"
    );
    let towards_pod = udp(
        NODE1_MAC,
        NODE2_MAC,
        (NODE1, SNAT_PORT),
        (POD_REMOTE, 80),
        63,
    );
    // The quoted packet keeps the TTL it had when quoted (as Linux and Cilium do).
    let as_client_sent = udp(CLIENT_MAC, NODE1_MAC, (CLIENT, 5353), (NODE1, 30080), 63);
    let icmp_before = env.stat("event_icmp_nat");

    // Fragmentation needed from a router between node and backend (node2 here), about the
    // forwarded packet: to the client, quoting the client's own packet; the router's
    // address stays the source.
    case!(
        env,
        "frag needed about a forwarded packet",
        "xdp",
        icmp_unreach(
            NODE2_MAC,
            NODE1_MAC,
            (NODE2, NODE1),
            64,
            Some(1400),
            &towards_pod
        ),
        XDP_TX,
        icmp_unreach(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE2, CLIENT),
            63,
            Some(1400),
            &as_client_sent
        ),
        "tx"
    );
    // Port unreachable from the backend itself: the client hears it from the frontend.
    case!(
        env,
        "port unreachable from the backend",
        "xdp",
        icmp_unreach(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE, NODE1),
            63,
            None,
            &towards_pod
        ),
        XDP_TX,
        icmp_unreach(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, CLIENT),
            62,
            None,
            &as_client_sent
        ),
        "tx"
    );
    // Fragmentation needed on the client's side about a reply (sent to the frontend): to
    // the backend, from the SNAT address, quoting the backend's own reply.
    let reply_to_client = udp(NODE1_MAC, CLIENT_MAC, (NODE1, 30080), (CLIENT, 5353), 62);
    let reply_as_pod_sent = udp(
        NODE2_MAC,
        NODE1_MAC,
        (POD_REMOTE, 80),
        (NODE1, SNAT_PORT),
        62,
    );
    case!(
        env,
        "frag needed about a reply",
        "xdp",
        icmp_unreach(
            CLIENT_MAC,
            NODE1_MAC,
            (OTHER, NODE1),
            64,
            Some(1280),
            &reply_to_client
        ),
        XDP_TX,
        icmp_unreach(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, POD_REMOTE),
            63,
            Some(1280),
            &reply_as_pod_sent
        ),
        "tx"
    );
    assert_eq!(env.stat("event_icmp_nat"), icmp_before + 3);

    // An unreachable about no translated flow passes untouched (a ping to the node: see
    // the unusual-packets test).
    let unknown = udp(NODE1_MAC, CLIENT_MAC, (NODE1, 5000), (CLIENT, 5353), 64);
    let stray = icmp_unreach(CLIENT_MAC, NODE1_MAC, (CLIENT, NODE1), 64, None, &unknown);
    case!(
        env,
        "unreachable about no translated flow",
        "xdp",
        stray.clone(),
        XDP_PASS,
        stray,
        "pass_other_proto"
    );
    assert_eq!(env.stat("event_icmp_nat"), icmp_before + 3);
}

#[test]
fn local_backend_dnat_and_tc_reply() {
    let Some(mut env) = setup() else { return };
    // Local pod: DNAT only, client address kept, handed to the stack (no TTL change: the
    // stack routes it and decrements).
    case!(
        env,
        "tcp syn to local backend",
        "xdp",
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 40001),
            (NODE1, 30081),
            64,
            true
        ),
        XDP_PASS,
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 40001),
            (POD_LOCAL, 80),
            64,
            true
        ),
        "local_deliver"
    );
    // The pod's reply leaves through the stack; TC egress restores nodeIP:30081.
    case!(
        env,
        "local reply in tc egress",
        m::PROG_TC_EGRESS,
        tcp(
            NODE1_MAC,
            CLIENT_MAC,
            (POD_LOCAL, 80),
            (CLIENT, 40001),
            63,
            false
        ),
        TC_NEXT,
        tcp(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30081),
            (CLIENT, 40001),
            63,
            false
        ),
        "tc_nat"
    );
    // Unrelated egress traffic is untouched and counts nothing.
    let before = env.stat("tc_nat");
    let stray = tcp(
        NODE1_MAC,
        CLIENT_MAC,
        (POD_LOCAL, 80),
        (CLIENT, 40999),
        63,
        false,
    );
    let (verdict, out) = env.tc(m::PROG_TC_EGRESS, &stray);
    assert_eq!(
        (verdict, hex(&out)),
        (TC_NEXT, hex(&stray)),
        "unrelated egress"
    );
    assert_eq!(env.stat("tc_nat"), before, "unrelated egress counted");
}

#[test]
fn fib_outcomes() {
    let Some(mut env) = setup() else { return };
    // No neighbour yet: XDP leaves the frame untouched for the stack...
    let syn = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40002),
        (NODE1, 30082),
        64,
        true,
    );
    case!(
        env,
        "no neighbour: xdp passes untouched",
        "xdp",
        syn.clone(),
        XDP_PASS,
        syn.clone(),
        "fib_pass"
    );
    // ...and TC ingress translates it and hands it to bpf_redirect_neigh (which resolves
    // the neighbour; the MACs are filled in by the kernel on transmit).
    case!(
        env,
        "no neighbour: tc ingress translates",
        m::PROG_TC_INGRESS,
        syn,
        TC_ACT_REDIRECT,
        tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (NODE1, SNAT_PORT),
            (POD_NO_NEIGH, 80),
            63,
            true
        ),
        "tc_nat"
    );
    let bh = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40003),
        (NODE1, 30083),
        64,
        true,
    );
    case!(
        env,
        "blackholed backend",
        "xdp",
        bh.clone(),
        XDP_DROP,
        bh,
        "drop_fib"
    );
    let none = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40004),
        (NODE1, 30084),
        64,
        true,
    );
    case!(
        env,
        "service without endpoints",
        "xdp",
        none.clone(),
        XDP_DROP,
        none,
        "drop_no_backend"
    );
}

/// A service with no endpoint anywhere (`SVC_F_REJECT`): a SYN gets a RST and a datagram
/// an ICMP port unreachable, from the frontend back to the client, out of the receiving
/// interface (XDP_TX; a redirect in TC); anything else is dropped. Expected frames built by
/// etherparse with every checksum computed from scratch.
#[test]
fn services_without_endpoints_refuse_from_the_frontend() {
    let Some(mut env) = setup() else {
        return;
    };
    for proto in [PROTO_TCP, PROTO_UDP] {
        let key = FrontendKey {
            addr: 0,
            port: 30085u16.to_be(),
            proto,
            pad: 0,
        };
        let svc = Service {
            svc_id: 20 + proto as u32,
            flags: SVC_F_REJECT,
            ..Default::default()
        };
        env.dp.set_service(&key, &svc).expect("set service");
    }
    let (client, frontend) = ((CLIENT, 40005), (NODE1, 30085));
    // A SYN carrying 18 bytes (as TCP Fast Open would): RST|ACK for seq 1000 + 18 + 1.
    let syn = tcp(CLIENT_MAC, NODE1_MAC, client, frontend, 64, true);
    let mut rst = Vec::new();
    PacketBuilder::ethernet2(NODE1_MAC, CLIENT_MAC)
        .ipv4(NODE1, CLIENT, 64)
        .tcp(30085, 40005, 0, 0)
        .rst()
        .ack(1019)
        .write(&mut rst, &[])
        .unwrap();
    for (prog, verdict) in [("xdp", XDP_TX), ("np_tc_in", TC_ACT_REDIRECT)] {
        case!(
            env,
            &format!("SYN, {prog}"),
            prog,
            syn.clone(),
            verdict,
            rst.clone(),
            "reject_no_endpoints"
        );
    }
    // A segment of no open flow that is not a SYN: dropped, never answered.
    let ack = tcp(CLIENT_MAC, NODE1_MAC, client, frontend, 64, false);
    case!(
        env,
        "ACK",
        "xdp",
        ack.clone(),
        XDP_DROP,
        ack,
        "drop_no_backend"
    );

    // A datagram: port unreachable quoting its IP header and UDP header; TOS 0xc0 and no
    // don't-fragment, as Linux sends ICMP errors.
    let dgram = udp(CLIENT_MAC, NODE1_MAC, client, frontend, 64);
    let mut unreach = icmp_unreach(
        NODE1_MAC,
        CLIENT_MAC,
        (NODE1, CLIENT),
        64,
        None,
        &dgram[..42],
    );
    unreach[15] = 0xc0;
    unreach[20] &= !0x40;
    fix_ip_csum(&mut unreach);
    for (prog, verdict) in [("xdp", XDP_TX), ("np_tc_in", TC_ACT_REDIRECT)] {
        let name = format!("datagram, {prog}");
        case!(
            env,
            &name,
            prog,
            dgram.clone(),
            verdict,
            unreach.clone(),
            "reject_no_endpoints"
        );
    }
}

#[test]
fn pass_through_untouched() {
    let Some(mut env) = setup() else { return };
    let ssh = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40000),
        (NODE1, 22),
        64,
        true,
    );
    case!(
        env,
        "node port without service",
        "xdp",
        ssh.clone(),
        XDP_PASS,
        ssh,
        "pass_no_match"
    );
    let other = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40000),
        (OTHER, 30080),
        64,
        true,
    );
    case!(
        env,
        "nodePort on a foreign address",
        "xdp",
        other.clone(),
        XDP_PASS,
        other,
        "pass_no_match"
    );
    let stray = tcp(
        NODE2_MAC,
        NODE1_MAC,
        (POD_REMOTE, 80),
        (NODE1, 61_001),
        64,
        false,
    );
    case!(
        env,
        "unknown reply in snat range",
        "xdp",
        stray.clone(),
        XDP_PASS,
        stray,
        "pass_no_match"
    );
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    case!(env, "arp", "xdp", arp.clone(), XDP_PASS, arp, "pass_not_ip");
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv4(CLIENT, NODE1, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    case!(
        env,
        "icmp echo to the node",
        "xdp",
        icmp.clone(),
        XDP_PASS,
        icmp,
        "pass_other_proto"
    );
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv6([0xfd; 16], [0xfd; 16], 64)
        .udp(1, 30080)
        .write(&mut v6, b"x")
        .unwrap();
    case!(
        env,
        "ipv6 to an address that is not a frontend",
        "xdp",
        v6.clone(),
        XDP_PASS,
        v6,
        "pass_no_match"
    );
}

/// Insert an 802.1Q tag after the MAC addresses.
fn vlan_tag(v: &[u8]) -> Vec<u8> {
    let mut out = v[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    out.extend_from_slice(&v[12..]);
    out
}

/// Recompute the IPv4 header checksum of a frame (after a test edits the header).
fn fix_ip_csum(v: &mut [u8]) {
    let ihl = ((v[14] & 0x0f) as usize) * 4;
    v[24] = 0;
    v[25] = 0;
    let mut sum = 0u32;
    for c in v[14..14 + ihl].chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    v[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Add `words` 32-bit words of IP options (NOPs, then end-of-list) to a TCP frame built
/// by `tcp()`, fixing lengths and both checksums through etherparse.
fn with_ip_options(v: &[u8], words: usize) -> Vec<u8> {
    let (ip, rest) = etherparse::Ipv4Header::from_slice(&v[14..]).unwrap();
    let mut opts = vec![1u8; words * 4];
    *opts.last_mut().unwrap() = 0;
    let mut ip2 = ip.clone();
    ip2.options = opts.as_slice().try_into().unwrap();
    ip2.total_len = ip.total_len + (words * 4) as u16;
    ip2.header_checksum = ip2.calc_header_checksum();
    let mut out = v[..14].to_vec();
    ip2.write(&mut out).unwrap();
    out.extend_from_slice(rest);
    out
}

#[test]
fn malformed_and_unusual_shapes() {
    let Some(mut env) = setup() else { return };
    let syn = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40010),
        (NODE1, 30081),
        64,
        true,
    );

    // IP options: XDP translates option-less headers only (constant offsets, so the
    // programs verify without CAP_PERFMON); it passes the packet untouched and TC ingress,
    // which reads and writes through skb helpers, translates it with its options kept.
    let with_opts = with_ip_options(&syn, 2);
    let expected = with_ip_options(
        &tcp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 40010),
            (POD_LOCAL, 80),
            64,
            true,
        ),
        2,
    );
    case!(
        env,
        "ip options: xdp passes",
        "xdp",
        with_opts.clone(),
        XDP_PASS,
        with_opts.clone(),
        "pass_ip_options"
    );
    case!(
        env,
        "ip options: tc ingress translates",
        m::PROG_TC_INGRESS,
        with_opts,
        TC_NEXT,
        expected,
        "tc_nat"
    );

    let mut shapes: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    // (A frame shorter than an Ethernet header never reaches XDP: the kernel's test run
    // refuses it just as drivers do.)
    shapes.push(("ethernet only", syn[..14].to_vec(), "pass_malformed"));
    shapes.push((
        "truncated ipv4 header",
        syn[..14 + 12].to_vec(),
        "pass_malformed",
    ));
    shapes.push((
        "truncated tcp header",
        syn[..14 + 20 + 10].to_vec(),
        "pass_malformed",
    ));
    let mut ihl4 = syn.clone();
    ihl4[14] = 0x44;
    fix_ip_csum(&mut ihl4);
    shapes.push(("ihl below 5", ihl4, "pass_malformed"));
    let mut v5 = syn.clone();
    v5[14] = 0x55;
    fix_ip_csum(&mut v5);
    shapes.push(("ip version 5", v5, "pass_malformed"));
    let mut long = syn.clone();
    let tl = u16::from_be_bytes([long[16], long[17]]) + 100;
    long[16..18].copy_from_slice(&tl.to_be_bytes());
    fix_ip_csum(&mut long);
    shapes.push(("total length beyond frame", long, "pass_malformed"));
    let mut short = syn.clone();
    short[16..18].copy_from_slice(&16u16.to_be_bytes());
    fix_ip_csum(&mut short);
    shapes.push(("total length below header", short, "pass_malformed"));
    let mut opts_cut = with_ip_options(&syn, 10);
    opts_cut.truncate(14 + 30);
    shapes.push(("options beyond frame", opts_cut, "pass_malformed"));
    let mut badudp = udp(CLIENT_MAC, NODE1_MAC, (CLIENT, 5355), (NODE1, 30081), 64);
    badudp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    shapes.push(("udp length beyond ip payload", badudp, "pass_malformed"));
    let mut mf = syn.clone();
    mf[20] = 0x20; // more fragments
    fix_ip_csum(&mut mf);
    shapes.push(("first fragment of tcp", mf, "pass_fragment"));
    let mut off = syn.clone();
    off[20..22].copy_from_slice(&185u16.to_be_bytes()); // offset 1480
    fix_ip_csum(&mut off);
    shapes.push(("later fragment of tcp", off, "pass_fragment"));
    shapes.push(("802.1Q tagged", vlan_tag(&syn), "pass_not_ip"));

    for (name, input, stat) in shapes {
        case!(env, name, "xdp", input.clone(), XDP_PASS, input, stat);
    }
}

#[test]
fn every_program_passes_the_verifier() {
    if !require_root() {
        return;
    }
    // The configurations that ship: default map sizes (what the agent uses) and the small
    // sizes of tests, each with the plain programs and with the debug variants
    // (`--debug-datapath`). Other runtime settings are map values, not programs.
    for sizes in [
        MapSizes::default(),
        MapSizes {
            services: 64,
            backends: 64,
            maglev_slots: 1024,
            conntrack: 1024,
            ..MapSizes::default()
        },
    ] {
        for variant in [Variant::Plain, Variant::Debug] {
            let mut dp = Datapath::load_variant(sizes, None, variant)
                .expect("every program loads through the verifier");
            let names = match variant {
                Variant::Plain => [m::PROG_XDP, m::PROG_TC_INGRESS, m::PROG_TC_EGRESS],
                Variant::Debug => [
                    m::PROG_XDP_DEBUG,
                    m::PROG_TC_INGRESS_DEBUG,
                    m::PROG_TC_EGRESS,
                ],
            };
            for name in names {
                let info = dp
                    .ebpf_mut()
                    .program(name)
                    .unwrap()
                    .info()
                    .expect("program info");
                let xlated = info.size_translated().unwrap_or(0) / 8;
                let verified = info.verified_instruction_count().unwrap_or(0);
                eprintln!(
                    "{name}: {xlated} instructions, {verified} verified instructions ({sizes:?})"
                );
                assert!(xlated > 0, "{name} has no instructions");
            }
        }
    }
}

fn udp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hops: u8,
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.0, dst.0, hops)
        .udp(src.1, dst.1)
        .write(&mut v, b"ping")
        .unwrap();
    v
}

/// An ICMPv6 error quoting `quoted` (a frame): packet too big with `mtu`, else port
/// unreachable. etherparse computes the checksum, pseudo-header included.
fn icmp6_error(
    smac: [u8; 6],
    dmac: [u8; 6],
    (src, dst): ([u8; 16], [u8; 16]),
    hops: u8,
    mtu: Option<u32>,
    quoted: &[u8],
) -> Vec<u8> {
    use etherparse::{icmpv6::DestUnreachableCode, Icmpv6Type};
    let t = match mtu {
        Some(mtu) => Icmpv6Type::PacketTooBig { mtu },
        None => Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src, dst, hops)
        .icmpv6(t)
        .write(&mut v, &quoted[14..])
        .unwrap();
    v
}

#[test]
fn ipv6_remote_backend_reply_and_icmpv6_errors() {
    let Some(mut env) = setup() else { return };
    // client:5353 -> [node1]:30080 -> [node1]:61000 -> pod on node2, hop limit - 1.
    let from_client = udp6(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT_6, 5353),
        (NODE1_6, 30080),
        64,
    );
    let towards_pod = udp6(
        NODE1_MAC,
        NODE2_MAC,
        (NODE1_6, SNAT_PORT),
        (POD_REMOTE_6, 80),
        63,
    );
    case!(
        env,
        "udp6 to remote backend",
        "xdp",
        from_client.clone(),
        XDP_TX,
        towards_pod.clone(),
        "tx"
    );
    case!(
        env,
        "udp6 reply from the backend",
        "xdp",
        udp6(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE_6, 80),
            (NODE1_6, SNAT_PORT),
            64
        ),
        XDP_TX,
        udp6(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1_6, 30080),
            (CLIENT_6, 5353),
            63
        ),
        "tx"
    );
    let icmp_before = env.stat("event_icmp_nat");
    // The quoted packet keeps the hop limit it had when quoted.
    let as_client_sent = udp6(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT_6, 5353),
        (NODE1_6, 30080),
        63,
    );
    // Packet too big from a router between node and backend (node2), about the forwarded
    // packet: to the client, quoting its own packet; the router stays the source. The
    // ICMPv6 checksum covers the outer addresses too.
    case!(
        env,
        "packet too big about a forwarded packet",
        "xdp",
        icmp6_error(
            NODE2_MAC,
            NODE1_MAC,
            (NODE2_6, NODE1_6),
            64,
            Some(1400),
            &towards_pod
        ),
        XDP_TX,
        icmp6_error(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE2_6, CLIENT_6),
            63,
            Some(1400),
            &as_client_sent
        ),
        "tx"
    );
    // Port unreachable from the backend itself: the client hears it from the frontend.
    case!(
        env,
        "port unreachable from the backend",
        "xdp",
        icmp6_error(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE_6, NODE1_6),
            63,
            None,
            &towards_pod
        ),
        XDP_TX,
        icmp6_error(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1_6, CLIENT_6),
            62,
            None,
            &as_client_sent
        ),
        "tx"
    );
    assert_eq!(env.stat("event_icmp_nat"), icmp_before + 2);

    // An extension header before the transport header: passed to the stack untouched
    // (hop-by-hop with a PadN option, in front of the same UDP packet).
    let mut hbh = from_client.clone();
    hbh[14 + 6] = 0; // next header: hop-by-hop
    let payload_len = u16::from_be_bytes([hbh[14 + 4], hbh[14 + 5]]) + 8;
    hbh[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    hbh.splice(54..54, [17, 0, 1, 4, 0, 0, 0, 0]);
    case!(
        env,
        "ipv6 hop-by-hop header",
        "xdp",
        hbh.clone(),
        XDP_PASS,
        hbh,
        "pass_ipv6_ext"
    );
    // IPv6 fragments are not translated (docs/architecture.md, Fragments): a first
    // fragment (fragment header, offset 0, M set) passes untouched like any extension
    // header.
    let mut frag = from_client.clone();
    frag[14 + 6] = 44; // next header: fragment
    let payload_len = u16::from_be_bytes([frag[14 + 4], frag[14 + 5]]) + 8;
    frag[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    frag.splice(54..54, [17, 0, 0, 1, 0, 0, 0x12, 0x34]);
    case!(
        env,
        "ipv6 first fragment",
        "xdp",
        frag.clone(),
        XDP_PASS,
        frag,
        "pass_ipv6_ext"
    );
}

// TCP state: which FIN and RST close a flow, SYN reuse of a closing tuple, expiry, replies
// of dead flows and the reclaim of their SNAT ports.

/// Flags of a crafted TCP segment.
const SYN: u8 = 1;
const ACK: u8 = 2;
const FIN: u8 = 4;
const RST: u8 = 8;
/// The client's initial sequence number in these tests, and the backend's.
const ISN: u32 = 1000;
const BISN: u32 = 7000;
/// Far outside any window around the flows' numbers: a stranger's guess.
const FAR: u32 = 1 << 31;
const POD_LOCAL_2: [u8; 4] = [198, 19, 1, 11];

/// A TCP segment without payload.
#[expect(
    clippy::too_many_arguments,
    reason = "a segment's fields, named at each call"
)]
fn seg(
    smac: [u8; 6],
    dmac: [u8; 6],
    (src, sp): Addr,
    (dst, dp): Addr,
    ttl: u8,
    flags: u8,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, ttl)
        .tcp(sp, dp, seq, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

/// A segment from the client to a nodePort of node1.
fn from_client(client_port: u16, node_port: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    seg(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, client_port),
        (NODE1, node_port),
        64,
        flags,
        seq,
        ack,
    )
}

/// The same segment as a local backend `pod` gets it (DNAT only, through the stack).
fn to_local(pod: [u8; 4], client_port: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    seg(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, client_port),
        (pod, 80),
        64,
        flags,
        seq,
        ack,
    )
}

/// A segment of a local backend `pod` to the client, as TC egress sees it.
fn from_local(pod: [u8; 4], client_port: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    seg(
        NODE1_MAC,
        CLIENT_MAC,
        (pod, 80),
        (CLIENT, client_port),
        63,
        flags,
        seq,
        ack,
    )
}

fn ct_key(client_port: u16, node_port: u16) -> FlowKey {
    FlowKey::new(
        raw(CLIENT),
        raw(NODE1),
        client_port.to_be(),
        node_port.to_be(),
        PROTO_TCP,
    )
}

impl Env {
    fn conntrack(&mut self) -> aya::maps::HashMap<&mut aya::maps::MapData, FlowKey, CtEntry> {
        let map = self.dp.ebpf_mut().map_mut(m::MAP_CONNTRACK).unwrap();
        aya::maps::HashMap::try_from(map).unwrap()
    }

    /// The NP_CT entry of the client's flow to a nodePort, as an operator reads it.
    fn ct(&mut self, client_port: u16, node_port: u16) -> Option<CtEntry> {
        self.conntrack()
            .get(&ct_key(client_port, node_port), 0)
            .ok()
    }

    /// [`Env::step`] for a client segment to node1's nodePort 30081 from `port`, which XDP
    /// hands to the stack translated for the local backend POD_LOCAL.
    #[track_caller]
    fn step_local(&mut self, case: &str, port: u16, flags: u8, seq: u32, ack: u32, stat: &str) {
        self.step(
            case,
            "xdp",
            from_client(port, 30081, flags, seq, ack),
            XDP_PASS,
            to_local(POD_LOCAL, port, flags, seq, ack),
            stat,
        );
    }

    /// Run the agent's reverse-NAT sweep over both families' maps.
    fn sweep(&mut self) -> Swept {
        let t = Timeouts::of(&self.config);
        let mut v4 = KernelFlowTables::<u32>::of(&self.dp).expect("IPv4 flow tables");
        let mut v6 = KernelFlowTables::<Ip6>::of(&self.dp).expect("IPv6 flow tables");
        let mut swept = gc::sweep(&mut v4, &t, gc::Mode::Routine, monotonic_coarse_ns);
        swept += gc::sweep(&mut v6, &t, gc::Mode::Routine, monotonic_coarse_ns);
        assert!(v4.take_error().is_none() && v6.take_error().is_none());
        swept
    }

    /// Age the flow's entry by `secs` (as if its last packet came that long ago).
    fn age(&mut self, client_port: u16, node_port: u16, secs: u64) {
        let key = ct_key(client_port, node_port);
        let mut e = self.ct(client_port, node_port).expect("entry to age");
        e.last_seen_ns = monotonic_coarse_ns().saturating_sub(secs * 1_000_000_000);
        assert!(e.last_seen_ns > 0, "uptime too short to age an entry");
        self.conntrack().insert(key, e, 0).unwrap();
    }

    /// Run `input` through a program; assert it left as `out` with `verdict` and bumped
    /// `stat` by one.
    #[track_caller]
    fn step(
        &mut self,
        case: &str,
        prog: &str,
        input: Vec<u8>,
        verdict: u32,
        out: Vec<u8>,
        stat: &str,
    ) {
        let before = self.stat(stat);
        let got = match prog {
            "xdp" => self.xdp(&input),
            p => self.tc(p, &input),
        };
        expect(self, case, got, verdict, &out, stat, before);
    }
}

#[track_caller]
fn assert_flags(e: &CtEntry, want: u16, case: &str) {
    let mask = CT_F_CLOSING | CT_F_SYN_ONLY | CT_F_BACKEND_SEQ;
    assert_eq!(
        e.flags & mask,
        want,
        "{case}: conntrack state flags of {e:?}"
    );
}

#[test]
fn tcp_fin_and_rst_close_a_flow_only_in_window() {
    let Some(mut env) = setup() else { return };
    // Table: the client's packets after its SYN (seq ISN) and the state each leaves.
    // Every packet is forwarded, translated, whatever it does to the state.
    type Case = (&'static str, u8, u32, &'static str, u16);
    let flows: [(u16, &[Case]); 3] = [
        (
            40100,
            &[
                (
                    "rst far from the SYN",
                    RST,
                    ISN ^ FAR,
                    "event_tcp_out_of_window",
                    CT_F_SYN_ONLY,
                ),
                ("ack of the handshake", ACK, ISN + 1, "local_deliver", 0),
                (
                    "fin far from the client's",
                    FIN | ACK,
                    ISN + FAR,
                    "event_tcp_out_of_window",
                    0,
                ),
                (
                    "rst just outside the window",
                    RST,
                    ISN + 1 + (3 << 20),
                    "event_tcp_out_of_window",
                    0,
                ),
                (
                    "fin in window",
                    FIN | ACK,
                    ISN + 1 + 500,
                    "local_deliver",
                    CT_F_CLOSING,
                ),
            ],
        ),
        (
            40101,
            &[
                ("ack of the handshake", ACK, ISN + 1, "local_deliver", 0),
                (
                    "rst in window",
                    RST,
                    ISN + 1 + 4000,
                    "local_deliver",
                    CT_F_CLOSING,
                ),
            ],
        ),
        (
            40102,
            // The client gives up on its SYN: an RST right after it.
            &[(
                "rst of a syn-only flow",
                RST,
                ISN + 1,
                "local_deliver",
                CT_F_CLOSING | CT_F_SYN_ONLY,
            )],
        ),
    ];
    for (port, cases) in flows {
        env.step_local("syn", port, SYN, ISN, 0, "local_deliver");
        let e = env.ct(port, 30081).expect("entry of the syn");
        assert_flags(&e, CT_F_SYN_ONLY, "syn");
        assert_eq!(e.client_seq, ISN, "the client's mark is its SYN's");
        for &(case, flags, seq, stat, state) in cases {
            let ack = if flags & ACK != 0 { BISN + 1 } else { 0 };
            env.step_local(case, port, flags, seq, ack, stat);
            let e = env.ct(port, 30081).expect("entry");
            assert_flags(&e, state, case);
        }
    }
}

#[test]
fn tcp_backend_fin_and_rst_need_the_backends_numbers() {
    let Some(mut env) = setup() else { return };
    // A local flow; the backend's packets leave through TC egress.
    let port = 40200;
    env.step_local("syn", port, SYN, ISN, 0, "local_deliver");
    let reply = |flags, seq, ack| from_local(POD_LOCAL, port, flags, seq, ack);
    let restored = |flags, seq, ack| {
        seg(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30081),
            (CLIENT, port),
            63,
            flags,
            seq,
            ack,
        )
    };
    // Before the backend's numbers are known, its RST must acknowledge the client's SYN.
    env.step(
        "backend rst acking nothing of the client's",
        m::PROG_TC_EGRESS,
        reply(RST | ACK, 0, ISN ^ FAR),
        TC_NEXT,
        restored(RST | ACK, 0, ISN ^ FAR),
        "event_tcp_out_of_window",
    );
    assert_flags(&env.ct(port, 30081).unwrap(), CT_F_SYN_ONLY, "unacked rst");
    // The SYN-ACK teaches the backend's sequence number.
    env.step(
        "syn-ack",
        m::PROG_TC_EGRESS,
        reply(SYN | ACK, BISN, ISN + 1),
        TC_NEXT,
        restored(SYN | ACK, BISN, ISN + 1),
        "tc_nat",
    );
    let e = env.ct(port, 30081).unwrap();
    assert_flags(&e, CT_F_SYN_ONLY | CT_F_BACKEND_SEQ, "syn-ack");
    assert_eq!(e.backend_seq, BISN);
    env.step_local("ack", port, ACK, ISN + 1, BISN + 1, "local_deliver");
    // A stranger's RST "from the backend" with the client's numbers right but not the
    // backend's: forwarded, state kept.
    env.step(
        "backend rst far from the backend's",
        m::PROG_TC_EGRESS,
        reply(RST | ACK, BISN ^ FAR, ISN + 1),
        TC_NEXT,
        restored(RST | ACK, BISN ^ FAR, ISN + 1),
        "event_tcp_out_of_window",
    );
    assert_flags(
        &env.ct(port, 30081).unwrap(),
        CT_F_BACKEND_SEQ,
        "far backend rst",
    );
    env.step(
        "backend fin in window",
        m::PROG_TC_EGRESS,
        reply(FIN | ACK, BISN + 1, ISN + 1),
        TC_NEXT,
        restored(FIN | ACK, BISN + 1, ISN + 1),
        "tc_nat",
    );
    assert_flags(
        &env.ct(port, 30081).unwrap(),
        CT_F_BACKEND_SEQ | CT_F_CLOSING,
        "backend fin",
    );
}

#[test]
fn tcp_syn_on_a_closing_tuple_opens_a_fresh_flow() {
    let Some(mut env) = setup() else { return };
    env.dp
        .set_backend(6, &backend(POD_LOCAL_2, 80, BE_F_LOCAL))
        .unwrap();
    let port = 40300;
    env.step_local("syn", port, SYN, ISN, 0, "local_deliver");
    env.step_local("ack", port, ACK, ISN + 1, BISN + 1, "local_deliver");
    // The service now chooses backend 6; the live flow stays on its backend, even for a
    // SYN (a retransmission, or a stranger's).
    service(30081, PROTO_TCP, 20, &[6], &mut env.dp, 3);
    env.step(
        "syn on a live flow",
        "xdp",
        from_client(port, 30081, SYN, ISN, 0),
        XDP_PASS,
        to_local(POD_LOCAL, port, SYN, ISN, 0),
        "event_established",
    );
    env.step(
        "fin",
        "xdp",
        from_client(port, 30081, FIN | ACK, ISN + 1, BISN + 1),
        XDP_PASS,
        to_local(POD_LOCAL, port, FIN | ACK, ISN + 1, BISN + 1),
        "event_established",
    );
    assert_flags(&env.ct(port, 30081).unwrap(), CT_F_CLOSING, "fin");
    // The last ACK of the closing flow still goes to its backend.
    env.step(
        "ack of a closing flow",
        "xdp",
        from_client(port, 30081, ACK, ISN + 2, BISN + 2),
        XDP_PASS,
        to_local(POD_LOCAL, port, ACK, ISN + 2, BISN + 2),
        "event_established",
    );
    // The client reuses its port: a new connection, to the service's current choice.
    let isn2 = ISN + 123_456_789;
    env.step(
        "syn on the closing tuple",
        "xdp",
        from_client(port, 30081, SYN, isn2, 0),
        XDP_PASS,
        to_local(POD_LOCAL_2, port, SYN, isn2, 0),
        "event_tcp_reopen",
    );
    let e = env.ct(port, 30081).unwrap();
    assert_flags(&e, CT_F_SYN_ONLY, "reopened");
    assert_eq!((e.backend_id, e.client_seq), (6, isn2), "{e:?}");
    // The old backend's late segment of the old flow is no reply of the new one: it
    // leaves untranslated.
    let late = from_local(POD_LOCAL, port, ACK, BISN + 2, ISN + 2);
    let before = env.stat("tc_nat");
    let (verdict, out) = env.tc(m::PROG_TC_EGRESS, &late);
    assert_eq!(
        (verdict, hex(&out)),
        (TC_NEXT, hex(&late)),
        "old backend's segment"
    );
    assert_eq!(
        env.stat("tc_nat"),
        before,
        "old backend's segment translated"
    );
    // The new backend's SYN-ACK is.
    env.step(
        "new backend's syn-ack",
        m::PROG_TC_EGRESS,
        from_local(POD_LOCAL_2, port, SYN | ACK, BISN, isn2 + 1),
        TC_NEXT,
        seg(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30081),
            (CLIENT, port),
            63,
            SYN | ACK,
            BISN,
            isn2 + 1,
        ),
        "tc_nat",
    );
}

#[test]
fn tcp_expired_flows_reopen_and_their_replies_pass_untouched() {
    let Some(mut env) = setup() else { return };
    env.dp
        .set_config(&Config {
            snat_addr: raw(NODE1),
            snat_addr6: ip6(NODE1_6),
            snat_port_min: SNAT_PORT,
            snat_port_max: SNAT_PORT,
            tcp_timeout_s: 30,
            ..Config::default()
        })
        .unwrap();
    env.dp
        .set_backend(6, &backend(POD_LOCAL_2, 80, BE_F_LOCAL))
        .unwrap();
    let port = 40400;
    env.step_local("syn", port, SYN, ISN, 0, "local_deliver");
    env.step_local("ack", port, ACK, ISN + 1, BISN + 1, "local_deliver");
    let live_reply = from_local(POD_LOCAL, port, ACK, BISN + 1, ISN + 1);
    env.step(
        "reply of the live flow",
        m::PROG_TC_EGRESS,
        live_reply.clone(),
        TC_NEXT,
        seg(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30081),
            (CLIENT, port),
            63,
            ACK,
            BISN + 1,
            ISN + 1,
        ),
        "tc_nat",
    );
    // Idle past the 30 s timeout: the same reply is no longer translated.
    env.age(port, 30081, 31);
    let before = env.stat("tc_nat");
    let (verdict, out) = env.tc(m::PROG_TC_EGRESS, &live_reply);
    assert_eq!(
        (verdict, hex(&out)),
        (TC_NEXT, hex(&live_reply)),
        "reply of an expired flow"
    );
    assert_eq!(
        env.stat("tc_nat"),
        before,
        "reply of an expired flow translated"
    );
    // A SYN on the expired tuple is a new flow, with the service's current choice.
    service(30081, PROTO_TCP, 20, &[6], &mut env.dp, 3);
    let isn2 = ISN + 5_000_000;
    env.step(
        "syn on the expired tuple",
        "xdp",
        from_client(port, 30081, SYN, isn2, 0),
        XDP_PASS,
        to_local(POD_LOCAL_2, port, SYN, isn2, 0),
        "event_new_flow",
    );
    let e = env.ct(port, 30081).unwrap();
    assert_eq!(e.backend_id, 6, "{e:?}");
    assert!(
        monotonic_coarse_ns() - e.last_seen_ns < 5_000_000_000,
        "fresh entry {e:?}"
    );

    // A remote flow whose entry is gone (evicted): its backend's reply to the SNAT port
    // passes untouched to the stack.
    let rport = 40401;
    env.step(
        "syn to remote",
        "xdp",
        from_client(rport, 30080, SYN, ISN, 0),
        XDP_TX,
        seg(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63,
            SYN,
            ISN,
            0,
        ),
        "tx",
    );
    env.conntrack().remove(&ct_key(rport, 30080)).unwrap();
    let orphan = seg(
        NODE2_MAC,
        NODE1_MAC,
        (POD_REMOTE, 80),
        (NODE1, SNAT_PORT),
        63,
        SYN | ACK,
        BISN,
        ISN + 1,
    );
    env.step(
        "reply of an absent flow",
        "xdp",
        orphan.clone(),
        XDP_PASS,
        orphan,
        "pass_no_match",
    );
}

#[test]
fn tcp_snat_ports_of_closing_and_expired_flows_are_reclaimed() {
    let Some(mut env) = setup() else { return };
    // One SNAT port (61000) towards the remote backend.
    let to_pod = |flags, seq, ack| {
        seg(
            NODE1_MAC,
            NODE2_MAC,
            (NODE1, SNAT_PORT),
            (POD_REMOTE, 80),
            63,
            flags,
            seq,
            ack,
        )
    };
    env.step(
        "syn",
        "xdp",
        from_client(40500, 30080, SYN, ISN, 0),
        XDP_TX,
        to_pod(SYN, ISN, 0),
        "tx",
    );
    env.step(
        "fin",
        "xdp",
        from_client(40500, 30080, FIN | ACK, ISN + 1, BISN + 1),
        XDP_TX,
        to_pod(FIN | ACK, ISN + 1, BISN + 1),
        "event_established",
    );
    assert_flags(
        &env.ct(40500, 30080).unwrap(),
        CT_F_CLOSING | CT_F_SYN_ONLY,
        "fin",
    );
    // The same client port opens a new connection: it takes the port its old flow held.
    let isn2 = ISN + 77_777;
    env.step(
        "syn reopening a closing snat flow",
        "xdp",
        from_client(40500, 30080, SYN, isn2, 0),
        XDP_TX,
        to_pod(SYN, isn2, 0),
        "event_tcp_reopen",
    );
    assert_flags(&env.ct(40500, 30080).unwrap(), CT_F_SYN_ONLY, "reopened");
    // Another client port: the only SNAT port is held by a live flow.
    let other = from_client(40501, 30080, SYN, ISN, 0);
    env.step(
        "snat port held",
        "xdp",
        other.clone(),
        XDP_DROP,
        other.clone(),
        "drop_snat_exhausted",
    );
    // Once that flow has expired (SYN only: 60 s), its port is free again, but only once
    // the agent's sweep has deleted its reverse entry: the datapath never takes over an
    // entry of another flow.
    env.age(40500, 30080, 61);
    env.step(
        "snat port of a dead flow, before the sweep",
        "xdp",
        other.clone(),
        XDP_DROP,
        other.clone(),
        "drop_snat_exhausted",
    );
    assert_eq!(
        env.sweep().freed,
        1,
        "the sweep frees the dead flow's entry"
    );
    env.step(
        "snat port reclaimed",
        "xdp",
        other,
        XDP_TX,
        to_pod(SYN, ISN, 0),
        "tx",
    );
    // The port's replies now go to the new owner.
    env.step(
        "reply to the new owner",
        "xdp",
        seg(
            NODE2_MAC,
            NODE1_MAC,
            (POD_REMOTE, 80),
            (NODE1, SNAT_PORT),
            63,
            SYN | ACK,
            BISN,
            ISN + 1,
        ),
        XDP_TX,
        seg(
            NODE1_MAC,
            CLIENT_MAC,
            (NODE1, 30080),
            (CLIENT, 40501),
            62,
            SYN | ACK,
            BISN,
            ISN + 1,
        ),
        "event_reply",
    );
}

// Conntrack under pressure: NP_CT is an LRU map, NP_RNAT is not.

impl Env {
    fn revnat(&mut self) -> Vec<(FlowKey, RevNat)> {
        let map = self.dp.ebpf_mut().map_mut(m::MAP_REVNAT).unwrap();
        let map: aya::maps::HashMap<_, FlowKey, RevNat> =
            aya::maps::HashMap::try_from(map).unwrap();
        map.iter().map(|kv| kv.unwrap()).collect()
    }

    fn flows(&mut self) -> Vec<(FlowKey, CtEntry)> {
        self.conntrack().iter().map(|kv| kv.unwrap()).collect()
    }

    /// What a user would see go wrong under pressure, checked over the maps: two live
    /// flows leaving with the same tuple towards their backend (replies would reach only
    /// one client), or a live flow without the reverse entry its replies need. Returns
    /// the number of live flows.
    #[track_caller]
    fn assert_consistent(&mut self, case: &str) -> usize {
        let t = Timeouts::of(&self.config);
        let now = monotonic_coarse_ns();
        let rnat: BTreeMap<_, _> = self
            .revnat()
            .into_iter()
            .map(|(k, v)| ((k.saddr, k.daddr, k.sport, k.dport, k.proto), (k, v)))
            .collect();
        let mut tuples = BTreeMap::new();
        let mut live = 0;
        for (key, e) in self.flows() {
            if t.expired(key.proto, &e, now) {
                continue;
            }
            live += 1;
            let reply = (
                e.backend_addr,
                e.nat_addr,
                e.backend_port,
                e.nat_port,
                key.proto,
            );
            if let Some(other) = tuples.insert(reply, key) {
                panic!("{case}: flows {other:?} and {key:?} share the reply tuple {reply:?}");
            }
            let Some((rkey, rev)) = rnat.get(&reply) else {
                panic!("{case}: live flow {key:?} has no reverse entry");
            };
            assert!(
                revnat_owner(rkey, rev) == key && bound_to(&e, rkey),
                "{case}: the reverse entry of {key:?} belongs to {:?}",
                revnat_owner(rkey, rev)
            );
        }
        live
    }
}

#[test]
fn snat_tuples_are_never_shared_when_conntrack_evicts_or_fills() {
    let Some(mut env) = setup() else { return };
    // 64 SNAT ports towards the one remote UDP backend.
    env.config.snat_port_max = SNAT_PORT + 63;
    let config = env.config;
    env.dp.set_config(&config).expect("config");
    let datagram = |client_port: u16| {
        udp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, client_port),
            (NODE1, 30080),
            64,
        )
    };
    let send = |env: &mut Env, ports: std::ops::Range<u16>| {
        for p in ports {
            env.xdp(&datagram(p));
        }
    };
    let exhausted = env.stat("drop_snat_exhausted");
    send(&mut env, 20_000..20_200);
    let live = env.assert_consistent("200 new flows for 64 ports");
    assert!(
        (48..=64).contains(&live),
        "most of the 64 ports are taken ({live})"
    );
    assert_eq!(
        env.stat("drop_snat_exhausted") - exhausted,
        200 - live as u64,
        "every flow that found no port is counted"
    );
    // Conntrack loses half of the flows (what LRU eviction does under pressure). New
    // clients find no port: the evicted flows' reverse entries still hold theirs.
    let keys: Vec<FlowKey> = env.flows().into_iter().map(|(k, _)| k).collect();
    let evict = |env: &mut Env| {
        for k in keys.iter().step_by(2) {
            env.conntrack().remove(k).unwrap();
        }
    };
    let evicted = keys.iter().step_by(2).count();
    evict(&mut env);
    send(&mut env, 20_200..20_300);
    assert_eq!(
        env.assert_consistent("new clients after eviction, before the sweep"),
        live - evicted,
        "the evicted flows' ports stay held until the sweep: nothing else takes them"
    );
    // An evicted flow that keeps sending gets its own port back (its reverse entry names it).
    send(&mut env, 20_000..20_200);
    assert_eq!(
        env.assert_consistent("evicted flows sending again"),
        live,
        "each evicted flow is back on its own port"
    );
    // Evicted for good, the flows' entries are freed by the sweep; their ports go to new
    // flows, one each.
    evict(&mut env);
    assert_eq!(env.sweep().freed as usize, evicted);
    send(&mut env, 20_200..20_300);
    let after = env.assert_consistent("new clients after the sweep");
    assert_eq!(
        after, live,
        "every freed port was taken again, by one flow each"
    );

    // Reverse entries of local flows fill NP_RNAT (1,024 here) while NP_CT evicts: new
    // flows are dropped and counted, none shares or loses an entry.
    let full = env.stat("drop_map_full");
    for p in 0..1_500u16 {
        env.xdp(&udp(
            CLIENT_MAC,
            NODE1_MAC,
            (CLIENT, 30_000 + p),
            (NODE1, 30081),
            64,
        ));
    }
    env.assert_consistent("local flows beyond the maps' capacity");
    assert!(
        env.stat("drop_map_full") > full,
        "flows beyond NP_RNAT's capacity are dropped and counted"
    );
}

const POD_PMTU: [u8; 4] = [198, 19, 4, 10];
const POD_PMTU_6: [u8; 16] = [0xfd, 0, 0, 0x19, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
/// The MTU of the route to node2's pods of 198.19.4.0/24 (fd00:19:4::/64).
const PATH_MTU: u16 = 1400;

/// A TCP segment (ACK) of the client's flow 40010 -> node1:30086 with `len` bytes of
/// payload: as the client sent it, or (`to_pod`) as forwarded to the backend, from node1's
/// SNAT port, TTL - 1 (the MACs stay: TC leaves them to `bpf_redirect_neigh`).
fn tcp_data(len: usize, to_pod: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let ((src, sp), (dst, dp), ttl) = if to_pod {
        ((NODE1, SNAT_PORT), (POD_PMTU, 80), 63)
    } else {
        ((CLIENT, 40010), (NODE1, 30086), 64)
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv4(src, dst, ttl)
        .tcp(sp, dp, 1001, 64240)
        .ack(5000)
        .write(&mut v, &payload)
        .unwrap();
    v
}

/// A UDP datagram client -> node1:30086 of `len` bytes of payload (IPv4: DF as given).
fn big_udp(len: usize, df: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv4(CLIENT, NODE1, 64)
        .udp(40011, 30086)
        .write(&mut v, &payload)
        .unwrap();
    if !df {
        v[20] &= !0x40;
        fix_ip_csum(&mut v);
    }
    v
}

fn big_udp6(len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE1_MAC)
        .ipv6(CLIENT_6, NODE1_6, 64)
        .udp(40012, 30086)
        .write(&mut v, &payload)
        .unwrap();
    v
}

/// The fragmentation needed node1 sends for `frame` from the frontend: TOS 0xc0, no DF,
/// the first 548 bytes of the client's packet quoted (576 in all).
fn frag_needed(frame: &[u8]) -> Vec<u8> {
    let mut v = icmp_unreach(
        NODE1_MAC,
        CLIENT_MAC,
        (NODE1, CLIENT),
        64,
        Some(PATH_MTU),
        &frame[..14 + 548],
    );
    v[15] = 0xc0;
    v[20] &= !0x40;
    fix_ip_csum(&mut v);
    assert_eq!(v.len(), 14 + 576);
    v
}

/// Path MTU: the route to the backend's pods carries `mtu lock 1400` (unlocked, the FIB
/// helper ignores it: net/ipv4/route.c, ip_mtu_from_fib_result; net/ipv6/route.c,
/// ip6_mtu_from_fib6). A client's packet that
/// does not fit, IPv4 with don't-fragment or IPv6, is answered with ICMP fragmentation
/// needed (ICMPv6 packet too big) from the frontend, quoting the client's packet; XDP and
/// TC alike. A GSO skb is judged by its segments; IPv4 without DF is sent on.
#[test]
fn packets_too_big_for_the_route_get_path_mtu_errors() {
    let Some(mut env) = setup() else { return };
    env.ns
        .ip("route add 198.19.4.0/24 via 198.18.0.12 dev lan0 mtu lock 1400");
    env.ns
        .ip("route add fd00:19:4::/64 via fd00:18::12 dev lan0 mtu lock 1400");
    env.dp.set_backend(6, &backend(POD_PMTU, 80, 0)).unwrap();
    service(30086, PROTO_TCP, 80, &[6], &mut env.dp, 9);
    service(30086, PROTO_UDP, 90, &[6], &mut env.dp, 10);
    udp6_service(&mut env.dp, 7, POD_PMTU_6, 30086, 100, 11);

    // TCP: the SYN fits and goes out; a full-sized segment of the flow does not.
    let syn = tcp(
        CLIENT_MAC,
        NODE1_MAC,
        (CLIENT, 40010),
        (NODE1, 30086),
        64,
        true,
    );
    let syn_out = tcp(
        NODE1_MAC,
        NODE2_MAC,
        (NODE1, SNAT_PORT),
        (POD_PMTU, 80),
        63,
        true,
    );
    case!(env, "small SYN", "xdp", syn, XDP_TX, syn_out, "tx");
    let big = tcp_data(1460, false);
    assert_eq!(big.len(), 14 + 1500);
    for (prog, verdict) in [("xdp", XDP_TX), (m::PROG_TC_INGRESS, TC_ACT_REDIRECT)] {
        case!(
            env,
            &format!("TCP segment of 1500 bytes, {prog}"),
            prog,
            big.clone(),
            verdict,
            frag_needed(&big),
            "icmp_frag_needed"
        );
    }
    // A GRO-merged skb of 1448-byte segments (1488 on the wire) is too big; one of
    // 1300-byte segments (1340) fits, however long the skb: translated and sent. (Two
    // segments each: BPF_PROG_TEST_RUN takes at most a page.)
    let merged = tcp_data(2 * 1448, false);
    let before = env.stat("icmp_frag_needed");
    let got = env.tc_gso(m::PROG_TC_INGRESS, &merged, 1448);
    expect(
        &mut env,
        "GSO skb of 1488-byte segments",
        got,
        TC_ACT_REDIRECT,
        &frag_needed(&merged),
        "icmp_frag_needed",
        before,
    );
    let merged = tcp_data(2 * 1300, false);
    let before = env.stat("tc_nat");
    let got = env.tc_gso(m::PROG_TC_INGRESS, &merged, 1300);
    expect(
        &mut env,
        "GSO skb of 1340-byte segments",
        got,
        TC_ACT_REDIRECT,
        &tcp_data(2 * 1300, true),
        "tc_nat",
        before,
    );

    // UDP with DF: answered; without DF: XDP leaves it to TC, which sends it on
    // translated (no fragmentation here, and the stack would take it for a martian).
    let dgram = big_udp(1472, true);
    for (prog, verdict) in [("xdp", XDP_TX), (m::PROG_TC_INGRESS, TC_ACT_REDIRECT)] {
        case!(
            env,
            &format!("UDP datagram of 1500 bytes with DF, {prog}"),
            prog,
            dgram.clone(),
            verdict,
            frag_needed(&dgram),
            "icmp_frag_needed"
        );
    }
    let no_df = big_udp(1472, false);
    case!(
        env,
        "UDP without DF, xdp",
        "xdp",
        no_df.clone(),
        XDP_PASS,
        no_df.clone(),
        "fib_pass"
    );
    let before = env.stat("tc_nat");
    let got = env.tc(m::PROG_TC_INGRESS, &no_df);
    assert_eq!(got.0, TC_ACT_REDIRECT, "UDP without DF, tc: verdict");
    assert_eq!(got.1.len(), no_df.len(), "UDP without DF, tc: sent whole");
    assert_eq!(
        &got.1[14 + 16..14 + 20],
        &POD_PMTU,
        "UDP without DF, tc: translated"
    );
    assert_eq!(env.stat("tc_nat"), before + 1);
    // A datagram that fits is forwarded as ever.
    let small = big_udp(1372, true);
    case!(
        env,
        "UDP datagram of 1400 bytes",
        "xdp",
        small.clone(),
        XDP_TX,
        {
            let payload: Vec<u8> = (0..1372).map(|i| (i * 3) as u8).collect();
            let mut v = Vec::new();
            PacketBuilder::ethernet2(NODE1_MAC, NODE2_MAC)
                .ipv4(NODE1, POD_PMTU, 63)
                .udp(SNAT_PORT, 80)
                .write(&mut v, &payload)
                .unwrap();
            v
        },
        "tx"
    );

    // IPv6: packet too big, quoting as much as fits in 1280 bytes.
    let dgram6 = big_udp6(1452);
    assert_eq!(dgram6.len(), 14 + 1500);
    let too_big = icmp6_error(
        NODE1_MAC,
        CLIENT_MAC,
        (NODE1_6, CLIENT_6),
        64,
        Some(PATH_MTU as u32),
        &dgram6[..14 + 1232],
    );
    assert_eq!(too_big.len(), 14 + 1280);
    for (prog, verdict) in [("xdp", XDP_TX), (m::PROG_TC_INGRESS, TC_ACT_REDIRECT)] {
        case!(
            env,
            &format!("UDP6 datagram of 1500 bytes, {prog}"),
            prog,
            dgram6.clone(),
            verdict,
            too_big.clone(),
            "icmp_frag_needed"
        );
    }
}
