//! `np-pktbench`: the packet-rate benchmark (tests/src/pktbench). Needs root.
//! Prints a table and writes the report as JSON; `cargo xtask bench` runs it and renders
//! docs/benchmarks.md from the JSON.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::{
    netns::ensure_bpffs,
    pktbench::{
        matrix::{self, Plan},
        micro,
        run::{self, Setup},
    },
    testbed::default_agent_path,
};

#[derive(Parser, Debug)]
#[command(about = "Packet rates: bare XDP forwarder, nodeport, kube-proxy iptables and nftables")]
struct Args {
    /// Short runs, 1 and 1,000 services.
    #[arg(long)]
    quick: bool,
    /// Write the report here as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Service counts (default: 1,1000 with --quick, else 1,1000,10000).
    #[arg(long, value_delimiter = ',')]
    services: Vec<usize>,
    /// Endpoints per service.
    #[arg(long, default_value_t = tests::pktbench::services::ENDPOINTS)]
    endpoints: usize,
    /// Configurations to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_setup)]
    setups: Vec<Setup>,
    /// Seconds per measured run (overrides the plan's).
    #[arg(long)]
    seconds: Option<f64>,
    /// CPU that generator, node and sink share.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Only the datapath's per-path costs.
    #[arg(long)]
    micro_only: bool,
    /// Skip the per-path costs.
    #[arg(long)]
    no_micro: bool,
    /// Skip the profile of nodeport (perf samples and BPF statistics).
    #[arg(long)]
    no_profile: bool,
    /// The agent binary (default: $NODEPORT_AGENT or target/release/nodeport-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
}

fn parse_setup(s: &str) -> Result<Setup, String> {
    Ok(match s {
        "ceiling" => Setup::Ceiling,
        "bare" => Setup::Bare,
        "nodeport" => Setup::Nodeport,
        "iptables" => Setup::Iptables,
        "nftables" => Setup::Nftables,
        _ => {
            return Err(format!(
                "unknown setup {s:?} (ceiling, bare, nodeport, iptables, nftables)"
            ))
        }
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("np-pktbench needs root (namespaces, XDP, BPF_PROG_TEST_RUN)");
    }
    ensure_bpffs();
    run::stop_on_signals();
    if args.micro_only {
        micro::run();
        return Ok(());
    }
    let agent = args.agent.unwrap_or_else(default_agent_path);
    if !agent.exists() {
        bail!(
            "no agent binary at {} (cargo build --release -p nodeport-agent)",
            agent.display()
        );
    }
    let mut plan = Plan::new(args.quick, agent);
    if !args.services.is_empty() {
        plan.service_counts = args.services;
    }
    if !args.setups.is_empty() {
        plan.setups = args.setups;
    }
    if let Some(s) = args.seconds {
        plan.timing.duration = Duration::from_secs_f64(s);
        plan.timing.warmup = Duration::from_secs_f64(s / 3.0);
    }
    plan.endpoints = args.endpoints;
    plan.timing.cpu = args.cpu;
    plan.micro = !args.no_micro;
    plan.profile = !args.no_profile;
    let report = matrix::run(&plan);
    matrix::print_summary(&report);
    if let Some(path) = args.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
