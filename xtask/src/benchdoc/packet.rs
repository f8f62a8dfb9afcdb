//! The packet-rate part of docs/benchmarks.md, from np-pktbench's JSON: rates and node
//! costs per configuration, service count and frame kind; nodeport against the others;
//! where nodeport's time goes; the datapath's per-path costs.

use std::fmt::Write as _;

use serde_json::Value;

use super::{fmt, kind_label, num, rows, setup_label, traffic_label};
use crate::svg::{bar_chart, Row};

fn uses_services(setup: &str) -> bool {
    matches!(setup, "nodeport" | "iptables" | "nftables")
}

/// The measurement of `setup` at `services` and `traffic` (any, for setups without
/// services) with frame kind `kind`.
fn find<'a>(
    ms: &'a [Value],
    setup: &str,
    services: u64,
    traffic: &str,
    kind: &Value,
) -> Option<&'a Value> {
    ms.iter().find(|m| {
        m["setup"] == setup
            && &m["kind"] == kind
            && (!uses_services(setup)
                || (m["services"].as_u64() == Some(services) && m["traffic"] == traffic))
    })
}

pub(super) fn render(s: &mut String, svgs: &mut Vec<(String, String)>, v: &Value) {
    let ms = rows(&v["measurements"]);
    let quick = v["quick"].as_bool() == Some(true);
    let _ = writeln!(s, "## Packet rates\n");
    let _ = writeln!(
        s,
        "From the {} run: {} s measured per figure after {} s of warm-up. Each service has {} endpoints, all on another node behind the sink.\n",
        if quick { "quick (`--quick`)" } else { "full" },
        fmt(num(&v["duration_s"]), 1),
        fmt(num(&v["warmup_s"]), 1),
        v["endpoints"]
    );
    s.push_str(concat!(
        "**How.** Three network namespaces joined by veth pairs: a generator, the node, a sink, ",
        "and a third veth pair from the sink back to the generator. A fixed population of ",
        "frames circulates: the generator (`bench_gen`, an XDP program on its return veth, ",
        "nodeport-ebpf/src/bench.rs) writes every header of each arriving frame, checksums ",
        "included, and redirects it into the node; the node forwards it to the sink; the sink ",
        "(`bench_sink`) counts it and redirects it back to the generator. The population is ",
        "injected once with AF_PACKET sends, and topped up on a 5 ms tick by as many frames as ",
        "the node dropped (`injected` in the JSON); no syscall is made per packet. ",
        "The node is, in turn, an untouched XDP redirect (the ceiling), a bare XDP forwarder ",
        "(rewrite MACs, redirect), the real `nodeport-agent` with a manifests folder of N ",
        "NodePort services whose endpoints sit behind the sink (remote backends: XDP DNAT + ",
        "SNAT and redirect), kube-proxy's iptables rules (iptables-legacy) or its nftables ",
        "rules, both with kernel forwarding. Traffic is TCP SYNs or UDP datagrams over IPv4 or ",
        "IPv6, spread over all N nodePorts from 4,096 source addresses: either every frame a ",
        "new flow, or a fixed set of 16,384 flows cycled (established), whatever N. Up to 1,000 ",
        "services, every service has a TCP and a UDP port and IPv4 and IPv6 endpoints; at ",
        "10,000 only TCP over IPv4 (four Maglev tables per service would not fit the agent's ",
        "default NP_MAGLEV). kube-proxy's rules here are IPv4 only.\n\n",
        "Generator, node and sink run in lock step on one CPU (the injecting thread is pinned, ",
        "and the veths' NAPI polls run where they were scheduled), which is steady here, ",
        "unlike spreading them over the VM's two vCPUs. The figures are therefore **per CPU**: ",
        "`ns/pkt` is kernel time (system + irq + softirq, /proc/stat) over the frames the sink ",
        "counted, and `Mpps` is its inverse, the rate one CPU sustains for generator + node + ",
        "sink. The kernel time counted is the pinned CPU's, plus the other CPU's softirq and ",
        "irq time: a stray frame sent from the other CPU can schedule one of the loop's NAPI ",
        "polls there, and the loop then leaves its CPU (the JSON records the pinned CPU's share ",
        "of each run, `pinned_share`); the agent's own work on the other CPU stays out. ",
        "*node ns* subtracts the ceiling run of the same frame kind (generator + ",
        "an XDP redirect of untouched frames + sink) and so estimates what the node's own ",
        "processing costs.\n\n",
    ));
    let _ = writeln!(s, "| configuration | services | frames | established Mpps | ns/pkt | node ns | new flows Mpps | ns/pkt | node ns |\n|---|---|---|---|---|---|---|---|---|");
    let mut chart = Vec::new();
    let mut seen: Vec<(&str, u64, &Value)> = Vec::new();
    for m in ms {
        let setup = m["setup"].as_str().unwrap_or("");
        let n = m["services"].as_u64().unwrap_or(0);
        let kind = &m["kind"];
        if seen.iter().any(|x| x.0 == setup && x.1 == n && x.2 == kind) {
            continue;
        }
        seen.push((setup, n, kind));
        let mut cells = Vec::new();
        let mut values = Vec::new();
        for traffic in ["established", "new_flows"] {
            let r = find(ms, setup, n, traffic, kind);
            let pps = r.and_then(|r| num(&r["pps"]));
            cells.push(format!(
                "{} | {} | {}",
                fmt(pps.map(|p| p / 1e6), 2),
                fmt(r.and_then(|r| num(&r["ns_per_packet"])), 0),
                fmt(r.and_then(|r| num(&r["node_ns"])), 0)
            ));
            values.push(pps.map(|p| p / 1e6));
        }
        let svc = if uses_services(setup) {
            n.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {svc} | {} | {} |",
            setup_label(setup),
            kind_label(kind),
            cells.join(" | ")
        );
        if kind_label(kind) == "IPv4 TCP SYN" {
            chart.push(Row {
                label: if svc == "-" {
                    setup_label(setup).to_string()
                } else {
                    let plural = if n == 1 { "" } else { "s" };
                    format!("{}, {svc} service{plural}", setup_label(setup))
                },
                values,
            });
        }
    }
    let _ = writeln!(
        s,
        "\nThe ceiling and the bare forwarder do not look at flows: one run each, shown in both columns.\n\n![packet rates](bench-pps.svg)\n"
    );
    svgs.push((
        "bench-pps.svg".into(),
        bar_chart(
            "IPv4 TCP packets per second of one CPU (generator + node + sink in lock step)",
            &["established flows", "new flows"],
            &chart,
            "Mpps",
            2,
        ),
    ));
    drops(s, ms);
    ratios(s, v);
    targets(s, v);
    profiles(s, v);
    micro_and_limits(s, svgs, v);
}

