//! Node addresses are followed: an address added to a node's interface starts taking
//! nodePort traffic within the agent's refresh period, and stops when it is removed.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tests::{
    client,
    netns::require_root,
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

#[test]
fn added_and_removed_node_addresses_are_followed() {
    if !require_root() {
        return;
    }
    let tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    let extra: SocketAddr = "198.18.0.21:30080".parse().unwrap();
    let node1 = tb.cluster().node("node1").ns();
    // Not yet an address of node1: nothing answers there.
    assert!(client::http_get(tb.cluster().client(), extra).is_err());

    node1.ip("addr add 198.18.0.21/24 dev lan0");
    let served = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        client::http_get(tb.cluster().client(), extra).is_ok()
    });
    assert!(served, "new node address never served\n{}", tb.agent_logs());

    node1.ip("addr del 198.18.0.21/24 dev lan0");
    let gone = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        client::http_get(tb.cluster().client(), extra).is_err()
    });
    assert!(
        gone,
        "removed node address still served\n{}",
        tb.agent_logs()
    );
    // The node's own address kept working throughout.
    assert!(client::http_get(tb.cluster().client(), tb.nodeport_addr("node1")).is_ok());
}
