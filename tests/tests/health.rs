//! kube-proxy-compatible health:
//! - `healthCheckNodePort`: for an `externalTrafficPolicy: Local` service, each node answers
//!   HTTP on that port of its own addresses (those inside `--nodeport-addresses`) with `200`
//!   while it has a ready local endpoint and `503` (with `localEndpoints: 0`) once it has
//!   none; a port another process holds is reported once and taken when freed.
//! - `/healthz` and `/livez` on the agent's health port: kube-proxy's fields, and `/healthz`
//!   alone turns `503` while this node's Node object is being deleted or carries the
//!   Cluster Autoscaler's `ToBeDeletedByClusterAutoscaler` taint.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Node, Taint},
    jiff::Timestamp,
};
use tests::{
    apiserver::{ApiServer, ApiServerConfig},
    client::DEFAULT_TIMEOUT,
    netns::{require_root, run_in, TempDir},
    testbed::{default_agent_path, echo_path, lan_api_server, poll_until, Testbed, TestbedOptions},
};

const HEALTH_PORT: u16 = 30256;

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

/// A health check answer: status code, content type and the parsed body.
#[derive(Debug)]
struct Answer {
    code: u16,
    content_type: String,
    body: serde_json::Value,
}

/// `GET /healthz` on `addr` from the calling thread's namespace.
fn get_here(addr: SocketAddr) -> Result<Answer, String> {
    get_path(addr, "/healthz")
}

/// `GET path` on `addr` from the calling thread's namespace.
fn get_path(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    let mut s = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(DEFAULT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write {addr}: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("read {addr}: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no header end in {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: bad status line in {raw:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = serde_json::from_str(body).map_err(|e| format!("{addr}: body {body:?}: {e}"))?;
    Ok(Answer {
        code,
        content_type,
        body,
    })
}

#[test]
fn health_check_node_port_reports_local_endpoints() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service.external_traffic_policy = Some("Local".into());
    opts.service.health_check_node_port = Some(HEALTH_PORT);
    let (ns, name) = (opts.service.namespace.clone(), opts.service.name.clone());
    let mut tb = Testbed::serving(opts);
    let addr = |tb: &Testbed, node: &str| SocketAddr::new(tb.nodeport_addr(node).ip(), HEALTH_PORT);
    let get = |tb: &Testbed, node: &str| {
        let a = addr(tb, node);
        run_in(tb.cluster().client(), || get_here(a))
    };
    let want_body = |n: u64, healthy: bool| {
        serde_json::json!({
            "service": {"namespace": ns, "name": name},
            "localEndpoints": n,
            "serviceProxyHealthy": healthy,
        })
    };

    for (node, n) in [("node1", 2), ("node2", 1)] {
        let mut last = None;
        let ok = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
            let a = get(&tb, node);
            let done = matches!(&a, Ok(a) if a.code == 200 && a.body == want_body(n, true));
            last = Some(a);
            done
        });
        assert!(
            ok,
            "{node}: want 200 with {n} local endpoints, last answer {last:?}\n{}",
            tb.agent_logs()
        );
        let a = get(&tb, node).unwrap();
        assert_eq!(a.content_type, "application/json", "{node}");
        // The same server on the node's IPv6 address: a load balancer checking over IPv6
        // gets the same answer.
        let a6 = SocketAddr::new(tb.cluster().node_ip6(node).into(), HEALTH_PORT);
        let six = run_in(tb.cluster().client(), || get_here(a6))
            .unwrap_or_else(|e| panic!("{node} over IPv6: {e}"));
        assert_eq!(
            (six.code, &six.body),
            (200, &want_body(n, true)),
            "{node} over IPv6"
        );
    }

    // node2 loses its only endpoint: its health check fails, node1's does not.
    tb.remove_endpoint("pb1");
    let mut last = None;
    let failed = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let a = get(&tb, "node2");
        let done = matches!(&a, Ok(a) if a.code == 503 && a.body == want_body(0, true));
        last = Some(a);
        done
    });
    assert!(
        failed,
        "node2: want 503 with 0 local endpoints, last answer {last:?}\n{}",
        tb.agent_logs()
    );
    let a = get(&tb, "node1").unwrap_or_else(|e| panic!("node1: {e}"));
    assert_eq!(a.code, 200, "node1 is unaffected: {a:?}");
    assert_eq!(a.body, want_body(2, true));
}

