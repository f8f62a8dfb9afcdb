//! IPv6 and dual-stack end to end, with real TCP and UDP clients in the dual-stack cluster
//! (tests::cluster: client fd00:18::10, node1 fd00:18::11, node2 fd00:18::12, pods in
//! fd00:19:1::/64 routed and fd00:19:2::/64 bridged). As for IPv4, the client has routes
//! only to the lan prefix, so an answer proves the NAT in both directions.
//!
//! The first test checks the cluster's own IPv6 plumbing without any agent; the others
//! need the agent to serve IPv6 (Service `spec.ipFamilies`, `addressType: IPv6` slices).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use tests::{
    client::{self, EchoReply},
    cluster::{IpFamily, PodNet, PodShape},
    manifests::{LoadBalancer, Protocol, Service, ServicePort},
    netns::{require_root, Netns},
    testbed::{
        all_ok, assert_cluster_policy_addresses, backends, default_agent_path, echo_path, names,
        poll_until, Testbed, TestbedOptions,
    },
};

const V4: IpFamily = IpFamily::V4;
const V6: IpFamily = IpFamily::V6;
/// New connections per frontend where a test wants every backend reached.
const CONNS: usize = 45;
/// Bound on waiting for the agents to serve, or to pick up a manifest change.
const AGENT_WAIT: Duration = Duration::from_secs(30);

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// The standard cluster with agents and `service`, not yet waited for.
fn start(service: Service) -> Testbed {
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service = service;
    Testbed::start(opts)
}