/// The datapath's per-path costs (plain test runs) and what the figures cannot say.
fn micro_and_limits(s: &mut String, svgs: &mut Vec<(String, String)>, v: &Value) {
    if let Some(micro) = v["micro"].as_object() {
        let _ = writeln!(s, "### Datapath per-path costs (BPF_PROG_TEST_RUN)\n");
        s.push_str(concat!(
            "`np_xdp` run once per call (repeat = 1) on a fresh copy of its packet, because plain ",
            "test runs reuse the packet buffer and the program rewrites it; the kernel's own timing ",
            "(~10 ns resolution, colder caches than under load). A path counts as proven when the ",
            "datapath's per-CPU counters moved by exactly the number of runs.\n\n",
            "| path | runs | median ns | mean ns | proven by counters |\n|---|---|---|---|---|\n",
        ));
        let mut chart = Vec::new();
        for p in rows(&micro["paths"]) {
            let median = num(&p["median_ns"]);
            let proof = if median.is_none() {
                p["note"].as_str().unwrap_or("").to_string()
            } else if p["proven"].as_bool() == Some(true) {
                let c: Vec<&str> = rows(&p["counters"])
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                if c.is_empty() {
                    "(baseline)".into()
                } else {
                    format!("yes: {}", c.join(", "))
                }
            } else {
                format!("**no**: {}", p["note"].as_str().unwrap_or(""))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {proof} |",
                p["path"].as_str().unwrap_or(""),
                p["runs"],
                fmt(median, 0),
                fmt(num(&p["mean_ns"]), 1)
            );
            chart.push(Row {
                label: p["path"].as_str().unwrap_or("").to_string(),
                values: vec![median],
            });
        }
        let _ = writeln!(s, "\n![per-path costs](bench-micro.svg)\n");
        svgs.push((
            "bench-micro.svg".into(),
            bar_chart(
                "np_xdp cost per path (median)",
                &["median"],
                &chart,
                "ns",
                0,
            ),
        ));
    }

    s.push_str(concat!(
        "### Limits of these figures\n\n",
        "- One 2-vCPU VM whose vCPU placement on the host changes; other work on the machine ",
        "(the JSON records the idle share before each run) disturbs single figures.\n",
        "- Lock step on one CPU measures cost, not the rate a multi-queue NIC would see.\n",
        "- veth, not a NIC: no DMA, no driver; XDP on veth is the only native XDP here.\n",
        "- kube-proxy's rules are written by this harness after its iptables and nftables modes ",
        "(externalTrafficPolicy Cluster, TCP and UDP ports, cluster IP rules included, IPv4), not by kube-proxy ",
        "itself; conntrack in the node namespace has 1 s timeouts for unanswered TCP and UDP ",
        "in new-flow runs (the kernel's defaults in established runs) and no software checksum ",
        "check (a NIC would have verified it).\n",
        "- Every figure is one run; `cargo xtask bench` (without `--quick`) adds 10,000 ",
        "services and longer runs.\n",
        "- The sink's XDP program receives the netfilter configurations' frames as socket ",
        "buffers and the XDP configurations' as XDP frames; the ceiling is an XDP one, so the ",
        "netfilter figures' node ns also carry that difference at the sink.\n",
        "- A node that drops frames is charged the cost of replacing them (an AF_PACKET send ",
        "and a copy into an XDP frame at the generator), and its CPU idles between ticks when ",
        "it drops nearly all of them: its ns/pkt is kernel time over delivered frames.\n",
    ));
}