/// The agent's health port (`--health-addr` default) and its metrics port.
const AGENT_HEALTH: u16 = 10256;
const AGENT_METRICS: u16 = 10249;
/// The API server's address on the lan (the bridge's own address in the lan namespace).
const TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// `path` of `node`'s agent, from inside the node (127.0.0.1).
fn agent_get(tb: &Testbed, node: &str, port: u16, path: &str) -> Result<Answer, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    run_in(tb.cluster().node(node).ns(), || get_path(addr, path))
}

fn time_field(a: &Answer, field: &str) -> Timestamp {
    let s = a.body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is no string: {a:?}"));
    s.parse()
        .unwrap_or_else(|e| panic!("{field} {s:?} is not RFC 3339: {e}"))
}

/// Checks the fields of a `/healthz` (`eligible` Some) or `/livez` answer: kube-proxy's, no
/// others, RFC 3339 times near now, `lastUpdated` equal to `currentTime` when 200.
fn check_fields(a: &Answer, eligible: Option<bool>, what: &str) {
    let mut keys: Vec<&str> = a
        .body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: body is no object: {a:?}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    let want: &[&str] = match eligible {
        Some(_) => &["currentTime", "lastUpdated", "nodeEligible"],
        None => &["currentTime", "lastUpdated"],
    };
    assert_eq!(keys, want, "{what}: {a:?}");
    assert_eq!(a.content_type, "application/json", "{what}");
    if let Some(e) = eligible {
        assert_eq!(a.body["nodeEligible"], e, "{what}: {a:?}");
    }
    let (last, now) = (time_field(a, "lastUpdated"), time_field(a, "currentTime"));
    let skew = Timestamp::now().duration_since(now).as_secs_f64().abs();
    assert!(skew < 30.0, "{what}: currentTime {now} is not now: {a:?}");
    if a.code == 200 {
        assert_eq!(
            last, now,
            "{what}: a healthy answer says lastUpdated = now: {a:?}"
        );
    } else {
        assert!(last <= now, "{what}: {a:?}");
    }
}

/// Polls `path` of `node`'s agent until its status is `code`; the last answer.
fn wait_code(tb: &Testbed, node: &str, path: &str, code: u16, what: &str) -> Answer {
    let mut last = None;
    let ok = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let a = agent_get(tb, node, AGENT_HEALTH, path);
        let done = matches!(&a, Ok(a) if a.code == code);
        last = Some(a);
        done
    });
    assert!(
        ok,
        "{what}: {node} {path} never answered {code}; last {last:?}\n{}",
        tb.agent_logs()
    );
    last.unwrap().unwrap()
}

/// The test API server in the lan namespace, seeded with the testbed's Nodes, Service and
/// slices, and the agents watching it. Field order is drop order.
struct KubeBed {
    api: ApiServer,
    tb: Testbed,
    _dir: TempDir,
}

fn kube_bed() -> KubeBed {
    let mut tb = Testbed::start(TestbedOptions::standard(echo_bin()));
    let (api, dir, kubeconfig) = lan_api_server(&tb, ApiServerConfig::default());
    tb.start_kube_agents(default_agent_path(), kubeconfig);
    if let Err(e) = tb.wait_for_service(Duration::from_secs(30)) {
        panic!("{e}");
    }
    KubeBed { api, tb, _dir: dir }
}

impl KubeBed {
    fn node(&self, name: &str) -> Node {
        self.api
            .get::<Node>(None, name)
            .unwrap_or_else(|| panic!("no Node {name}"))
    }