/// [`start`], then wait until the service answers in each of its families through every
/// node; the failure names the first address that did not answer.
fn serving(service: Service) -> Testbed {
    let mut tb = start(service);
    tb.wait_for_service(AGENT_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    tb
}

/// `sample-nodeport` (TCP and UDP on nodePort 30080) for IPv6 only.
fn ipv6_only() -> Service {
    Service::sample_nodeport_with_udp().with_families(&[V6])
}

/// Whether `ping -6` from `from` reaches `to` (one echo request, 2 s).
fn ping6(from: &Netns, to: IpAddr) -> bool {
    from.try_exec(&["ping", "-6", "-n", "-c", "1", "-W", "2", &to.to_string()])
        .is_ok_and(|o| o.status.success())
}

/// The cluster's IPv6 plumbing, no load balancer: the client reaches the nodes' IPv6
/// addresses and nothing behind them; nodes reach their own and each other's pods over
/// IPv6; pods reach each other across nodes with their own addresses; the echo server
/// answers both families on one socket and prints each address in its own notation.
#[test]
fn dual_stack_cluster_plumbing() {
    if !require_root() {
        return;
    }
    let tb = Testbed::start(TestbedOptions::standard(echo_bin()));
    let c = tb.cluster();
    for node in c.nodes() {
        assert!(
            ping6(c.client(), node.ip6.into()),
            "client cannot ping6 {} ({})",
            node.name,
            node.ip6
        );
    }
    // No route from the client to the IPv6 pod prefixes (like IPv4): only NAT can answer.
    for pod in c.pods() {
        let r = client::http_get(c.client(), pod.echo_addr_in(V6));
        assert!(
            r.is_err(),
            "the client reached pod {} at {} directly: it must have no pod routes",
            pod.name,
            pod.ip6
        );
    }
    for node in c.nodes() {
        for pod in c.pods() {
            let addr = pod.echo_addr_in(V6);
            // The address the pod sees: a local bridged pod is reached from cni0's address
            // (same prefix), a local routed one from the lan address, another node's from
            // what the pod network prefers (the lan address, or flannel.1's).
            let want: IpAddr = match (pod.node == node.name, node.shape) {
                (true, PodShape::Bridged) => node.bridge_gateway6().into(),
                // Under VXLAN flannel.1's fd00:19:1:: shares the longest prefix with the
                // pod (RFC 6724, rule 8), so the node's own traffic takes it as source.
                (true, PodShape::Routed) if c.spec().podnet == PodNet::Vxlan => {
                    node.tunnel_addr(V6)
                }
                (true, PodShape::Routed) => node.ip6.into(),
                (false, _) => c.remote_pod_source(&node.name, V6),
            };
            let r = client::http_get(node.ns(), addr)
                .unwrap_or_else(|e| panic!("{} -> {} over TCP/IPv6: {e}", node.name, pod.name));
            assert_eq!(
                (r.from.as_str(), r.client_ip),
                (pod.name.as_str(), want),
                "{} -> {addr} over TCP",
                node.name
            );
            let r = client::udp_request(node.ns(), addr)
                .unwrap_or_else(|e| panic!("{} -> {} over UDP/IPv6: {e}", node.name, pod.name));
            assert_eq!(
                (r.from.as_str(), r.client_ip),
                (pod.name.as_str(), want),
                "{} -> {addr} over UDP",
                node.name
            );
        }
    }
    // Pod to pod across nodes, both ways: each sees the other's own IPv6 address.
    for (from, to) in [("pa1", "pb1"), ("pb1", "pa2")] {
        let (f, t) = (c.pod(from), c.pod(to));
        let r = client::http_get(f.ns(), t.echo_addr_in(V6))
            .unwrap_or_else(|e| panic!("{from} -> {to} over IPv6: {e}"));
        assert_eq!((r.from.as_str(), r.client_ip), (to, IpAddr::from(f.ip6)));
    }
    // IPv4 on the same dual-stack echo socket is still reported as IPv4.
    let node2 = c.node("node2");
    let r = client::http_get(node2.ns(), c.pod("pb1").echo_addr()).expect("node2 -> pb1 IPv4");
    assert_eq!(r.client_ip, IpAddr::from(node2.bridge_gateway()));
}

/// An IPv6-only Service (`ipFamilies: [IPv6]`), TCP and UDP on one nodePort, through both
/// nodes under `externalTrafficPolicy: Cluster`: every backend answers, local backends see
/// the client's fd00:18::10, backends on the other node the receiving node's IPv6 address.
/// The IPv4 node addresses do not serve it.
#[test]
fn ipv6_only_nodeport_tcp_and_udp_through_both_nodes() {
    if !require_root() {
        return;
    }
    let tb = serving(ipv6_only());
    let c = tb.cluster();
    let every = names(&["pa1", "pa2", "pb1"]);
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr6(node);
        let tcp = all_ok(
            &tb,
            &format!("tcp {addr} via {node}"),
            client::http_get_many(c.client(), addr, CONNS),
        );
        assert_eq!(backends(&tcp), every, "tcp {addr}: backends reached");
        assert_cluster_policy_addresses(c, node, V6, &tcp);
        let udp = all_ok(
            &tb,
            &format!("udp {addr} via {node}"),
            client::udp_request_many(c.client(), addr, CONNS),
        );
        assert_eq!(backends(&udp), every, "udp {addr}: backends reached");
        assert_cluster_policy_addresses(c, node, V6, &udp);

        let v4 = tb.nodeport_addr(node);
        assert!(
            client::http_get(c.client(), v4).is_err(),
            "{v4} answered an IPv6-only Service over IPv4"
        );
    }
}

