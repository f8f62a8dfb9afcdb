//! Path MTU through the balancer: the lan path to node2 takes only 1400 bytes (node2's lan
//! link, both ends, and node1's routes to node2's pods say so), the client's link stays
//! at 1500. A client's packet that node1 would forward to pb1 on node2 and that does not
//! fit is answered by node1's datapath with ICMP fragmentation needed (ICMPv6 packet too
//! big) from the frontend: the client's stack learns the path MTU for the frontend address
//! (`ip route get` shows the cached `mtu 1400`) and resegments, so TCP transfers complete
//! byte for byte in both families, and a UDP socket that forbids fragmentation gets
//! EMSGSIZE. Nothing is dropped as a martian on the way. Needs root.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tests::{
    client,
    cluster::IpFamily,
    manifests::Service,
    netns::{require_root, run_in, sh, Netns},
    testbed::{default_agent_path, echo_path, Testbed, TestbedOptions},
};

const MTU: u32 = 1400;
const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
const WAIT: Duration = Duration::from_secs(20);
const SIZE: usize = 2 * 1024 * 1024;

/// The smaller MTU on the way to node2: its lan link (both ends), and on node1 the routes
/// to node2's pods, as an operator sets route MTUs (the bridge between them would
/// silently drop larger frames, so node1 must know).
fn narrow_path_to_node2(tb: &Testbed) {
    let c = tb.cluster();
    c.lan().ip(&format!("link set v-node2 mtu {MTU}"));
    c.node("node2").ns().ip(&format!("link set lan0 mtu {MTU}"));
    let node2 = c.node("node2");
    let (cidr, cidr6) = (node2.pod_cidr, node2.pod_cidr6);
    let node1 = c.node("node1").ns();
    // Locked: otherwise the FIB lookup's check ignores a route's MTU, as IPv4 forwarding
    // does (net/ipv4/route.c, ip_mtu_from_fib_result; net.ipv4.ip_forward_use_pmtu is the
    // other way to make it count; net/ipv6/route.c, ip6_mtu_from_fib6).
    node1.ip(&format!(
        "route replace {}/{} via {} dev lan0 mtu lock {MTU}",
        cidr.0, cidr.1, node2.ip
    ));
    node1.ip(&format!(
        "route replace {}/{} via {} dev lan0 mtu lock {MTU}",
        cidr6.0, cidr6.1, node2.ip6
    ));
}

