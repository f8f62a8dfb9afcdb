//! Rolling updates, as a user sees them: a pod that turns terminating (`ready: false,
//! serving: true, terminating: true`) while others are ready keeps the connections and
//! UDP flows it already has for the whole grace period, through both nodes (its own and
//! the other, where the flow is source-NATed), while new connections avoid it. When it
//! leaves the EndpointSlice, its UDP flow moves to another pod at once and its TCP
//! connection ends (the packet goes to another pod, which resets it). Needs root.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use tests::{
    client::{self, KeepAliveConn},
    netns::require_root,
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

const AGENT_WAIT: Duration = Duration::from_secs(30);
/// The grace period the test holds the pod terminating for, after the agents took it out
/// of the tables.
const GRACE: Duration = Duration::from_secs(4);
const NODES: [&str; 2] = ["node1", "node2"];
const POD: &str = "pa2";

/// A kept connection and a UDP source port, both answered by `POD`, through one node.
struct Flows {
    node: &'static str,
    addr: SocketAddr,
    conn: KeepAliveConn,
    udp_sport: u16,
}

fn flows_on_pod(tb: &Testbed, node: &'static str) -> Flows {
    let client = tb.cluster().client();
    let addr = tb.nodeport_addr(node);
    let conn = (0..100)
        .find_map(|_| {
            let mut c = KeepAliveConn::connect(client, addr).ok()?;
            (c.request().ok()?.from == POD).then_some(c)
        })
        .unwrap_or_else(|| panic!("no connection via {node} reached {POD}"));
    let udp_sport = (41_000..41_300)
        .find(|&p| client::udp_request_from(client, addr, p).is_ok_and(|r| r.from == POD))
        .unwrap_or_else(|| panic!("no UDP source port via {node} reached {POD}"));
    Flows {
        node,
        addr,
        conn,
        udp_sport,
    }
}

/// Both kept flows through every node still answered by `POD`.
fn check_kept(tb: &Testbed, flows: &mut [Flows], when: &str) {
    let client = tb.cluster().client();
    for f in flows.iter_mut() {
        let r = f.conn.request().unwrap_or_else(|e| {
            panic!(
                "{when}: kept connection via {} broke: {e}\n{}",
                f.node,
                tb.agent_logs()
            )
        });
        assert_eq!(r.from, POD, "{when}: kept connection via {} moved", f.node);
        let r = client::udp_request_from(client, f.addr, f.udp_sport).unwrap_or_else(|e| {
            panic!(
                "{when}: UDP flow via {} got no answer: {e}\n{}",
                f.node,
                tb.agent_logs()
            )
        });
        assert_eq!(r.from, POD, "{when}: UDP flow via {} moved", f.node);
    }
}

/// 30 new connections in a row, alternating nodes, none answered by `POD` (with one of
/// three table slots each, a stale table passes with odds (2/3)^30, about 5e-6).
fn new_connections_avoid_pod(tb: &Testbed) -> bool {
    (0..30).all(|i| {
        client::http_get(tb.cluster().client(), tb.nodeport_addr(NODES[i % 2]))
            .is_ok_and(|r| r.from != POD)
    })
}

#[test]
fn terminating_pod_keeps_its_flows_until_it_leaves_the_slice() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut tb = Testbed::serving(TestbedOptions::standard(echo).with_agent(default_agent_path()));
    let mut flows: Vec<Flows> = NODES.iter().map(|&n| flows_on_pod(&tb, n)).collect();

    tb.set_conditions(POD, false, true, true);
    let avoided = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        check_kept(&tb, &mut flows, "while the agents pick up the change");
        new_connections_avoid_pod(&tb)
    });
    assert!(
        avoided,
        "new connections still reach terminating {POD}\n{}",
        tb.agent_logs()
    );
    // /metrics counts it as draining for the service port, beside the two taking new flows.
    let gauges = |tb: &Testbed, backends: u32, draining: u32| {
        let labels = "{namespace=\"default\",service=\"sample-nodeport\",port=\"http-port\",protocol=\"TCP\",family=\"IPv4\"}";
        let want = [
            format!("nodeport_service_backends{labels} {backends}"),
            format!("nodeport_service_endpoints_draining{labels} {draining}"),
        ];
        NODES.iter().all(|&n| {
            let m = tb.agent_metrics(n);
            want.iter().all(|w| m.lines().any(|l| l == w))
        })
    };
    assert!(
        gauges(&tb, 2, 1),
        "per-service gauges while {POD} drains:\n{}",
        tb.agent_metrics("node1")
    );
    let until = Instant::now() + GRACE;
    while Instant::now() < until {
        check_kept(&tb, &mut flows, "during the grace period");
        thread::sleep(Duration::from_millis(200));
    }
    assert!(new_connections_avoid_pod(&tb), "after the grace period");

    tb.remove_endpoint(POD);
    assert!(
        poll_until(AGENT_WAIT, Duration::from_millis(100), || gauges(&tb, 2, 0)),
        "per-service gauges after {POD} left the slice:\n{}",
        tb.agent_metrics("node1")
    );
    for f in &mut flows {
        let moved = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
            client::udp_request_from(tb.cluster().client(), f.addr, f.udp_sport)
                .is_ok_and(|r| r.from != POD)
        });
        assert!(
            moved,
            "UDP flow via {} still answered by {POD} after it left the slice\n{}",
            f.node,
            tb.agent_logs()
        );
        // The TCP connection ends: the next segment goes to another pod, which knows no
        // such connection and resets it; it is never answered by POD again.
        let ended = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
            match f.conn.request() {
                Err(_) => true,
                Ok(r) => r.from != POD,
            }
        });
        assert!(
            ended,
            "kept connection via {} still answered by {POD} after it left the slice",
            f.node
        );
    }
}
