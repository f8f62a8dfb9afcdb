//! Interfaces come and go: a node's uplink deleted and recreated under the same name (a
//! driver reload, a CNI or networkd recreating it) is served again within 5 s, also when it
//! is back before the agent could see it gone (TCX and cls_bpf), with `/readyz` and the
//! healthCheckNodePort answering 503 while it is gone; an agent started
//! after the uplink was recreated behind its back (SIGKILL, then the link replaced)
//! replaces the stale pinned links and serves; an agent started before its uplink has an
//! IPv4 address uses the address once it comes as the SNAT source. Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use tests::{
    client,
    cluster::IpFamily,
    manifests::{write_atomic, LB_SERVICE},
    netns::{require_root, run_in},
    testbed::{
        all_ok, assert_cluster_policy_addresses, backends, default_agent_path, echo_path,
        poll_until, Testbed, TestbedOptions,
    },
};

const AGENT_WAIT: Duration = Duration::from_secs(30);
/// How soon a recreated uplink must be served again.
const REATTACH_WITHIN: Duration = Duration::from_secs(5);
const HEALTH_PORT: u16 = 10256;
const CHECK_PORT: u16 = 30257;

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// A `Local` NodePort service with a healthCheckNodePort, its endpoint pa1 on node1.
const LOCAL_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: local-svc
  namespace: default
spec:
  type: NodePort
  externalTrafficPolicy: Local
  healthCheckNodePort: 30257
  selector:
    app: local
  ports:
  - name: web
    protocol: TCP
    port: 8080
    targetPort: 80
    nodePort: 31081
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-svc-1
  namespace: default
  labels:
    kubernetes.io/service-name: local-svc
addressType: IPv4
ports:
- name: web
  protocol: TCP
  port: 80
endpoints:
- addresses: [198.19.1.10]
  conditions: {ready: true}
  nodeName: node1
";

/// The status code of `GET path` on 127.0.0.1:`port` inside `node`'s namespace; `None`
/// when nothing answers.
fn status(tb: &Testbed, node: &str, port: u16, path: &str) -> Option<u16> {
    run_in(tb.cluster().node(node).ns(), || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    })
}

/// `/readyz` of `node`'s agent and the healthCheckNodePort of `local-svc` there.
fn readiness(tb: &Testbed, node: &str) -> (Option<u16>, Option<u16>) {
    (
        status(tb, node, HEALTH_PORT, "/readyz"),
        status(tb, node, CHECK_PORT, "/"),
    )
}

