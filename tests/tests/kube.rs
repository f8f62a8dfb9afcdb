//! The agent in Kubernetes API mode (`--kubeconfig`) against the test API server
//! (tests::apiserver), while the server cuts watches, fails requests, forgets its event history
//! and goes away. Every step is checked twice: end to end (new and kept-alive TCP connections
//! from the client namespace) and in the pinned maps of each agent (NP_SVC frontends, NP_BE
//! backend addresses).
//!
//! The agents run in the node namespaces, so the server runs in the lan namespace: the lan
//! bridge gets 198.18.0.1, the server listens there (its listening socket is created by a
//! thread that entered the lan namespace) and the agents reach it over the lan, as they would
//! reach a control plane. Needs root; each test builds its own cluster and server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use k8s_openapi::api::{core::v1, discovery::v1::EndpointSlice};
use nodeport_common::{maps as m, FrontendKey, Service as SvcValue};
use serde::de::DeserializeOwned;
use tests::{
    apiserver::{ApiServer, ApiServerConfig},
    client::{self, EchoReply, KeepAliveConn},
    manifests::{Manifests, Service},
    netns::{list_np_namespaces, require_root, run_in, TempDir},
    testbed::{
        default_agent_path, echo_path, lan_api_server, poll_until, Testbed, TestbedOptions, API_IP,
    },
};

const FIRST_PORT: u16 = 30080;
const SECOND_PORT: u16 = 30081;
const THIRD_PORT: u16 = 30082;
/// An endpoint address only a headless Service's slice holds.
const HEADLESS_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 9, 9);
const TCP: u8 = 6;
/// Bound on waiting for the agents to serve or to pick up a change.
const WAIT: Duration = Duration::from_secs(25);
/// New connections per node where a step wants every backend reached.
const CONNS: usize = 45;
/// Period of the server's watch bookmarks (the real server: about a minute).
const BOOKMARKS: Duration = Duration::from_millis(200);
/// Marker of one watcher error in the agent's log (`warn`, once per error).
const WATCH_ERROR: &str = "Kubernetes watch error";

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

fn parse<K: DeserializeOwned>(yaml: &str) -> K {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("cannot parse {e}:\n{yaml}"))
}

/// The typed objects of `m`: its Service and one EndpointSlice per node.
fn service_objects(m: &Manifests) -> (v1::Service, Vec<EndpointSlice>) {
    let slices = m
        .nodes
        .iter()
        .map(|n| parse(&m.endpoint_slice_yaml(&n.name)))
        .collect();
    (parse(&m.service.to_yaml()), slices)
}

/// `sample-nodeport` as a second Service: `second`, nodePort 30081, its own slices, every pod
/// but pa2 (NP_BE holds a backend once for all the services that use it: step 3 wants pa2
/// used by `sample-nodeport` only).
fn second_service(m: &Manifests) -> Manifests {
    let mut m = m.clone();
    assert!(m.remove_endpoint("pa2"));
    m.service = Service {
        name: "second".into(),
        app: "second-app".into(),
        ..m.service
    };
    m.service.ports[0].node_port = SECOND_PORT;
    m
}

