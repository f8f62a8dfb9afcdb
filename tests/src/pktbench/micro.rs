//! Per-path costs of the datapath's XDP program `np_xdp`, through plain
//! BPF_PROG_TEST_RUN: pass-through, new flow, established flow, reply, and a new flow
//! that takes its client's sticky backend (session affinity). Plain test runs reuse the packet buffer across
//! `repeat`s, and np_xdp rewrites it, so every run is a separate `repeat = 1` call with a
//! fresh copy of its packet (measuring.md); the figure is the kernel's own timing of the
//! program (ns, ~10 ns resolution, caches colder than under load). Each path is proven by
//! the datapath's per-CPU counters: N runs must move its counters by exactly N.

use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use nodeport_agent::{
    datapath::{Datapath, MapSizes},
    sync::Maps,
};
use nodeport_common::{
    bench::PROG_SINK, maps as m, Backend, Config, FrontendKey, Service, Stat, PROTO_TCP,
    SVC_F_AFFINITY,
};
use serde::Serialize;

use crate::netns::{run_in, Netns, NodeLan};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const CLIENT: [u8; 4] = [198, 18, 0, 10];
const NODE: [u8; 4] = [198, 18, 0, 11];
const BACKEND: [u8; 4] = [198, 19, 2, 10];
const NODE_PORT: u16 = 30080;
/// The new-flow service: the same frontend re-pointed at this many backends.
const BACKENDS: u32 = 8;
/// The reply path's flow gets this SNAT port (the range is this one port at first).
const REPLY_SNAT_PORT: u16 = 61_000;
/// Runs per path.
pub const RUNS: u32 = 20_000;

/// One path's cost.
#[derive(Clone, Debug, Serialize)]
pub struct PathCost {
    pub path: String,
    /// Counters that must each have moved by `runs`.
    pub counters: Vec<String>,
    pub runs: u32,
    /// None when the path does not exist in this build.
    pub median_ns: Option<f64>,
    pub mean_ns: Option<f64>,
    /// Every counter moved by exactly `runs`.
    pub proven: bool,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct MicroReport {
    pub paths: Vec<PathCost>,
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), smac: [u8; 6], syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[]).expect("frame");
    v
}

struct Env {
    ns: Netns,
    _peer: Netns,
    dp: Datapath,
    lan0: u32,
}

impl Env {
    /// A namespace like node1 of the test cluster ([`NodeLan`]).
    fn new() -> Env {
        let NodeLan { ns, peer, lan0 } = NodeLan::new("mc");
        let sizes = MapSizes {
            services: 64,
            backends: 64,
            maglev_slots: 1024,
            conntrack: 65_536,
            ..MapSizes::default()
        };
        let mut dp = Datapath::load(sizes, None).expect("load datapath");
        dp.set_node_addr(u32::from_ne_bytes(NODE))
            .expect("node addr");
        // Backend 1 serves the reply path; all BACKENDS share new flows, so that SNAT
        // ports stay plentiful (one port per flow and backend).
        for id in 1..=BACKENDS {
            let mut addr = BACKEND;
            addr[3] += id as u8 - 1;
            let be = Backend {
                addr: u32::from_ne_bytes(addr),
                port: 80u16.to_be(),
                flags: 0,
                pad: 0,
            };
            dp.set_backend(id, &be).expect("backend");
        }
        dp.write_slots(0, &[1]).expect("slots");
        let all: Vec<u32> = (1..=BACKENDS).collect();
        dp.write_slots(8, &all).expect("slots");
        let mut env = Env {
            ns,
            _peer: peer,
            dp,
            lan0,
        };
        env.point_service(0, 1);
        env.snat_ports(REPLY_SNAT_PORT, REPLY_SNAT_PORT);
        env
    }

    /// Points the nodePort at `size` Maglev slots from `off`.
    fn point_service(&mut self, off: u32, size: u32) {
        self.point_service_with(off, size, 0);
    }

    /// [`Env::point_service`] with `SVC_F_*` flags (affinity for 3 hours, when set).
    fn point_service_with(&mut self, off: u32, size: u32, flags: u16) {
        self.dp
            .set_service(
                &FrontendKey {
                    addr: 0,
                    port: NODE_PORT.to_be(),
                    proto: PROTO_TCP,
                    pad: 0,
                },
                &Service {
                    table_off: off,
                    table_size: size,
                    svc_id: 1,
                    flags,
                    affinity_timeout_s: 10_800,
                    ..Default::default()
                },
            )
            .expect("service");
    }

    fn snat_ports(&mut self, min: u16, max: u16) {
        self.dp
            .set_config(&Config {
                snat_addr: u32::from_ne_bytes(NODE),
                snat_port_min: min,
                snat_port_max: max,
                ..Config::default()
            })
            .expect("config");
    }

    fn stat(&self, s: Stat) -> u64 {
        self.dp.stats().expect("stats")[s.name()]
    }

