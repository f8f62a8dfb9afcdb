//! The whole packet-rate benchmark: which configurations, service counts and traffic kinds
//! run, in which order, and the report they make (a table on stdout, JSON for the docs).

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use crate::{
    netns::run_id,
    pktbench::{
        micro,
        run::{Bed, Kind, Measurement, Setup, Timing, Traffic},
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
                rate: 0,
            },
            agent,
            micro: true,
        }
    }
}

/// nodeport's packet rate over the others', same service count and traffic, same run.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub services: usize,
    pub traffic: Traffic,
    pub vs_bare: Option<f64>,
    pub vs_iptables: Option<f64>,
    pub vs_nftables: Option<f64>,
}

/// Whether the generator outran everything it fed: its rate alone over the fastest of the
/// configurations (bare forwarder, nodeport, iptables, nftables; the ceiling run is the
/// generator's own floor, not a configuration).
#[derive(Clone, Debug, Serialize)]
pub struct Headroom {
    pub generator_pps: f64,
    pub fastest_pps: f64,
    pub ceiling_pps: Option<f64>,
    pub ratio: f64,
    /// ratio >= 1.5.
    pub ok: bool,
}

/// A target of issue 5, reported, never asserted.
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
    pub rate: u64,
    /// Generator only, one row per frame kind.
    pub generator: Vec<Measurement>,
    pub measurements: Vec<Measurement>,
    pub ratios: Vec<Ratio>,
    pub headroom: Option<Headroom>,
    pub targets: Vec<Target>,
    pub micro: Option<micro::MicroReport>,
}

fn find(ms: &[Measurement], setup: Setup, services: usize, traffic: Traffic) -> Option<f64> {
    ms.iter()
        .find(|m| {
            m.setup == setup
                && (m.services == services || !setup.uses_services())
                && m.traffic == traffic
                && m.kind == Kind::V4_TCP
        })
        .map(|m| m.pps)
}

/// Runs the plan; prints each figure as it comes.
pub fn run(plan: &Plan) -> Report {
    let t = plan.timing;
    let mut generator = Vec::new();
    {
        let bed = &mut Bed::new(
            &run_id(),
            Setup::GenOnly,
            ServiceSet::new(1),
            Traffic::NewFlows,
            &plan.agent,
        );
        for kind in Kind::ALL {
            let m = bed.measure(kind, Traffic::NewFlows, t);
            print_row(&m);
            generator.push(m);
        }
    }
    let mut measurements = Vec::new();
    for &setup in &plan.setups {
        let counts: &[usize] = if setup.uses_services() {
            &plan.service_counts
        } else {
            &[1]
        };
        for &n in counts {
            // A fresh node per traffic kind: each configuration gets the conntrack
            // timeouts of that kind (see `run::flow_timeouts`).
            for traffic in [Traffic::Established, Traffic::NewFlows] {
                let set = ServiceSet::with_endpoints(n, plan.endpoints);
                let mut bed = Bed::new(&run_id(), setup, set, traffic, &plan.agent);
                let m = bed.measure(Kind::V4_TCP, traffic, t);
                print_row(&m);
                measurements.push(m);
            }
        }
    }
    let micro = plan.micro.then(micro::run);
    report(plan, generator, measurements, micro)
}

fn report(
    plan: &Plan,
    generator: Vec<Measurement>,
    measurements: Vec<Measurement>,
    micro: Option<micro::MicroReport>,
) -> Report {
    let ms = &measurements;
    let mut ratios = Vec::new();
    for &n in &plan.service_counts {
        for traffic in [Traffic::Established, Traffic::NewFlows] {
            let Some(np) = find(ms, Setup::Nodeport, n, traffic) else {
                continue;
            };
            let over = |s: Setup| find(ms, s, n, traffic).map(|o| np / o);
            ratios.push(Ratio {
                services: n,
                traffic,
                vs_bare: over(Setup::Bare),
                vs_iptables: over(Setup::Iptables),
                vs_nftables: over(Setup::Nftables),
            });
        }
    }
    let fastest = ms
        .iter()
        .filter(|m| m.setup != Setup::Ceiling)
        .map(|m| m.pps)
        .fold(0.0, f64::max);
    let ceiling = ms
        .iter()
        .filter(|m| m.setup == Setup::Ceiling)
        .map(|m| m.pps)
        .reduce(f64::max);
    let headroom = generator
        .iter()
        .find(|m| m.kind == Kind::V4_TCP)
        .map(|g| Headroom {
            generator_pps: g.pps,
            fastest_pps: fastest,
            ceiling_pps: ceiling,
            ratio: g.pps / fastest,
            ok: g.pps >= 1.5 * fastest,
        });
    let mut targets = Vec::new();
    for traffic in [Traffic::Established, Traffic::NewFlows] {
        let worst = ratios
            .iter()
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
        let v = match (
            find(ms, Setup::Nodeport, 1, traffic),
            find(ms, Setup::Nodeport, most, traffic),
        ) {
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
        rate: plan.timing.rate,
        generator,
        measurements,
        ratios,
        headroom,
        targets,
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
        "  {:<30} {:>6} svc  {:<18} {:<13} {:>7.3} Mpps  {:>7.1} ns/pkt  (sent {}, delivered {}, idle before {:.0}%)",
        m.setup.label(),
        m.services,
        traffic_label(m.traffic),
        m.kind.label(),
        m.pps / 1e6,
        m.ns_per_packet,
        m.sent,
        m.delivered,
        m.idle_before * 100.0
    );
    if !m.datapath.is_empty() {
        let c: Vec<String> = m.datapath.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("      datapath counters during the run: {}", c.join(" "));
    }
}

/// The summary printed at the end.
pub fn print_summary(r: &Report) {
    println!("\nratios (nodeport pps over the other's, same run):");
    for x in &r.ratios {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
        println!(
            "  {:>6} svc {:<18} vs bare {}  vs iptables {}  vs nftables {}",
            x.services,
            traffic_label(x.traffic),
            f(x.vs_bare),
            f(x.vs_iptables),
            f(x.vs_nftables)
        );
    }
    if let Some(h) = &r.headroom {
        println!(
            "\ngenerator: {:.2} Mpps alone, {:.3}x the fastest configuration ({:.2} Mpps): {}",
            h.generator_pps / 1e6,
            h.ratio,
            h.fastest_pps / 1e6,
            if h.ok {
                "not the bottleneck"
            } else {
                "BELOW 1.5x (lock step: costs add on one CPU, see the ceiling run)"
            }
        );
    }
    println!("\ntargets (reported, not asserted):");
    for t in &r.targets {
        println!(
            "  {:<60} {:>8} goal {:<22} {}",
            t.what,
            t.value.map_or("n/a".into(), |v| format!("{v:.3}")),
            t.goal,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            }
        );
    }
}
