//! Conntrack under pressure, as a user sees it: a spoofed SYN flood and a UDP flood of
//! twice the conntrack capacity through both nodes leave established connections and
//! UDP flows working; what does not fit is dropped and counted; the sweep under pressure
//! ends the flood's unassured flows within seconds (their timeouts are a minute), and new
//! connections work again. And the node's own sockets are kept off the SNAT ports. Needs
//! root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use tests::{
    client::{self, KeepAliveConn},
    netns::{require_root, run_in, Netns},
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};

/// NP_CT and NP_RNAT capacity of the agents under test (IPv4; IPv6 at its minimum).
const CT_MAX: usize = 2048;
/// New flows work again this soon after the flood: the unassured flows' idle time before
/// a sweep under pressure ends them (2 s), a second between sweeps, and slack; far less
/// than the flood's timeouts (SYN only 60 s, UDP 30 s).
const RECOVERY: Duration = Duration::from_secs(10);
const NODES: [&str; 2] = ["node1", "node2"];
const AGENT_WAIT: Duration = Duration::from_secs(30);

fn agent_args() -> Vec<String> {
    [
        "--conntrack-max",
        &CT_MAX.to_string(),
        "--conntrack-max6",
        "1024",
    ]
    .map(String::from)
    .to_vec()
}

/// A kept connection and a UDP source port through one node, and the pods that answer
/// them.
struct Kept {
    node: &'static str,
    addr: SocketAddr,
    conn: KeepAliveConn,
    conn_pod: String,
    udp_sport: u16,
    udp_pod: String,
}

impl Kept {
    fn open(tb: &Testbed, node: &'static str, udp_sport: u16) -> Kept {
        let client = tb.cluster().client();
        let addr = tb.nodeport_addr(node);
        let mut conn = KeepAliveConn::connect(client, addr).expect("kept connection");
        let conn_pod = conn.request().expect("first request").from;
        let udp_pod = client::udp_request_from(client, addr, udp_sport)
            .expect("UDP flow")
            .from;
        Kept {
            node,
            addr,
            conn,
            conn_pod,
            udp_sport,
            udp_pod,
        }
    }

    /// One request on the connection and one datagram of the flow, each answered by the
    /// same pod as before.
    fn check(&mut self, tb: &Testbed, when: &str) {
        let r = self.conn.request().unwrap_or_else(|e| {
            panic!(
                "{when}: kept connection via {} broke: {e}\n{}",
                self.node,
                tb.agent_logs()
            )
        });
        assert_eq!(r.from, self.conn_pod, "{when}: kept connection moved");
        let r = client::udp_request_from(tb.cluster().client(), self.addr, self.udp_sport)
            .unwrap_or_else(|e| {
                panic!(
                    "{when}: UDP flow via {} got no answer: {e}\n{}",
                    self.node,
                    tb.agent_logs()
                )
            });
        assert_eq!(r.from, self.udp_pod, "{when}: UDP flow moved");
    }
}