/// The nodeport datapath's drop counters that moved during runs.
fn drops(s: &mut String, ms: &[Value]) {
    let drops: Vec<String> = ms
        .iter()
        .filter(|m| m["setup"] == "nodeport")
        .filter_map(|m| {
            let c: Vec<String> = rows(&m["datapath"])
                .iter()
                .filter(|kv| kv[0].as_str().is_some_and(|k| k.starts_with("drop_")))
                .map(|kv| format!("{} {}", kv[0].as_str().unwrap_or(""), kv[1]))
                .collect();
            (!c.is_empty()).then(|| {
                format!(
                    "- {} service(s), {}, {}: delivered {} in the measured window, {} frames re-injected; datapath (whole run) {}",
                    m["services"],
                    traffic_label(m["traffic"].as_str().unwrap_or("")),
                    kind_label(&m["kind"]),
                    m["delivered"],
                    m["injected"],
                    c.join(", ")
                )
            })
        })
        .collect();
    if !drops.is_empty() {
        let _ = writeln!(s, "Drops counted by the nodeport datapath:\n");
        for d in drops {
            let _ = writeln!(s, "{d}");
        }
        s.push('\n');
    }
}

fn ratios(s: &mut String, v: &Value) {
    let _ = writeln!(s, "### nodeport against the others (same run)\n\nRates: nodeport's Mpps over the other's. Costs: the other's node ns over nodeport's (how many times cheaper nodeport is per packet).\n\n| services | traffic | frames | nodeport node ns | rate / bare | rate / iptables | rate / nftables | cost iptables / nodeport | cost nftables / nodeport |\n|---|---|---|---|---|---|---|---|---|");
    for r in rows(&v["ratios"]) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["services"],
            traffic_label(r["traffic"].as_str().unwrap_or("")),
            kind_label(&r["kind"]),
            fmt(num(&r["node_ns"]), 0),
            fmt(num(&r["vs_bare"]), 2),
            fmt(num(&r["vs_iptables"]), 2),
            fmt(num(&r["vs_nftables"]), 2),
            fmt(num(&r["cost_iptables"]), 2),
            fmt(num(&r["cost_nftables"]), 2)
        );
    }
}

fn targets(s: &mut String, v: &Value) {
    let _ = writeln!(s, "\n### Targets (IPv4 TCP; reported, never asserted)\n\n| target | value | goal | |\n|---|---|---|---|");
    for t in rows(&v["targets"]) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t["what"].as_str().unwrap_or(""),
            fmt(num(&t["value"]), 2),
            t["goal"].as_str().unwrap_or(""),
            match t["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            }
        );
    }
    s.push('\n');
}