fn hash_map<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin.join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    HashMap::try_from(Map::HashMap(data)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The nodePort frontends (address 0) in NP_SVC under `pin`: (port, IP protocol).
fn frontends(pin: &Path) -> BTreeSet<(u16, u8)> {
    let svc: HashMap<MapData, FrontendKey, SvcValue> = hash_map(pin, m::MAP_SERVICES);
    svc.keys()
        .map(|k| k.expect("NP_SVC key"))
        .filter(|k| k.addr == 0)
        .map(|k| (u16::from_be_bytes(k.port.to_ne_bytes()), k.proto))
        .collect()
}

/// NP_BE under `pin`: backend id -> (address, port).
fn backends(pin: &Path) -> BTreeMap<u32, (Ipv4Addr, u16)> {
    nodeport_agent::datapath::MapReader::open(pin)
        .and_then(|r| r.backends())
        .expect("NP_BE")
        .into_iter()
        .map(|(id, b)| {
            (
                id,
                (
                    Ipv4Addr::from(b.addr.to_ne_bytes()),
                    u16::from_be_bytes(b.port.to_ne_bytes()),
                ),
            )
        })
        .collect()
}

fn backend_addrs(pin: &Path) -> BTreeSet<Ipv4Addr> {
    backends(pin).into_values().map(|(a, _)| a).collect()
}

fn tally(rs: &[EchoReply]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for r in rs {
        *t.entry(r.from.clone()).or_insert(0) += 1;
    }
    t
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A cluster whose agents watch a test API server on the lan.
struct KubeBed {
    // Field order is drop order: the server (the agents only see errors), then the testbed
    // (agents, pins, cluster with the lan namespace the server listened in), then the folder
    // of the kubeconfig.
    api: ApiServer,
    tb: Testbed,
    _dir: TempDir,
    started: Instant,
}

impl KubeBed {
    /// Cluster, server (seeded with the Nodes, `sample-nodeport` and its slices), agents.
    /// Does not wait for the service.
    fn start() -> KubeBed {
        let started = Instant::now();
        let opts = TestbedOptions {
            // TCP only: wait_for_service checks exactly what the Service has.
            service: Service::sample_nodeport(),
            ..TestbedOptions::standard(echo_bin())
        };
        let mut tb = Testbed::start(opts);
        let (api, dir, kubeconfig) = lan_api_server(
            &tb,
            ApiServerConfig {
                bookmark_interval: BOOKMARKS,
                ..ApiServerConfig::default()
            },
        );
        let lan = tb.cluster().lan();
        // The listening socket belongs to the lan namespace (where the thread that created it
        // was), not to the root namespace the test runs in, and the nodes reach it.
        let port = api.addr().port();
        let listening = |out: std::process::Output| {
            String::from_utf8_lossy(&out.stdout).contains(&format!("{API_IP}:{port}"))
        };
        let sport = format!("sport = :{port}");
        assert!(
            listening(lan.exec(&["ss", "-Hltn", &sport])),
            "API server not listening in the lan namespace"
        );
        let root = std::process::Command::new("ss")
            .args(["-Hltn", &sport])
            .output()
            .expect("ss");
        assert!(
            !listening(root),
            "API server listening in the root namespace"
        );
        for node in tb.cluster().nodes() {
            let ok = run_in(node.ns(), || {
                TcpStream::connect_timeout(&api.addr(), Duration::from_secs(2)).is_ok()
            });
            assert!(
                ok,
                "{} cannot reach the API server at {}",
                node.name,
                api.addr()
            );
        }

        tb.start_kube_agents(default_agent_path(), kubeconfig);
        KubeBed {
            api,
            tb,
            _dir: dir,
            started,
        }
    }

    fn client(&self) -> &tests::netns::Netns {
        self.tb.cluster().client()
    }

    fn addr(&self, node: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.tb.cluster().node_ip(node), port))
    }

    fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        self.tb.cluster().pod(pod).ip
    }

    fn pin(&self, node: &str) -> PathBuf {
        self.tb
            .agents()
            .iter()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
            .pin_path()
            .to_path_buf()
    }

    /// The agents' logs and the server's last requests, for failure messages.
    fn diag(&self) -> String {
        let reqs = self.api.requests();
        let tail: String = reqs[reqs.len().saturating_sub(25)..]
            .iter()
            .map(|r| {
                format!(
                    "  {} {} -> {}{}\n",
                    r.method,
                    r.uri,
                    r.status,
                    if r.watch { " (watch)" } else { "" }
                )
            })
            .collect();
        format!(
            "{}----- API server: last {} of {} requests -----\n{tail}",
            self.tb.agent_logs(),
            reqs.len().min(25),
            reqs.len()
        )
    }

    /// Panics with the diagnostics when an agent has exited.
    fn check_agents(&mut self) {
        if let Err(e) = self.tb.check_agents() {
            panic!("{e}\n{}", self.diag());
        }
    }

    /// `n` GETs on fresh connections through `node`'s `port`; Err names the first failure.
    fn get_many(&self, node: &str, port: u16, n: usize) -> Result<Vec<EchoReply>, String> {
        let addr = self.addr(node, port);
        client::http_get_many(self.client(), addr, n)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.map_err(|e| format!("request {i}/{n} via {node} ({addr}): {e}")))
            .collect()
    }

    /// `n` GETs through each node that must all succeed; the backends reached per node.
    fn reached(
        &self,
        port: u16,
        n: usize,
        what: &str,
    ) -> BTreeMap<String, BTreeMap<String, usize>> {
        ["node1", "node2"]
            .into_iter()
            .map(|node| {
                let rs = self
                    .get_many(node, port, n)
                    .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.diag()));
                (node.to_string(), tally(&rs))
            })
            .collect()
    }

    /// Whether a fresh connection to `node`'s `port` gets an answer (1 s timeout).
    fn answers(&self, node: &str, port: u16) -> bool {
        let addr = self.addr(node, port);
        run_in(self.client(), || {
            client::http_get_here(addr, Duration::from_secs(1)).is_ok()
        })
    }

    /// Watch requests for `node`'s Node (the only requests that name the agent's node).
    fn node_watches(&self, node: &str) -> usize {
        let sel = format!("fieldSelector=metadata.name%3D{node}");
        self.api
            .requests()
            .iter()
            .filter(|r| r.watch && r.uri.contains(&sel))
            .count()
    }

    /// List requests for Services (not watches) answered with 200.
    fn service_lists(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| !r.watch && r.status == 200 && r.uri.starts_with("/api/v1/services?"))
            .count()
    }

    fn watch_errors(&self, node: &str) -> usize {
        self.tb.agent_log(node).matches(WATCH_ERROR).count()
    }

    /// The stored slice of `service` on `node`, changed by `f`, written back.
    fn edit_slice(&self, service: &str, node: &str, f: impl FnOnce(&mut EndpointSlice)) {
        let name = format!("{service}-{node}");
        let mut s: EndpointSlice = self
            .api
            .get(Some("default"), &name)
            .unwrap_or_else(|| panic!("no EndpointSlice {name}"));
        f(&mut s);
        self.api
            .update(&s)
            .unwrap_or_else(|e| panic!("update {name}: {e}"));
    }

    /// Removes the endpoint with address `ip` from `service`'s slice of `node`.
    fn remove_endpoint(&self, service: &str, node: &str, ip: Ipv4Addr) {
        self.edit_slice(service, node, |s| {
            let before = s.endpoints.len();
            s.endpoints.retain(|e| e.addresses != [ip.to_string()]);
            assert_eq!(s.endpoints.len() + 1, before, "{ip} not in the slice");
        });
    }

    /// Puts pod `pod`'s endpoint back into `service`'s slice of its node (from the manifests).
    fn restore_endpoint(&self, service: &str, pod: &str) {
        let m = self.tb.manifests();
        let node = self.tb.cluster().pod_node(pod).to_string();
        let full: EndpointSlice = parse(&m.endpoint_slice_yaml(&node));
        let ep = full
            .endpoints
            .into_iter()
            .find(|e| e.addresses == [self.pod_ip(pod).to_string()])
            .unwrap_or_else(|| panic!("{pod} not in the manifests"));
        self.edit_slice(service, &node, |s| s.endpoints.push(ep));
    }

    /// Connections kept open through each node, none on `avoid`: (node, connection, first
    /// reply).
    fn keep_alive_conns(&self, avoid: &str) -> Vec<(String, KeepAliveConn, EchoReply)> {
        let mut out = Vec::new();
        for node in ["node1", "node2"] {
            let addr = self.addr(node, FIRST_PORT);
            let mut found = None;
            for _ in 0..30 {
                let mut c = KeepAliveConn::connect(self.client(), addr)
                    .unwrap_or_else(|e| panic!("connect via {node}: {e}\n{}", self.diag()));
                let r = c
                    .request()
                    .unwrap_or_else(|e| panic!("first request via {node}: {e}\n{}", self.diag()));
                if r.from != avoid {
                    found = Some((c, r));
                    break;
                }
            }
            let (c, r) = found.unwrap_or_else(|| panic!("every connection via {node} on {avoid}"));
            out.push((node.to_string(), c, r));
        }
        out
    }

    /// Every kept connection still answers, from the same backend and client address.
    fn check_kept(&self, conns: &mut [(String, KeepAliveConn, EchoReply)], when: &str) {
        for (node, c, first) in conns.iter_mut() {
            let r = c.request().unwrap_or_else(|e| {
                panic!(
                    "{when}: kept connection via {node} broke: {e}\n{}",
                    self.diag()
                )
            });
            assert_eq!(
                &r,
                first,
                "{when}: kept connection via {node} changed backend or address\n{}",
                self.diag()
            );
        }
    }

    /// Drops everything and checks that no namespace of the run is left.
    fn finish(self, test: &str) {
        let prefix = format!("np-{}-", self.tb.cluster().run_id());
        let took = self.started.elapsed();
        drop(self);
        let left: Vec<_> = list_np_namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        eprintln!("{test}: {took:.1?}");
    }
}

