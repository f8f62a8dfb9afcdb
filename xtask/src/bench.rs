//! `cargo xtask bench [--quick]`: runs the control-plane benchmark
//! (nodeport-agent/benches/control_plane.rs) and the packet-rate benchmark (`np-pktbench`,
//! tests/src/pktbench: generator, bare XDP forwarder, nodeport, kube-proxy's iptables and
//! nftables rules, and the datapath's per-path costs), each writing JSON under
//! target/bench/, then regenerates docs/benchmarks.md and its SVG plots from that JSON
//! (benchdoc.rs).

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    benchdoc::{self, Provenance},
    build, setup, util,
};

pub fn run(quick: bool) -> Result<()> {
    if !util::is_root() {
        bail!("the benchmarks load eBPF programs and create network namespaces: run as root");
    }
    setup::ensure(setup::Scope::All)?;
    let root = util::workspace_root();
    let out = util::target_dir().join("bench");
    let q = if quick { " --quick" } else { "" };
    let mut commands = Vec::new();

    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args([
        "bench",
        "-p",
        "nodeport-agent",
        "--bench",
        "control_plane",
        "--",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    commands.push(format!(
        "cargo bench -p nodeport-agent --bench control_plane --{q}"
    ));
    util::run_inherit(&mut cmd)?;

    let bin = build::cargo_build(true)?;
    commands.push("cargo build --release -p nodeport-agent -p tests --bins".into());
    let pkt_json = out.join("packet.json");
    let mut cmd = Command::new(bin.join("np-pktbench"));
    cmd.current_dir(&root)
        .env("NODEPORT_AGENT", bin.join("nodeport-agent"))
        .arg("--json")
        .arg(&pkt_json);
    if quick {
        cmd.arg("--quick");
    }
    commands.push(format!(
        "NODEPORT_AGENT=target/release/nodeport-agent target/release/np-pktbench{q} --json target/bench/packet.json"
    ));
    util::run_inherit(&mut cmd)?;

    let cp = read_json(&out.join("control_plane.json"))?;
    let pkt = read_json(&pkt_json)?;
    let prov = Provenance {
        quick,
        machine: machine(),
        commands,
    };
    let (doc, svgs) = benchdoc::render(Some(&cp), Some(&pkt), &prov);
    let docs = root.join("docs");
    for (name, svg) in svgs {
        fs::write(docs.join(&name), svg).with_context(|| format!("writing docs/{name}"))?;
    }
    fs::write(docs.join("benchmarks.md"), doc).context("writing docs/benchmarks.md")?;
    println!("wrote docs/benchmarks.md and its plots");
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn machine() -> String {
    let out = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!(
        "Linux {}, {} CPUs ({cpu})",
        out("uname", &["-r"]),
        out("nproc", &[])
    )
}
