//! `externalTrafficPolicy: Local` end to end: each node balances only over its own
//! endpoints and the backend sees the client's own address; a node without a local
//! endpoint drops the traffic (counted) instead of forwarding it to another node.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use tests::{
    client,
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
    // node1 is unaffected.
    assert!(client::http_get(tb.cluster().client(), tb.nodeport_addr("node1")).is_ok());
}
