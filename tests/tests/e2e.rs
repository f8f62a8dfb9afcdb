//! End-to-end tier: real TCP and UDP through the agent in a two-node cluster of network
//! namespaces (tests::cluster). Needs root; each test builds its own cluster with its own
//! run id, so they run in parallel.
//!
//! Binaries: the agent from `NODEPORT_AGENT` (default `<workspace>/target/release/nodeport-agent`),
//! the echo server from `NP_ECHO` (default: the np-echo cargo built for this test run).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use tests::{
    client::{self, EchoReply, KeepAliveConn},
    cluster::{Cluster, ClusterSpec, IpFamily, LanKind, PodNet, PodShape, TunnelCounters},
    netns::{list_np_namespaces, require_root, run_id},
    testbed::{
        all_ok, assert_cluster_policy_addresses, default_agent_path, echo_path, names, poll_until,
        Testbed, TestbedOptions,
    },
};

/// New connections per node address where a test wants every backend reached.
const CONNS: usize = 60;
/// Bound on waiting for the agents to serve / to pick up a manifest change.
const AGENT_WAIT: Duration = Duration::from_secs(30);

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// The standard cluster with agents, waiting until the service answers through every node.
fn start_with_agent() -> Testbed {
    let agent = default_agent_path();
    let mut tb = Testbed::start(TestbedOptions::standard(echo_bin()).with_agent(agent));
    if let Err(e) = tb.wait_for_service(AGENT_WAIT) {
        panic!("{e}");
    }
    tb
}

/// Drops the testbed and checks that nothing of its run is left in `ip netns`.
fn finish(tb: Testbed) {
    let prefix = format!("np-{}-", tb.cluster().run_id());
    drop(tb);
    let left: Vec<_> = list_np_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

fn tally(rs: &[EchoReply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rs {
        *m.entry(r.from.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn tcp_and_udp_through_both_nodes() {
    if !require_root() {
        return;
    }
    let tb = start_with_agent();
    let every = names(&["pa1", "pa2", "pb1"]);
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr(node);
        let tcp = all_ok(
            &tb,
            &format!("tcp via {node}"),
            client::http_get_many(tb.cluster().client(), addr, CONNS),
        );
        let seen: BTreeSet<String> = tally(&tcp).into_keys().collect();
        assert_eq!(
            seen,
            every,
            "tcp via {node}: backends reached {:?}",
            tally(&tcp)
        );
        let udp = all_ok(
            &tb,
            &format!("udp via {node}"),
            client::udp_request_many(tb.cluster().client(), addr, CONNS),
        );
        let seen: BTreeSet<String> = tally(&udp).into_keys().collect();
        assert_eq!(
            seen,
            every,
            "udp via {node}: backends reached {:?}",
            tally(&udp)
        );
    }
    finish(tb);
}

#[test]
fn remote_backend_sees_receiving_node_address() {
    if !require_root() {
        return;
    }
    let tb = start_with_agent();
    let c = tb.cluster();
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr(node);
        let mut replies = all_ok(
            &tb,
            &format!("tcp via {node}"),
            client::http_get_many(c.client(), addr, CONNS),
        );
        replies.extend(all_ok(
            &tb,
            &format!("udp via {node}"),
            client::udp_request_many(c.client(), addr, CONNS / 2),
        ));
        assert_cluster_policy_addresses(c, node, IpFamily::V4, &replies);
    }
    finish(tb);
}

#[test]
fn long_lived_connection_keeps_backend_when_backend_added() {
    if !require_root() {
        return;
    }
    let mut tb = start_with_agent();
    let mut conns: Vec<(String, KeepAliveConn, EchoReply)> = Vec::new();
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr(node);
        let mut conn = KeepAliveConn::connect(tb.cluster().client(), addr)
            .unwrap_or_else(|e| panic!("connect via {node}: {e}"));
        let first = conn
            .request()
            .unwrap_or_else(|e| panic!("first request via {node}: {e}"));
        conns.push((node.to_string(), conn, first));
    }
    let check = |tb: &Testbed, conns: &mut Vec<(String, KeepAliveConn, EchoReply)>| {
        for (node, conn, first) in conns.iter_mut() {
            let r = conn.request().unwrap_or_else(|e| {
                panic!("kept connection via {node} broke: {e}\n{}", tb.agent_logs())
            });
            assert_eq!(
                &r, first,
                "kept connection via {node} changed backend or address"
            );
        }
    };

    tb.add_pod("node1", "pa3", Ipv4Addr::new(198, 19, 1, 12));
    tb.add_pod("node2", "pb2", Ipv4Addr::new(198, 19, 2, 11));

    // New connections reach the new pods once the agents re-read the folder; the kept
    // connections stay where they were meanwhile.
    let mut seen = BTreeSet::new();
    let picked_up = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        check(&tb, &mut conns);
        for node in ["node1", "node2"] {
            let rs = client::http_get_many(tb.cluster().client(), tb.nodeport_addr(node), 10);
            seen.extend(rs.into_iter().flatten().map(|r| r.from));
        }
        seen.contains("pa3") && seen.contains("pb2")
    });
    assert!(
        picked_up,
        "new pods never reached (seen {seen:?})\n{}",
        tb.agent_logs()
    );

    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        check(&tb, &mut conns);
        thread::sleep(Duration::from_millis(200));
    }
    drop(conns);
    finish(tb);
}

