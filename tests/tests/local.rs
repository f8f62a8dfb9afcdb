//! `externalTrafficPolicy: Local` end to end: each node balances only over its own
//! endpoints and the backend sees the client's own address; a node without a local
//! endpoint drops the traffic (counted) instead of forwarding it to another node.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use tests::{
    client::{self, KeepAliveConn},
    cluster::IpFamily,
    netns::require_root,
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

#[test]
fn local_policy_keeps_the_client_address_and_stays_on_the_node() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service.external_traffic_policy = Some("Local".into());
    let mut tb = Testbed::serving(opts);
    let client_ip = tb.cluster().client_ip().to_string();

    for (node, local) in [
        ("node1", ["pa1", "pa2"].as_slice()),
        ("node2", ["pb1"].as_slice()),
    ] {
        let mut seen = BTreeSet::new();
        for r in client::http_get_many(tb.cluster().client(), tb.nodeport_addr(node), 30) {
            let r = r.unwrap_or_else(|e| panic!("via {node}: {e}\n{}", tb.agent_logs()));
            assert_eq!(
                r.client_ip.to_string(),
                client_ip,
                "Local policy must keep the client address"
            );
            seen.insert(r.from);
        }
        let want: BTreeSet<String> = local.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, want, "via {node}: only that node's endpoints");
    }

    // node2 loses its only endpoint: it must drop, not forward to node1's pods.
    tb.remove_endpoint("pb1");
    let dropped = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        client::http_get(tb.cluster().client(), tb.nodeport_addr("node2")).is_err()
    });
    assert!(
        dropped,
        "node2 still answers without a local endpoint\n{}",
        tb.agent_logs()
    );
    // Dropped (the client times out), not refused by node2's own stack.
    let err = client::http_get(tb.cluster().client(), tb.nodeport_addr("node2"))
        .expect_err("node2 answered");
    assert!(
        err.is_timeout(),
        "node2 without a local endpoint must drop (client times out), got: {err}"
    );
    // node1 is unaffected.
    assert!(client::http_get(tb.cluster().client(), tb.nodeport_addr("node1")).is_ok());
}

#[test]
fn switching_between_cluster_and_local_keeps_established_connections() {
    if !require_root() {
        return;
    }
    let opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    let mut tb = Testbed::serving(opts);
    let client_ip = tb.cluster().client_ip().to_string();
    let node1 = tb.nodeport_addr("node1");
    // What node2's pod sees of node1's source-NATed flows: node1's lan address, or its
    // tunnel's on a VXLAN pod network.
    let node1_ip = tb
        .cluster()
        .remote_pod_source("node1", IpFamily::V4)
        .to_string();

    // Under Cluster: one kept-alive connection to node2's pod (source-NATed to node1) and
    // one to a pod of node1 (client address kept).
    let mut remote = None;
    let mut local = None;
    for _ in 0..60 {
        let mut c = KeepAliveConn::connect(tb.cluster().client(), node1).expect("connect");
        let r = c.request().expect("first request");
        match r.from.as_str() {
            "pb1" if remote.is_none() => remote = Some((c, r)),
            "pa1" | "pa2" if local.is_none() => local = Some((c, r)),
            _ => {}
        }
        if remote.is_some() && local.is_some() {
            break;
        }
    }
    let (mut remote, r0) = remote.expect("no connection reached pb1");
    let (mut local, l0) = local.expect("no connection reached node1's pods");
    assert_eq!(r0.client_ip.to_string(), node1_ip);
    assert_eq!(l0.client_ip.to_string(), client_ip);

    let set_policy = |tb: &mut Testbed, p: &str| {
        tb.update_manifests(|m| m.service.external_traffic_policy = Some(p.into()));
        let local = p == "Local";
        let done = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            tb.nodeport_policy_is("node1", nodeport_common::PROTO_TCP, local)
        });
        assert!(done, "policy {p} never programmed\n{}", tb.agent_logs());
    };

    set_policy(&mut tb, "Local");
    // Established connections keep their backend and their translation...
    for _ in 0..3 {
        let r = remote
            .request()
            .expect("the connection to pb1 broke at the switch");
        assert_eq!(
            (r.from.as_str(), r.client_ip.to_string()),
            ("pb1", node1_ip.clone())
        );
        let l = local
            .request()
            .expect("the connection to node1's pod broke");
        assert_eq!(
            (&l.from, l.client_ip.to_string()),
            (&l0.from, client_ip.clone())
        );
    }
    // ...while new connections stay on node1 and keep the client address.
    let mut seen = BTreeSet::new();
    for r in client::http_get_many(tb.cluster().client(), node1, 20) {
        let r = r.expect("new connection under Local");
        assert_eq!(r.client_ip.to_string(), client_ip);
        seen.insert(r.from);
    }
    assert!(
        seen.iter().all(|p| p.starts_with("pa")),
        "under Local: {seen:?}"
    );

    // Back to Cluster: connections opened under either policy go on; new ones reach pb1.
    let mut local2 = KeepAliveConn::connect(tb.cluster().client(), node1).expect("connect");
    let l2 = local2.request().expect("request under Local");
    set_policy(&mut tb, "Cluster");
    for c in [&mut remote, &mut local, &mut local2] {
        c.request()
            .expect("an established connection broke at the switch back");
    }
    assert_eq!(local2.request().unwrap().from, l2.from);
    let reached = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        client::http_get(tb.cluster().client(), node1).is_ok_and(|r| r.from == "pb1")
    });
    assert!(
        reached,
        "under Cluster again, node2's pod gets no new connection"
    );
}