/// `nodeport-agent inspect interfaces` of `node`'s agent.
fn inspect_interfaces(tb: &Testbed, node: &str) -> String {
    let pin = tb
        .agents()
        .iter()
        .find(|a| a.node == node)
        .expect("agent")
        .pin_path()
        .display()
        .to_string();
    let agent = default_agent_path();
    let out = tb.cluster().node(node).ns().exec(&[
        agent.to_str().unwrap(),
        "inspect",
        "--pin-path",
        &pin,
        "interfaces",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 40 requests through `node`'s nodePort: all answered, by local and remote backends, each
/// seeing the right client address (the client's, or `node`'s for a remote one).
fn assert_served(tb: &Testbed, node: &str, when: &str) {
    let rs = all_ok(
        tb,
        when,
        client::http_get_many(tb.cluster().client(), tb.nodeport_addr(node), 40),
    );
    assert_cluster_policy_addresses(tb.cluster(), node, IpFamily::V4, &rs);
}

#[test]
fn a_recreated_uplink_is_served_again_within_5s_and_not_ready_while_gone() {
    if !require_root() {
        return;
    }
    recreated_uplink(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
}

/// The same with cls_bpf filters (kernels without TCX): the device takes them and the
/// clsact qdisc with it; the agent adds both again.
#[test]
fn a_recreated_uplink_gets_its_cls_bpf_filters_back() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.agent_args = ["--tc-attach", "legacy", "--xdp-mode", "tc"]
        .map(String::from)
        .to_vec();
    recreated_uplink(opts);
}

fn recreated_uplink(opts: TestbedOptions) {
    let mut tb = Testbed::serving(opts);
    write_atomic(tb.manifest_dir(), "50-local-svc.yaml", LOCAL_SERVICE).expect("manifest");
    let ready = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
        readiness(&tb, "node1") == (Some(200), Some(200))
    });
    assert!(
        ready,
        "node1 not ready and healthy at first: {:?}\n{}",
        readiness(&tb, "node1"),
        tb.agent_logs()
    );
    assert!(inspect_interfaces(&tb, "node1").contains("lan0"));

    let mac = tb.cluster().delete_uplink("node1");
    // While it is gone: not ready, and the load balancer's health check fails too.
    let mut last = (None, None);
    let unready = poll_until(REATTACH_WITHIN, Duration::from_millis(100), || {
        last = readiness(&tb, "node1");
        last == (Some(503), Some(503))
    });
    assert!(
        unready,
        "/readyz and the healthCheckNodePort while lan0 is gone: {last:?}\n{}",
        tb.agent_logs()
    );
    let shown = inspect_interfaces(&tb, "node1");
    assert!(
        !shown.contains("lan0"),
        "inspect shows lan0 attached while it is gone:\n{shown}"
    );
    // Still not ready a moment later (the agent does not attach to nothing).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(readiness(&tb, "node1"), (Some(503), Some(503)));

    // Back, as a CNI or networkd would bring it: same name and MAC, addresses, routes.
    let recreated = Instant::now();
    tb.cluster_mut().recreate_uplink("node1", &mac);
    tb.cluster().configure_uplink("node1", IpFamily::V4);
    tb.cluster().configure_uplink("node1", IpFamily::V6);
    let addr = tb.nodeport_addr("node1");
    let mut first = None;
    let back = poll_until(REATTACH_WITHIN, Duration::from_millis(100), || {
        first = client::http_get(tb.cluster().client(), addr).ok();
        first.is_some()
    });
    let took = recreated.elapsed();
    assert!(
        back && took <= REATTACH_WITHIN,
        "nodePort not served within {REATTACH_WITHIN:?} of the uplink's return (took {took:?})\n{}",
        tb.agent_logs()
    );
    let first = first.unwrap();
    let pods: Vec<String> = tb.cluster().pods().iter().map(|p| p.name.clone()).collect();
    assert!(pods.contains(&first.from), "answered by {first:?}");
    assert_served(&tb, "node1", "after the uplink's return");
    let healthy = poll_until(REATTACH_WITHIN, Duration::from_millis(100), || {
        readiness(&tb, "node1") == (Some(200), Some(200))
    });
    assert!(
        healthy,
        "still not ready after the uplink's return: {:?}\n{}",
        readiness(&tb, "node1"),
        tb.agent_logs()
    );
    assert!(inspect_interfaces(&tb, "node1").contains("lan0"));
    // The operator reads each transition once, however long it lasted.
    let log = tb.agent_log("node1");
    for line in ["interface gone", "re-attached"] {
        assert_eq!(log.matches(line).count(), 1, "{line:?} in the log:\n{log}");
    }

    // A driver reload: gone and back between two of the agent's checks (new index, same
    // name), so the agent may never see it missing.
    let mac = tb.cluster().delete_uplink("node1");
    let recreated = Instant::now();
    tb.cluster_mut().recreate_uplink("node1", &mac);
    tb.cluster().configure_uplink("node1", IpFamily::V4);
    tb.cluster().configure_uplink("node1", IpFamily::V6);
    let back = poll_until(REATTACH_WITHIN, Duration::from_millis(100), || {
        client::http_get(tb.cluster().client(), addr).is_ok()
    });
    let took = recreated.elapsed();
    assert!(
        back && took <= REATTACH_WITHIN,
        "nodePort not served within {REATTACH_WITHIN:?} of a quick recreation (took {took:?})\n{}",
        tb.agent_logs()
    );
    assert_served(&tb, "node1", "after a quick recreation");
    let healthy = poll_until(REATTACH_WITHIN, Duration::from_millis(100), || {
        readiness(&tb, "node1") == (Some(200), Some(200))
    });
    assert!(
        healthy,
        "{:?}\n{}",
        readiness(&tb, "node1"),
        tb.agent_logs()
    );

    // node2 was never affected.
    assert_served(&tb, "node2", "node2");
}

#[test]
fn an_agent_restarted_after_its_uplink_was_recreated_replaces_the_stale_links() {
    if !require_root() {
        return;
    }
    let mut tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    // SIGKILL: the links stay pinned. Then the uplink is replaced behind the agent's back,
    // which leaves those links attached to nothing.
    tb.kill_agent("node1");
    let mac = tb.cluster().delete_uplink("node1");
    tb.cluster_mut().recreate_uplink("node1", &mac);
    tb.cluster().configure_uplink("node1", IpFamily::V4);
    tb.cluster().configure_uplink("node1", IpFamily::V6);
    tb.restart_agent("node1");
    let addr = tb.nodeport_addr("node1");
    let mut up = false;
    let started = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
        if let Err(e) = tb.check_agents() {
            panic!("{e}");
        }
        up = client::http_get(tb.cluster().client(), addr).is_ok();
        up && status(&tb, "node1", HEALTH_PORT, "/readyz") == Some(200)
    });
    assert!(
        started,
        "the restarted agent does not serve (nodePort answered: {up})\n{}",
        tb.agent_logs()
    );
    assert_served(&tb, "node1", "after the restart");
    let rs = all_ok(&tb, "UDP", {
        client::udp_request_many(tb.cluster().client(), addr, 20)
    });
    assert!(!backends(&rs).is_empty());
}

#[test]
fn the_snat_source_follows_an_address_added_after_start() {
    if !require_root() {
        return;
    }
    let mut tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    let node_ip = tb.cluster().node_ip("node1");
    // An agent that starts while lan0 has no IPv4 address yet.
    let status_code = tb.stop_agent("node1").expect("agent exits on SIGTERM");
    assert!(status_code.success(), "{status_code:?}");
    tb.cluster()
        .node("node1")
        .ns()
        .ip(&format!("addr del {node_ip}/24 dev lan0"));
    tb.restart_agent("node1");
    let synced = poll_until(AGENT_WAIT, Duration::from_millis(200), || {
        tb.agent_log("node1").contains("synced")
    });
    assert!(synced, "agent never synced\n{}", tb.agent_logs());
    write_atomic(tb.manifest_dir(), "50-lb-svc.yaml", LB_SERVICE).expect("manifest");
    tb.cluster()
        .client()
        .ip(&format!("route add 198.18.0.100/32 via {node_ip}"));

    // The address arrives (DHCP, networkd, a CNI).
    tb.cluster().configure_uplink("node1", IpFamily::V4);
    let lb: SocketAddr = "198.18.0.100:8080".parse().unwrap();
    let mut last = None;
    let remote = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let r = client::http_get(tb.cluster().client(), lb);
        let done = matches!(&r, Ok(r) if r.from == "pb1");
        last = Some(r);
        done
    });
    assert!(
        remote,
        "the remote backend never answered through {lb}: last {last:?}\n{}",
        tb.agent_logs()
    );
    // pb1 sees node1's address (the SNAT source), pa1 the client's.
    let rs = all_ok(
        &tb,
        "LB",
        client::http_get_many(tb.cluster().client(), lb, 40),
    );
    assert_cluster_policy_addresses(tb.cluster(), "node1", IpFamily::V4, &rs);
}
