//! ICMP errors about translated flows reach the client as the client's own: a UDP client of
//! a nodePort whose backends do not listen on the target port learns "connection refused",
//! whether the backend is on the node the client used (its error leaves through TC egress)
//! or on the other node (the error comes back to the SNAT address and XDP translates it).
//!
//! The nodes' own stacks would refuse an unserved nodePort with the very same ICMP error,
//! so the test stops them from sending any (a netfilter OUTPUT rule, which neither the
//! pods' forwarded errors nor XDP's transmitted ones pass): every refusal the client sees
//! is a backend's, translated.

use std::path::PathBuf;

use tests::{
    client,
    manifests::{Protocol, ServicePort},
    netns::require_root,
    testbed::{default_agent_path, echo_path, Testbed, TestbedOptions},
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// A UDP port nothing listens on in the pods.
const CLOSED_PORT: u16 = 9;
/// The closed port's nodePort.
const NODE_PORT: u16 = 30090;
/// Requests per node: enough to reach local and remote backends alike.
const REQUESTS: usize = 12;

#[test]
fn udp_clients_see_port_unreachable_from_local_and_remote_backends() {
    if !require_root() {
        return;
    }
    let mut tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    for node in ["node1", "node2"] {
        let ns = tb.cluster().node(node).ns();
        ns.exec(&["nft", "add", "table", "ip", "np_icmp_test"]);
        ns.exec(&[
            "nft",
            "add chain ip np_icmp_test out { type filter hook output priority 0; }",
        ]);
        ns.exec(&[
            "nft",
            "add rule ip np_icmp_test out icmp type destination-unreachable drop",
        ]);
    }
    // The pods answer every datagram: no ICMP rate limit (a burst of 6 per destination by
    // default) to tell apart from a lost translation.
    for pod in tb.cluster().pods() {
        pod.ns().sysctl("net.ipv4.icmp_ratelimit", "0");
    }
    tb.update_manifests(|m| {
        m.service.ports.push(ServicePort {
            name: "closed".into(),
            protocol: Protocol::Udp,
            port: 9090,
            target_port: CLOSED_PORT,
            node_port: NODE_PORT,
        })
    });
    for node in ["node1", "node2"] {
        let mut addr = tb.nodeport_addr(node);
        addr.set_port(NODE_PORT);
        // The UDP frontend appears with the next sync (until then nobody answers).
        let first = tests::testbed::poll_until(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(200),
            || client::udp_refused(tb.cluster().client(), addr).unwrap_or(false),
        );
        assert!(first, "no refusal via {node}\n{}", tb.agent_logs());
        for i in 0..REQUESTS {
            let refused = client::udp_refused(tb.cluster().client(), addr)
                .unwrap_or_else(|e| panic!("request {i} via {node}: {e}"));
            assert!(
                refused,
                "request {i} via {node}: no ICMP port unreachable reached the client's socket\n{}",
                tb.agent_logs()
            );
        }
    }
}