/// `externalTrafficPolicy: Local` over IPv6: each node serves only its own endpoints and
/// the backend sees the client's own fd00:18::10; a node whose last local IPv6 endpoint
/// goes drops the traffic (the client times out) instead of forwarding it.
#[test]
fn ipv6_local_policy_keeps_the_client_address_and_drops_without_local_endpoint() {
    if !require_root() {
        return;
    }
    // Dual stack, so that pb1 keeps an IPv4 endpoint when its IPv6 one goes.
    let mut svc = Service::sample_nodeport_with_udp().with_families(&[V4, V6]);
    svc.external_traffic_policy = Some("Local".into());
    let mut tb = serving(svc);
    let client_ip = IpAddr::from(tb.cluster().client_ip6());
    for (node, local) in [("node1", &["pa1", "pa2"][..]), ("node2", &["pb1"][..])] {
        let addr = tb.nodeport_addr6(node);
        let mut rs = all_ok(
            &tb,
            &format!("tcp {addr}"),
            client::http_get_many(tb.cluster().client(), addr, 30),
        );
        rs.extend(all_ok(
            &tb,
            &format!("udp {addr}"),
            client::udp_request_many(tb.cluster().client(), addr, 15),
        ));
        assert_eq!(
            backends(&rs),
            names(local),
            "{addr}: only {node}'s endpoints"
        );
        for r in &rs {
            assert_eq!(
                r.client_ip, client_ip,
                "{addr}: under Local, backend {} must see the client's own address",
                r.from
            );
        }
    }

    // node2 loses its only IPv6 endpoint (pb1 keeps its IPv4 one, which must not count).
    tb.update_manifests(|m| assert!(m.remove_endpoint_of("pb1", V6)));
    let node2 = tb.nodeport_addr6("node2");
    let gone = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
        client::http_get(tb.cluster().client(), node2).is_err()
    });
    assert!(
        gone,
        "{node2} still answers without a local IPv6 endpoint\n{}",
        tb.agent_logs()
    );
    let err = client::http_get(tb.cluster().client(), node2).expect_err("node2 answered");
    assert!(
        err.is_timeout(),
        "{node2} without a local endpoint must drop (client times out), got: {err}"
    );
    let udp = client::udp_request(tb.cluster().client(), node2);
    assert!(
        udp.as_ref().is_err_and(|e| e.is_timeout()),
        "{node2} without a local endpoint must drop UDP (no answer), got: {udp:?}"
    );
    // node1 is unaffected, and so is node2's IPv4 side, where pb1 is still an endpoint.
    let r = client::http_get(tb.cluster().client(), tb.nodeport_addr6("node1"))
        .unwrap_or_else(|e| panic!("node1 after node2 lost its endpoint: {e}"));
    assert_eq!(r.client_ip, client_ip);
    let v4 = tb.nodeport_addr("node2");
    let r = client::http_get(tb.cluster().client(), v4)
        .unwrap_or_else(|e| panic!("{v4} after pb1 lost only its IPv6 endpoint: {e}"));
    assert_eq!(r.from, "pb1", "{v4}: under Local, node2's own endpoint");
}

/// A dual-stack Service (`ipFamilies: [IPv4, IPv6]`): one nodePort answers on the IPv4 and
/// the IPv6 node addresses, each from the endpoints of its own family's EndpointSlices. The
/// slices differ on purpose (IPv4: pa1, pb1; IPv6: pa2, pb1), so a family reaching a
/// backend of the other family's slices shows.
#[test]
fn dual_stack_nodeport_serves_each_family_from_its_own_slices() {
    if !require_root() {
        return;
    }
    let mut tb = start(Service::sample_nodeport_with_udp().with_families(&[V4, V6]));
    tb.update_manifests(|m| {
        assert!(m.remove_endpoint_of("pa2", V4));
        assert!(m.remove_endpoint_of("pa1", V6));
    });
    tb.wait_for_service(AGENT_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = tb.cluster();
    let wanted = [(V4, names(&["pa1", "pb1"])), (V6, names(&["pa2", "pb1"]))];
    // The agents started on the full slices: wait until each family serves the trimmed
    // ones, on both nodes.
    for (family, want) in &wanted {
        for node in ["node1", "node2"] {
            let addr = tb.nodeport_addr_in(node, *family);
            let settled = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
                let rs: Vec<EchoReply> = client::http_get_many(c.client(), addr, CONNS)
                    .into_iter()
                    .flatten()
                    .collect();
                backends(&rs) == *want
            });
            assert!(
                settled,
                "{addr}: never served exactly {want:?}\n{}",
                tb.agent_logs()
            );
        }
    }
    for (family, want) in wanted {
        for node in ["node1", "node2"] {
            let addr = tb.nodeport_addr_in(node, family);
            let what = format!("{} {addr} via {node}", family.as_str());
            let (tcp, udp) = (
                client::http_get_many(c.client(), addr, CONNS),
                client::udp_request_many(c.client(), addr, CONNS),
            );
            for (proto, rs) in [("tcp", tcp), ("udp", udp)] {
                let rs = all_ok(&tb, &format!("{proto} {what}"), rs);
                assert_eq!(
                    backends(&rs),
                    want,
                    "{proto} {what}: want exactly the {} slices' endpoints",
                    family.as_str()
                );
                assert_cluster_policy_addresses(c, node, family, &rs);
            }
        }
    }
}