/// Every step against both nodes: service up, a new Service after cut watches, an endpoint
/// removed through failing requests, a Service deleted behind a compacted history (410, the
/// agent re-lists), and a server outage.
#[test]
fn agents_follow_the_api_server_through_faults() {
    if !require_root() {
        return;
    }
    let mut kb = KubeBed::start();
    kb.tb
        .wait_for_service(WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", kb.diag()));
    let every = names(&["pa1", "pa2", "pb1"]);
    let pa2 = kb.pod_ip("pa2");
    let all_ips: BTreeSet<Ipv4Addr> = ["pa1", "pa2", "pb1"]
        .into_iter()
        .map(|p| kb.pod_ip(p))
        .collect();

    // 1. Both nodes answer on 30080, every backend is reached, the maps hold the service.
    for (node, t) in kb.reached(FIRST_PORT, CONNS, "step 1") {
        let seen: BTreeSet<String> = t.keys().cloned().collect();
        assert_eq!(
            seen,
            every,
            "step 1: backends via {node}: {t:?}\n{}",
            kb.diag()
        );
    }
    for node in ["node1", "node2"] {
        let pin = kb.pin(node);
        assert_eq!(
            frontends(&pin),
            BTreeSet::from([(FIRST_PORT, TCP)]),
            "step 1: NP_SVC of {node}"
        );
        let be = backends(&pin);
        assert_eq!(
            be.values().map(|(a, _)| *a).collect::<BTreeSet<_>>(),
            all_ips,
            "step 1: NP_BE of {node}: {be:?}"
        );
        assert!(be.values().all(|(_, p)| *p == 80), "step 1: ports {be:?}");
    }
    // Kept through every later step: none on pa2, which step 3 removes.
    let mut kept = kb.keep_alive_conns("pa2");

    // 2. Watches cut, then a second Service: the re-established watches bring it.
    kb.api.cut_watches();
    let second = second_service(kb.tb.manifests());
    let (svc2, slices2) = service_objects(&second);
    kb.api.create(&svc2).expect("create second");
    for s in &slices2 {
        kb.api.create(s).expect("create second's slice");
    }
    let up = poll_until(WAIT, Duration::from_millis(200), || {
        ["node1", "node2"].iter().all(|n| {
            frontends(&kb.pin(n)).contains(&(SECOND_PORT, TCP)) && kb.answers(n, SECOND_PORT)
        })
    });
    assert!(up, "step 2: 30081 never served\n{}", kb.diag());
    for (node, t) in kb.reached(SECOND_PORT, CONNS, "step 2") {
        let seen: BTreeSet<String> = t.keys().cloned().collect();
        assert_eq!(
            seen,
            names(&["pa1", "pb1"]),
            "step 2: 30081 backends via {node}: {t:?}"
        );
    }
    // A cut stream looks like an early end to kube-rs (`eof in poll`), which resumes the
    // watch from its last resource version: each agent's Node watch was opened again.
    for node in ["node1", "node2"] {
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
                kb.node_watches(node) >= 2
            }),
            "step 2: agent on {node} did not watch again after the cut\n{}",
            kb.diag()
        );
    }
    kb.check_kept(&mut kept, "step 2");
    kb.check_agents();

    // 3. The next 5 requests fail (500), the watches are cut so that the agents must make
    // requests, and pa2 leaves sample-nodeport's slice of node1.
    kb.api.fail_next(5);
    kb.api.cut_watches();
    kb.remove_endpoint("sample-nodeport", "node1", pa2);
    let mut last = String::new();
    let gone = poll_until(WAIT, Duration::from_millis(200), || {
        let maps: Vec<_> = ["node1", "node2"]
            .iter()
            .filter(|n| backend_addrs(&kb.pin(n)).contains(&pa2))
            .collect();
        if !maps.is_empty() {
            last = format!("NP_BE of {maps:?} holds pa2");
            return false;
        }
        // A stale table picks pa2 for a new connection with odds 1/3 each (3 backends in
        // both services): 30 misses in a row by chance have odds (2/3)^30, about 5e-6.
        let rs: Vec<_> = (0..30)
            .map(|i| {
                let node = ["node1", "node2"][i % 2];
                client::http_get(kb.client(), kb.addr(node, FIRST_PORT))
            })
            .collect();
        let t: BTreeMap<String, usize> = tally(&rs.iter().flatten().cloned().collect::<Vec<_>>());
        last = format!(
            "replies {t:?}, errors {}",
            rs.iter().filter(|r| r.is_err()).count()
        );
        rs.iter().all(|r| r.as_ref().is_ok_and(|r| r.from != "pa2"))
    });
    assert!(
        gone,
        "step 3: pa2 still served or mapped ({last})\n{}",
        kb.diag()
    );
    assert_eq!(
        kb.api.pending_failures(),
        0,
        "step 3: the injected failures were not all hit"
    );
    let failed = kb.api.requests().iter().filter(|r| r.status == 500).count();
    assert_eq!(
        failed,
        5,
        "step 3: {failed} requests got 500\n{}",
        kb.diag()
    );
    for (node, t) in kb.reached(FIRST_PORT, CONNS, "step 3") {
        let seen: BTreeSet<String> = t.keys().cloned().collect();
        assert_eq!(
            seen,
            names(&["pa1", "pb1"]),
            "step 3: backends via {node} after pa2's removal: {t:?}"
        );
    }
    kb.check_kept(&mut kept, "step 3");
    kb.check_agents();

    // 4. The history is compacted behind the agents: their re-watches get 410 Expired and
    // they must re-list, and `second` was deleted in between. The delay makes every re-watch
    // reach the server after the compaction.
    let relists_before: Vec<usize> = ["node1", "node2"]
        .iter()
        .map(|n| kb.tb.agent_log(n).matches("re-listing").count())
        .collect();
    let lists_before = kb.service_lists();
    kb.api.set_delay(Duration::from_millis(500));
    kb.api.cut_watches();
    kb.api
        .delete_named::<v1::Service>(Some("default"), "second")
        .expect("delete second");
    for s in &slices2 {
        kb.api.delete(s).expect("delete second's slice");
    }
    kb.api.compact();
    kb.api.set_delay(Duration::ZERO);
    let mut last = String::new();
    let removed = poll_until(WAIT, Duration::from_millis(200), || {
        kb.check_kept(&mut kept, "step 4");
        for node in ["node1", "node2"] {
            if let Err(e) = kb.get_many(node, FIRST_PORT, 2) {
                panic!("step 4: 30080 broke meanwhile: {e}\n{}", kb.diag());
            }
        }
        let still: Vec<_> = ["node1", "node2"]
            .into_iter()
            .filter(|n| {
                frontends(&kb.pin(n)).contains(&(SECOND_PORT, TCP)) || kb.answers(n, SECOND_PORT)
            })
            .collect();
        last = format!("30081 still mapped or answering via {still:?}");
        still.is_empty()
    });
    assert!(removed, "step 4: {last}\n{}", kb.diag());
    for (i, node) in ["node1", "node2"].into_iter().enumerate() {
        assert_eq!(
            frontends(&kb.pin(node)),
            BTreeSet::from([(FIRST_PORT, TCP)]),
            "step 4: NP_SVC of {node}"
        );
        let n = kb.tb.agent_log(node).matches("re-listing").count();
        assert!(
            n > relists_before[i],
            "step 4: agent on {node} did not re-list after the 410\n{}",
            kb.diag()
        );
    }
    // The server saw both agents list the Services again (the delete reached them by the
    // re-list, not by an event).
    assert!(
        kb.service_lists() >= lists_before + 2,
        "step 4: Services not listed again by both agents\n{}",
        kb.diag()
    );
    kb.check_kept(&mut kept, "step 4");

    // 5. The server goes away for a while: the agents see errors and back off, the datapath
    // keeps serving; a change made once it is back is picked up.
    let errors_before: Vec<usize> = ["node1", "node2"]
        .iter()
        .map(|n| kb.watch_errors(n))
        .collect();
    kb.api.stop();
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        kb.check_kept(&mut kept, "step 5, server stopped");
        for node in ["node1", "node2"] {
            if let Err(e) = kb.get_many(node, FIRST_PORT, 2) {
                panic!(
                    "step 5: 30080 broke while the server is down: {e}\n{}",
                    kb.diag()
                );
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    kb.check_agents();
    for (i, node) in ["node1", "node2"].into_iter().enumerate() {
        assert!(
            kb.watch_errors(node) > errors_before[i],
            "step 5: agent on {node} saw no error while the server was down\n{}",
            kb.diag()
        );
    }
    // The listening socket is made again: in the lan namespace too.
    run_in(kb.tb.cluster().lan(), || kb.api.restart()).expect("restart the API server");
    kb.restore_endpoint("sample-nodeport", "pa2");
    let mut last = String::new();
    let back = poll_until(WAIT, Duration::from_millis(200), || {
        kb.check_kept(&mut kept, "step 5, server back");
        let maps: Vec<_> = ["node1", "node2"]
            .into_iter()
            .filter(|n| !backend_addrs(&kb.pin(n)).contains(&pa2))
            .collect();
        if !maps.is_empty() {
            last = format!("NP_BE of {maps:?} lacks pa2");
            return false;
        }
        let rs = kb.get_many("node1", FIRST_PORT, 10).unwrap_or_default();
        let rs2 = kb.get_many("node2", FIRST_PORT, 10).unwrap_or_default();
        last = format!(
            "replies via node1 {:?}, via node2 {:?}",
            tally(&rs),
            tally(&rs2)
        );
        rs.iter().any(|r| r.from == "pa2") && rs2.iter().any(|r| r.from == "pa2")
    });
    assert!(
        back,
        "step 5: pa2 not back after the restart ({last})\n{}",
        kb.diag()
    );
    for (node, t) in kb.reached(FIRST_PORT, CONNS, "step 5") {
        let seen: BTreeSet<String> = t.keys().cloned().collect();
        assert_eq!(seen, every, "step 5: backends via {node}: {t:?}");
    }
    kb.check_kept(&mut kept, "the end");
    kb.check_agents();
    drop(kept);
    kb.finish("agents_follow_the_api_server_through_faults");
}

/// An agent restarted on the pinned state of an earlier run while the API server refuses
/// every request keeps that state whole (the datapath serves, the maps are not wiped), and
/// applies the cluster's state once it can list.
#[test]
fn restarted_agent_deletes_nothing_before_its_first_list() {
    if !require_root() {
        return;
    }
    let mut kb = KubeBed::start();
    kb.tb
        .wait_for_service(WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", kb.diag()));
    let pa2 = kb.pod_ip("pa2");
    let pin = kb.pin("node1");
    let svc_before = frontends(&pin);
    let be_before = backends(&pin);
    assert!(
        svc_before.contains(&(FIRST_PORT, TCP)) && be_before.values().any(|(a, _)| *a == pa2),
        "NP_SVC {svc_before:?}, NP_BE {be_before:?}\n{}",
        kb.diag()
    );

    kb.tb.kill_agent("node1");
    // While no agent runs on node1, pa2 leaves the cluster: the restarted agent may apply
    // that only once it has listed everything.
    kb.remove_endpoint("sample-nodeport", "node1", pa2);
    // Every request fails from now on (node2's agent keeps its open watches).
    kb.api.fail_next(1_000_000);
    kb.tb.restart_agent("node1");
    let failing = poll_until(WAIT, Duration::from_millis(100), || {
        let log = kb.tb.agent_log("node1");
        log.contains("restored state from the pinned maps") && log.contains(WATCH_ERROR)
    });
    kb.check_agents();
    assert!(
        failing,
        "restarted agent never started listing\n{}",
        kb.diag()
    );

    // The window: the agent runs, cannot list, and must leave everything in place.
    let window = Instant::now();
    let mut samples = 0;
    while window.elapsed() < Duration::from_secs(3) {
        let rs = kb
            .get_many("node1", FIRST_PORT, 5)
            .unwrap_or_else(|e| panic!("while the agent cannot list: {e}\n{}", kb.diag()));
        assert_eq!(rs.len(), 5);
        assert_eq!(
            frontends(&pin),
            svc_before,
            "NP_SVC changed before the first list\n{}",
            kb.diag()
        );
        assert_eq!(
            backends(&pin),
            be_before,
            "NP_BE changed before the first list\n{}",
            kb.diag()
        );
        samples += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let log = kb.tb.agent_log("node1");
    assert!(
        !log.contains("synced") && !log.contains("first complete snapshot"),
        "the agent synced although every request failed\n{}",
        kb.diag()
    );
    assert!(kb.api.pending_failures() > 0);
    assert!(samples >= 5, "{samples} samples in the window");

    // The server answers again: the agent lists, syncs and drops pa2.
    kb.api.fail_next(0);
    let synced = poll_until(WAIT, Duration::from_millis(100), || {
        kb.tb.agent_log("node1").contains("synced")
    });
    assert!(
        synced,
        "the agent never synced once the server answered\n{}",
        kb.diag()
    );
    let mut last = String::new();
    let applied = poll_until(WAIT, Duration::from_millis(200), || {
        let addrs = backend_addrs(&pin);
        let rs = kb.get_many("node1", FIRST_PORT, 30);
        last = format!(
            "NP_BE {addrs:?}, replies {:?}",
            rs.as_ref().map(|r| tally(r))
        );
        !addrs.contains(&pa2) && rs.is_ok_and(|rs| rs.iter().all(|r| r.from != "pa2"))
    });
    assert!(
        applied,
        "pa2's removal not applied after the sync ({last})\n{}",
        kb.diag()
    );
    assert_eq!(frontends(&pin), svc_before, "NP_SVC after the sync");
    // Backend ids of the earlier run are kept for the backends that stay.
    let be_after = backends(&pin);
    for (id, b) in &be_after {
        assert_eq!(
            be_before.get(id),
            Some(b),
            "backend id {id} changed: {be_after:?}"
        );
    }
    let log = kb.tb.agent_log("node1");
    assert!(
        log.contains("reusing pinned maps"),
        "maps not reused:\n{log}"
    );
    kb.check_agents();
    kb.finish("restarted_agent_deletes_nothing_before_its_first_list");
}

/// kube-proxy's label selectors: a Service labelled for another proxy is not served (its
/// nodePort stays the node's: nothing listens there, the connection is refused) and the
/// EndpointSlices of headless Services are not read. A third Service, created last, shows
/// the agents have seen everything before.
#[test]
fn other_proxies_services_and_headless_slices_are_left_alone() {
    if !require_root() {
        return;
    }
    let mut kb = KubeBed::start();
    if let Err(e) = kb.tb.wait_for_service(WAIT) {
        panic!("{e}\n{}", kb.diag());
    }
    let mut other = second_service(kb.tb.manifests());
    let (mut svc, slices) = service_objects(&other);
    svc.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_string(),
            "another-proxy".to_string(),
        )]
        .into(),
    );
    kb.api
        .create(&svc)
        .expect("create the other proxy's Service");
    for s in &slices {
        kb.api.create(s).expect("create its slice");
    }
    // The third Service: its own slices, plus a headless-labelled slice naming it with an
    // address no pod has.
    other.service.name = "third".into();
    other.service.ports[0].node_port = THIRD_PORT;
    let (svc3, slices3) = service_objects(&other);
    let mut headless = slices3[0].clone();
    headless.metadata.name = Some("third-headless".into());
    headless
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("service.kubernetes.io/headless".into(), String::new());
    headless.endpoints[0].addresses = vec![HEADLESS_ADDR.to_string()];
    kb.api.create(&headless).expect("create the headless slice");
    kb.api.create(&svc3).expect("create third");
    for s in &slices3 {
        kb.api.create(s).expect("create third's slice");
    }
    let up = poll_until(WAIT, Duration::from_millis(200), || {
        ["node1", "node2"].iter().all(|n| {
            frontends(&kb.pin(n)).contains(&(THIRD_PORT, TCP)) && kb.answers(n, THIRD_PORT)
        })
    });
    assert!(up, "30082 never served\n{}", kb.diag());
    for node in ["node1", "node2"] {
        let pin = kb.pin(node);
        assert!(
            !frontends(&pin).contains(&(SECOND_PORT, TCP)),
            "{node} serves the other proxy's Service"
        );
        assert!(
            !backend_addrs(&pin).contains(&HEADLESS_ADDR),
            "{node} read a headless Service's slice"
        );
        let r = client::http_get(kb.client(), kb.addr(node, SECOND_PORT));
        assert!(
            r.as_ref().is_err_and(|e| !e.is_timeout()),
            "the other proxy's nodePort via {node}: {r:?} (want a refusal from the node)"
        );
    }
    kb.check_agents();
}