#[test]
fn removed_endpoint_gets_no_new_connections() {
    if !require_root() {
        return;
    }
    let mut tb = start_with_agent();
    let nodes = ["node1", "node2"];
    for node in nodes {
        let rs = all_ok(
            &tb,
            node,
            client::http_get_many(tb.cluster().client(), tb.nodeport_addr(node), CONNS),
        );
        assert!(
            tally(&rs).contains_key("pa2"),
            "pa2 not reached via {node} before removal: {:?}",
            tally(&rs)
        );
    }

    tb.remove_endpoint("pa2");
    // The change shows when a batch of 30 new connections avoids pa2 (a stale table picks it
    // with probability 1/3 each, so a false "done" has odds (2/3)^30, about 5e-6).
    let changed = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
        (0..30).all(|i| {
            let node = nodes[i % 2];
            client::http_get(tb.cluster().client(), tb.nodeport_addr(node))
                .is_ok_and(|r| r.from != "pa2")
        })
    });
    assert!(
        changed,
        "pa2 still gets new connections after removal\n{}",
        tb.agent_logs()
    );

    for node in nodes {
        let addr = tb.nodeport_addr(node);
        let mut rs = all_ok(
            &tb,
            node,
            client::http_get_many(tb.cluster().client(), addr, CONNS),
        );
        rs.extend(all_ok(
            &tb,
            node,
            client::udp_request_many(tb.cluster().client(), addr, CONNS / 2),
        ));
        let t = tally(&rs);
        assert!(
            !t.contains_key("pa2"),
            "pa2 reached via {node} after removal: {t:?}"
        );
        assert_eq!(
            t.keys().cloned().collect::<BTreeSet<_>>(),
            names(&["pa1", "pb1"]),
            "via {node}"
        );
    }
    finish(tb);
}

