//! Measurements: one configuration of the node (a [`Bed`]: topology, programs, agent or
//! rules), one traffic kind, one bounded run of circulating frames, and the figures it
//! gives. All three namespaces work in lock step on one CPU (the injecting thread is
//! pinned; the veth NAPI work runs in softirq on the same CPU), so the CPU is busy for the
//! whole run and `ns_per_packet` (busy kernel time / delivered frames) is the CPU time per
//! delivered packet of generator + node + sink (measuring.md); the ceiling run's figure,
//! subtracted, leaves the node's own.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use nodeport_agent::datapath::MapReader;
use nodeport_common::bench::{
    FwdConfig, GenConfig, SinkConfig, CNT_GEN, CNT_GEN_STOPPED, CNT_SINK, FWD_F_REWRITE, PROG_FWD,
    PROG_GEN, PROG_SINK, SINK_F_RETURN,
};
use serde::Serialize;

use crate::{
    netns::{ensure_bpffs, Child, PinPath, TempDir},
    pktbench::{
        circulate::{circulate, GenRun, GenStats, Mode},
        cpu::wait_for_idle,
        kubeproxy,
        progs::BenchProgs,
        services::{self, ServiceSet},
        topo::{self, Topology},
    },
    testbed::AGENT_STOP_GRACE,
};

/// What runs on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// XDP redirect of untouched frames: the floor every configuration stands on.
    Ceiling,
    /// XDP forwarder rewriting MACs and redirecting: the machine's limit.
    Bare,
    /// The nodeport agent and its datapath (XDP DNAT + SNAT to remote backends).
    Nodeport,
    /// kube-proxy's iptables mode (iptables-legacy), kernel forwarding.
    Iptables,
    /// kube-proxy's nftables mode, kernel forwarding.
    Nftables,
}

impl Setup {
    pub fn label(self) -> &'static str {
        match self {
            Setup::Ceiling => "ceiling (untouched redirect)",
            Setup::Bare => "bare XDP forwarder",
            Setup::Nodeport => "nodeport",
            Setup::Iptables => "kube-proxy iptables",
            Setup::Nftables => "kube-proxy nftables",
        }
    }

    /// Whether the service count changes what the node does.
    pub fn uses_services(self) -> bool {
        matches!(self, Setup::Nodeport | Setup::Iptables | Setup::Nftables)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// Every frame a new flow.
    NewFlows,
    /// A fixed set of flows, cycled (see [`ESTABLISHED_FLOWS`]).
    Established,
}

/// Frames of one kind: IPv4 or IPv6, TCP SYN or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Kind {
    pub ipv6: bool,
    pub udp: bool,
}

impl Kind {
    pub const V4_TCP: Kind = Kind {
        ipv6: false,
        udp: false,
    };
    pub const ALL: [Kind; 4] = [
        Kind::V4_TCP,
        Kind {
            ipv6: false,
            udp: true,
        },
        Kind {
            ipv6: true,
            udp: false,
        },
        Kind {
            ipv6: true,
            udp: true,
        },
    ];

    pub fn label(self) -> String {
        format!(
            "{} {}",
            if self.ipv6 { "IPv6" } else { "IPv4" },
            if self.udp { "UDP" } else { "TCP SYN" }
        )
    }

    /// Minimum Ethernet frame (60 bytes without FCS), or room for the IP header and 20
    /// bytes (the generator's one bounds check), if longer.
    pub fn frame_len(self) -> usize {
        let l3 = if self.ipv6 { 40 } else { 20 };
        (14 + l3 + 20).max(60)
    }
}

/// How many flows established-flow traffic cycles, whatever the service count (so that
/// 1 and 10,000 services see the same traffic and every one of 10,000 services gets
/// flows).
pub const ESTABLISHED_FLOWS: u32 = 16_384;

/// The generator's settings for `traffic` of `kind` towards `services` nodePorts.
pub fn gen_config(kind: Kind, traffic: Traffic, services: usize) -> GenConfig {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    if kind.ipv6 {
        src = topo::SRC_BASE6.octets();
        dst = topo::NODE_ADDR6.octets();
    } else {
        src[..4].copy_from_slice(&topo::SRC_BASE.octets());
        dst[..4].copy_from_slice(&topo::NODE_ADDR.octets());
    }
    GenConfig {
        src_mac: topo::GEN_MAC,
        dst_mac: topo::NODE_GEN_MAC,
        ipv6: kind.ipv6 as u8,
        proto: if kind.udp { 17 } else { 6 },
        frame_len: kind.frame_len() as u16,
        src_addr: src,
        dst_addr: dst,
        src_count: topo::SRC_COUNT,
        flows: match traffic {
            Traffic::NewFlows => 0,
            Traffic::Established => ESTABLISHED_FLOWS,
        },
        dst_port: services::NODE_PORT_BASE,
        dst_ports: services as u16,
        out_ifindex: 0,
        flags: 0,
    }
}

