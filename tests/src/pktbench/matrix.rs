//! The whole packet-rate benchmark: which configurations, service counts and traffic kinds
//! run, in which order, and the report they make (a table on stdout, JSON for the docs).

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use crate::{
    netns::run_id,
    pktbench::{
        circulate, micro, profile,
        run::{probe_mode, Bed, Kind, Measurement, Setup, Timing, Traffic},
        services::{self, ServiceSet},
    },
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub service_counts: Vec<usize>,
    pub setups: Vec<Setup>,
    /// Endpoints per service.
    pub endpoints: usize,
    pub timing: Timing,
    pub agent: PathBuf,
    /// Also the datapath's per-path costs.
    pub micro: bool,
    /// Also where nodeport's time goes (perf and BPF run-time statistics), at
    /// `profile_services` services.
    pub profile: bool,
    pub profile_services: usize,
}

impl Plan {
    /// `--quick`: 1 and 1,000 services, 1.5 s runs. Full: 1, 1,000 and 10,000, 4 s runs.
    pub fn new(quick: bool, agent: PathBuf) -> Plan {
        let secs = if quick { 1.5 } else { 4.0 };
        Plan {
            quick,
            service_counts: if quick {
                vec![1, 1_000]
            } else {
                vec![1, 1_000, 10_000]
            },
            // The ceiling comes first: every other figure is read against it.
            setups: vec![
                Setup::Ceiling,
                Setup::Bare,
                Setup::Nodeport,
                Setup::Iptables,
                Setup::Nftables,
            ],
            endpoints: services::ENDPOINTS,
            timing: Timing {
                warmup: Duration::from_secs_f64(secs / 3.0),
                duration: Duration::from_secs_f64(secs),
                max_frames: 200_000_000,
                cpu: 1,
            },
            agent,
            micro: true,
            profile: true,
            profile_services: 1_000,
        }
    }
}

/// nodeport against the others, same service count, traffic and frame kind, same run:
/// packet rates (nodeport's over the other's) and node costs (the other's ns/pkt over
/// nodeport's, both with the ceiling subtracted: how many times cheaper nodeport is).
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub services: usize,
    pub traffic: Traffic,
    pub kind: Kind,
    pub node_ns: Option<f64>,
    pub vs_bare: Option<f64>,
    pub vs_iptables: Option<f64>,
    pub vs_nftables: Option<f64>,
    pub cost_iptables: Option<f64>,
    pub cost_nftables: Option<f64>,
}

/// A target, reported, never asserted.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: Option<f64>,
    pub goal: String,
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    pub endpoints: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub cpu: usize,
    /// How the frames were generated (one line, for the report).
    pub method: String,
    pub measurements: Vec<Measurement>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
    pub profile: Vec<profile::Profile>,
    pub micro: Option<micro::MicroReport>,
}

/// The measurement of `setup` at `services` (any count for setups that have no services)
/// with `traffic` (any, for the ceiling and the bare forwarder) and `kind`.
fn find(
    ms: &[Measurement],
    setup: Setup,
    services: usize,
    traffic: Traffic,
    kind: Kind,
) -> Option<&Measurement> {
    ms.iter().find(|m| {
        m.setup == setup
            && m.kind == kind
            && (!setup.uses_services() || (m.services == services && m.traffic == traffic))
    })
}

/// The frame kinds a configuration is measured with: all four for the forwarders; what
/// the set serves for nodeport; IPv4 for kube-proxy's rules (IPv4 only here).
fn kinds(setup: Setup, set: &ServiceSet) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| match setup {
            Setup::Ceiling | Setup::Bare => true,
            Setup::Nodeport => (!k.udp || set.udp) && (!k.ipv6 || set.dual_stack),
            Setup::Iptables | Setup::Nftables => !k.ipv6 && (!k.udp || set.udp),
        })
        .collect()
}