/// `ip route get ADDR` in `ns` (the route cache exception shows the learnt MTU).
fn route_get(ns: &Netns, addr: SocketAddr) -> String {
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    let out = ns.exec(&["ip", family, "route", "get", &addr.ip().to_string()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernel log lines about martians.
fn martians() -> usize {
    let out = sh(&["dmesg"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("martian"))
        .count()
}

/// A connected UDP socket to `addr` that forbids fragmentation (IP_PMTUDISC_DO), sending
/// datagrams of a full 1500-byte packet until the send fails with EMSGSIZE (the path MTU
/// learnt from node1's ICMP error) or `WAIT` passes. Returns that error's kind, if any,
/// and the socket's path MTU (IP_MTU / IPV6_MTU) then.
fn udp_until_emsgsize(ns: &Netns, addr: SocketAddr) -> (Option<io::Error>, i32) {
    run_in(ns, || {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).expect("bind");
        s.connect(addr).expect("connect");
        let (level, opt, mtu_opt, hdr) = if addr.is_ipv6() {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_MTU,
                48,
            )
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_MTU, 28)
        };
        let on: libc::c_int = 2; // IP_PMTUDISC_DO, IPV6_PMTUDISC_DO
                                 // SAFETY: a valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt PMTUDISC_DO");
        let data = vec![0x5a; 1500 - hdr];
        let t0 = Instant::now();
        let mut err = None;
        while t0.elapsed() < WAIT {
            match s.send(&data) {
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    err = Some(e);
                    break;
                }
                // The ICMP error arrives asynchronously (ECONNREFUSED-like errors of a
                // connected socket may surface too); keep sending.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let mut mtu: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and out-parameters of the right size.
        unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                mtu_opt,
                &mut mtu as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (err, mtu)
    })
}

#[test]
fn client_learns_the_path_mtu_to_a_remote_backend_from_the_frontend() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut opts = TestbedOptions::standard(echo).with_agent(default_agent_path());
    opts.service = Service::sample_nodeport_with_udp().with_families(&FAMILIES);
    let mut tb = Testbed::start(opts);
    tb.wait_for_service(WAIT).unwrap_or_else(|e| panic!("{e}"));
    // Only pb1, on node2, serves: node1 forwards every flow over the narrow path.
    tb.remove_endpoint("pa1");
    tb.remove_endpoint("pa2");
    for family in FAMILIES {
        let addr = tb.nodeport_addr_in("node1", family);
        let ok = tests::testbed::poll_until(WAIT, Duration::from_millis(200), || {
            client::http_get(tb.cluster().client(), addr).is_ok_and(|r| r.from == "pb1")
        });
        assert!(ok, "{addr} not served by pb1 alone\n{}", tb.agent_logs());
    }
    narrow_path_to_node2(&tb);
    tb.cluster()
        .node("node1")
        .ns()
        .sysctl("net.ipv4.conf.all.log_martians", "1");
    tb.cluster()
        .node("node2")
        .ns()
        .sysctl("net.ipv4.conf.all.log_martians", "1");
    let martians0 = martians();
    let client_ns = tb.cluster().client();

    // UDP first, while the client knows no smaller path MTU: the datagram leaves whole,
    // node1 answers, the socket learns and refuses the next one.
    let before = tb.counter("node1", "icmp_frag_needed");
    for family in FAMILIES {
        let addr = tb.nodeport_addr_in("node1", family);
        let (err, mtu) = udp_until_emsgsize(client_ns, addr);
        assert!(
            err.is_some(),
            "UDP {family:?} to {addr}: no EMSGSIZE within {WAIT:?} (icmp_frag_needed {})\n{}",
            tb.counter("node1", "icmp_frag_needed"),
            tb.agent_logs()
        );
        assert_eq!(mtu, MTU as i32, "UDP {family:?} to {addr}: socket path MTU");
    }
    let answered = tb.counter("node1", "icmp_frag_needed") - before;
    assert!(answered >= 2, "node1 counted {answered} path MTU errors");

    // TCP: 2 MiB each way through pb1, byte for byte; the client resegments for the
    // frontend address once it has the ICMP error. (The UDP test taught the client the
    // path MTU already: forget it, so that TCP learns it itself.)
    client_ns.ip("-4 route flush cache");
    client_ns.ip("-6 route flush cache");
    let data = client::pattern(SIZE, 0x2545_f491_4f6c_dd1d);
    for family in FAMILIES {
        let addr = tb.nodeport_addr_in("node1", family);
        let before = tb.counter("node1", "icmp_frag_needed");
        let (from, back) = client::http_echo(client_ns, addr, &data)
            .unwrap_or_else(|e| panic!("TCP {family:?} via {addr}: {e}\n{}", tb.agent_logs()));
        assert_eq!(from, "pb1", "TCP {family:?} via {addr}");
        assert_eq!(back.len(), SIZE, "TCP {family:?} via {addr}: bytes back");
        assert!(back == data, "TCP {family:?} via {addr}: bytes differ");
        let route = route_get(client_ns, addr);
        assert!(
            route.contains(&format!("mtu {MTU}")),
            "TCP {family:?}: the client's route to {addr} has no learnt mtu {MTU}: {route}"
        );
        eprintln!(
            "TCP {family:?}: {} path MTU errors; client route: {}",
            tb.counter("node1", "icmp_frag_needed") - before,
            route.trim()
        );
    }
    assert_eq!(
        martians(),
        martians0,
        "martians were logged during the test"
    );
    assert_eq!(tb.counter("node1", "drop_fib"), 0, "node1 dropped on FIB");
}
