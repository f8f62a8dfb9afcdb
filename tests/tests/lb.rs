//! LoadBalancer and external IPs end to end: `status.loadBalancer.ingress[].ip` and
//! `spec.externalIPs` are frontends on the service `port`, balanced like nodePorts. The
//! client reaches them through node1 (a /32 route, as an upstream router would send them).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tests::{
    client,
    manifests::{write_atomic, IpFamily, LB_SERVICE},
    netns::require_root,
    testbed::{
        all_ok, assert_cluster_policy_addresses, backends, default_agent_path, echo_path, names,
        poll_until, Testbed, TestbedOptions,
    },
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

#[test]
fn load_balancer_and_external_ips_are_frontends_on_the_service_port() {
    if !require_root() {
        return;
    }
    let tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    write_atomic(tb.manifest_dir(), "50-lb-svc.yaml", LB_SERVICE).expect("write manifest");
    for ip in ["198.18.0.100", "198.18.0.101"] {
        tb.cluster()
            .client()
            .ip(&format!("route add {ip}/32 via 198.18.0.11"));
    }
    for frontend in [
        "198.18.0.100:8080",
        "198.18.0.101:8080",
        "198.18.0.12:31080",
    ] {
        let addr: SocketAddr = frontend.parse().unwrap();
        let up = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
            client::http_get(tb.cluster().client(), addr).is_ok()
        });
        assert!(up, "{frontend} never answered\n{}", tb.agent_logs());
        // Both endpoints are reached; the one on the node where the traffic enters (node1
        // for the LB addresses) sees the client, the other one that node's address.
        let rs = all_ok(
            &tb,
            frontend,
            client::http_get_many(tb.cluster().client(), addr, 40),
        );
        assert_eq!(backends(&rs), names(&["pa1", "pb1"]), "{frontend}");
        let entry = if frontend.starts_with("198.18.0.12") {
            "node2"
        } else {
            "node1"
        };
        assert_cluster_policy_addresses(tb.cluster(), entry, IpFamily::V4, &rs);
    }
}

/// `LB_SERVICE` with `spec.loadBalancerSourceRanges` (none when empty).
fn lb_service_with_ranges(ranges: &[&str]) -> String {
    if ranges.is_empty() {
        return LB_SERVICE.to_string();
    }
    let list = ranges.join(", ");
    LB_SERVICE.replacen(
        "  externalIPs: [198.18.0.101]\n",
        &format!("  externalIPs: [198.18.0.101]\n  loadBalancerSourceRanges: [{list}]\n"),
        1,
    )
}

#[test]
fn source_ranges_guard_the_load_balancer_ips_only() {
    if !require_root() {
        return;
    }
    let tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    let client_ip = tb.cluster().client_ip();
    let write = |ranges: &[&str]| {
        write_atomic(
            tb.manifest_dir(),
            "50-lb-svc.yaml",
            &lb_service_with_ranges(ranges),
        )
        .expect("write manifest")
    };
    for ip in ["198.18.0.100", "198.18.0.101"] {
        tb.cluster()
            .client()
            .ip(&format!("route add {ip}/32 via 198.18.0.11"));
    }
    let lb: SocketAddr = "198.18.0.100:8080".parse().unwrap();
    let external_ip: SocketAddr = "198.18.0.101:8080".parse().unwrap();
    let node_port: SocketAddr = "198.18.0.11:31080".parse().unwrap();
    let answers = |addr: SocketAddr| client::http_get(tb.cluster().client(), addr).is_ok();
    let wait = |addr: SocketAddr, want: bool| {
        poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
            answers(addr) == want
        })
    };

    // The client's own /32 is allowed.
    let own = format!("{client_ip}/32");
    write(&["198.18.200.0/24", &own]);
    assert!(
        wait(lb, true),
        "allowed client refused\n{}",
        tb.agent_logs()
    );

    // A list without the client: the LB IP drops it (counted), the nodePort and the
    // external IP do not (kube-proxy filters LoadBalancer IPs only).
    write(&["198.18.200.0/24"]);
    assert!(
        wait(lb, false),
        "client outside the ranges still served\n{}",
        tb.agent_logs()
    );
    assert!(
        answers(node_port),
        "source ranges must not apply to the nodePort"
    );
    assert!(
        answers(external_ip),
        "source ranges must not apply to the external IP\n{}",
        tb.agent_logs()
    );
    assert!(
        tb.counter("node1", "drop_source_range") > 0,
        "source-range drops not counted on node1"
    );

    // A prefix covering the client (longest-prefix match inside a wider list) and then no
    // list at all: served again.
    write(&["198.18.200.0/24", "198.18.0.0/16"]);
    assert!(
        wait(lb, true),
        "client inside 198.18.0.0/16 refused\n{}",
        tb.agent_logs()
    );
    write(&["198.18.200.0/24"]);
    assert!(wait(lb, false));
    write(&[]);
    assert!(
        wait(lb, true),
        "no list must allow everyone\n{}",
        tb.agent_logs()
    );
}