/// Where nodeport's time goes: BPF statistics per program, calls in each program's code,
/// perf samples per kernel symbol.
fn profiles(s: &mut String, v: &Value) {
    for p in rows(&v["profile"]) {
        let _ = writeln!(
            s,
            "### Where the time goes: nodeport, {} services, {}, {}\n\n{} ns/pkt in all (generator + node + sink). Programs (kernel BPF statistics; runs per delivered packet, mean run time) and the calls their translated code contains:\n\n| program | runs/pkt | ns/run | helper and BPF-to-BPF calls in the code |\n|---|---|---|---|",
            p["services"],
            traffic_label(p["traffic"].as_str().unwrap_or("")),
            kind_label(&p["kind"]),
            fmt(num(&p["ns_per_packet"]), 0)
        );
        for g in rows(&p["programs"]) {
            let calls: Vec<String> = g["calls"]
                .as_object()
                .map(|o| o.iter().map(|(k, n)| format!("{k} x{n}")).collect())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                g["program"].as_str().unwrap_or(""),
                fmt(num(&g["runs_per_packet"]), 2),
                fmt(num(&g["ns_per_run"]), 0),
                calls.join(", ")
            );
        }
        let _ = writeln!(s, "\nKernel symbols over 0.5% of the busy kernel samples (`perf record -e cpu-clock:k -a` over the measured window, idle samples taken out), as a share and as ns per delivered packet:\n\n| share | ns/pkt | symbol |\n|---|---|---|");
        for x in rows(&p["symbols"]) {
            let _ = writeln!(
                s,
                "| {}% | {} | `{}` |",
                fmt(num(&x["percent"]), 2),
                fmt(num(&x["ns_per_packet"]), 1),
                x["symbol"].as_str().unwrap_or("")
            );
        }
        if let Some(n) = p["note"].as_str().filter(|n| !n.is_empty()) {
            let _ = writeln!(s, "\nNot measured: {n}");
        }
        s.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{render as render_doc, Provenance};

    fn m(
        setup: &str,
        services: u64,
        traffic: &str,
        pps: f64,
        node: Option<f64>,
    ) -> serde_json::Value {
        json!({"setup": setup, "services": services, "traffic": traffic, "pps": pps,
               "ns_per_packet": 1e9 / pps, "node_ns": node, "sent": 10, "delivered": 10,
               "injected": 0, "datapath": [], "kind": {"ipv6": false, "udp": false}})
    }

    #[test]
    fn renders_tables_plots_and_targets() {
        let pkt = json!({
            "quick": true, "endpoints": 16, "duration_s": 1.5, "warmup_s": 0.5,
            "measurements": [
                m("ceiling", 1, "established", 10e6, None),
                m("nodeport", 1000, "established", 5e6, Some(100.0)),
                m("nodeport", 1000, "new_flows", 1e6, Some(900.0)),
            ],
            "ratios": [{"services": 1000, "traffic": "new_flows", "kind": {"ipv6": false, "udp": false},
                        "node_ns": 900.0, "vs_bare": 0.5, "vs_iptables": 3.0, "vs_nftables": null,
                        "cost_iptables": 2.5, "cost_nftables": null}],
            "targets": [{"what": "x", "value": 0.5, "goal": ">= 0.9", "met": false}],
            "profile": [{"services": 1000, "traffic": "established", "kind": {"ipv6": false, "udp": false},
                         "ns_per_packet": 400.0, "note": "",
                         "programs": [{"program": "np_xdp", "runs_per_packet": 1.0, "ns_per_run": 120.0,
                                       "calls": {"bpf_fib_lookup": 2, "(bpf-to-bpf)": 3}}],
                         "symbols": [{"symbol": "[k] veth_xdp_rcv", "percent": 12.5, "ns_per_packet": 50.0}]}],
            "micro": {"paths": [{"path": "reply", "runs": 5, "median_ns": 130.0, "mean_ns": 131.0,
                                 "proven": true, "counters": ["event_reply"], "note": ""},
                                {"path": "session affinity", "runs": 0, "median_ns": null, "mean_ns": null,
                                 "proven": false, "counters": [], "note": "not measured: session affinity not in this build"}]}
        });
        let p = Provenance {
            quick: true,
            machine: "test".into(),
            commands: vec!["cmd".into()],
        };
        let (md, svgs) = render_doc(None, Some(&pkt), &p);
        assert!(md.contains("`cargo xtask bench --quick`"));
        assert!(
            md.contains(
                "| nodeport | 1000 | IPv4 TCP SYN | 5.00 | 200 | 100 | 1.00 | 1000 | 900 |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| 1000 | new flows | IPv4 TCP SYN | 900 | 0.50 | 3.00 | n/a | 2.50 | n/a |"
            ),
            "{md}"
        );
        assert!(md.contains("**missed**"));
        assert!(
            md.contains("| np_xdp | 1.00 | 120 | (bpf-to-bpf) x3, bpf_fib_lookup x2 |"),
            "{md}"
        );
        assert!(
            md.contains("| 12.50% | 50.0 | `[k] veth_xdp_rcv` |"),
            "{md}"
        );
        assert!(md.contains("not measured: session affinity not in this build"));
        let names: Vec<&str> = svgs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bench-pps.svg", "bench-micro.svg"]);
        assert!(md.contains("## Control plane\n\nNot measured"));
    }
}
