//! `np-demo`: the dev-VM demo (`cargo xtask run`). Builds the two-node cluster with three
//! echo pods (pa1, pa2 on node1, pb1 on node2), writes the manifests, starts one agent per
//! node, prints commands to try, and removes everything on Ctrl-C/SIGTERM.
//!
//! `np-demo --agent PATH --echo PATH [--keep-going] [--agent-arg ARG]...`
//! Without `--agent` it runs the cluster and echo pods only (to poke at the network);
//! `np-demo --cleanup` removes leftovers of earlier runs.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use clap::Parser;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tests::{
    manifests::IpFamily,
    netns::{cleanup_leftovers, require_root},
    testbed::{Testbed, TestbedOptions},
};

#[derive(Parser, Debug)]
#[command(about = "Run nodeport in a two-node cluster of network namespaces")]
struct Args {
    /// The agent binary (started once per node). Without it, only the cluster runs.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The echo server binary (default: np-echo next to this binary).
    #[arg(long)]
    echo: Option<PathBuf>,
    /// Keep the cluster up when an agent exits early (print its output, keep waiting).
    #[arg(long)]
    keep_going: bool,
    /// Extra argument for every agent (repeatable), e.g. `--agent-arg=--verbose`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Only remove leftovers of earlier runs (np-* namespaces, pins, temp dirs; live runs
    /// are spared) and exit.
    #[arg(long)]
    cleanup: bool,
    /// How long to wait for the service to answer before warning.
    #[arg(long, default_value_t = 20)]
    ready_timeout_secs: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        require_root();
        eprintln!("np-demo must run as root");
        return ExitCode::FAILURE;
    }
    if args.cleanup {
        let r = cleanup_leftovers();
        println!(
            "removed {} namespace(s), {} pin(s), {} temp dir(s); spared {} of live runs",
            r.namespaces.len(),
            r.pins.len(),
            r.temp_dirs.len(),
            r.skipped_live.len()
        );
        return ExitCode::SUCCESS;
    }
    // A handler (not a blocked mask) so children, which exec, start with default dispositions.
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &act) }.expect("sigaction");
    }
    let echo = args.echo.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("current exe")
            .with_file_name("np-echo")
    });
    let mut opts = TestbedOptions::standard(echo);
    // A dual-stack Service: the same nodePort over IPv4 and IPv6.
    opts.service = opts.service.with_families(&IpFamily::BOTH);
    opts.agent = args.agent.clone();
    opts.agent_args = args.agent_args.clone();

    let mut tb = Testbed::start(opts);
    let c = tb.cluster();
    let client = c.client().name().to_string();
    println!("nodeport demo, run id {}", c.run_id());
    println!(
        "  client {} {} in namespace {client}",
        c.client_ip(),
        c.client_ip6()
    );
    for n in c.nodes() {
        let pods: Vec<String> = c
            .pods_on(&n.name)
            .map(|p| format!("{} {} {}", p.name, p.ip, p.ip6))
            .collect();
        println!(
            "  {} {} {} in namespace {} ({:?} pods: {})",
            n.name,
            n.ip,
            n.ip6,
            n.ns().name(),
            n.shape,
            pods.join(", ")
        );
    }
    println!("  manifests: {}", tb.manifest_dir().display());
    println!("  logs: {}", c.log_dir().display());
    for a in tb.agents() {
        println!("  agent on {}: pin path {}", a.node, a.pin_path().display());
    }

    let mut failed = false;
    if args.agent.is_some() {
        println!("waiting for the service to answer through every node...");
        match tb.wait_for_service(Duration::from_secs(args.ready_timeout_secs)) {
            Ok(()) => println!("ready."),
            Err(e) => {
                eprintln!("WARNING: {e}");
                if tb.check_agents().is_err() && !args.keep_going {
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let c = tb.cluster();
    println!("\nTry (TCP, HTTP):");
    for f in IpFamily::BOTH {
        for n in c.nodes() {
            println!(
                "  sudo ip netns exec {client} curl -s http://{}/",
                tb.nodeport_addr_in(&n.name, f)
            );
        }
    }
    println!("Try (UDP):");
    for f in IpFamily::BOTH {
        for n in c.nodes() {
            let a = tb.nodeport_addr_in(&n.name, f);
            let host = match a.ip() {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            };
            println!(
                "  echo hi | sudo ip netns exec {client} socat -t1 - UDP:{host}:{}",
                a.port()
            );
        }
    }
    println!("A pod directly, from a node:");
    if let (Some(n), Some(p)) = (c.nodes().first(), c.pods().last()) {
        println!(
            "  sudo ip netns exec {} curl -s http://{}/",
            n.ns().name(),
            p.echo_addr()
        );
    }
    println!("\nCtrl-C to stop and clean up.");

    let mut reported = false;
    while !STOP.load(Ordering::SeqCst) {
        if let Err(e) = tb.check_agents() {
            if !reported {
                eprintln!("{e}");
                reported = true;
                failed = true;
            }
            if !args.keep_going {
                break;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!("stopping agents and removing the cluster...");
    drop(tb);
    println!("done.");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