    /// Runs `prog` once per frame (each a fresh copy), returns the kernel's per-run ns.
    fn time(&mut self, prog: &str, frames: &[Vec<u8>]) -> Vec<u64> {
        let lan0 = self.lan0;
        let p: &mut Xdp = self
            .dp
            .ebpf_mut()
            .program_mut(prog)
            .expect("program")
            .try_into()
            .expect("xdp");
        if prog == PROG_SINK {
            // Not loaded by the agent's loader: the baseline program is loaded here.
            let _ = p.load();
        }
        run_in(&self.ns, || {
            let md: [u32; 6] = [0, 0, 0, lan0, 0, 0];
            let mut out = vec![0u8; 256];
            frames
                .iter()
                .map(|f| {
                    let mut md = md;
                    md[1] = f.len() as u32;
                    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
                    let mut opts = TestRunOptions::new();
                    opts.data_in = Some(f);
                    opts.data_out = Some(&mut out);
                    opts.ctx_in = Some(&ctx);
                    let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
                    r.duration.as_nanos() as u64
                })
                .collect()
        })
    }

    /// Times `frames` through np_xdp and checks that each of `stats` moved by one per run.
    fn path(&mut self, name: &str, frames: &[Vec<u8>], stats: &[Stat]) -> PathCost {
        let before: Vec<u64> = stats.iter().map(|&s| self.stat(s)).collect();
        let ns = self.time(m::PROG_XDP, frames);
        let moved: Vec<u64> = stats
            .iter()
            .zip(&before)
            .map(|(&s, b)| self.stat(s) - b)
            .collect();
        let runs = frames.len() as u32;
        let proven = moved.iter().all(|&d| d == runs as u64);
        let note = if proven {
            String::new()
        } else {
            format!("counters moved by {moved:?}, expected {runs} each: NOT THE INTENDED PATH")
        };
        cost(name, stats, runs, &ns, proven, note)
    }
}

fn cost(name: &str, stats: &[Stat], runs: u32, ns: &[u64], proven: bool, note: String) -> PathCost {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    PathCost {
        path: name.into(),
        counters: stats.iter().map(|s| s.name().to_string()).collect(),
        runs,
        median_ns: sorted.get(sorted.len() / 2).map(|&v| v as f64),
        mean_ns: (!ns.is_empty()).then(|| ns.iter().sum::<u64>() as f64 / ns.len() as f64),
        proven,
        note,
    }
}

/// Measures every path (needs root); prints the table as it goes.
pub fn run() -> MicroReport {
    let mut env = Env::new();
    let n = RUNS as usize;
    let mut paths = Vec::new();
    // Baseline: the sink program (one per-CPU counter, XDP_DROP), on the same frames.
    let syn = tcp((CLIENT, 40_000), (NODE, NODE_PORT), CLIENT_MAC, true);
    let base = env.time(PROG_SINK, &vec![syn.clone(); n]);
    paths.push(cost(
        "baseline: bench_sink (count + drop)",
        &[],
        RUNS,
        &base,
        true,
        "the floor of a test run".into(),
    ));
    // Reply: open one flow on the single SNAT port, then its replies.
    env.path(
        "open the reply flow",
        std::slice::from_ref(&syn),
        &[Stat::NewFlow],
    );
    let reply = tcp((BACKEND, 80), (NODE, REPLY_SNAT_PORT), PEER_MAC, false);
    paths.push(env.path("reply", &vec![reply; n], &[Stat::Reply, Stat::Tx]));
    env.snat_ports(1024, 65_535);
    env.point_service(8, BACKENDS);
    let other = tcp((CLIENT, 40_000), (NODE, 9_999), CLIENT_MAC, true);
    paths.push(env.path(
        "pass-through (not a service)",
        &vec![other; n],
        &[Stat::PassNoMatch],
    ));
    // New flows: a different client port (and address) for every run.
    let new: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let c = [198, 18, 0, 10];
            tcp((c, 1024 + i as u16), (NODE, NODE_PORT), CLIENT_MAC, true)
        })
        .collect();
    paths.push(env.path(
        "new flow (DNAT + SNAT, XDP_TX)",
        &new,
        &[Stat::NewFlow, Stat::Tx],
    ));
    let est = tcp((CLIENT, 1024), (NODE, NODE_PORT), CLIENT_MAC, false);
    paths.push(env.path(
        "established flow (XDP_TX)",
        &vec![est; n],
        &[Stat::Established, Stat::Tx],
    ));
    paths.push(affinity(&mut env, n));
    for p in &paths {
        println!(
            "  {:<40} median {:>6} ns  mean {:>7} ns  {}",
            p.path,
            p.median_ns.map_or("-".into(), |v| format!("{v:.0}")),
            p.mean_ns.map_or("-".into(), |v| format!("{v:.1}")),
            if p.median_ns.is_none() {
                p.note.clone()
            } else if p.proven {
                format!("proven: {} x {}", p.runs, p.counters.join(", "))
            } else {
                p.note.clone()
            }
        );
    }
    MicroReport { paths }
}

/// Session affinity: new flows of one client to an affinity service, each taking the
/// client's sticky backend instead of the Maglev table. The first flow creates the binding.
fn affinity(env: &mut Env, n: usize) -> PathCost {
    env.point_service_with(8, BACKENDS, SVC_F_AFFINITY);
    let client = [198, 18, 0, 20];
    let flows: Vec<Vec<u8>> = (0..=n)
        .map(|i| {
            tcp(
                (client, 1024 + i as u16),
                (NODE, NODE_PORT),
                CLIENT_MAC,
                true,
            )
        })
        .collect();
    env.path("open the affinity binding", &flows[..1], &[Stat::NewFlow]);
    env.path(
        "new flow, sticky backend (affinity)",
        &flows[1..],
        &[Stat::AffinityHit, Stat::NewFlow, Stat::Tx],
    )
}
