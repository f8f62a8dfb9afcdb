//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure;
//! `--unit`: only the unprivileged host unit tests.

use std::{
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{build, cleanup, setup, util};

struct Step<'a> {
    name: &'static str,
    action: Box<dyn FnOnce() -> Result<()> + 'a>,
}

impl<'a> Step<'a> {
    fn new(name: &'static str, action: impl FnOnce() -> Result<()> + 'a) -> Self {
        Self {
            name,
            action: Box::new(action),
        }
    }
}

enum Outcome {
    Passed(Duration),
    Failed(Duration),
    NotRun,
}

pub fn run(unit: bool) -> Result<ExitCode> {
    let steps = if unit { unit_steps() } else { all_steps() };
    Ok(run_steps(steps))
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(util::workspace_root()).args(args);
    cmd
}

fn unit_steps() -> Vec<Step<'static>> {
    vec![
        Step::new("setup (toolchain)", || {
            setup::ensure(setup::Scope::Toolchain)
        }),
        // Unit tests of libraries and binaries; the privileged tests live in the tests crate's
        // integration tests (tests/tests/), which this leaves out.
        Step::new("unit tests", || {
            util::run_inherit(&mut cargo(&["test", "--workspace", "--lib", "--bins"]))
        }),
    ]
}

fn all_steps() -> Vec<Step<'static>> {
    let root = util::is_root();
    vec![
        Step::new("setup", || setup::ensure(setup::Scope::All)),
        Step::new("rustfmt", || {
            util::run_inherit(&mut cargo(&["fmt", "--all", "--", "--check"]))
        }),
        Step::new("build (release)", || build::cargo_build(true).map(drop)),
        Step::new("clippy", || {
            util::run_inherit(&mut cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }),
        Step::new("cleanup of earlier runs", move || {
            if root {
                // Only what is older than any run: another run may be going on right now.
                cleanup::run(cleanup::Scope::OlderThan(cleanup::STALE_AFTER))
            } else {
                eprintln!("not root: skipped");
                Ok(())
            }
        }),
        Step::new("tests (release)", move || {
            if !root {
                warn_not_root();
            }
            let bin = build::profile_dir(true);
            util::run_inherit(
                cargo(&["test", "--release", "--workspace", "--no-fail-fast"])
                    .env("NODEPORT_AGENT", bin.join("nodeport-agent"))
                    .env("NP_ECHO", bin.join("np-echo")),
            )
        }),
        Step::new("end-to-end tests on a lan of default veths", move || {
            if !root {
                warn_not_root();
            }
            e2e_suite(DEFAULT_VETH_SUITE, ("NP_LAN", "veth"))
        }),
        Step::new("end-to-end tests on a VXLAN pod network", move || {
            if !root {
                warn_not_root();
            }
            e2e_suite(VXLAN_SUITE, ("NP_PODNET", "vxlan"))
        }),
    ]
}

/// The end-to-end tests `suite` once more, with the testbed switch `env` set.
fn e2e_suite(suite: &[&str], env: (&str, &str)) -> Result<()> {
    let bin = build::profile_dir(true);
    let mut args = vec!["test", "--release", "-p", "tests", "--no-fail-fast"];
    for t in suite {
        args.extend(["--test", t]);
    }
    util::run_inherit(
        cargo(&args)
            .env(env.0, env.1)
            .env("NODEPORT_AGENT", bin.join("nodeport-agent"))
            .env("NP_ECHO", bin.join("np-echo")),
    )
}

/// The end-to-end tests run a second time on a lan of veths with default settings (tx
/// offload on, GRO off, no program on the bridge ports: kind, k3d, lab VMs), where the
/// agent's `auto` mode serves the uplinks with TC alone (tests/src/cluster.rs, `LanKind`).
const DEFAULT_VETH_SUITE: &[&str] = &[
    "e2e", "bulk", "drain", "hook", "local", "lb", "affinity", "ipv6", "icmp", "health", "restart",
    "addrs", "observe", "reject", "flood", "pmtu", "frags",
];

/// The end-to-end tests run a third time with pod traffic between nodes in flannel's VXLAN
/// overlay (flannel.1, ip-masq, a lan that drops pod addresses: tests/src/cluster.rs,
/// `PodNet`), where remote backends are reached through the tunnel and SNATed to its
/// address.
const VXLAN_SUITE: &[&str] = &[
    "e2e", "bulk", "local", "drain", "reject", "icmp", "ipv6", "lb",
];

fn warn_not_root() {
    let line = "!".repeat(78);
    if util::in_ci() {
        eprintln!(
            "{line}\n!! NOT ROOT with CI=true: the privileged packet, verifier and end-to-end \
             tests will FAIL.\n{line}"
        );
    } else {
        eprintln!(
            "{line}\n!! WARNING: not running as root. The privileged packet, verifier and \
             end-to-end tests\n!! cannot run and will be SKIPPED: this run does NOT check the \
             datapath.\n!! Run `cargo xtask test` as root for the full suite.\n{line}"
        );
    }
}

fn run_steps(steps: Vec<Step<'_>>) -> ExitCode {
    let total = steps.len();
    let start = Instant::now();
    let mut outcomes: Vec<(&'static str, Outcome)> = Vec::with_capacity(total);
    let mut failure = None;
    for (index, step) in steps.into_iter().enumerate() {
        if failure.is_some() {
            outcomes.push((step.name, Outcome::NotRun));
            continue;
        }
        eprintln!("\n==> [{}/{total}] {}", index + 1, step.name);
        let step_start = Instant::now();
        let result = (step.action)();
        let elapsed = step_start.elapsed();
        match result {
            Ok(()) => {
                eprintln!("<== {}: ok ({})", step.name, util::fmt_duration(elapsed));
                outcomes.push((step.name, Outcome::Passed(elapsed)));
            }
            Err(err) => {
                eprintln!(
                    "<== {}: FAILED ({})",
                    step.name,
                    util::fmt_duration(elapsed)
                );
                outcomes.push((step.name, Outcome::Failed(elapsed)));
                failure = Some((step.name, err));
            }
        }
    }

    eprintln!("\nSummary:");
    for (name, outcome) in &outcomes {
        let (status, time) = match outcome {
            Outcome::Passed(elapsed) => ("ok", util::fmt_duration(*elapsed)),
            Outcome::Failed(elapsed) => ("FAILED", util::fmt_duration(*elapsed)),
            Outcome::NotRun => ("not run", String::new()),
        };
        eprintln!("  {status:<8} {time:>8}  {name}");
    }
    let total_time = util::fmt_duration(start.elapsed());
    match failure {
        None => {
            if !util::is_root() && outcomes.iter().any(|(name, _)| name.starts_with("tests")) {
                warn_not_root();
            }
            eprintln!("all {total} steps passed in {total_time}");
            ExitCode::SUCCESS
        }
        Some((name, err)) => {
            eprintln!("FAILED at step `{name}` after {total_time}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