/// The zone of each node in [`zone_hints_keep_cluster_traffic_in_the_zone`].
const ZONES: [(&str, &str); 2] = [("node1", "zone-a"), ("node2", "zone-b")];

/// `slices` with each endpoint hinted for the zone `zone_of` gives its pod.
fn hinted(slices: &[EndpointSlice], zone_of: impl Fn(&str) -> &'static str) -> Vec<EndpointSlice> {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
    let mut out = slices.to_vec();
    for s in &mut out {
        for e in &mut s.endpoints {
            let pod = e
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .expect("endpoint names its pod");
            e.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone {
                    name: zone_of(&pod).into(),
                }]),
                for_nodes: None,
            });
        }
    }
    out
}

/// Topology hints as kube-proxy applies them to Cluster-policy traffic: node1 is in
/// zone-a, node2 in zone-b (Node label `topology.kubernetes.io/zone`). With pa1 (node1)
/// and pb1 (node2) hinted for zone-a and pa2 for zone-b, node1 sends to pa1 and pb1 only
/// (pb1 across nodes: a zone, not the node) and node2 to pa2 only. With every endpoint
/// hinted for zone-b, zone-a has none and node1 falls back to all three.
#[test]
fn zone_hints_keep_cluster_traffic_in_the_zone() {
    if !require_root() {
        return;
    }
    let mut kb = KubeBed::start();
    if let Err(e) = kb.tb.wait_for_service(WAIT) {
        panic!("{e}\n{}", kb.diag());
    }
    let m = kb.tb.manifests().clone();
    for n in &m.nodes {
        let mut node: v1::Node = parse(&n.to_yaml());
        let zone = ZONES
            .iter()
            .find(|(name, _)| *name == n.name)
            .map(|(_, z)| *z)
            .expect("a zone for every node");
        node.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("topology.kubernetes.io/zone".into(), zone.into());
        kb.api.apply(&node).expect("label the Node with its zone");
    }
    let (_, slices) = service_objects(&m);
    let every = names(&["pa1", "pa2", "pb1"]);
    // Waits until the backends reached through each node are `want` (all of them, over
    // CONNS connections each); panics with what was reached.
    let settle = |kb: &KubeBed, want: &[(&str, BTreeSet<String>)], what: &str| {
        let mut last = BTreeMap::new();
        let ok = poll_until(WAIT, Duration::from_millis(500), || {
            last = kb.reached(FIRST_PORT, CONNS, what);
            want.iter()
                .all(|(node, pods)| last[*node].keys().cloned().collect::<BTreeSet<_>>() == *pods)
        });
        assert!(ok, "{what}: reached {last:?}, want {want:?}\n{}", kb.diag());
    };

    let by_zone = |pod: &str| if pod == "pa2" { "zone-b" } else { "zone-a" };
    let narrowed = [
        ("node1", names(&["pa1", "pb1"])),
        ("node2", names(&["pa2"])),
    ];
    let apply = |kb: &KubeBed, slices: Vec<EndpointSlice>| {
        for s in slices {
            kb.api.apply(&s).expect("update the slice");
        }
    };
    apply(&kb, hinted(&slices, by_zone));
    settle(&kb, &narrowed, "hints for both zones");

    // One ready endpoint without hints: hints are ignored everywhere.
    let mut partly = hinted(&slices, by_zone);
    for s in &mut partly {
        for e in &mut s.endpoints {
            if e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some("pb1") {
                e.hints = None;
            }
        }
    }
    apply(&kb, partly);
    settle(
        &kb,
        &[("node1", every.clone()), ("node2", every.clone())],
        "pb1 without hints",
    );

    // Hinted again; then no endpoint for zone-a: node1 falls back to them all (node2's
    // zone-b has them all).
    apply(&kb, hinted(&slices, by_zone));
    settle(&kb, &narrowed, "hints for both zones again");
    apply(&kb, hinted(&slices, |_| "zone-b"));
    settle(
        &kb,
        &[("node1", every.clone()), ("node2", every)],
        "no hint for zone-a",
    );
    kb.check_agents();
}