/// One result.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub setup: Setup,
    pub services: usize,
    pub traffic: Traffic,
    pub kind: Kind,
    pub sent: u64,
    pub delivered: u64,
    /// Frames injected during the measured run: the population, then one for each frame
    /// the node dropped.
    pub injected: u64,
    /// Wall-clock length of the run.
    pub seconds: f64,
    /// Kernel time of all CPUs during the run (the lock-step CPU's, and whatever of the
    /// loop ran elsewhere).
    pub cpu_seconds: f64,
    /// The lock-step CPU's share of `cpu_seconds` (near 1 when lock step held).
    pub pinned_share: f64,
    /// Delivered at the sink per second of busy CPU: the rate one CPU sustains.
    pub pps: f64,
    /// Delivered at the sink per wall-clock second (close to `pps` while the population
    /// keeps the CPU busy; lower when the node drops frames and the loop waits for
    /// top-ups).
    pub wall_pps: f64,
    /// CPU time (one CPU, lock step: generator + node + sink) per delivered packet.
    pub ns_per_packet: f64,
    /// Idle share of all CPUs just before the run (other work on the machine disturbs it).
    pub idle_before: f64,
    /// ns_per_packet minus the ceiling's for the same frame kind: the node's own cost
    /// (filled in by the matrix; None for the ceiling itself).
    pub node_ns: Option<f64>,
    /// nodeport only: the datapath's counters that moved during the run (warm-up and
    /// drain included).
    pub datapath: Vec<(String, u64)>,
}

/// Run lengths.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
    /// Upper bound on frames per run, whatever the duration.
    pub max_frames: u64,
    pub cpu: usize,
}

/// A configured node: dropping it stops the agent, removes pins and folders, then the
/// namespaces (fields drop in order).
pub struct Bed {
    pub setup: Setup,
    pub services: usize,
    pub mode: Mode,
    agent: Option<Child>,
    _pin: Option<PinPath>,
    _dir: Option<TempDir>,
    progs: BenchProgs,
    topo: Topology,
}

impl Bed {
    /// Builds the topology under `run_id` and configures the node for `setup`.
    pub fn new(
        run_id: &str,
        setup: Setup,
        set: ServiceSet,
        traffic: Traffic,
        agent: &std::path::Path,
        mode: Mode,
    ) -> Bed {
        let topo = Topology::new(run_id);
        let mut progs = BenchProgs::load();
        progs.set_sink(&SinkConfig {
            ifindex: topo.sink_ret_ifindex,
            flags: if mode == Mode::Circulate {
                SINK_F_RETURN
            } else {
                0
            },
        });
        progs.attach(PROG_SINK, &topo.sink, topo::SINK_IF);
        progs.attach(PROG_GEN, &topo.gen, topo::GEN_RET_IF);
        let mut bed = Bed {
            setup,
            services: set.count,
            mode,
            agent: None,
            _pin: None,
            _dir: None,
            progs,
            topo,
        };
        match setup {
            Setup::Ceiling | Setup::Bare => {
                bed.progs.set_fwd(&FwdConfig {
                    ifindex: bed.topo.node_sink_ifindex,
                    flags: if setup == Setup::Bare {
                        FWD_F_REWRITE
                    } else {
                        0
                    },
                    src_mac: topo::NODE_SINK_MAC,
                    dst_mac: topo::SINK_MAC,
                });
                bed.progs
                    .attach(PROG_FWD, &bed.topo.node, topo::NODE_GEN_IF);
            }
            Setup::Nodeport => bed.start_agent(run_id, set, traffic, agent),
            Setup::Iptables => {
                kubeproxy::iptables_restore(
                    &bed.topo.node,
                    &kubeproxy::iptables_ruleset(&set),
                    false,
                );
            }
            Setup::Nftables => {
                kubeproxy::nft_load(
                    &bed.topo.node,
                    &kubeproxy::nft_ruleset(&set, topo::NODE_ADDR),
                    false,
                );
            }
        }
        bed
    }