    fn set_taints(&self, name: &str, keys: &[&str]) {
        let mut n = self.node(name);
        n.spec.get_or_insert_with(Default::default).taints = Some(
            keys.iter()
                .map(|k| Taint {
                    key: k.to_string(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                })
                .collect(),
        );
        self.api.update(&n).expect("update Node taints");
    }
}

#[test]
fn healthz_follows_node_deletion_and_autoscaler_taint_while_livez_stays_up() {
    if !require_root() {
        return;
    }
    let bed = kube_bed();
    let tb = &bed.tb;
    for node in ["node1", "node2"] {
        let h = wait_code(tb, node, "/healthz", 200, "after the first sync");
        check_fields(&h, Some(true), &format!("{node} /healthz"));
        let l = agent_get(tb, node, AGENT_HEALTH, "/livez").expect("/livez");
        assert_eq!(l.code, 200, "{node} /livez: {l:?}");
        check_fields(&l, None, &format!("{node} /livez"));
    }

    // The Cluster Autoscaler is about to remove node1: load balancers must drain it.
    bed.set_taints("node1", &["example.com/other", TAINT]);
    let h = wait_code(tb, "node1", "/healthz", 503, "tainted");
    check_fields(&h, Some(false), "node1 /healthz, tainted");
    let l = agent_get(tb, "node1", AGENT_HEALTH, "/livez").expect("/livez");
    assert_eq!(l.code, 200, "/livez ignores the Node: {l:?}");
    check_fields(&l, None, "node1 /livez, tainted");
    let other = agent_get(tb, "node2", AGENT_HEALTH, "/healthz").expect("node2");
    assert_eq!(
        (other.code, &other.body["nodeEligible"]),
        (200, &true.into())
    );
    // Traffic is still served: eligibility is about load balancers, not the datapath.
    assert!(
        tests::client::http_get(tb.cluster().client(), tb.nodeport_addr("node1")).is_ok(),
        "node1 stopped serving its nodePort"
    );

    // The taint is withdrawn (scale-down cancelled).
    bed.set_taints("node1", &["example.com/other"]);
    let h = wait_code(tb, "node1", "/healthz", 200, "untainted");
    check_fields(&h, Some(true), "node1 /healthz, untainted");

    // Deleted, held by a finalizer: deletionTimestamp set, the object still there.
    let mut n = bed.node("node1");
    n.metadata.finalizers = Some(vec!["nodeport.test/hold".into()]);
    bed.api.update(&n).expect("add a finalizer");
    let deleting = bed.api.delete(&bed.node("node1")).expect("delete Node");
    assert!(
        deleting.metadata.deletion_timestamp.is_some(),
        "the test server keeps a Node with finalizers: {deleting:?}"
    );
    let h = wait_code(tb, "node1", "/healthz", 503, "being deleted");
    check_fields(&h, Some(false), "node1 /healthz, being deleted");
    let l = agent_get(tb, "node1", AGENT_HEALTH, "/livez").expect("/livez");
    assert_eq!(l.code, 200, "/livez ignores the Node: {l:?}");

    // The finalizer goes, and the Node with it: still not eligible.
    let mut n = bed.node("node1");
    n.metadata.finalizers = None;
    bed.api.update(&n).expect("remove the finalizer");
    assert!(
        bed.api.get::<Node>(None, "node1").is_none(),
        "Node still there"
    );
    std::thread::sleep(Duration::from_secs(2));
    let h = agent_get(tb, "node1", AGENT_HEALTH, "/healthz").expect("/healthz");
    assert_eq!(h.code, 503, "a deleted Node: {h:?}\n{}", tb.agent_logs());
    check_fields(&h, Some(false), "node1 /healthz, deleted");
    let l = agent_get(tb, "node1", AGENT_HEALTH, "/livez").expect("/livez");
    assert_eq!(l.code, 200, "{l:?}");
    let metrics = agent_text(tb, "node1", AGENT_METRICS, "/metrics");
    assert!(
        metrics.contains(r#"nodeport_health_probes_total{path="/healthz",code="503"}"#),
        "{metrics}"
    );
    let log = tb.agent_log("node1");
    assert!(
        log.contains("Node node1 is being deleted") && log.contains("Node node1 is tainted"),
        "the agent says why /healthz fails:\n{log}"
    );
}

/// The raw body of `GET path` on 127.0.0.1:`port` inside `node`.
fn agent_text(tb: &Testbed, node: &str, port: u16, path: &str) -> String {
    run_in(tb.cluster().node(node).ns(), || {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        s.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
}

/// The value of metric sample `name` (no labels) in `text`.
fn sample(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_taken_health_check_port_is_reported_once_and_served_when_freed() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.agent_args = vec![
        "--nodeport-addresses".into(),
        "198.18.0.0/24,fd00:18::/64".into(),
    ];
    let (ns, name) = (opts.service.namespace.clone(), opts.service.name.clone());
    let mut tb = Testbed::serving(opts);
    let node1_ip = tb.cluster().node_ip("node1");
    let held = SocketAddr::from((node1_ip, HEALTH_PORT));
    // Another process on node1 holds the port on node1's address (as kube-proxy would).
    let taker = run_in(tb.cluster().node("node1").ns(), || TcpListener::bind(held))
        .unwrap_or_else(|e| panic!("taking {held} in node1: {e}"));
    // An address of node2 outside --nodeport-addresses: no health check server there.
    let outside = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), HEALTH_PORT));
    tb.cluster()
        .node("node2")
        .ns()
        .ip(&format!("addr add {}/32 dev lan0", outside.ip()));

    // The Service becomes Local with a healthCheckNodePort.
    tb.update_manifests(|m| {
        m.service.external_traffic_policy = Some("Local".into());
        m.service.health_check_node_port = Some(HEALTH_PORT);
    });
    let node2 = SocketAddr::from((tb.cluster().node_ip("node2"), HEALTH_PORT));
    let ok = poll_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || matches!(run_in(tb.cluster().client(), || get_here(node2)), Ok(a) if a.code == 200),
    );
    assert!(
        ok,
        "node2 never served its health check\n{}",
        tb.agent_logs()
    );
    // Only inside --nodeport-addresses: node2 itself cannot reach one outside.
    let refused = run_in(tb.cluster().node("node2").ns(), || get_here(outside));
    assert!(
        refused.is_err(),
        "{outside} is outside --nodeport-addresses but answers: {refused:?}"
    );
    // node1 serves its IPv6 address; its IPv4 one is held.
    let node1_v6 = SocketAddr::new(tb.cluster().node_ip6("node1").into(), HEALTH_PORT);
    let ok = poll_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || matches!(run_in(tb.cluster().client(), || get_here(node1_v6)), Ok(a) if a.code == 200),
    );
    assert!(ok, "node1 over IPv6\n{}", tb.agent_logs());

    // Several syncs and retries pass while the port stays taken (retries at 1, 3, 7 s...).
    let failed_line =
        format!("health check server of Service {ns}/{name}: cannot listen on {held}");
    for i in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        // A change that makes every agent sync again.
        tb.set_conditions("pa2", i % 2 == 1, true, false);
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = tb.agent_log("node1");
    assert_eq!(
        log.matches(&failed_line).count(),
        1,
        "the taken port is reported exactly once, naming the Service:\n{log}"
    );
    assert!(log.contains("Address already in use"), "{log}");
    let metrics = agent_text(&tb, "node1", AGENT_METRICS, "/metrics");
    assert_eq!(
        sample(&metrics, "nodeport_healthcheck_listeners_failed"),
        Some(1),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "nodeport_healthcheck_listeners"), Some(1));
    assert!(run_in(tb.cluster().client(), || get_here(held)).is_err());

    // Freed: the agent takes it within its backoff (at most 30 s).
    drop(taker);
    let mut last = None;
    let ok = poll_until(Duration::from_secs(40), Duration::from_millis(250), || {
        let a = run_in(tb.cluster().client(), || get_here(held));
        let done = matches!(&a, Ok(a) if a.code == 200);
        last = Some(a);
        done
    });
    assert!(
        ok,
        "{held} never served once freed: {last:?}\n{}",
        tb.agent_logs()
    );
    let a = last.unwrap().unwrap();
    assert_eq!(a.body["service"]["name"], name.as_str());
    let log = tb.agent_log("node1");
    assert!(
        log.contains(&format!(
            "health check server of Service {ns}/{name}: listening on {held} after"
        )),
        "the recovery is reported:\n{log}"
    );
    let metrics = agent_text(&tb, "node1", AGENT_METRICS, "/metrics");
    assert_eq!(
        sample(&metrics, "nodeport_healthcheck_listeners_failed"),
        Some(0)
    );
    assert_eq!(sample(&metrics, "nodeport_healthcheck_listeners"), Some(2));
}
