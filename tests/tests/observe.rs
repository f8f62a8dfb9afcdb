//! Observability end to end: the agent's /readyz and /healthz answer inside the node,
//! /metrics moves with real traffic sent through the nodePort, and `inspect` and /metrics
//! name the Service beside its numeric id.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use tests::{
    client,
    cluster::LanKind,
    netns::{require_root, run_in},
    testbed::{default_agent_path, echo_path, Testbed, TestbedOptions},
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// GET `path` from 127.0.0.1:`port` inside `node`'s namespace: (status code, body).
fn get(tb: &Testbed, node: &str, port: u16, path: &str) -> (u16, String) {
    run_in(tb.cluster().node(node).ns(), || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the agent");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read response");
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
}

/// The value of the sample `name` (labels included, exactly as exposed).
fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

#[test]
fn health_readiness_and_metrics_follow_traffic() {
    if !require_root() {
        return;
    }
    let tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));

    let (code, body) = get(&tb, "node1", 10256, "/readyz");
    assert_eq!(code, 200, "readyz after the first sync: {body}");
    let (code, body) = get(&tb, "node1", 10256, "/healthz");
    assert_eq!(code, 200, "healthz: {body}");
    assert!(body.contains("lastUpdated"), "healthz body: {body}");

    let new_flows = "nodeport_datapath_events_total{event=\"new_flow\"}";
    let (_, before) = get(&tb, "node1", 10249, "/metrics");
    let n = 25;
    let replies = client::http_get_many(tb.cluster().client(), tb.nodeport_addr("node1"), n);
    assert!(
        replies.iter().all(|r| r.is_ok()),
        "requests failed: {replies:?}"
    );
    let (code, after) = get(&tb, "node1", 10249, "/metrics");
    assert_eq!(code, 200);
    let grew = sample(&after, new_flows) - sample(&before, new_flows);
    assert!(
        grew >= n as u64,
        "{n} connections but new_flow grew by {grew}\n{after}"
    );
    assert!(
        sample(&after, "nodeport_conntrack_entries") >= n as u64,
        "conntrack gauge:\n{after}"
    );
    assert_eq!(sample(&after, "nodeport_conntrack_capacity"), 262_144);
    // One reverse-NAT entry per translated flow, local or source-NATed.
    assert!(
        sample(&after, "nodeport_revnat_entries") >= n as u64,
        "revnat gauge:\n{after}"
    );
    assert_eq!(sample(&after, "nodeport_revnat_capacity"), 262_144);
    assert_eq!(sample(&after, "nodeport_ready"), 1);
    assert!(sample(&after, "nodeport_syncs_total") >= 1);
    // sample-nodeport serves TCP and UDP on nodePort 30080: two service ports.
    assert_eq!(sample(&after, "nodeport_services"), 2);
    // Per service port, by name: the three echo pods take new flows, none drains.
    for (port, proto) in [("http-port", "TCP"), ("udp-port", "UDP")] {
        let labels = format!(
            "{{namespace=\"default\",service=\"sample-nodeport\",port=\"{port}\",protocol=\"{proto}\",family=\"IPv4\"}}"
        );
        let line = format!("nodeport_service_backends{labels} 3");
        assert!(
            after.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{after}"
        );
        let line = format!("nodeport_service_endpoints_draining{labels} 0");
        assert!(
            after.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{after}"
        );
    }

    // `inspect` reads the same maps with its own handles.
    let pin = tb
        .agents()
        .iter()
        .find(|a| a.node == "node1")
        .expect("agent")
        .pin_path()
        .to_path_buf();
    let inspect_text = |args: &[&str]| -> String {
        let out = Command::new(default_agent_path())
            .arg("inspect")
            .arg("--pin-path")
            .arg(&pin)
            .args(args)
            .output()
            .expect("run inspect");
        assert!(
            out.status.success(),
            "inspect {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("inspect prints UTF-8")
    };
    let inspect = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&inspect_text(&all)).expect("inspect prints JSON")
    };
    let services = inspect(&["services"]);
    let tcp = services
        .as_array()
        .and_then(|a| a.iter().find(|f| f["frontend"] == "*:30080/TCP"))
        .unwrap_or_else(|| panic!("no *:30080/TCP frontend in {services}"));
    let mut backends: Vec<String> = tcp["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["address"].as_str().unwrap_or_default().to_string())
        .collect();
    backends.sort();
    assert_eq!(
        backends,
        ["198.19.1.10:80", "198.19.1.11:80", "198.19.2.10:80"]
    );
    let slots: u64 = tcp["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(
        slots,
        tcp["table_size"].as_u64().unwrap(),
        "every slot owned by a backend"
    );
    // The Service is named beside its id, in the table and in JSON.
    let tcp_name = "default/sample-nodeport:http-port/TCP";
    assert_eq!(
        tcp["service"],
        tcp_name,
        "{tcp}\nagent log:\n{}",
        tb.agent_log("node1")
    );
    let table = inspect_text(&["services"]);
    let svc_id = tcp["svc_id"].as_u64().unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("*:30080/TCP "))
        .unwrap_or_else(|| panic!("no *:30080/TCP row in\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[..3],
        ["*:30080/TCP", &svc_id.to_string(), tcp_name],
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("*:30080/UDP ")
            && l.contains(" default/sample-nodeport:udp-port/UDP ")),
        "{table}"
    );
    let flows = inspect(&["conntrack", "--client", "198.18.0.10", "--port", "30080"]);
    let flows = flows.as_array().expect("flows");
    assert!(
        flows.len() >= n,
        "{} flows from the client after {n} connections",
        flows.len()
    );
    assert!(flows
        .iter()
        .all(|f| f["client"].as_str().unwrap().starts_with("198.18.0.10:")));
    // Each flow names its service port: the connections above, and the testbed's UDP
    // probes of the same nodePort.
    let udp_name = "default/sample-nodeport:udp-port/UDP";
    let name_of = |proto: &str| if proto == "UDP" { udp_name } else { tcp_name };
    assert!(
        flows
            .iter()
            .all(|f| f["service"] == name_of(f["protocol"].as_str().unwrap())),
        "flows not named by their service port: {flows:?}"
    );
    assert!(
        flows.iter().filter(|f| f["service"] == tcp_name).count() >= n,
        "{flows:?}"
    );
    // The conntrack table names the service of each flow between frontend and backend.
    let table = inspect_text(&["conntrack", "--client", "198.18.0.10", "--port", "30080"]);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(rows.len() >= n, "{table}");
    let frontend = tb.nodeport_addr("node1").to_string();
    for row in rows {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols[2..4],
            [frontend.as_str(), name_of(cols[0])],
            "a flow without its service:\n{table}"
        );
    }
    let counters = inspect(&["counters"]);
    assert!(
        counters["event_new_flow"].as_u64().unwrap() >= n as u64,
        "{counters}"
    );
}

/// Per-packet datapath logs (aya-log) appear only with `--debug-datapath`, and name the
/// flow and its verdict; without the switch the agent logs no packets.
#[test]
fn per_packet_logs_only_with_the_debug_switch() {
    if !require_root() {
        return;
    }
    let line = "np 198.18.0.10:";
    for debug in [false, true] {
        let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
        if debug {
            opts.agent_args.push("--debug-datapath".into());
        }
        let tb = Testbed::serving(opts);
        let replies = client::http_get_many(tb.cluster().client(), tb.nodeport_addr("node1"), 5);
        assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
        let logged =
            tests::testbed::poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
                tb.agent_log("node1").contains(line)
            });
        let log = tb.agent_log("node1");
        if debug {
            assert!(logged, "no per-packet log with --debug-datapath:\n{log}");
            // XDP logs the packets it passes as they came; TC alone logs them translated.
            let want = match tb.cluster().spec().lan {
                LanKind::Wire => "-> 198.18.0.11:30080 proto 6",
                LanKind::DefaultVeth => " proto 6 tc_nat",
            };
            assert!(log.contains(want), "{log}");
        } else {
            assert!(!logged, "per-packet logs without the debug switch:\n{log}");
        }
    }
}
