//! kube-proxy-compatible `healthCheckNodePort`: for an `externalTrafficPolicy: Local`
//! service, each node answers HTTP on that port of its own address with `200` while it has
//! a ready local endpoint and `503` (with `localEndpoints: 0`) once it has none.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use tests::{
    client::DEFAULT_TIMEOUT,
    netns::{require_root, run_in},
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
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

/// `GET /` on `addr` from the calling thread's namespace.
fn get_here(addr: SocketAddr) -> Result<Answer, String> {
    let mut s = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(DEFAULT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
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