/// The LoadBalancer IP and external IP this test gives the IPv6 service.
const LB_IP6: &str = "fd00:18::100";
const EXTERNAL_IP6: &str = "fd00:18::101";

/// An IPv6 LoadBalancer: the ingress IP fd00:18::100 (and the external IP fd00:18::101),
/// routed by the client towards node1, serve the service port like a nodePort;
/// `loadBalancerSourceRanges` with IPv6 CIDRs admit the client by its /128 or its /64 and
/// drop it (timeout) when only another range is listed, while the nodePort stays open.
#[test]
fn ipv6_load_balancer_ip_and_source_ranges() {
    if !require_root() {
        return;
    }
    let mut svc = Service::sample_nodeport().with_families(&[V6]);
    svc.external_ips = vec![EXTERNAL_IP6.parse().unwrap()];
    svc.load_balancer = Some(LoadBalancer {
        ingress: vec![LB_IP6.parse().unwrap()],
        source_ranges: Vec::new(),
    });
    let svc_port = svc.ports[0].port;
    let mut tb = serving(svc);
    for ip in [LB_IP6, EXTERNAL_IP6] {
        tb.cluster().client().ip(&format!(
            "route add {ip}/128 via {}",
            tb.cluster().node_ip6("node1")
        ));
    }
    let lb = SocketAddr::new(LB_IP6.parse().unwrap(), svc_port);
    let external = SocketAddr::new(EXTERNAL_IP6.parse().unwrap(), svc_port);
    for addr in [lb, external] {
        let up = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
            client::http_get(tb.cluster().client(), addr).is_ok()
        });
        assert!(up, "{addr} never answered\n{}", tb.agent_logs());
        let rs = all_ok(
            &tb,
            &format!("tcp {addr}"),
            client::http_get_many(tb.cluster().client(), addr, CONNS),
        );
        assert_eq!(backends(&rs), names(&["pa1", "pa2", "pb1"]), "{addr}");
        // The traffic enters at node1.
        assert_cluster_policy_addresses(tb.cluster(), "node1", V6, &rs);
    }

    let node_port = tb.nodeport_addr6("node1");
    let set_ranges = |tb: &mut Testbed, ranges: &[&str]| {
        tb.update_manifests(|m| {
            m.service
                .load_balancer
                .as_mut()
                .expect("LoadBalancer")
                .source_ranges = ranges.iter().map(|s| s.to_string()).collect();
        })
    };
    let lb_answers = |tb: &Testbed, want: bool| {
        poll_until(AGENT_WAIT, Duration::from_millis(200), || {
            client::http_get(tb.cluster().client(), lb).is_ok() == want
        })
    };

    // Each step changes the answer, so each shows the agent applied the list.
    // Only another range: the LB IP drops the client; the nodePort does not.
    set_ranges(&mut tb, &["fd00:99::/64"]);
    assert!(
        lb_answers(&tb, false),
        "{lb} still serves fd00:18::10 with only fd00:99::/64 allowed\n{}",
        tb.agent_logs()
    );
    let drops = tb.counter("node1", "drop_source_range");
    let err = client::http_get(tb.cluster().client(), lb).expect_err("dropped");
    assert!(
        err.is_timeout(),
        "{lb}: a client outside the ranges must be dropped (timeout), got: {err}"
    );
    // Dropped by the source-range check, not lost some other way (say, a frontend gone
    // and the packet routed into an unresolved neighbour).
    assert!(
        tb.counter("node1", "drop_source_range") > drops,
        "{lb}: the timeout was not a source-range drop"
    );
    client::http_get(tb.cluster().client(), node_port).unwrap_or_else(|e| {
        panic!("loadBalancerSourceRanges must not apply to the nodePort {node_port}: {e}")
    });

    // The client's own /128 in a list: allowed.
    set_ranges(&mut tb, &["fd00:99::/64", "fd00:18::10/128"]);
    assert!(
        lb_answers(&tb, true),
        "client fd00:18::10 refused with its /128 listed\n{}",
        tb.agent_logs()
    );
    set_ranges(&mut tb, &["fd00:99::/64"]);
    assert!(
        lb_answers(&tb, false),
        "{lb} still serves fd00:18::10 with only fd00:99::/64 allowed (second time)"
    );

    // The client's /64: allowed again.
    set_ranges(&mut tb, &["fd00:99::/64", "fd00:18::/64"]);
    assert!(
        lb_answers(&tb, true),
        "client refused with fd00:18::/64 listed\n{}",
        tb.agent_logs()
    );
}

