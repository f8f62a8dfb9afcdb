//! deploy/daemonset.yaml: that it is made of valid Kubernetes objects (a typed round trip
//! through k8s-openapi, then `kubectl apply --dry-run`), that it asks for the least privilege
//! (capabilities, RBAC, volumes), and that its arguments, probes and ports match the agent's
//! CLI. Not privileged; kubectl parts are skipped with a message when kubectl is missing.
//!
//! kubectl and the test API server: `kubectl apply --dry-run=client` still maps every kind to
//! a resource through the server's discovery, and the test API server (tests::apiserver)
//! serves only Namespaces, Nodes, Services and EndpointSlices. A small front server here
//! answers the discovery documents of the other kinds of the manifest (ServiceAccount,
//! ClusterRole, ClusterRoleBinding, DaemonSet), with the real server's resource names and
//! scopes, and passes every other request through to the test API server. kubectl's own
//! schema validation needs the server's OpenAPI schemas, which the test server does not have,
//! hence `--validate=false`; field names and types are checked by the typed round trip
//! instead. `--dry-run=server` runs for the Namespace, the one kind of the manifest the test
//! API server stores.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use tests::{
    apiserver::{ApiServer, Kind},
    netns::{run_id, TempDir},
    testbed::{default_agent_path, workspace_root},
};

/// Capabilities the agent may add: CAP_BPF and CAP_NET_ADMIN load and attach the programs
/// (tests/tests/caps.rs proves they are enough).
const ALLOWED_CAPS: &[&str] = &["BPF", "NET_ADMIN"];
/// Capabilities the agent must never get (CAP_PERFMON only for --debug-datapath).
const FORBIDDEN_CAPS: &[&str] = &[
    "SYS_ADMIN",
    "ALL",
    "SYS_MODULE",
    "SYS_PTRACE",
    "NET_RAW",
    "PERFMON",
];

// ---------------------------------------------------------------------------------------------
// Helpers

fn manifest_path() -> PathBuf {
    workspace_root().join("deploy/daemonset.yaml")
}

