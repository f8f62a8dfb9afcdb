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

/// Addresses on kube-ipvs0 (where IPVS-mode kube-proxy binds Service addresses; a bridge
/// here, since the test kernel may lack the dummy driver) and
/// link-local addresses never take nodePorts; an address on another interface does.
#[test]
fn service_devices_and_link_local_addresses_take_no_nodeports() {
    if !require_root() {
        return;
    }
    let tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    let node1 = tb.cluster().node("node1").ns();
    let client = tb.cluster().client();
    for dev in ["kube-ipvs0", "dummy7"] {
        node1.ip(&format!("link add {dev} type bridge"));
        node1.ip(&format!("link set {dev} up"));
    }
    for (dev, ip) in [
        ("kube-ipvs0", "198.18.50.1"),
        ("dummy7", "198.18.50.2"),
        ("dummy7", "169.254.50.3"),
    ] {
        node1.ip(&format!("addr add {ip}/32 dev {dev}"));
        client.ip(&format!("route add {ip}/32 via 198.18.0.11"));
    }
    let at = |ip: &str| -> SocketAddr { format!("{ip}:30080").parse().unwrap() };
    // The ordinary address shows the agent has taken in the new addresses.
    let served = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        client::http_get(client, at("198.18.50.2")).is_ok()
    });
    assert!(
        served,
        "address on dummy7 never served\n{}",
        tb.agent_logs()
    );
    for ip in ["198.18.50.1", "169.254.50.3"] {
        assert!(
            client::http_get(client, at(ip)).is_err(),
            "{ip} must take no nodePort traffic\n{}",
            tb.agent_logs()
        );
    }
}

/// With room for one IPv4 node address, the uplink's address is kept, the others are
/// left out and named in the log.
#[test]
fn addresses_that_do_not_fit_are_named_and_the_uplinks_kept() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.agent_args = vec!["--max-node-addresses".into(), "1".into()];
    let tb = Testbed::serving(opts);
    let node1 = tb.cluster().node("node1").ns();
    node1.ip("link add dummy8 type bridge");
    node1.ip("link set dummy8 up");
    // Sorts before the uplink's 198.18.0.11: a choice in address order would keep it.
    node1.ip("addr add 10.99.0.1/32 dev dummy8");
    let named = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let log = tb.agent_log("node1");
        log.contains("node addresses do not fit") && log.contains("10.99.0.1")
    });
    assert!(
        named,
        "left-out address not logged\n{}",
        tb.agent_log("node1")
    );
    assert!(
        client::http_get(tb.cluster().client(), tb.nodeport_addr("node1")).is_ok(),
        "the uplink's address must be kept\n{}",
        tb.agent_log("node1")
    );
}