/// `n` TCP SYNs and `n` UDP datagrams to `dst`, each from another spoofed (address, port)
/// of the lan that no host holds (the backends' answers go nowhere), sent from the
/// client's namespace through a raw socket.
fn flood(client: &Netns, dst: SocketAddr, n: usize) {
    let SocketAddr::V4(dst) = dst else {
        unreachable!("IPv4 flood")
    };
    run_in(client, || {
        // SAFETY: plain socket calls on a descriptor owned here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        for i in 0..n {
            let src = Ipv4Addr::new(198, 18, 0, 100 + (i % 150) as u8).octets();
            let sport = 10_000 + i as u16;
            for udp in [false, true] {
                let b = PacketBuilder::ipv4(src, dst.ip().octets(), 64);
                let mut pkt = Vec::new();
                if udp {
                    b.udp(sport, dst.port()).write(&mut pkt, b"flood").unwrap();
                } else {
                    b.tcp(sport, dst.port(), i as u32 * 7919, 64240)
                        .syn()
                        .write(&mut pkt, &[])
                        .unwrap();
                }
                // SAFETY: `pkt` and `to` outlive the call.
                let sent = unsafe {
                    libc::sendto(
                        fd,
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&raw const to).cast(),
                        size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if sent < 0 {
                    // A full socket buffer: wait a little, the flood goes on.
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
    });
}

fn pressure_drops(tb: &Testbed, node: &str) -> u64 {
    tb.counter(node, "drop_map_full") + tb.counter(node, "drop_snat_exhausted")
}

#[test]
fn floods_at_twice_the_conntrack_capacity_leave_established_flows_working() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut opts = TestbedOptions::standard(echo).with_agent(default_agent_path());
    opts.agent_args = agent_args();
    let tb = Testbed::serving(opts);
    let mut kept: Vec<Kept> = NODES
        .iter()
        .zip([41_000, 41_001])
        .map(|(&n, p)| Kept::open(&tb, n, p))
        .collect();
    let drops_before: Vec<u64> = NODES.iter().map(|n| pressure_drops(&tb, n)).collect();

    // Twice the capacity per node, of each kind, while the kept flows carry on.
    let client = tb.cluster().client();
    let started = Instant::now();
    thread::scope(|s| {
        let floods: Vec<_> = NODES
            .iter()
            .map(|&n| {
                let dst = tb.nodeport_addr(n);
                s.spawn(move || flood(client, dst, 2 * CT_MAX))
            })
            .collect();
        while floods.iter().any(|f| !f.is_finished()) {
            for k in &mut kept {
                k.check(&tb, "during the flood");
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    eprintln!(
        "flood of {} packets per node sent in {:?}",
        4 * CT_MAX,
        started.elapsed()
    );
    for k in &mut kept {
        k.check(&tb, "after the flood");
    }
    for (i, n) in NODES.iter().enumerate() {
        let dropped = pressure_drops(&tb, n) - drops_before[i];
        eprintln!(
            "{n}: {dropped} flood packets dropped for full maps or exhausted SNAT ports, {} new flows",
            tb.counter(n, "event_new_flow")
        );
        assert!(
            dropped > 0,
            "{n}: flows beyond the maps' capacity are dropped and counted\n{}",
            tb.agent_metrics(n)
        );
    }

    // Drops were counted, so the sweeps run under pressure: the flood's flows (no
    // handshake ACK, no UDP stream) are ended once idle for 2 s, and new connections and
    // UDP flows work again through both nodes long before the flood's flows would time
    // out.
    let flood_end = Instant::now();
    for n in NODES {
        let addr = tb.nodeport_addr(n);
        let metric = |name: &str| {
            tb.agent_metrics(n)
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
        };
        // The sweeps end the flood's flows (most of the map) once they idled for 2 s.
        let ended = poll_until(RECOVERY, Duration::from_millis(200), || {
            metric("nodeport_conntrack_gc_early_dropped_total") > 0
                && (metric("nodeport_revnat_entries") as usize) < CT_MAX / 2
        });
        assert!(
            ended,
            "{n}: the flood's flows were not ended within {RECOVERY:?}\n{}",
            tb.agent_metrics(n)
        );
        let ok = poll_until(RECOVERY, Duration::from_millis(200), || {
            client::http_get(client, addr).is_ok()
                && client::udp_request_from(client, addr, 42_000).is_ok()
        });
        assert!(
            ok,
            "new flows via {n} after the flood\n{}\n{}",
            tb.agent_metrics(n),
            tb.agent_logs()
        );
        let (early, freed, entries) = (
            metric("nodeport_conntrack_gc_early_dropped_total"),
            metric("nodeport_conntrack_gc_freed_total"),
            metric("nodeport_revnat_entries"),
        );
        eprintln!(
            "{n}: {early} unassured flows ended early, {freed} entries freed, {entries} left, \
             {:?} after the flood",
            flood_end.elapsed()
        );
    }
    for k in &mut kept {
        k.check(&tb, "after the sweep");
    }
}

#[test]
fn snat_ports_are_reserved_from_the_nodes_own_sockets() {
    if !require_root() {
        return;
    }
    let echo = echo_path(env!("CARGO_BIN_EXE_np-echo"));
    let mut tb = Testbed::serving(TestbedOptions::standard(echo).with_agent(default_agent_path()));
    let read = |tb: &Testbed, key: &str| {
        let path = format!("/proc/sys/net/ipv4/{key}");
        let out = tb.cluster().node("node1").ns().exec(&["cat", &path]).stdout;
        String::from_utf8(out).unwrap().trim().to_string()
    };
    // Linux's default ephemeral range lies outside the default SNAT range: nothing to do.
    assert_eq!(read(&tb, "ip_local_reserved_ports"), "");
    // A node whose sockets may take any port: the agent reserves the SNAT range at start
    // and keeps what was reserved before.
    let node = tb.cluster().node("node1").ns();
    node.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    node.sysctl("net.ipv4.ip_local_reserved_ports", "8080");
    tb.restart_agent("node1");
    tb.wait_for_service(AGENT_WAIT)
        .expect("service after the restart");
    assert_eq!(read(&tb, "ip_local_reserved_ports"), "8080,10000-29999");
    // A connection of the node's own to a pod now never leaves from a SNAT port.
    let node = tb.cluster().node("node1").ns();
    let pod = tb.cluster().pods()[0].echo_addr();
    for _ in 0..50 {
        let sock = run_in(node, || {
            std::net::TcpStream::connect_timeout(&pod, Duration::from_secs(2))
        })
        .expect("node to pod");
        let port = sock.local_addr().unwrap().port();
        assert!(
            !(10_000..=29_999).contains(&port),
            "the node's own connection left from SNAT port {port}"
        );
    }
}