/// Runs the plan; prints each figure as it comes.
pub fn run(plan: &Plan) -> Report {
    let t = plan.timing;
    let mut measurements: Vec<Measurement> = Vec::new();
    let mut profiles = Vec::new();
    let mode = probe_mode(&plan.agent);
    for &setup in &plan.setups {
        let counts: &[usize] = if setup.uses_services() {
            &plan.service_counts
        } else {
            &[1]
        };
        let traffics: &[Traffic] = if setup.uses_services() {
            &[Traffic::Established, Traffic::NewFlows]
        } else {
            &[Traffic::Established]
        };
        for &n in counts {
            // A fresh node per traffic kind: each configuration gets the conntrack
            // timeouts of that kind (see `run::flow_timeouts`).
            for &traffic in traffics {
                let set = ServiceSet::for_bench(n, plan.endpoints);
                let mut bed = Bed::new(&run_id(), setup, set, traffic, &plan.agent, mode);
                for kind in kinds(setup, &set) {
                    let mut m = bed.measure(kind, traffic, t);
                    m.node_ns = node_ns(&measurements, &m);
                    print_row(&m);
                    measurements.push(m);
                }
                if plan.profile && setup == Setup::Nodeport && n == plan.profile_services {
                    profiles.push(profile::run(&mut bed, traffic, t));
                }
            }
        }
    }
    let micro = plan.micro.then(micro::run);
    report(plan, mode, measurements, profiles, micro)
}

/// A measurement's ns/pkt minus the ceiling's for the same frame kind.
fn node_ns(ms: &[Measurement], m: &Measurement) -> Option<f64> {
    if m.setup == Setup::Ceiling {
        return None;
    }
    let c = find(ms, Setup::Ceiling, 1, m.traffic, m.kind)?;
    Some(m.ns_per_packet - c.ns_per_packet)
}

fn report(
    plan: &Plan,
    mode: circulate::Mode,
    measurements: Vec<Measurement>,
    profile: Vec<profile::Profile>,
    micro: Option<micro::MicroReport>,
) -> Report {
    let ms = &measurements;
    let mut ratios = Vec::new();
    for &n in &plan.service_counts {
        for traffic in [Traffic::Established, Traffic::NewFlows] {
            for kind in Kind::ALL {
                let Some(np) = find(ms, Setup::Nodeport, n, traffic, kind) else {
                    continue;
                };
                let other = |s: Setup| find(ms, s, n, traffic, kind);
                let pps = |s: Setup| other(s).map(|o| np.pps / o.pps);
                let cost = |s: Setup| match (other(s).and_then(|o| o.node_ns), np.node_ns) {
                    (Some(o), Some(me)) if me > 0.0 => Some(o / me),
                    _ => None,
                };
                ratios.push(Ratio {
                    services: n,
                    traffic,
                    kind,
                    node_ns: np.node_ns,
                    vs_bare: pps(Setup::Bare),
                    vs_iptables: pps(Setup::Iptables),
                    vs_nftables: pps(Setup::Nftables),
                    cost_iptables: cost(Setup::Iptables),
                    cost_nftables: cost(Setup::Nftables),
                });
            }
        }
    }
    let v4tcp = |r: &&Ratio| r.kind == Kind::V4_TCP;
    let mut targets = Vec::new();
    for traffic in [Traffic::Established, Traffic::NewFlows] {
        let worst = ratios
            .iter()
            .filter(v4tcp)
            .filter(|r| r.traffic == traffic)
            .filter_map(|r| r.vs_bare)
            .reduce(f64::min);
        targets.push(Target {
            what: format!(
                "nodeport / bare forwarder pps, {}, worst service count",
                traffic_label(traffic)
            ),
            value: worst,
            goal: ">= 0.90".into(),
            met: worst.map(|v| v >= 0.9),
        });
    }
    for traffic in [Traffic::NewFlows, Traffic::Established] {
        let v = ratios
            .iter()
            .filter(v4tcp)
            .find(|r| r.services == 1_000 && r.traffic == traffic)
            .and_then(|r| r.vs_iptables);
        targets.push(Target {
            what: format!(
                "nodeport / iptables pps at 1,000 services, {}",
                traffic_label(traffic)
            ),
            value: v,
            goal: ">= 5".into(),
            met: v.map(|v| v >= 5.0),
        });
    }
    let most = plan.service_counts.iter().copied().max().unwrap_or(1);
    for traffic in [Traffic::NewFlows, Traffic::Established] {
        let pps = |n| find(ms, Setup::Nodeport, n, traffic, Kind::V4_TCP).map(|m| m.pps);
        let v = match (pps(1), pps(most)) {
            (Some(a), Some(b)) if most > 1 => Some(b / a),
            _ => None,
        };
        targets.push(Target {
            what: format!(
                "nodeport pps at {most} services / at 1 service, {}",
                traffic_label(traffic)
            ),
            value: v,
            goal: "0.95 ... 1.05 (10,000 vs 1)".into(),
            met: v.map(|v| (v - 1.0).abs() <= 0.05),
        });
    }
    Report {
        quick: plan.quick,
        endpoints: plan.endpoints,
        warmup_s: plan.timing.warmup.as_secs_f64(),
        duration_s: plan.timing.duration.as_secs_f64(),
        cpu: plan.timing.cpu,
        method: match mode {
            circulate::Mode::Circulate => format!(
                "{} frames circulate generator -> node -> sink -> generator (XDP_REDIRECT over veth pairs, rewritten by the generator on every lap, topped up by AF_PACKET sends when the node drops some), all on CPU {} in lock step; node ns = ns/pkt minus the ceiling's (untouched redirect) for the same frame kind",
                circulate::POPULATION,
                plan.timing.cpu
            ),
            circulate::Mode::Send => format!(
                "fallback: every frame an AF_PACKET send into the generator's veth, rewritten there by XDP, dropped at the sink, all on CPU {} in lock step; node ns = ns/pkt minus the ceiling's for the same frame kind",
                plan.timing.cpu
            ),
        },
        measurements,
        ratios,
        targets,
        profile,
        micro,
    }
}