/// The documents of deploy/daemonset.yaml as JSON values (empty documents skipped).
fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(manifest_path()).expect("reading deploy/daemonset.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("deploy/daemonset.yaml: bad YAML");
            serde_json::to_value(v).expect("YAML document as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The one document of `kind`.
fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in the manifest"
    );
    found[0]
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Paths where `a` and `b` differ.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                diff(&format!("{path}.{k}"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: manifest has {a}, the API type keeps {b}")),
    }
}

/// Deserializes `obj` as the API type `K` and serializes it back: an unknown or misplaced
/// field is dropped by the type (and shows as a difference), a wrongly typed value fails.
fn round_trip<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(obj: &Value) -> Vec<String> {
    let name = obj["metadata"]["name"].as_str().unwrap_or("?");
    let typed: K = serde_json::from_value(obj.clone())
        .unwrap_or_else(|e| panic!("{} {name} does not parse as the API type: {e}", K::KIND));
    let back = serde_json::to_value(&typed).expect("serialize");
    let mut out = Vec::new();
    diff(&format!("{} {name}", K::KIND), obj, &back, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// The manifest as Kubernetes objects

#[test]
fn every_object_is_a_valid_api_object() {
    let docs = documents();
    let mut kinds = Vec::new();
    let mut problems = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().expect("every document has a kind");
        let api_version = d["apiVersion"]
            .as_str()
            .expect("every document has an apiVersion");
        kinds.push(format!("{api_version} {kind}"));
        problems.extend(match kind {
            "Namespace" => round_trip::<Namespace>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "DaemonSet" => round_trip::<DaemonSet>(d),
            other => panic!("unexpected kind {other} in deploy/daemonset.yaml"),
        });
    }
    assert!(
        problems.is_empty(),
        "fields the API does not know:\n{}",
        problems.join("\n")
    );
    assert_eq!(
        kinds,
        [
            "v1 Namespace",
            "v1 ServiceAccount",
            "rbac.authorization.k8s.io/v1 ClusterRole",
            "rbac.authorization.k8s.io/v1 ClusterRoleBinding",
            "apps/v1 DaemonSet",
        ]
    );
    // Namespaced objects live in nodeport-system; cluster-scoped ones have no namespace.
    for d in &docs {
        let ns = d["metadata"]["namespace"].as_str();
        match d["kind"].as_str() {
            Some("ServiceAccount" | "DaemonSet") => assert_eq!(ns, Some("nodeport-system")),
            _ => assert_eq!(ns, None, "{} is cluster-scoped", d["kind"]),
        }
    }
}

#[test]
fn the_round_trip_catches_unknown_fields() {
    // The check above is only worth something if a typo is caught.
    let mut ds = doc(&documents(), "DaemonSet").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = json!({});
    let problems = round_trip::<DaemonSet>(&ds);
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// Least privilege

#[test]
fn cluster_role_only_reads_services_nodes_and_endpointslices() {
    let docs = documents();
    let role = doc(&docs, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for verb in strs(&rule["verbs"]) {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "verb {verb:?}: the agent writes nothing to the API"
            );
        }
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    let want: BTreeSet<String> = ["/services", "/nodes", "discovery.k8s.io/endpointslices"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(
        granted, want,
        "the ClusterRole grants exactly what the agent watches"
    );

    let binding = doc(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = doc(&docs, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": sa["metadata"]["name"],
                 "namespace": sa["metadata"]["namespace"] }])
    );
    let ds = doc(&docs, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
}

#[test]
fn agent_container_is_not_privileged_and_adds_few_capabilities() {
    let docs = documents();
    let ds = doc(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    for field in ["hostPID", "hostIPC"] {
        assert_ne!(pod[field], json!(true), "{field}");
    }
    assert_eq!(
        pod["hostNetwork"],
        json!(true),
        "XDP attaches to the node's interfaces"
    );
    assert!(
        pod.get("initContainers").is_none(),
        "no (privileged) init container"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let sc = &containers[0]["securityContext"];
    assert_ne!(sc["privileged"], json!(true));
    assert_eq!(sc["allowPrivilegeEscalation"], json!(false));
    assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let add = strs(&sc["capabilities"]["add"]);
    for cap in &add {
        let bare = cap.trim_start_matches("CAP_");
        assert!(
            !FORBIDDEN_CAPS.contains(&bare),
            "capability {cap} must not be added"
        );
        assert!(
            ALLOWED_CAPS.contains(&bare),
            "capability {cap} is not in {ALLOWED_CAPS:?}"
        );
    }
    for needed in ["BPF", "NET_ADMIN"] {
        assert!(
            add.iter().any(|c| c.trim_start_matches("CAP_") == needed),
            "{needed} missing"
        );
    }

    // Host paths: the BPF filesystem only, never with Bidirectional propagation (which
    // Kubernetes allows only in privileged containers).
    for v in pod["volumes"].as_array().expect("volumes") {
        if let Some(hp) = v.get("hostPath") {
            assert_eq!(hp["path"], "/sys/fs/bpf", "host path {v}");
        }
    }
    for m in containers[0]["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
    {
        assert_ne!(m["mountPropagation"], "Bidirectional", "{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet against the agent's CLI

/// The flag names of `args` (`--pin-path=/x` and `--pin-path /x` both give `--pin-path`).
fn arg_flags(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            Some(v.to_string())
        } else if a == flag {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

#[test]
fn daemonset_matches_the_agent_cli() {
    let docs = documents();
    let ds = doc(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    let flags = arg_flags(&args);
    for required in ["--interface", "--pin-path", "--keep-datapath"] {
        assert!(
            flags.iter().any(|f| f == required),
            "{required} missing from {args:?}"
        );
    }
    // The pins must be on the host's bpffs, i.e. below the hostPath mount.
    let pin = arg_value(&args, "--pin-path").expect("--pin-path value");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts.iter().any(|m| {
            let mp = m["mountPath"].as_str().unwrap_or("");
            pin.starts_with(&format!("{mp}/")) && m["readOnly"] != json!(true)
        }),
        "--pin-path {pin} is not below a writable volume mount"
    );
    assert_eq!(
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("spec.nodeName"))
    );
    assert_eq!(pod["tolerations"], json!([{ "operator": "Exists" }]));
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");

    // Probes and ports: /readyz and /livez on the health port, metrics port named.
    let port_of = |name: &str| {
        c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port named {name}"))
    };
    let (health, metrics) = (port_of("health"), port_of("metrics"));
    assert_eq!((health, metrics), (10256, 10249));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], json!(health));
    // /livez: /healthz fails on a Node being drained by the autoscaler, which must not
    // restart the agent.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], json!(health));

    // Against the agent binary when it is built: every flag exists, and the health and
    // metrics ports are the defaults (the manifest does not pass --health-addr, so the probes
    // must hit the default port).
    let agent = default_agent_path();
    let help = match Command::new(&agent).arg("--help").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            eprintln!(
                "{} not built: skipping the check of the manifest's flags against --help \
                 (cargo build --release -p nodeport-agent)",
                agent.display()
            );
            return;
        }
    };
    for flag in &flags {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{} --help has no {flag}",
            agent.display()
        );
    }
    for (flag, port) in [("--health-addr", health), ("--metrics-addr", metrics)] {
        if arg_value(&args, flag).is_some() {
            continue;
        }
        let section = help
            .split_once(&format!("{flag} "))
            // Up to the next option (clap indents long options by 6, short ones by 2).
            .map(|(_, rest)| {
                let end = ["\n      --", "\n  -"]
                    .iter()
                    .filter_map(|m| rest.find(m))
                    .min()
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .unwrap_or_else(|| panic!("{} --help has no {flag}", agent.display()));
        assert!(
            section.contains(&format!("[default: 0.0.0.0:{port}]")),
            "{flag}'s default is not 0.0.0.0:{port}: {section}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// kubectl

fn have_kubectl() -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("kubectl not installed: skipping the kubectl dry runs");
    }
    ok
}

/// Runs kubectl against `kubeconfig` (killed after 20 s).
fn kubectl(dir: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(dir.join("kube-cache"))
        .arg("--request-timeout=10s")
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let until = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait kubectl").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("kubectl output")
}

/// Discovery of the manifest's kinds that the test API server does not serve, as the real
/// server describes them.
fn extra_resource_list(path: &str) -> Option<Value> {
    let res = |name: &str, kind: &str, namespaced: bool| {
        json!({
            "name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced,
            "kind": kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        })
    };
    let group = |name: &str| {
        json!({
            "kind": "APIGroup", "apiVersion": "v1", "name": name,
            "versions": [{ "groupVersion": format!("{name}/v1"), "version": "v1" }],
            "preferredVersion": { "groupVersion": format!("{name}/v1"), "version": "v1" },
        })
    };
    let list = |gv: &str, resources: Vec<Value>| {
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": resources })
    };
    Some(match path {
        "/apis/apps" => group("apps"),
        "/apis/rbac.authorization.k8s.io" => group("rbac.authorization.k8s.io"),
        "/apis/apps/v1" => list("apps/v1", vec![res("daemonsets", "DaemonSet", true)]),
        "/apis/rbac.authorization.k8s.io/v1" => list(
            "rbac.authorization.k8s.io/v1",
            vec![
                res("clusterroles", "ClusterRole", false),
                res("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        _ => return None,
    })
}

/// One HTTP/1.1 exchange with `upstream`: sends `head` (with `Connection: close`) and
/// `body`, returns the whole response.
fn exchange(upstream: SocketAddr, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(upstream)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut lines: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    s.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn json_response(body: &Value) -> Vec<u8> {
    let b = body.to_string();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

/// The JSON body of a GET on the test API server.
fn upstream_json(upstream: SocketAddr, path: &str) -> Option<Value> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {upstream}\r\nAccept: application/json");
    let resp = exchange(upstream, &head, &[]).ok()?;
    let text = String::from_utf8(resp).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn handle(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut request_line = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    let path = target.split('?').next().unwrap_or("");

    let answer = match (method, path) {
        ("GET", "/apis") => upstream_json(upstream, path).map(|mut v| {
            let groups = v["groups"].as_array_mut().expect("groups");
            for name in ["apps", "rbac.authorization.k8s.io"] {
                let mut g = extra_resource_list(&format!("/apis/{name}")).expect("group");
                if let Some(m) = g.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                groups.push(g);
            }
            v
        }),
        ("GET", "/api/v1") => upstream_json(upstream, path).map(|mut v| {
            v["resources"].as_array_mut().expect("resources").push(json!({
                "name": "serviceaccounts", "singularName": "serviceaccount", "namespaced": true,
                "kind": "ServiceAccount", "shortNames": ["sa"],
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }));
            v
        }),
        ("GET", p) => extra_resource_list(p),
        _ => None,
    };
    let response = match answer {
        Some(v) => json_response(&v),
        None => exchange(upstream, &head, &body)?,
    };
    client.write_all(&response)?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

/// The discovery front server: stops on drop.
struct Front {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Front {
    fn start(upstream: SocketAddr) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    thread::spawn(move || {
                        if let Err(e) = handle(conn, upstream) {
                            eprintln!("front server: {e}");
                        }
                    });
                }
            }
        });
        Front {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn write_kubeconfig(path: &Path, server: &str) {
    let kc = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: t\n  cluster:\n    server: {server}\n\
         contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n    namespace: default\n\
         current-context: t\nusers:\n- name: t\n  user: {{}}\n"
    );
    std::fs::write(path, kc).expect("write kubeconfig");
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn kubectl_dry_run_accepts_the_manifest() {
    if !have_kubectl() {
        return;
    }
    let api = ApiServer::start().expect("test API server");
    let front = Front::start(api.addr());
    let dir = TempDir::new(&run_id(), "deploy-kubectl");
    let kc = dir.path().join("kubeconfig");
    write_kubeconfig(&kc, &format!("http://{}", front.addr));
    let manifest = manifest_path();
    let manifest = manifest.to_str().expect("UTF-8 path");

    let client = |file: &str| {
        kubectl(
            dir.path(),
            &kc,
            &[
                "apply",
                "--dry-run=client",
                "--validate=false",
                "-f",
                file,
                "-o",
                "name",
            ],
        )
    };
    let out = client(manifest);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_lines(&out),
        [
            "namespace/nodeport-system",
            "serviceaccount/nodeport-agent",
            "clusterrole.rbac.authorization.k8s.io/nodeport-agent",
            "clusterrolebinding.rbac.authorization.k8s.io/nodeport-agent",
            "daemonset.apps/nodeport-agent",
        ]
    );

    // The check has teeth: an apiVersion the server does not have is refused.
    let text = std::fs::read_to_string(manifest_path()).expect("manifest");
    let bad = dir.path().join("bad.yaml");
    let broken = text.replace("apiVersion: apps/v1", "apiVersion: extensions/v1beta1");
    assert_ne!(broken, text);
    std::fs::write(&bad, broken).expect("write");
    let out = client(bad.to_str().expect("UTF-8"));
    assert!(
        !out.status.success(),
        "a DaemonSet in extensions/v1beta1 was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no matches for kind \"DaemonSet\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Server-side dry run of the Namespace, the one kind here the test API server stores.
    let ns = serde_yaml::to_string(doc(&documents(), "Namespace")).expect("yaml");
    let ns_file = dir.path().join("namespace.yaml");
    std::fs::write(&ns_file, ns).expect("write");
    let out = kubectl(
        dir.path(),
        &kc,
        &[
            "apply",
            "--dry-run=server",
            "-f",
            ns_file.to_str().expect("UTF-8"),
            "-o",
            "name",
        ],
    );
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_lines(&out), ["namespace/nodeport-system"]);

    // Dry runs store nothing.
    assert!(api
        .get_value(Kind::Namespace, None, "nodeport-system")
        .is_none());
}