/// `sessionAffinity: ClientIP` over IPv6: new connections (new source ports) from one
/// client keep reaching one backend, through each node, for TCP and UDP alike. Without
/// affinity, three backends would give that with probability 3^-11 per series.
#[test]
fn ipv6_client_ip_affinity_sticks() {
    if !require_root() {
        return;
    }
    let mut svc = ipv6_only();
    svc.session_affinity_timeout = Some(600);
    let tb = serving(svc);
    for node in ["node1", "node2"] {
        let addr = tb.nodeport_addr6(node);
        let tcp = all_ok(
            &tb,
            &format!("tcp {addr}"),
            client::http_get_many(tb.cluster().client(), addr, 12),
        );
        assert_eq!(
            backends(&tcp).len(),
            1,
            "tcp {addr}: connections of one client spread over {:?}",
            backends(&tcp)
        );
        let udp = all_ok(
            &tb,
            &format!("udp {addr}"),
            client::udp_request_many(tb.cluster().client(), addr, 12),
        );
        assert_eq!(
            backends(&udp).len(),
            1,
            "udp {addr}: requests of one client spread over {:?}",
            backends(&udp)
        );
    }
}

/// A UDP port nothing listens on in the pods, and its nodePort.
const CLOSED_PORT: u16 = 9;
const CLOSED_NODE_PORT: u16 = 30090;

/// ICMPv6 errors about translated flows reach the client as its own: a UDP client of an
/// IPv6 nodePort whose backends do not listen gets ECONNREFUSED, through either node (the
/// backend is local or remote). The nodes' own stacks are kept from sending any ICMPv6
/// destination-unreachable (an nftables OUTPUT rule that forwarded and XDP-sent errors do
/// not pass), so every refusal is a backend's, translated (see icmp.rs for IPv4).
#[test]
fn ipv6_udp_clients_see_port_unreachable() {
    if !require_root() {
        return;
    }
    let mut svc = ipv6_only();
    svc.ports.push(ServicePort {
        name: "closed".into(),
        protocol: Protocol::Udp,
        port: 9090,
        target_port: CLOSED_PORT,
        node_port: CLOSED_NODE_PORT,
    });
    let tb = serving(svc);
    for node in ["node1", "node2"] {
        let ns = tb.cluster().node(node).ns();
        ns.exec(&["nft", "add", "table", "ip6", "np_icmp6_test"]);
        ns.exec(&[
            "nft",
            "add chain ip6 np_icmp6_test out { type filter hook output priority 0; }",
        ]);
        ns.exec(&[
            "nft",
            "add rule ip6 np_icmp6_test out icmpv6 type destination-unreachable drop",
        ]);
    }
    for pod in tb.cluster().pods() {
        pod.ns().sysctl("net.ipv6.icmp.ratelimit", "0");
    }
    for node in ["node1", "node2"] {
        let addr = SocketAddr::new(tb.cluster().node_ip6(node).into(), CLOSED_NODE_PORT);
        let first = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
            client::udp_refused(tb.cluster().client(), addr).unwrap_or(false)
        });
        assert!(
            first,
            "no ICMPv6 port unreachable reached the client via {node} ({addr})\n{}",
            tb.agent_logs()
        );
        for i in 0..12 {
            let refused = client::udp_refused(tb.cluster().client(), addr)
                .unwrap_or_else(|e| panic!("request {i} to {addr}: {e}"));
            assert!(
                refused,
                "request {i} to {addr}: no ICMPv6 port unreachable reached the client's socket\n{}",
                tb.agent_logs()
            );
        }
    }
    // The echo port of the same service still answers.
    let ok = client::udp_request(tb.cluster().client(), tb.nodeport_addr6("node1"));
    assert!(ok.is_ok(), "udp echo port after the refusals: {ok:?}");
}