    fn start_agent(
        &mut self,
        run_id: &str,
        set: ServiceSet,
        traffic: Traffic,
        agent: &std::path::Path,
    ) {
        ensure_bpffs();
        self.topo.node.sysctl(
            "net.ipv4.ip_local_port_range",
            services::NODE_EPHEMERAL_RANGE,
        );
        let dir = TempDir::new(run_id, "bench-manifests");
        set.write_manifests(&dir.path().join("m"))
            .expect("writing manifests");
        let pin = PinPath::new(&format!("np-{run_id}-bench"));
        let log = dir.path().join("agent.log");
        let (m, p) = (
            dir.path().join("m").display().to_string(),
            pin.path().display().to_string(),
        );
        let (tcp_syn, udp) = flow_timeouts(traffic);
        let argv = [
            agent.to_str().expect("utf-8 agent path"),
            "--conntrack-tcp-syn-timeout",
            tcp_syn,
            "--conntrack-udp-timeout",
            udp,
            // The node's veths deliver XDP frames here (every receiving end has NAPI), so
            // XDP serves them; `auto` would choose TC alone for veth uplinks.
            "--xdp-mode",
            "native",
            "--interface",
            topo::NODE_GEN_IF,
            "--interface",
            topo::NODE_SINK_IF,
            "--node-name",
            services::NODE_NAME,
            "--manifests",
            &m,
            "--pin-path",
            &p,
            "--nodeport-range",
            services::AGENT_NODEPORT_RANGE,
            "--snat-port-range",
            services::AGENT_SNAT_RANGE,
            "--health-addr",
            "127.0.0.1:10256",
            "--metrics-addr",
            "127.0.0.1:10249",
        ];
        let mut child = self
            .topo
            .node
            .spawn(&argv, Some(&log))
            .with_term_grace(AGENT_STOP_GRACE);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let programmed = MapReader::open(pin.path())
                .and_then(|r| r.services())
                .map_or(0, |s| s.len());
            if programmed >= set.count {
                break;
            }
            check_interrupt();
            if let Some(st) = child.try_wait() {
                panic!(
                    "the agent exited ({st}) before programming its services:\n{}",
                    child.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent programmed {programmed} of {} services in 180 s:\n{}",
                set.count,
                child.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        self.agent = Some(child);
        self._pin = Some(pin);
        self._dir = Some(dir);
    }

    /// The nodeport datapath's counters (empty for other setups).
    pub fn datapath_counters(&self) -> Vec<(&'static str, u64)> {
        match &self._pin {
            Some(pin) => MapReader::open(pin.path())
                .and_then(|r| r.counters())
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// The generator's settings for `traffic` of `kind`, sent towards the node.
    fn gen_config(&self, kind: Kind, traffic: Traffic) -> GenConfig {
        GenConfig {
            out_ifindex: self.topo.gen_ifindex,
            ..gen_config(kind, traffic, self.services)
        }
    }

    fn circulate(
        &mut self,
        kind: Kind,
        traffic: Traffic,
        run: GenRun,
        window: &mut dyn FnMut(bool),
    ) -> GenStats {
        let cfg = self.gen_config(kind, traffic);
        circulate(
            &mut self.progs,
            &self.topo.sink,
            self.topo.sink_ret_ifindex,
            &cfg,
            run,
            window,
        )
    }

    /// Circulates frames until the generator has sent about `frames` (no warm-up), then
    /// drains them. For smoke tests: what the programs counted over the whole run,
    /// drain included.
    pub fn send(&mut self, kind: Kind, traffic: Traffic, frames: u64, cpu: usize) -> Smoke {
        let c = |p: &BenchProgs| {
            [
                p.count(CNT_GEN),
                p.count(CNT_SINK),
                p.count(CNT_GEN_STOPPED),
            ]
        };
        let before = c(&self.progs);
        let run = self.circulate(
            kind,
            traffic,
            GenRun {
                cpu,
                warmup: Duration::ZERO,
                duration: Duration::from_secs(10),
                max_frames: frames,
                mode: self.mode,
            },
            &mut |_| {},
        );
        let after = c(&self.progs);
        Smoke {
            sent: after[0] - before[0],
            delivered: after[1] - before[1],
            drained: after[2] - before[2],
            injected: run.injected_total,
        }
    }

    /// One run of `traffic`: a warm-up (which also opens the established flows), then
    /// the measured window, in one stretch of circulation.
    pub fn measure(&mut self, kind: Kind, traffic: Traffic, t: Timing) -> Measurement {
        self.measure_with(kind, traffic, t, &mut |_| {})
    }

    /// [`Bed::measure`], calling `window` when the measured window opens (`true`) and
    /// closes (`false`): for a profiler that should see that window only.
    pub fn measure_with(
        &mut self,
        kind: Kind,
        traffic: Traffic,
        t: Timing,
        window: &mut dyn FnMut(bool),
    ) -> Measurement {
        if matches!(self.setup, Setup::Iptables | Setup::Nftables) {
            conntrack_settings(&self.topo, traffic);
        }
        check_interrupt();
        let idle_before = wait_for_idle();
        let dp0 = self.datapath_counters();
        let run = self.circulate(
            kind,
            traffic,
            GenRun {
                cpu: t.cpu,
                warmup: t.warmup,
                duration: t.duration,
                max_frames: t.max_frames,
                mode: self.mode,
            },
            window,
        );
        check_interrupt();
        // The datapath's counters cover warm-up and drain as well: they say which paths
        // the frames took, not how many.
        let datapath = self
            .datapath_counters()
            .into_iter()
            .zip(dp0)
            .map(|((k, v1), (_, v0))| (k.to_string(), v1 - v0))
            .filter(|(_, d)| *d != 0)
            .collect();
        let seconds = run.elapsed.as_secs_f64();
        let cpu_seconds = run.busy.all.as_secs_f64();
        let delivered = run.delivered;
        Measurement {
            setup: self.setup,
            services: self.services,
            traffic,
            kind,
            sent: run.frames,
            delivered,
            injected: run.injected,
            seconds,
            cpu_seconds,
            pinned_share: if cpu_seconds > 0.0 {
                run.busy.pinned.as_secs_f64() / cpu_seconds
            } else {
                0.0
            },
            pps: delivered as f64 / cpu_seconds,
            wall_pps: delivered as f64 / seconds,
            ns_per_packet: if delivered == 0 {
                f64::NAN
            } else {
                cpu_seconds * 1e9 / delivered as f64
            },
            idle_before,
            node_ns: None,
            datapath,
        }
    }
}

/// The generator mode this machine runs: circulating frames if a short run through the
/// bare forwarder delivers every frame, else AF_PACKET sends. Says which in one line.
pub fn probe_mode(agent: &std::path::Path) -> Mode {
    const FRAMES: u64 = 20_000;
    let tried = std::panic::catch_unwind(|| {
        let mut bed = Bed::new(
            &crate::netns::run_id(),
            Setup::Bare,
            ServiceSet::new(1),
            Traffic::NewFlows,
            agent,
            Mode::Circulate,
        );
        bed.send(Kind::V4_TCP, Traffic::NewFlows, FRAMES, 0)
    });
    match tried {
        Ok(s) if s.sent >= FRAMES && s.delivered == s.sent => {
            println!(
                "generator: {} (probe: {} laps, none lost)",
                Mode::Circulate.label(),
                s.sent
            );
            Mode::Circulate
        }
        other => {
            let why = match other {
                Ok(s) => format!("{} of {} frames reached the sink", s.delivered, s.sent),
                Err(_) => "the probe failed (see the panic above)".into(),
            };
            println!(
                "generator: circulating frames do not run here ({why}): using {}",
                Mode::Send.label()
            );
            Mode::Send
        }
    }
}

/// What a smoke run's programs counted, drain included.
#[derive(Clone, Copy, Debug)]
pub struct Smoke {
    /// Frames the generator wrote and sent towards the node.
    pub sent: u64,
    /// Frames the sink counted.
    pub delivered: u64,
    /// Frames the generator dropped after the stop: the population left at the end.
    pub drained: u64,
    /// Frames injected: the population and its top-ups.
    pub injected: u64,
}

/// Conntrack settings of the netfilter configurations, in the node namespace: no software
/// checksum check (a NIC would have verified it; the XDP datapath does not check
/// either), and [`flow_timeouts`] for unanswered flows (the sink never replies).
fn conntrack_settings(topo: &Topology, traffic: Traffic) {
    let (tcp, udp) = flow_timeouts(traffic);
    for (k, v) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_syn_sent", tcp),
        ("net.netfilter.nf_conntrack_udp_timeout", udp),
        ("net.netfilter.nf_conntrack_checksum", "0"),
    ] {
        topo.node.sysctl(k, v);
    }
}

/// Timeouts (seconds) of TCP flows that never got past the SYN and of UDP flows, the
/// same for every configuration: 1 s for new-flow runs, so they do not fill the tables
/// (or, for the SNAT configurations, the source-port space towards a backend), the
/// kernel's defaults (120 s, 30 s) for established ones, so a slow configuration does not
/// see its cycled flows expire and turn into new ones.
fn flow_timeouts(traffic: Traffic) -> (&'static str, &'static str) {
    match traffic {
        Traffic::NewFlows => ("1", "1"),
        Traffic::Established => ("120", "30"),
    }
}

/// Set by SIGINT or SIGTERM (see [`stop_on_signals`]).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM stop the generator and then unwind the benchmark (panic
/// "interrupted"), so every guard removes its namespaces, pins and folders.
pub fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether a stop was asked for.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn check_interrupt() {
    if stopped() {
        panic!("interrupted: cleaning up");
    }
}

/// The agent binary for the nodeport configuration.
pub fn agent_path() -> PathBuf {
    crate::testbed::default_agent_path()
}
