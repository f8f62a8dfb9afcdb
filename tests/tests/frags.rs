//! Fragmented UDP end to end: a 4,000-byte request (three IPv4 fragments at MTU 1500) to a
//! nodePort, answered by the backend with the request echoed (three fragments back), under
//! `externalTrafficPolicy: Cluster` (remote backends source-NATed, both directions
//! translated in XDP or TC on node1's uplink; local ones delivered through the stack and
//! their fragmented answers restored in TC egress) and `Local`. Every fragment must take
//! its first fragment's translation: the client gets the whole answer, from the frontend
//! address (its socket is connected), and the backend saw the address the policy promises.
//! IPv6 fragments are not translated (docs/architecture.md states the rule), so IPv4 only.

use std::{path::PathBuf, time::Duration};

use tests::{
    client,
    cluster::IpFamily,
    netns::require_root,
    testbed::{
        assert_cluster_policy_addresses, default_agent_path, echo_path, poll_until, Testbed,
        TestbedOptions,
    },
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// Request size: more than two MTU 1500 fragments' worth of UDP payload.
const SIZE: usize = 4000;
/// Requests per node and policy (fresh sockets: new flows, new backend choices).
const REQUESTS: usize = 24;

/// `REQUESTS` fragmented requests through `node`, each answered in full; the replies.
fn big_requests(tb: &Testbed, node: &str) -> Vec<client::EchoReply> {
    let addr = tb.nodeport_addr(node);
    (0..REQUESTS)
        .map(|i| {
            let data: Vec<u8> = (0..SIZE).map(|j| (i * 7 + j) as u8 % 251).collect();
            let (reply, echoed) = client::udp_echo(tb.cluster().client(), addr, &data)
                .unwrap_or_else(|e| {
                    panic!(
                        "{SIZE}-byte UDP request {i} via {node}: {e}\nnode1 counters: \
                         pass_frag_out_of_order={} event_frag_later={}\n{}",
                        tb.counter("node1", "pass_frag_out_of_order"),
                        tb.counter("node1", "event_frag_later"),
                        tb.agent_logs()
                    )
                });
            assert_eq!(echoed.len(), SIZE, "via {node}: answer length");
            assert!(
                echoed == data,
                "via {node}: answer bytes differ from the request"
            );
            reply
        })
        .collect()
}

#[test]
fn fragmented_udp_requests_and_answers_under_both_policies() {
    if !require_root() {
        return;
    }
    let opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    let mut tb = Testbed::serving(opts);
    let later = tb.counter("node1", "event_frag_later");

    // Cluster: through each node, local backends see the client, remote ones the node.
    for node in ["node1", "node2"] {
        let replies = big_requests(&tb, node);
        assert_cluster_policy_addresses(tb.cluster(), node, IpFamily::V4, &replies);
    }
    assert!(
        tb.counter("node1", "event_frag_later") > later,
        "node1 translated no later fragment"
    );

    // Local: only the node's own backends, which see the client's address.
    tb.update_manifests(|m| m.service.external_traffic_policy = Some("Local".into()));
    let local = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        ["node1", "node2"]
            .iter()
            .all(|n| tb.nodeport_policy_is(n, nodeport_common::PROTO_UDP, true))
    });
    assert!(local, "Local policy never programmed\n{}", tb.agent_logs());
    let client_ip = tb.cluster().client_ip();
    for (node, pods) in [("node1", ["pa1", "pa2"].as_slice()), ("node2", &["pb1"])] {
        for r in big_requests(&tb, node) {
            assert!(
                pods.contains(&r.from.as_str()),
                "via {node}: answered by {}",
                r.from
            );
            assert_eq!(
                r.client_ip, client_ip,
                "via {node}: Local keeps the client address"
            );
        }
    }
    assert_eq!(
        tb.counter("node1", "pass_frag_out_of_order"),
        0,
        "fragments came out of order on the lan"
    );
}