/// The harness itself, without an agent: pods answer from the nodes (same node and across
/// nodes, both pod shapes), pods reach each other, the client reaches the nodes but cannot
/// route to pods, the lan has the offload settings, a pod can join a running cluster.
#[test]
fn harness_routes_without_agent() {
    if !require_root() {
        return;
    }
    let mut tb = Testbed::start(TestbedOptions::standard(echo_bin()));
    tb.add_pod("node1", "pa3", Ipv4Addr::new(198, 19, 1, 12));
    tb.add_pod("node2", "pb2", Ipv4Addr::new(198, 19, 2, 11));
    let c = tb.cluster();
    assert_eq!(c.pods().len(), 5);

    for node in c.nodes() {
        for pod in c.pods() {
            let what = format!("{} -> {} ({})", node.name, pod.name, pod.ip);
            let r = client::http_get(node.ns(), pod.echo_addr())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(r.from, pod.name, "{what}");
            // The node's source address: cni0's for its own bridged pods, its lan address
            // for its routed ones, and for another node's pods whatever the pod network
            // prefers (the lan address, or flannel.1's under NP_PODNET=vxlan).
            let src = if pod.node == node.name && node.shape == PodShape::Bridged {
                IpAddr::from(node.bridge_gateway())
            } else if pod.node == node.name {
                IpAddr::from(node.ip)
            } else {
                c.remote_pod_source(&node.name, IpFamily::V4)
            };
            assert_eq!(r.client_ip, src, "{what}: no NAT between node and pod");
            let r = client::udp_request(node.ns(), pod.echo_addr())
                .unwrap_or_else(|e| panic!("udp {what}: {e}"));
            assert_eq!(r.from, pod.name, "udp {what}");
        }
    }
    // Pod to pod, across nodes and shapes.
    let tunnel = c.spec().podnet == PodNet::Vxlan;
    let before: Vec<TunnelCounters> = if tunnel {
        c.nodes()
            .iter()
            .map(|n| c.tunnel_counters(&n.name))
            .collect()
    } else {
        Vec::new()
    };
    for (a, b) in [("pa1", "pb1"), ("pb1", "pa2"), ("pb2", "pa3")] {
        let (pa, pb) = (c.pod(a), c.pod(b));
        let r =
            client::http_get(pa.ns(), pb.echo_addr()).unwrap_or_else(|e| panic!("{a} -> {b}: {e}"));
        assert_eq!((r.from.as_str(), r.client_ipv4()), (b, pa.ip), "{a} -> {b}");
    }
    if tunnel {
        // Pod traffic between nodes went through flannel.1 both ways (the lan's bridge
        // drops any frame with a pod address, so nothing took another way).
        for (n, b) in c.nodes().iter().zip(before) {
            let a = c.tunnel_counters(&n.name);
            let (tx, rx, tx2, rx2) = (b.tx_packets, b.rx_packets, a.tx_packets, a.rx_packets);
            assert!(
                tx2 >= tx + 9 && rx2 >= rx + 9,
                "{}: flannel.1 sent {} and received {} packets for three TCP exchanges \
                 across nodes",
                n.name,
                tx2 - tx,
                rx2 - rx
            );
        }
    }
    // The client has no route to pods: fails, and fast.
    for pod in c.pods() {
        let t = Instant::now();
        let r = client::http_get(c.client(), pod.echo_addr());
        assert!(
            r.is_err(),
            "client reached pod {} directly: {r:?}",
            pod.name
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "client -> {}: took {:?}",
            pod.name,
            t.elapsed()
        );
        let r = client::udp_request(c.client(), pod.echo_addr());
        assert!(
            r.is_err(),
            "client reached pod {} over UDP: {r:?}",
            pod.name
        );
    }
    // The client reaches the nodes: without an agent, the nodePort is refused (a RST, not
    // a timeout).
    for node in c.nodes() {
        let addr = SocketAddr::from((node.ip, 30080));
        let e = client::http_get(c.client(), addr).expect_err("nothing listens on the nodePort");
        assert!(
            !e.is_timeout(),
            "client -> {addr}: expected a refusal, got {e}"
        );
    }
    let feature = |ns: &tests::netns::Netns, ifname: &str, name: &str| -> String {
        let out = ns.exec(&["ethtool", "-k", ifname]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{name}: "))
                    .map(|v| v.to_string())
            })
            .unwrap_or_default()
    };
    // A wire-like lan: tx checksum offload off, GRO on bridge-side ends. A lan of default
    // veths: tx offload on, GRO off.
    let wire = c.spec().lan == LanKind::Wire;
    let (tx, gro) = if wire { ("off", "on") } else { ("on", "off") };
    for node in c.nodes() {
        assert!(
            feature(node.ns(), "lan0", "tx-checksumming").starts_with(tx),
            "{} lan0",
            node.name
        );
        let side = format!("v-{}", node.name);
        assert!(
            feature(c.lan(), &side, "generic-receive-offload").starts_with(gro),
            "{side}"
        );
        assert!(
            feature(c.lan(), &side, "tx-checksumming").starts_with(tx),
            "{side}"
        );
    }
    assert!(
        feature(c.client(), "eth0", "tx-checksumming").starts_with(tx),
        "client eth0"
    );
    // Pod veths keep the defaults.
    assert!(
        feature(c.pod("pa1").ns(), "eth0", "tx-checksumming").starts_with("on"),
        "pod eth0"
    );
    finish(tb);
}

/// A panic while a cluster exists still removes all of its namespaces.
#[test]
fn cluster_is_removed_after_panic() {
    if !require_root() {
        return;
    }
    let id = run_id();
    let id2 = id.clone();
    let r = std::panic::catch_unwind(move || {
        let c = Cluster::with_run_id(&id2, ClusterSpec::standard());
        assert!(
            list_np_namespaces()
                .iter()
                .filter(|n| n.starts_with(&format!("np-{id2}-")))
                .count()
                >= 7
        );
        let _ = c;
        panic!("deliberate");
    });
    assert!(r.is_err());
    let left: Vec<_> = list_np_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("np-{id}-")))
        .collect();
    assert!(left.is_empty(), "left behind after panic: {left:?}");
}
