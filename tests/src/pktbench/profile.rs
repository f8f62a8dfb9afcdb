//! Where nodeport's time goes on one configuration: while a measured run goes on, `perf
//! record` samples the kernel on every CPU (the lock-step CPU, and the other if the loop
//! strays) (every kernel symbol's share: the JIT-ed programs,
//! the helpers and map functions they call, the veth and redirect code around them), and
//! the kernel's BPF statistics (`kernel.bpf_stats_enabled`) give each of the datapath's
//! programs its runs and run time. The helper and BPF-to-BPF calls each program contains
//! are read from its translated instructions (`bpftool prog dump xlated`).

use std::{
    collections::BTreeMap,
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use aya::programs::loaded_programs;
use nodeport_common::maps as m;
use serde::Serialize;

use crate::pktbench::{
    matrix::traffic_label,
    run::{Bed, Kind, Timing, Traffic},
};

/// One program's share, from the BPF statistics (in a run of its own: with them on, every
/// program run also reads the clock twice, included in `ns_per_run`).
#[derive(Clone, Debug, Serialize)]
pub struct ProgStat {
    pub program: String,
    /// Program runs per delivered packet.
    pub runs_per_packet: f64,
    /// Mean run time (ns).
    pub ns_per_run: f64,
    /// Calls in the program's translated code: helper name -> count, and BPF-to-BPF
    /// calls under "(bpf-to-bpf)".
    pub calls: BTreeMap<String, usize>,
}

/// A kernel symbol's share of the CPU's samples.
#[derive(Clone, Debug, Serialize)]
pub struct Share {
    pub symbol: String,
    pub percent: f64,
    /// The share as ns per delivered packet.
    pub ns_per_packet: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub services: usize,
    pub traffic: Traffic,
    pub kind: Kind,
    pub ns_per_packet: f64,
    pub programs: Vec<ProgStat>,
    pub symbols: Vec<Share>,
    /// What could not be measured, if anything.
    pub note: String,
}

const PROGRAMS: [&str; 3] = [m::PROG_XDP, m::PROG_TC_INGRESS, m::PROG_TC_EGRESS];

/// (id, run time, runs) of the datapath's programs now loaded.
fn prog_stats() -> Vec<(String, u32, Duration, u64)> {
    loaded_programs()
        .flatten()
        .filter_map(|p| {
            let name = p.name_as_str()?.to_string();
            PROGRAMS
                .contains(&name.as_str())
                .then(|| (name, p.id(), p.run_time(), p.run_count()))
        })
        .collect()
}

fn sysctl(key: &str, value: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let old = fs::read_to_string(&path).ok()?.trim().to_string();
    fs::write(&path, value).ok()?;
    Some(old)
}

/// Helper and BPF-to-BPF calls in program `id`'s translated code.
fn calls(id: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(o) = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
    else {
        return out;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(rest) = line.split_once(") call ").map(|(_, r)| r) else {
            continue;
        };
        // Helpers print as `bpf_name#id`, BPF-to-BPF calls as `pc+N` or `subprog#pc`.
        let target = rest.split('#').next().unwrap_or(rest).trim();
        let name = if target.starts_with("bpf_") {
            target.to_string()
        } else {
            "(bpf-to-bpf)".to_string()
        };
        *out.entry(name).or_default() += 1;
    }
    out
}

/// Samples `bed` (a nodeport configuration) during one measured run of `traffic`.
pub fn run(bed: &mut Bed, traffic: Traffic, t: Timing) -> Profile {
    let kind = Kind::V4_TCP;
    let mut note = Vec::new();
    // First a run with the BPF statistics on: each program run then also reads the clock
    // twice, which costs more than some programs here, so the perf run goes without.
    let stats_old = sysctl("kernel.bpf_stats_enabled", "1");
    let before = prog_stats();
    let stats_run = bed.measure(kind, traffic, t);
    let after = prog_stats();
    if let Some(old) = stats_old {
        sysctl("kernel.bpf_stats_enabled", &old);
    }
    let kallsyms_old = sysctl("net.core.bpf_jit_kallsyms", "1");
    let data = std::env::temp_dir().join(format!("np-perf-{}.data", std::process::id()));
    // perf samples the measured window only: started when it opens, stopped (SIGINT, so it
    // writes its file) when it closes.
    let mut perf: Option<std::io::Result<std::process::Child>> = None;
    let mut window = |open: bool| {
        if open {
            perf = Some(
                Command::new("perf")
                    .args([
                        "record",
                        "-q",
                        "-e",
                        "cpu-clock:k",
                        // All CPUs: the loop may leave its CPU (see cpu.rs); idle samples
                        // are taken out of the shares.
                        "-a",
                        "-o",
                    ])
                    .arg(&data)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn(),
            );
        } else if let Some(Ok(c)) = &perf {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        }
    };
    let m = bed.measure_with(kind, traffic, t, &mut window);
    let symbols = match perf.map(|p| p.and_then(|mut c| c.wait())) {
        Some(Ok(_)) => shares(&data, m.ns_per_packet),
        other => {
            note.push(format!("perf record did not run ({other:?})"));
            Vec::new()
        }
    };
    let _ = fs::remove_file(&data);
    if let Some(old) = kallsyms_old {
        sysctl("net.core.bpf_jit_kallsyms", &old);
    }
    // The counters cover the warm-up too: runs per packet compare runs with the frames
    // the generator sent over the same stretch, which the counters do not give; the
    // measured window's share is assumed to be the run's.
    let total_runs: u64 = PROGRAMS
        .iter()
        .map(|p| {
            after.iter().filter(|a| a.0 == *p).map(|a| a.3).sum::<u64>()
                - before
                    .iter()
                    .filter(|b| b.0 == *p)
                    .map(|b| b.3)
                    .sum::<u64>()
        })
        .sum();
    let in_window = t.duration.as_secs_f64() / (t.warmup + t.duration).as_secs_f64();
    let programs = PROGRAMS
        .iter()
        .filter_map(|&name| {
            let a = after.iter().filter(|a| a.0 == name);
            let (mut runs, mut time, mut id) = (0u64, 0f64, None);
            for x in a {
                let b = before.iter().find(|b| b.1 == x.1);
                runs += x.3 - b.map_or(0, |b| b.3);
                time += (x.2 - b.map_or(Duration::ZERO, |b| b.2)).as_nanos() as f64;
                id = Some(x.1);
            }
            let id = id?;
            Some(ProgStat {
                program: name.to_string(),
                runs_per_packet: runs as f64 * in_window / stats_run.delivered.max(1) as f64,
                ns_per_run: if runs == 0 { 0.0 } else { time / runs as f64 },
                calls: calls(id),
            })
        })
        .collect();
    if total_runs == 0 {
        note.push("the BPF statistics counted no runs".into());
    }
    Profile {
        services: bed.services,
        traffic,
        kind,
        ns_per_packet: m.ns_per_packet,
        programs,
        symbols,
        note: note.join("; "),
    }
}

/// Symbols of the idle loop: the CPU waiting, not working (between ticks of a run whose
/// node dropped the population, say).
const IDLE: [&str; 6] = [
    "pv_native_safe_halt",
    "default_idle",
    "intel_idle",
    "acpi_idle_do_entry",
    "poll_idle",
    "native_safe_halt",
];

/// Symbols over 0.5% of the busy samples, from `perf report`: shares of the kernel's busy
/// time (idle samples taken out), and as ns per delivered packet.
fn shares(data: &std::path::Path, ns_per_packet: f64) -> Vec<Share> {
    let Ok(o) = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let all: Vec<(String, f64)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pct: f64 = it.next()?.strip_suffix('%')?.parse().ok()?;
            let _level = it.next()?;
            Some((it.collect::<Vec<_>>().join(" "), pct))
        })
        .collect();
    let idle: f64 = all
        .iter()
        .filter(|(s, _)| IDLE.contains(&s.as_str()))
        .map(|(_, p)| p)
        .sum();
    let busy = (100.0 - idle).max(f64::MIN_POSITIVE);
    all.into_iter()
        .filter(|(s, _)| !IDLE.contains(&s.as_str()))
        .map(|(symbol, p)| {
            let percent = p * 100.0 / busy;
            Share {
                symbol,
                percent,
                ns_per_packet: percent / 100.0 * ns_per_packet,
            }
        })
        .filter(|s| s.percent >= 0.5)
        .collect()
}

pub fn print(p: &Profile) {
    println!(
        "\nwhere the time goes: nodeport, {} services, {}, {} ({:.1} ns/pkt in all)",
        p.services,
        traffic_label(p.traffic),
        p.kind.label(),
        p.ns_per_packet
    );
    for s in &p.programs {
        let calls: Vec<String> = s.calls.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        println!(
            "  {:<10} {:.2} runs/pkt, {:.1} ns/run; calls in its code: {}",
            s.program,
            s.runs_per_packet,
            s.ns_per_run,
            calls.join(", ")
        );
    }
    for s in &p.symbols {
        println!(
            "  {:>6.2}%  {:>7.1} ns/pkt  {}",
            s.percent, s.ns_per_packet, s.symbol
        );
    }
    if !p.note.is_empty() {
        println!("  note: {}", p.note);
    }
}
