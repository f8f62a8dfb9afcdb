//! nodeport shares its TC hook, as CNIs and observability tools expect: another program
//! attached after nodeport's (a TCX link, and a legacy clsact `cls_bpf` filter) sees the
//! node's own traffic (ping, a plain TCP port) and the nodePort traffic nodeport leaves
//! to the stack (connections to a pod on the same node), at ingress and at egress; what
//! nodeport sends on itself (XDP_TX, redirects) and drops stays its own. Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use aya::programs::tc::TcAttachType;
use tests::{
    client,
    neighbour::{Hook, Neighbour},
    netns::{require_root, run_in},
    testbed::{all_ok, default_agent_path, echo_path, Testbed, TestbedOptions},
};

const NODE: &str = "node1";
const PINGS: u64 = 5;

/// The four neighbours' counts: (label, count).
fn counts(ns: &[(String, Neighbour)]) -> Vec<(String, u64)> {
    ns.iter().map(|(l, n)| (l.clone(), n.count())).collect()
}

/// Each neighbour saw at least `min` more packets than in `before`.
fn assert_saw(before: &[(String, u64)], after: &[(String, u64)], min: u64, what: &str) {
    for ((label, b), (_, a)) in before.iter().zip(after) {
        assert!(
            a - b >= min,
            "{label} saw {} packets of {what}, expected at least {min}",
            a - b
        );
    }
}

/// One exchange with a plain TCP server of the node (not a nodePort): at least 3
/// packets each way (handshake, data, close).
fn plain_tcp(tb: &Testbed) {
    let node = tb.cluster().node(NODE).ns();
    let listener = run_in(node, || TcpListener::bind("0.0.0.0:0").expect("bind"));
    let port = listener.local_addr().expect("local addr").port();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"world").expect("write");
    });
    let addr = SocketAddr::new(tb.cluster().node_ip(NODE).into(), port);
    let reply = run_in(tb.cluster().client(), || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        buf
    });
    assert_eq!(&reply, b"world");
    server.join().expect("server thread");
}

#[test]
fn programs_after_nodeports_see_what_it_leaves_to_the_stack() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let tb = Testbed::serving(TestbedOptions::standard(echo).with_agent(default_agent_path()));
    let ns = tb.cluster().node(NODE).ns();
    let mut neighbours = Vec::new();
    for hook in [Hook::TcxLast, Hook::Legacy] {
        for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
            neighbours.push((
                format!("{hook:?} {dir:?}"),
                Neighbour::attach(ns, "lan0", dir, hook),
            ));
        }
    }

    // The node's own traffic: ping and a plain TCP port.
    let before = counts(&neighbours);
    let ip = tb.cluster().node_ip(NODE).to_string();
    let count = PINGS.to_string();
    tb.cluster()
        .client()
        .exec(&["ping", "-c", &count, "-i", "0.2", "-W", "2", &ip]);
    plain_tcp(&tb);
    assert_saw(
        &before,
        &counts(&neighbours),
        PINGS + 3,
        "the node's own traffic",
    );

    // nodePort connections that land on a pod of this node: nodeport translates them and
    // leaves them to the stack (replies too, translated back at egress).
    let before = counts(&neighbours);
    let replies = all_ok(
        &tb,
        NODE,
        client::http_get_many(tb.cluster().client(), tb.nodeport_addr(NODE), 30),
    );
    let local = replies
        .iter()
        .filter(|r| tb.cluster().pod_node(&r.from) == NODE)
        .count() as u64;
    assert!(
        local > 0,
        "no connection reached a pod of {NODE}: {replies:?}"
    );
    assert_saw(
        &before,
        &counts(&neighbours),
        3 * local,
        "nodePort connections to local pods",
    );
    drop(neighbours);
}