pub fn traffic_label(t: Traffic) -> &'static str {
    match t {
        Traffic::NewFlows => "new flows",
        Traffic::Established => "established flows",
    }
}

fn print_row(m: &Measurement) {
    println!(
        "  {:<30} {:>6} svc  {:<18} {:<13} {:>7.3} Mpps  {:>7.1} ns/pkt  node {:>7}  (sent {}, delivered {}, injected {}, on the pinned CPU {:.0}%, idle before {:.0}%)",
        m.setup.label(),
        m.services,
        traffic_label(m.traffic),
        m.kind.label(),
        m.pps / 1e6,
        m.ns_per_packet,
        m.node_ns.map_or("-".into(), |v| format!("{v:.1} ns")),
        m.sent,
        m.delivered,
        m.injected,
        m.pinned_share * 100.0,
        m.idle_before * 100.0
    );
    if !m.datapath.is_empty() {
        let c: Vec<String> = m.datapath.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("      datapath counters during the run: {}", c.join(" "));
    }
}

/// The summary printed at the end.
pub fn print_summary(r: &Report) {
    let f = |v: Option<f64>, d: usize| v.map_or("n/a".to_string(), |v| format!("{v:.d$}"));
    println!("\nnodeport against the others (same run; pps: nodeport's over theirs; cost: their node ns over nodeport's):");
    for x in &r.ratios {
        println!(
            "  {:>6} svc {:<18} {:<13} node {:>7} ns  pps vs bare {}  vs iptables {}  vs nftables {}  cost: iptables {}x  nftables {}x",
            x.services,
            traffic_label(x.traffic),
            x.kind.label(),
            f(x.node_ns, 1),
            f(x.vs_bare, 2),
            f(x.vs_iptables, 2),
            f(x.vs_nftables, 2),
            f(x.cost_iptables, 2),
            f(x.cost_nftables, 2)
        );
    }
    for p in &r.profile {
        profile::print(p);
    }
    println!("\ntargets (reported, not asserted):");
    for t in &r.targets {
        println!(
            "  {:<60} {:>8} goal {:<22} {}",
            t.what,
            f(t.value, 3),
            t.goal,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            }
        );
    }
}
