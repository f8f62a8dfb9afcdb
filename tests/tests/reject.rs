//! A Service without any usable endpoint refuses, as kube-proxy's REJECT does: a TCP
//! connection is refused at once (the client gets a RST from the frontend) and a UDP
//! socket gets ECONNREFUSED (an ICMP or ICMPv6 port unreachable from the frontend that
//! quotes its datagram), in both families, through both nodes. Endpoints that are only
//! terminating (not serving) count as none; a ready one brings the Service back. Refusals
//! are rate-limited per CPU and counted. (Local policy on a node without a local endpoint
//! still drops: tests/local.rs.)

use std::{
    io,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use tests::{
    client,
    cluster::IpFamily,
    manifests::Service,
    netns::{require_root, run_in},
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

const PODS: [&str; 3] = ["pa1", "pa2", "pb1"];
const NODES: [&str; 2] = ["node1", "node2"];
const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
const WAIT: Duration = Duration::from_secs(20);

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// How a TCP connection to `addr` from the client ends, and how long that took.
fn connect(tb: &Testbed, addr: SocketAddr) -> (io::Result<()>, Duration) {
    run_in(tb.cluster().client(), || {
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop);
        (r, t0.elapsed())
    })
}

fn refused(tb: &Testbed, addr: SocketAddr) -> bool {
    matches!(connect(tb, addr).0, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

/// Every frontend (both nodes, both families) refuses TCP within a second and UDP with
/// ECONNREFUSED.
fn assert_all_refuse(tb: &Testbed, why: &str) {
    for node in NODES {
        for family in FAMILIES {
            let addr = tb.nodeport_addr_in(node, family);
            let ok = poll_until(WAIT, Duration::from_millis(200), || refused(tb, addr));
            assert!(
                ok,
                "{why}: {addr} via {node} does not refuse TCP\n{}",
                tb.agent_logs()
            );
            let (r, took) = connect(tb, addr);
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
                    && took < Duration::from_secs(1),
                "{why}: TCP to {addr}: {r:?} after {took:?}, want refused within 1 s"
            );
            let udp = client::udp_refused(tb.cluster().client(), addr)
                .unwrap_or_else(|e| panic!("{why}: UDP to {addr}: {e}"));
            assert!(
                udp,
                "{why}: UDP to {addr} via {node} was not refused (ECONNREFUSED)"
            );
        }
    }
}

#[test]
fn services_without_endpoints_refuse_tcp_and_udp_in_both_families() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service = Service::sample_nodeport_with_udp().with_families(&FAMILIES);
    let mut tb = Testbed::start(opts);
    tb.wait_for_service(WAIT).unwrap_or_else(|e| panic!("{e}"));

    // Every pod terminating and no longer serving: no usable endpoint is left.
    for pod in PODS {
        tb.set_conditions(pod, false, false, true);
    }
    assert_all_refuse(&tb, "every endpoint terminating");
    for node in NODES {
        assert!(
            tb.counter(node, "reject_no_endpoints") > 0,
            "{node} counted no refusal"
        );
    }

    // One pod ready again: served, not refused.
    tb.set_conditions("pb1", true, true, false);
    for node in NODES {
        for family in FAMILIES {
            let addr = tb.nodeport_addr_in(node, family);
            let back = poll_until(WAIT, Duration::from_millis(200), || {
                client::http_get(tb.cluster().client(), addr).is_ok_and(|r| r.from == "pb1")
            });
            assert!(back, "{addr} not served by pb1 again\n{}", tb.agent_logs());
            let udp = client::udp_request(tb.cluster().client(), addr)
                .unwrap_or_else(|e| panic!("UDP to {addr} once pb1 is ready: {e}"));
            assert_eq!(udp.from, "pb1");
        }
    }

    // No endpoint listed at all.
    for pod in PODS {
        tb.remove_endpoint(pod);
    }
    assert_all_refuse(&tb, "no endpoint listed");
}

#[test]
fn refusals_are_rate_limited_per_cpu_and_counted() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service = Service::sample_nodeport_with_udp();
    let mut tb = Testbed::start(opts);
    tb.wait_for_service(WAIT).unwrap_or_else(|e| panic!("{e}"));
    for pod in PODS {
        tb.remove_endpoint(pod);
    }
    let addr = tb.nodeport_addr("node1");
    assert!(
        poll_until(WAIT, Duration::from_millis(200), || refused(&tb, addr)),
        "{addr} does not refuse\n{}",
        tb.agent_logs()
    );
    let (sent0, limited0) = (
        tb.counter("node1", "reject_no_endpoints"),
        tb.counter("node1", "drop_reject_rate"),
    );
    // A burst of datagrams from many ports, far faster than 1,000 refusals a second.
    const BURST: u64 = 3000;
    let took = run_in(tb.cluster().client(), || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let t0 = Instant::now();
        for i in 0..BURST {
            // An unconnected socket: a refusal does not stop the next send. Paced at about
            // 10,000 a second, so no queue on the way drops any.
            let _ = sock.send_to(b"x", addr);
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        t0.elapsed()
    });
    // Let the last refusals and counters settle.
    std::thread::sleep(Duration::from_millis(300));
    let sent = tb.counter("node1", "reject_no_endpoints") - sent0;
    let limited = tb.counter("node1", "drop_reject_rate") - limited0;
    assert_eq!(
        sent + limited,
        BURST,
        "each datagram refused or rate-limited, once"
    );
    // Two CPUs may each send their burst of 50 and then 1,000 a second.
    let cap = 2 * (50 + (took.as_secs_f64() * 1000.0).ceil() as u64) + 2;
    assert!(
        limited > 0 && sent <= cap,
        "{sent} refusals and {limited} rate-limited in {took:?} (at most {cap} refusals)"
    );
}
