//! The test API server (tests::apiserver) against real clients: `kubectl` (skipped with a
//! message when it is not installed) and kube-rs (`Api`, `runtime::watcher`, `reflector`).
//! Not privileged; every test bounds its waits and finishes in well under 20 s.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, watcher, WatchStreamExt},
    Client, Config,
};
use tests::{
    apiserver::{ApiServer, ApiServerConfig},
    netns::{run_id, TempDir},
};

// ---------------------------------------------------------------------------------------------
// Helpers

fn service(ns: &str, name: &str, node_port: Option<i32>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ports: Some(vec![ServicePort {
                port: 80,
                node_port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn endpoint_slice(ns: &str, name: &str, service: &str, addrs: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: addrs
            .iter()
            .map(|a| Endpoint {
                addresses: vec![a.to_string()],
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn node(name: &str, ip: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `(namespace, name, resourceVersion)` of every Service, sorted.
fn service_keys<'a>(items: impl IntoIterator<Item = &'a Service>) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = items
        .into_iter()
        .map(|s| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn kube_client(server: &ApiServer, dir: &Path) -> Client {
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).expect("kubeconfig");
    let kc = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// -- kubectl ----------------------------------------------------------------------------------

fn have_kubectl() -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("kubectl not installed: skipping the kubectl part of this test");
    }
    ok
}

fn kubectl_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .arg("--cache-dir")
        .arg(dir.join("kube-cache"))
        .arg("--request-timeout=10s")
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    c
}

/// Runs kubectl to completion (killed after 15 s) and returns its output.
fn kubectl(dir: &Path, args: &[&str]) -> Output {
    let mut child = kubectl_cmd(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let until = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait kubectl").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("kubectl output")
}

fn kubectl_ok(dir: &Path, args: &[&str]) -> String {
    let out = kubectl(dir, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = kubectl_ok(dir, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

fn item_names(list: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            let ns = i["metadata"]["namespace"].as_str().unwrap_or("");
            let name = i["metadata"]["name"].as_str().unwrap_or("");
            if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            }
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// kubectl

#[test]
fn kubectl_get_lists_what_was_created() {
    if !have_kubectl() {
        return;
    }
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-get");
    server
        .write_kubeconfig(dir.path().join("kubeconfig"))
        .unwrap();
    server
        .create(&service("default", "web", Some(30080)))
        .unwrap();
    server.create(&service("team-a", "api", None)).unwrap();
    server
        .create(&endpoint_slice(
            "default",
            "web-abc12",
            "web",
            &["198.18.0.10", "198.18.0.11"],
        ))
        .unwrap();
    server.create(&node("node-1", "198.18.1.1")).unwrap();
    server.create(&node("node-2", "198.18.1.2")).unwrap();

    let svcs = kubectl_json(dir.path(), &["get", "services", "-A", "-o", "json"]);
    assert_eq!(svcs["kind"], "List");
    assert_eq!(item_names(&svcs), ["default/web", "team-a/api"]);
    let api = svcs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == "api")
        .unwrap();
    let np = api["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!((30000..=32767).contains(&np), "allocated nodePort {np}");

    // Namespaced list (the kubeconfig's namespace is default) and a single object.
    let only_default = kubectl_json(dir.path(), &["get", "svc", "-o", "json"]);
    assert_eq!(item_names(&only_default), ["default/web"]);
    let web = kubectl_json(dir.path(), &["get", "svc", "web", "-o", "json"]);
    assert_eq!(web["spec"]["ports"][0]["nodePort"], 30080);
    assert_eq!(web["spec"]["type"], "NodePort");

    let slices = kubectl_json(
        dir.path(),
        &["get", "endpointslices.discovery.k8s.io", "-A", "-o", "json"],
    );
    assert_eq!(item_names(&slices), ["default/web-abc12"]);
    assert_eq!(
        slices["items"][0]["endpoints"][1]["addresses"][0],
        "198.18.0.11"
    );
    let nodes = kubectl_json(dir.path(), &["get", "nodes", "-o", "json"]);
    assert_eq!(item_names(&nodes), ["node-1", "node-2"]);

    // Human-readable output goes through the server-side Table.
    let table = kubectl_ok(dir.path(), &["get", "services", "-A"]);
    assert!(
        table.contains("PORT(S)") && table.contains("80:30080/TCP"),
        "{table}"
    );
    let table = kubectl_ok(
        dir.path(),
        &["get", "endpointslices.discovery.k8s.io", "-A"],
    );
    assert!(
        table.contains("web-abc12") && table.contains("198.18.0.10"),
        "{table}"
    );
    let table = kubectl_ok(dir.path(), &["get", "nodes"]);
    assert!(
        table.contains("node-1") && table.contains("node-2"),
        "{table}"
    );

    // Selectors and chunked lists.
    let sel = kubectl_json(
        dir.path(),
        &["get", "svc", "-A", "-l", "app=api", "-o", "json"],
    );
    assert_eq!(item_names(&sel), ["team-a/api"]);
    let chunked = kubectl_json(
        dir.path(),
        &["get", "svc", "-A", "--chunk-size=1", "-o", "json"],
    );
    assert_eq!(item_names(&chunked), ["default/web", "team-a/api"]);
    let lists_with_continue = server
        .requests()
        .iter()
        .filter(|r| r.uri.contains("continue="))
        .count();
    assert!(
        lists_with_continue >= 1,
        "kubectl --chunk-size=1 followed the continue token"
    );
}

#[test]
fn kubectl_watch_prints_a_service_created_later() {
    if !have_kubectl() {
        return;
    }
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-watch");
    server
        .write_kubeconfig(dir.path().join("kubeconfig"))
        .unwrap();
    server.create(&service("default", "early", None)).unwrap();

    let mut child = kubectl_cmd(
        dir.path(),
        &[
            "get",
            "services",
            "--watch",
            "-o",
            "name",
            "--request-timeout=0",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn kubectl");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let wait_for = |want: &str, lines: &mut Vec<String>| {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                lines.push(l.clone());
                if l.trim() == want {
                    return true;
                }
            }
        }
        false
    };
    let saw_early = wait_for("service/early", &mut lines);
    let watching = server.wait_for_watches(1, Duration::from_secs(10));
    if saw_early && watching {
        server.create(&service("default", "late", None)).unwrap();
    }
    let saw_late = saw_early && watching && wait_for("service/late", &mut lines);
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(saw_early, "initial list line: {lines:?}");
    assert!(watching, "kubectl opened a watch");
    assert!(saw_late, "watch line for the new service: {lines:?}");
    let watch_req = server
        .requests()
        .into_iter()
        .find(|r| r.watch)
        .expect("a watch request");
    assert!(
        watch_req.uri.contains("resourceVersion=") && watch_req.status == 200,
        "{watch_req:?}"
    );
}

#[test]
fn kubectl_create_apply_delete() {
    if !have_kubectl() {
        return;
    }
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-create");
    server
        .write_kubeconfig(dir.path().join("kubeconfig"))
        .unwrap();
    let manifest = dir.path().join("svc.yaml");
    let yaml =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: made-by-kubectl\n  namespace: demo\n\
                spec:\n  type: NodePort\n  selector:\n    app: demo\n  ports:\n  - port: 80\n    \
                targetPort: 8080\n    nodePort: 30123\n";
    std::fs::write(&manifest, yaml).unwrap();
    let out = kubectl_ok(dir.path(), &["create", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("service/made-by-kubectl created"), "{out}");
    let svc: Service = server
        .get(Some("demo"), "made-by-kubectl")
        .expect("created through kubectl");
    let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port.node_port, Some(30123));
    assert_eq!(port.protocol.as_deref(), Some("TCP"), "defaulted");

    // A second create conflicts, as on a real server.
    let again = kubectl(dir.path(), &["create", "-f", manifest.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("AlreadyExists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // kubectl apply (client-side: GET then strategic-merge PATCH) changes the target port.
    std::fs::write(&manifest, yaml.replace("8080", "9090")).unwrap();
    let out = kubectl_ok(dir.path(), &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("configured"), "{out}");
    let svc: Service = server.get(Some("demo"), "made-by-kubectl").unwrap();
    let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9090))
    );
    assert_eq!(port.node_port, Some(30123));

    // The object kubectl created is visible to kube-rs too, and kubectl delete removes it.
    let out = kubectl_ok(
        dir.path(),
        &["delete", "service", "made-by-kubectl", "-n", "demo"],
    );
    assert!(out.contains("deleted"), "{out}");
    assert!(server
        .get::<Service>(Some("demo"), "made-by-kubectl")
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// kube-rs

#[tokio::test]
async fn kube_api_list_get_create_and_errors() {
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-api");
    let client = kube_client(&server, dir.path()).await;
    for i in 0..5 {
        server
            .create(&service("ns1", &format!("s{i}"), None))
            .unwrap();
    }
    let api: Api<Service> = Api::namespaced(client.clone(), "ns1");

    // Chunked list: 5 objects in pages of 2, consistent with the first page's revision.
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    server.create(&service("ns1", "s9", None)).unwrap();
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let third = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(third.items.len(), 1);
    assert!(third.metadata.continue_.as_deref().unwrap_or("").is_empty());
    assert_eq!(
        third.metadata.resource_version,
        first.metadata.resource_version
    );

    // Create, conflict, get, delete through the API.
    let created = api
        .create(
            &PostParams::default(),
            &service("ns1", "via-api", Some(31000)),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let err = api
        .create(&PostParams::default(), &service("ns1", "via-api", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err:?}"
    );
    let err = api
        .create(
            &PostParams::default(),
            &service("ns1", "taken", Some(31000)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    let err = api.get("nope").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    api.delete("via-api", &DeleteParams::default())
        .await
        .unwrap();
    assert!(server.get::<Service>(Some("ns1"), "via-api").is_none());

    // An Exact list at a compacted revision is 410 Expired.
    let old = first.metadata.resource_version.clone().unwrap();
    server.compact();
    let err = api
        .list(
            &ListParams::default()
                .at(&old)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );
    // So is a continue token from before the compaction.
    let err = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );

    // Injected 500s carry a Status; stop refuses connections, restart serves again.
    server.fail_next(1);
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 500),
        "{err:?}"
    );
    server.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    api.list(&ListParams::default()).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    server.set_delay(Duration::ZERO);
    server.stop();
    assert!(api.list(&ListParams::default()).await.is_err());
    server.restart().unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        6
    );
}

#[tokio::test]
async fn kube_raw_watch_bookmarks_timeout_and_410() {
    let server = ApiServer::start_with(ApiServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-rawwatch");
    let client = kube_client(&server, dir.path()).await;
    let api: Api<Service> = Api::all(client);
    server.create(&service("default", "a", None)).unwrap();
    let rv = server.resource_version().to_string();

    // Events after rv, then a bookmark; the stream ends at timeoutSeconds.
    let started = Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    server.create(&service("default", "b", None)).unwrap();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("watch ends by itself")
        .unwrap()
    {
        seen.push(match ev {
            WatchEvent::Added(s) => format!("ADDED {}", s.metadata.name.unwrap()),
            WatchEvent::Modified(s) => format!("MODIFIED {}", s.metadata.name.unwrap()),
            WatchEvent::Deleted(s) => format!("DELETED {}", s.metadata.name.unwrap()),
            WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
            WatchEvent::Error(e) => format!("ERROR {}", e.code),
        });
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert_eq!(
        seen.first().map(String::as_str),
        Some("ADDED b"),
        "{seen:?}"
    );
    let now = server.resource_version().to_string();
    assert!(seen.contains(&format!("BOOKMARK {now}")), "{seen:?}");

    // A watch from a compacted revision gets one ERROR 410 Expired event, then the stream ends.
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"), "{e:?}");
            assert!(
                e.message
                    .starts_with(&format!("too old resource version: {rv} (")),
                "{e:?}"
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(stream.try_next().await.unwrap().is_none());
}

/// Opens a watch over plain HTTP/1.1, applies `fault`, and returns what the server sent until
/// the connection closed or the response ended.
fn raw_watch_then(server: &ApiServer, fault: impl FnOnce(&ApiServer)) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(server.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rv = server.resource_version();
    write!(
        conn,
        "GET /api/v1/services?watch=true&resourceVersion={rv} HTTP/1.1\r\nHost: test\r\n\r\n"
    )
    .unwrap();
    assert!(server.wait_for_watches(1, Duration::from_secs(5)));
    server
        .create(&service("raw", &format!("r{rv}"), None))
        .unwrap();
    // Let the event reach the socket before the fault.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"ADDED\"") {
        let n = conn.read(&mut buf).expect("event before the fault");
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    fault(server);
    // Until EOF (a torn connection), or the final chunk (the connection stays open for
    // keep-alive after a clean end).
    while !got.ends_with(b"0\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the watch: {e}"),
        }
    }
    String::from_utf8(got).unwrap()
}

#[test]
fn raw_http_cut_tears_the_stream_close_ends_it() {
    let server = ApiServer::start().expect("start");
    let cut = raw_watch_then(&server, ApiServer::cut_watches);
    assert!(cut.starts_with("HTTP/1.1 200 OK\r\n"), "{cut}");
    assert!(
        cut.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{cut}"
    );
    assert!(
        !cut.ends_with("0\r\n\r\n"),
        "a cut stream has no final chunk: {cut:?}"
    );
    let closed = raw_watch_then(&server, ApiServer::close_watches);
    assert!(
        closed.ends_with("0\r\n\r\n"),
        "a closed stream ends cleanly: {closed:?}"
    );
}

/// Runs a reflector over all Services; returns its store and a counter of errors it saw.
/// (An error is a failed request or an ERROR event; a torn watch stream is not one.)
fn spawn_reflector(
    client: Client,
) -> (
    reflector::Store<Service>,
    std::sync::Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let (reader, writer) = reflector::store();
    let errors = std::sync::Arc::new(AtomicUsize::new(0));
    let errs = errors.clone();
    let stream = reflector(
        writer,
        watcher(Api::<Service>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if item.is_err() {
                errs.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (reader, errors, task)
}

fn store_keys(store: &reflector::Store<Service>) -> Vec<(String, String, String)> {
    let items = store.state();
    service_keys(items.iter().map(|s| s.as_ref()))
}

#[tokio::test]
async fn kube_watcher_follows_changes_cuts_and_410() {
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-watcher");
    let client = kube_client(&server, dir.path()).await;
    server.create(&service("default", "one", None)).unwrap();
    server.create(&service("other", "two", None)).unwrap();

    // Events: the watcher also reports them one by one.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let events = tokio::spawn({
        let client = client.clone();
        async move {
            let stream =
                watcher(Api::<Service>::all(client), watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(ev)) = stream.next().await {
                let text = match ev {
                    watcher::Event::Apply(s) => format!("apply {}", s.metadata.name.unwrap()),
                    watcher::Event::Delete(s) => format!("delete {}", s.metadata.name.unwrap()),
                    watcher::Event::InitApply(s) => format!("init {}", s.metadata.name.unwrap()),
                    watcher::Event::Init => "init-start".into(),
                    watcher::Event::InitDone => "init-done".into(),
                };
                if ev_tx.send(text).is_err() {
                    break;
                }
            }
        }
    });
    let (store, errors, task) = spawn_reflector(client);
    let expect = |server: &ApiServer| service_keys(server.list::<Service>().iter());

    let synced = eventually(Duration::from_secs(5), || {
        store_keys(&store) == expect(&server)
    })
    .await;
    assert!(synced, "initial sync: {:?}", store_keys(&store));
    assert!(server.wait_for_watches(2, Duration::from_secs(5)));

    // ADDED / MODIFIED / DELETED.
    server.create(&service("default", "three", None)).unwrap();
    let mut one: Service = server.get(Some("default"), "one").unwrap();
    one.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("v".into(), "2".into());
    server.update(&one).unwrap();
    server
        .delete_named::<Service>(Some("other"), "two")
        .unwrap();
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while !got.contains(&"delete two".to_string()) && Instant::now() < until {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), ev_rx.recv()).await {
            got.push(e);
        }
    }
    let tail: Vec<&str> = got
        .iter()
        .map(String::as_str)
        .filter(|e| !e.starts_with("init"))
        .collect();
    assert_eq!(tail, ["apply three", "apply one", "delete two"], "{got:?}");
    assert!(got.starts_with(&["init-start".into()]), "{got:?}");
    let synced = eventually(Duration::from_secs(5), || {
        store_keys(&store) == expect(&server)
    })
    .await;
    assert!(
        synced,
        "after changes: {:?} vs {:?}",
        store_keys(&store),
        expect(&server)
    );

    // Cut every stream: the watchers re-watch from their last revision (no new list) and pick
    // up what changed meanwhile.
    let lists_before = list_requests(&server);
    let watches_before = watch_requests(&server);
    server.cut_watches();
    // kube-rs treats the torn chunked stream (UnexpectedEof) like the end of the watch.
    let rewatched = eventually(Duration::from_secs(5), || {
        watch_requests(&server) >= watches_before + 2 && server.open_watches() >= 2
    })
    .await;
    assert!(rewatched, "both watchers opened a new watch after the cut");
    server.create(&service("default", "four", None)).unwrap();
    let synced = eventually(Duration::from_secs(5), || {
        store_keys(&store) == expect(&server)
    })
    .await;
    assert!(
        synced,
        "after a cut: {:?} vs {:?}",
        store_keys(&store),
        expect(&server)
    );
    assert_eq!(
        list_requests(&server),
        lists_before,
        "re-watched without re-listing"
    );
    let rewatch = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.watch)
        .unwrap();
    assert!(
        rewatch.uri.contains("resourceVersion=") && !rewatch.uri.contains("resourceVersion=0&"),
        "{rewatch:?}"
    );

    // Stopped server, changes, compaction: the re-watch from the old revision gets 410 and the
    // watchers re-list.
    assert!(server.wait_for_watches(2, Duration::from_secs(5)));
    server.stop();
    server.create(&service("default", "five", None)).unwrap();
    server
        .delete_named::<Service>(Some("default"), "three")
        .unwrap();
    server.compact();
    server.restart().unwrap();
    let synced = eventually(Duration::from_secs(12), || {
        store_keys(&store) == expect(&server)
    })
    .await;
    assert!(
        synced,
        "after a 410: {:?} vs {:?}",
        store_keys(&store),
        expect(&server)
    );
    assert!(list_requests(&server) > lists_before, "re-listed after 410");

    assert!(
        errors.load(Ordering::SeqCst) >= 1,
        "the 410 ERROR event surfaced"
    );
    task.abort();
    events.abort();
}

fn watch_requests(server: &ApiServer) -> usize {
    server.requests().iter().filter(|r| r.watch).count()
}

fn list_requests(server: &ApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.watch && r.uri.starts_with("/api/v1/services"))
        .count()
}

#[tokio::test]
async fn kube_watcher_backs_off_through_500s() {
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-backoff");
    let client = kube_client(&server, dir.path()).await;
    server.create(&service("default", "x", None)).unwrap();
    server
        .create(&endpoint_slice("default", "x-1", "x", &["198.18.0.5"]))
        .unwrap();

    // The first two requests (the initial list and its first retry) fail.
    server.fail_next(2);
    let started = Instant::now();
    let (store, errors, task) = spawn_reflector(client.clone());
    let expect = service_keys(server.list::<Service>().iter());
    let synced = eventually(Duration::from_secs(15), || store_keys(&store) == expect).await;
    assert!(synced, "synced after the 500s: {:?}", store_keys(&store));
    assert_eq!(errors.load(Ordering::SeqCst), 2, "each 500 surfaced once");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the watcher backed off between attempts ({:?})",
        started.elapsed()
    );
    let statuses: Vec<u16> = server
        .requests()
        .iter()
        .filter(|r| r.uri.starts_with("/api/v1/services"))
        .map(|r| r.status)
        .take(3)
        .collect();
    assert_eq!(statuses, [500, 500, 200]);

    // A failing watch (not list) start is retried too; EndpointSlices through another watcher.
    let slices = Api::<EndpointSlice>::all(client);
    server.fail_next(1);
    let stream = watcher(slices, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(slice)) => return slice,
                Some(Err(_)) => continue,
                None => panic!("watcher ended"),
            }
        }
    })
    .await
    .expect("an EndpointSlice after the retry");
    assert_eq!(first.metadata.name.as_deref(), Some("x-1"));
    assert_eq!(server.pending_failures(), 0);
    task.abort();
}

#[tokio::test]
async fn kube_streaming_list_and_label_selector() {
    let server = ApiServer::start().expect("start");
    let dir = TempDir::new(&run_id(), "apiserver-stream");
    let client = kube_client(&server, dir.path()).await;
    server.create(&service("default", "one", None)).unwrap();
    server.create(&service("default", "two", None)).unwrap();

    // sendInitialEvents=true: the initial state arrives as ADDED events, ended by the
    // k8s.io/initial-events-end bookmark (kube's InitDone); the selector applies.
    let config = watcher::Config::default()
        .streaming_lists()
        .labels("app=one");
    let stream = watcher(Api::<Service>::all(client), config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut got = Vec::new();
    let mut next = async || {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("stream goes on")
            .expect("no error");
        match ev {
            watcher::Event::Init => "init".to_string(),
            watcher::Event::InitApply(s) => format!("init-apply {}", s.metadata.name.unwrap()),
            watcher::Event::InitDone => "init-done".to_string(),
            watcher::Event::Apply(s) => format!("apply {}", s.metadata.name.unwrap()),
            watcher::Event::Delete(s) => format!("delete {}", s.metadata.name.unwrap()),
        }
    };
    for _ in 0..3 {
        got.push(next().await);
    }
    assert_eq!(got, ["init", "init-apply one", "init-done"]);
    assert!(server
        .requests()
        .iter()
        .any(|r| r.watch && r.uri.contains("sendInitialEvents=true")));

    // An object leaving the selection is a DELETED event for this watch; entering, ADDED.
    let mut one: Service = server.get(Some("default"), "one").unwrap();
    one.metadata.labels = Some(BTreeMap::from([("app".into(), "other".into())]));
    server.update(&one).unwrap();
    assert_eq!(next().await, "delete one");
    let mut two: Service = server.get(Some("default"), "two").unwrap();
    two.metadata.labels = Some(BTreeMap::from([("app".into(), "one".into())]));
    server.update(&two).unwrap();
    assert_eq!(next().await, "apply two");
}
