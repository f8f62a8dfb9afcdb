//! Bulk TCP through a backend on another node (Cluster policy): 10 MB up and the same 10
//! MB echoed back, verified byte for byte, through each node. On a lan of default veths
//! (`NP_LAN=veth`: senders with tx offload hand over CHECKSUM_PARTIAL packets, GRO merges
//! segments) this is what a translation that mishandles partial checksums or merged
//! packets breaks: transfers stall or arrive short. On a VXLAN pod network
//! (`NP_PODNET=vxlan`) the bytes must cross the receiving node's flannel.1 both ways. Needs
//! root.

use std::time::Duration;

use tests::{
    client,
    cluster::PodNet,
    netns::require_root,
    testbed::{default_agent_path, echo_path, Testbed, TestbedOptions},
};

const SIZE: usize = 10 * 1024 * 1024;

/// 10 MB each way through a pod of the other node, via each node.
fn through_remote_backends(tb: &Testbed) {
    let data = client::pattern(SIZE, 0x9e37_79b9_7f4a_7c15);
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr(node);
        // New connections until Maglev picks a pod of the other node (two of three pods
        // via node2, one via node1: 40 tries miss with odds below 1e-7).
        let mut done = false;
        for _ in 0..40 {
            let tunnel_before = (tb.cluster().spec().podnet == PodNet::Vxlan)
                .then(|| tb.cluster().tunnel_counters(node));
            let (from, back) = client::http_echo(tb.cluster().client(), addr, &data)
                .unwrap_or_else(|e| panic!("bulk transfer via {node}: {e}\n{}", tb.agent_logs()));
            if tb.cluster().pod_node(&from) == node {
                continue;
            }
            assert_eq!(
                back.len(),
                SIZE,
                "via {node} to {from}: {} of {SIZE} bytes came back",
                back.len()
            );
            let first_bad = back.iter().zip(&data).position(|(a, b)| a != b);
            assert_eq!(first_bad, None, "via {node} to {from}: bytes differ");
            if let Some(before) = tunnel_before {
                // On a VXLAN pod network both directions crossed flannel.1 of the node
                // the client talked to.
                let after = tb.cluster().tunnel_counters(node);
                let (tx, rx) = (
                    after.tx_bytes - before.tx_bytes,
                    after.rx_bytes - before.rx_bytes,
                );
                assert!(
                    tx >= SIZE as u64 && rx >= SIZE as u64,
                    "via {node} to {from}: {node}'s flannel.1 sent {tx} and received {rx} \
                     bytes for {SIZE} each way"
                );
            }
            done = true;
            break;
        }
        assert!(
            done,
            "no connection via {node} reached a pod of another node"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ten_megabytes_each_way_through_a_remote_backend() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let tb = Testbed::serving(TestbedOptions::standard(echo).with_agent(default_agent_path()));
    through_remote_backends(&tb);
}

/// `--xdp-mode generic` is served by TC alone (generic XDP would see GRO-merged packets
/// with partial checksums): the log says so, and bulk transfers arrive whole.
#[test]
fn generic_mode_is_served_by_tc_and_delivers_bulk() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut opts = TestbedOptions::standard(echo).with_agent(default_agent_path());
    opts.agent_args = vec!["--xdp-mode".into(), "generic".into()];
    let tb = Testbed::serving(opts);
    for node in ["node1", "node2"] {
        let log = tb.agent_log(node);
        assert!(
            log.contains("path=Tc") && log.contains("generic XDP runs after GRO"),
            "{log}"
        );
    }
    through_remote_backends(&tb);
}
