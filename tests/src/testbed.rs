//! A cluster with echo pods, a manifests folder and one agent per node: what `np-demo` runs
//! and what the end-to-end tests start from. Dropping it stops the agents (SIGTERM, bounded
//! wait), removes their pins, the manifests folder and the cluster, in that order.
//!
//! Agent contract (the only way the harness talks to the agent, so it never links it):
//! `AGENT --interface lan0 --node-name NODE --manifests DIR --pin-path /sys/fs/bpf/np-<id>-NODE`
//! run inside the node's network namespace with `nsenter --net` (mount namespace shared,
//! so the agent sees /sys/fs/bpf). [`Testbed::start_kube_agents`] passes
//! `--kubeconfig PATH` instead of `--manifests DIR`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    apiserver::{ApiServer, ApiServerConfig},
    client::{self, EchoReply},
    cluster::{Cluster, ClusterSpec, IpFamily, LanKind},
    manifests::{Manifests, Protocol, Service, SAMPLE_NODE_PORT},
    netns::{ensure_bpffs, run_in, Child, PinPath, TempDir},
};

/// Where the test API server listens: the first address of the lan, held by its bridge.
pub const API_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 1);

/// A test API server at [`API_IP`] in `tb`'s lan namespace (`config.listen` is replaced;
/// the nodes reach it over the lan), seeded with the testbed's Nodes, its Service and one
/// EndpointSlice per node, and a kubeconfig for it in a temp dir (removed on drop).
pub fn lan_api_server(tb: &Testbed, config: ApiServerConfig) -> (ApiServer, TempDir, PathBuf) {
    let lan = tb.cluster().lan();
    lan.ip(&format!(
        "addr add {API_IP}/{} dev br0",
        tb.cluster().spec().lan_prefix
    ));
    let api = run_in(lan, || {
        ApiServer::start_with(ApiServerConfig {
            listen: SocketAddr::from((API_IP, 0)),
            ..config
        })
    })
    .expect("starting the API server in the lan namespace");
    let dir = TempDir::new(tb.cluster().run_id(), "kube");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .expect("writing the kubeconfig");
    let m = tb.manifests();
    let parse = |what: &str, yaml: &str| {
        serde_yaml::from_str::<serde_yaml::Value>(yaml)
            .unwrap_or_else(|e| panic!("{what}: {e}:\n{yaml}"))
    };
    for n in &m.nodes {
        let node: k8s_openapi::api::core::v1::Node =
            serde_yaml::from_value(parse("Node", &n.to_yaml())).expect("Node");
        api.create(&node).expect("create Node");
    }
    let svc: k8s_openapi::api::core::v1::Service =
        serde_yaml::from_value(parse("Service", &m.service.to_yaml())).expect("Service");
    api.create(&svc).expect("create Service");
    for n in &m.nodes {
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_yaml::from_value(parse("EndpointSlice", &m.endpoint_slice_yaml(&n.name)))
                .expect("EndpointSlice");
        api.create(&slice).expect("create EndpointSlice");
    }
    (api, dir, kubeconfig)
}

/// How long a stopping agent gets between SIGTERM and SIGKILL.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The agent binary: `$NODEPORT_AGENT`, else `<workspace>/target/release/nodeport-agent`.
pub fn default_agent_path() -> PathBuf {
    std::env::var_os("NODEPORT_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/nodeport-agent"))
}

/// All replies of a batch, panicking (with the agents' logs) on the first error.
pub fn all_ok(tb: &Testbed, what: &str, rs: Vec<client::Result<EchoReply>>) -> Vec<EchoReply> {
    let n = rs.len();
    rs.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("{what}: request {i}/{n} failed: {e}\n{}", tb.agent_logs()))
        })
        .collect()
}

/// The pods that answered.
pub fn backends(rs: &[EchoReply]) -> BTreeSet<String> {
    rs.iter().map(|r| r.from.clone()).collect()
}

/// A set of pod names.
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Under `externalTrafficPolicy: Cluster`, entering through `node`: a backend on `node`
/// sees the client's own address, a backend elsewhere sees `node`'s address (SNAT), in the
/// family of the request: its lan address, or on a VXLAN pod network its tunnel's
/// ([`Cluster::remote_pod_source`]). Both kinds must occur.
pub fn assert_cluster_policy_addresses(
    c: &Cluster,
    node: &str,
    family: IpFamily,
    rs: &[EchoReply],
) {
    let (mut local, mut remote) = (0, 0);
    for r in rs {
        let backend_node = c.pod_node(&r.from);
        if backend_node == node {
            local += 1;
            assert_eq!(
                r.client_ip,
                c.client_addr(family),
                "{} backend {} on {node} (the receiving node) must see the client's address",
                family.as_str(),
                r.from
            );
        } else {
            remote += 1;
            assert_eq!(
                r.client_ip,
                c.remote_pod_source(node, family),
                "{} backend {} on {backend_node} must see {node}'s address (SNAT), not the \
                 client's",
                family.as_str(),
                r.from
            );
        }
    }
    assert!(
        local > 0 && remote > 0,
        "via {node} ({}): {local} local and {remote} remote answers; want both",
        family.as_str()
    );
}

/// The echo server binary: `NP_ECHO` (set by `cargo xtask test`), else `built` (tests pass
/// `env!("CARGO_BIN_EXE_np-echo")`, the one cargo built for them).
pub fn echo_path(built: &str) -> PathBuf {
    std::env::var_os("NP_ECHO").map_or_else(|| PathBuf::from(built), PathBuf::from)
}

/// Polls `f` every `every` until it returns true or `timeout` passes; returns the last result.
pub fn poll_until(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(every);
    }
}

#[derive(Clone, Debug)]
pub struct TestbedOptions {
    pub spec: ClusterSpec,
    pub service: Service,
    /// The np-echo binary.
    pub echo: PathBuf,
    /// The agent binary; `None` runs the cluster without agents.
    pub agent: Option<PathBuf>,
    /// Extra arguments appended to every agent's command line.
    pub agent_args: Vec<String>,
}

impl TestbedOptions {
    /// The standard cluster, `sample-nodeport` with TCP and UDP, no agent.
    pub fn standard(echo: PathBuf) -> TestbedOptions {
        TestbedOptions {
            spec: ClusterSpec::standard(),
            service: Service::sample_nodeport_with_udp(),
            echo,
            agent: None,
            agent_args: Vec::new(),
        }
    }

    pub fn with_agent(mut self, agent: PathBuf) -> TestbedOptions {
        self.agent = Some(agent);
        self
    }
}

/// Where the agents read their objects from.
#[derive(Clone, Debug)]
enum AgentSource {
    /// `--manifests DIR`: the testbed's manifests folder (the default).
    Manifests,
    /// `--kubeconfig PATH`: a Kubernetes API server (see [`Testbed::start_kube_agents`]).
    Kubeconfig(PathBuf),
}

/// One running agent.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    /// Stopped (SIGTERM, then SIGKILL after the grace) before the pin goes.
    child: Child,
    pin: PinPath,
}

impl Agent {
    pub fn pin_path(&self) -> &Path {
        self.pin.path()
    }

    pub fn log(&self) -> String {
        self.child.log()
    }
}

#[derive(Debug)]
pub struct Testbed {
    // Field order is drop order: agents, then the folder they read, then the cluster.
    agents: Vec<Agent>,
    manifest_dir: TempDir,
    manifests: Manifests,
    echo: PathBuf,
    /// Agent binary and extra arguments, to restart an agent the same way.
    agent_bin: Option<PathBuf>,
    agent_args: Vec<String>,
    source: AgentSource,
    cluster: Cluster,
}

impl Testbed {
    /// Builds the cluster, starts an echo server in every pod, writes the manifests (every
    /// pod a ready endpoint) and starts the agents. Does not wait for the service.
    pub fn start(opts: TestbedOptions) -> Testbed {
        assert!(
            opts.echo.is_file(),
            "echo server binary {} not found (build it: cargo build -p tests --bins)",
            opts.echo.display()
        );
        if let Some(a) = &opts.agent {
            assert!(
                a.is_file(),
                "agent binary {} not found: build it (cargo build --release -p nodeport-agent) \
                 or point NODEPORT_AGENT at it",
                a.display()
            );
            ensure_bpffs();
        }
        let mut cluster = Cluster::new(opts.spec);
        cluster.start_all_echo(&opts.echo);
        let manifests = Manifests::from_cluster(&cluster, opts.service);
        let manifest_dir = TempDir::new(cluster.run_id(), "manifests");
        manifests
            .write_to(manifest_dir.path())
            .unwrap_or_else(|e| panic!("cannot write manifests: {e}"));
        let mut tb = Testbed {
            agents: Vec::new(),
            manifest_dir,
            manifests,
            echo: opts.echo,
            agent_bin: opts.agent.clone(),
            agent_args: opts.agent_args.clone(),
            source: AgentSource::Manifests,
            cluster,
        };
        if let Some(agent) = &opts.agent {
            let nodes: Vec<String> = tb.cluster.nodes().iter().map(|n| n.name.clone()).collect();
            for node in nodes {
                tb.start_agent(agent, &node, &opts.agent_args);
            }
        }
        tb
    }

    /// Starts an agent on every node that watches the Kubernetes API server of `kubeconfig`
    /// (`--kubeconfig PATH` instead of `--manifests DIR`), with the extra arguments of the
    /// options. For a testbed started without an agent (the server usually needs the
    /// cluster to exist first, e.g. to listen on the lan). [`Testbed::restart_agent`] starts
    /// them again the same way. Does not wait for the service.
    pub fn start_kube_agents(&mut self, agent: PathBuf, kubeconfig: PathBuf) {
        assert!(self.agents.is_empty(), "agents are running already");
        assert!(
            agent.is_file(),
            "agent binary {} not found: build it (cargo build --release -p nodeport-agent) \
             or point NODEPORT_AGENT at it",
            agent.display()
        );
        ensure_bpffs();
        self.agent_bin = Some(agent.clone());
        self.source = AgentSource::Kubeconfig(kubeconfig);
        let nodes: Vec<String> = self
            .cluster
            .nodes()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let extra = self.agent_args.clone();
        for node in nodes {
            self.start_agent(&agent, &node, &extra);
        }
    }

    /// [`Testbed::start`], then wait (30 s at most) until the service answers through every
    /// node; panics with the agents' logs otherwise.
    pub fn serving(opts: TestbedOptions) -> Testbed {
        let mut tb = Testbed::start(opts);
        if let Err(e) = tb.wait_for_service(Duration::from_secs(30)) {
            panic!("{e}");
        }
        tb
    }

    fn start_agent(&mut self, agent: &Path, node: &str, extra: &[String]) {
        let pin = PinPath::new(&format!("np-{}-{node}", self.cluster.run_id()));
        self.spawn_agent(agent, node, extra, pin);
    }

    /// SIGKILL the agent of `node`: no cleanup runs, its pins (maps, links) stay.
    pub fn kill_agent(&mut self, node: &str) {
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on {node}"));
        a.child.kill();
    }

    /// SIGTERM the agent of `node` and wait for it to exit (its clean shutdown runs).
    pub fn stop_agent(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on {node}"));
        a.child.terminate(AGENT_STOP_GRACE)
    }

    /// Start the agent of `node` again, on the same pin path, after `kill_agent`.
    pub fn restart_agent(&mut self, node: &str) {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on {node}"));
        let Agent { child, pin, .. } = self.agents.remove(i);
        drop(child);
        let agent = self
            .agent_bin
            .clone()
            .expect("testbed started without an agent");
        let extra = self.agent_args.clone();
        self.spawn_agent(&agent, node, &extra, pin);
    }

    fn spawn_agent(&mut self, agent: &Path, node: &str, extra: &[String], pin: PinPath) {
        // A restarted agent logs to a new file, so the earlier run's log stays readable.
        let mut log = self.cluster.log_dir().join(format!("agent-{node}.log"));
        let mut n = 1;
        while log.exists() {
            n += 1;
            log = self.cluster.log_dir().join(format!("agent-{node}-{n}.log"));
        }
        let agent = agent.to_str().expect("utf-8 agent path");
        let (source_flag, source_path) = match &self.source {
            AgentSource::Manifests => ("--manifests", self.manifest_dir.path()),
            AgentSource::Kubeconfig(path) => ("--kubeconfig", path.as_path()),
        };
        let source_path = source_path.to_str().expect("utf-8 path").to_string();
        let pin_s = pin.path().to_str().expect("utf-8 pin path").to_string();
        let mut argv: Vec<&str> = vec![
            agent,
            "--interface",
            "lan0",
            "--node-name",
            node,
            source_flag,
            &source_path,
            "--pin-path",
            &pin_s,
        ];
        argv.extend(extra.iter().map(String::as_str));
        // A wire-like lan is where native XDP delivers; there the tests hold the agent to
        // it (under `auto` it would choose it too, unless the uplink is a veth, which it
        // is here). A lan of default veths runs the agent's own choice.
        if self.cluster.spec().lan == LanKind::Wire && !extra.iter().any(|a| a == "--xdp-mode") {
            argv.extend(["--xdp-mode", "native"]);
        }
        let child = self
            .cluster
            .node(node)
            .ns()
            .spawn(&argv, Some(&log))
            .with_term_grace(AGENT_STOP_GRACE);
        self.agents.push(Agent {
            node: node.to_string(),
            child,
            pin,
        });
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster, to change its links (e.g. [`Cluster::recreate_uplink`]).
    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The datapath counter `name` of `node`'s agent, summed over CPUs (read from its pins).
    pub fn counter(&self, node: &str, name: &str) -> u64 {
        let agent = self
            .agents()
            .iter()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent on {node}"));
        let counters = nodeport_agent::datapath::MapReader::open(agent.pin_path())
            .and_then(|m| m.counters())
            .unwrap_or_else(|e| panic!("{node}: reading counters: {e}"));
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{node}: no counter {name} in {counters:?}"))
            .1
    }

    pub fn agent_log(&self, node: &str) -> String {
        self.agents
            .iter()
            .find(|a| a.node == node)
            .map(Agent::log)
            .unwrap_or_default()
    }

    /// The agent's `/metrics` on `node` (its default `--metrics-addr`, from inside the node);
    /// empty when it does not answer.
    pub fn agent_metrics(&self, node: &str) -> String {
        use std::io::{Read as _, Write as _};
        crate::netns::run_in(self.cluster().node(node).ns(), || {
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", 10249)) else {
                return String::new();
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ =
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.split_once("\r\n\r\n")
                .map(|(_, body)| body.to_string())
                .unwrap_or_default()
        })
    }

    /// All agent logs, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("----- agent {} log -----\n{}\n", a.node, a.log()))
            .collect()
    }

    /// Err with the agent's log when an agent has exited.
    pub fn check_agents(&mut self) -> Result<(), String> {
        for a in &mut self.agents {
            if let Some(st) = a.child.try_wait() {
                return Err(format!(
                    "agent on {} exited early ({st}); its output:\n{}",
                    a.node,
                    a.child.log()
                ));
            }
        }
        Ok(())
    }

    pub fn manifests(&self) -> &Manifests {
        &self.manifests
    }

    pub fn manifest_dir(&self) -> &Path {
        self.manifest_dir.path()
    }

    /// Changes the manifests with `f` and rewrites the folder (atomically per file).
    pub fn update_manifests(&mut self, f: impl FnOnce(&mut Manifests)) {
        f(&mut self.manifests);
        self.manifests
            .write_to(self.manifest_dir.path())
            .unwrap_or_else(|e| panic!("cannot write manifests: {e}"));
    }

    /// Adds a pod to the running cluster (its IPv6 address derived from `ip`), starts its
    /// echo server and adds it to its node's EndpointSlices of both families.
    pub fn add_pod(&mut self, node: &str, name: &str, ip: std::net::Ipv4Addr) {
        let ip6 = self.cluster.add_pod(node, name, ip).ip6;
        let echo = self.echo.clone();
        self.cluster.start_echo(name, &echo);
        self.update_manifests(|m| {
            m.add_endpoint(name, ip, node);
            m.add_endpoint(name, ip6, node);
        });
    }

    /// Sets the conditions of every endpoint of pod `pod` (both families), e.g. a rolling
    /// update's `ready: false, serving: true, terminating: true` (the pod keeps running).
    pub fn set_conditions(&mut self, pod: &str, ready: bool, serving: bool, terminating: bool) {
        self.update_manifests(|m| {
            let mut found = false;
            for e in m.endpoints.iter_mut().filter(|e| e.pod == pod) {
                (e.ready, e.serving, e.terminating) = (ready, serving, terminating);
                found = true;
            }
            assert!(found, "{pod} is not an endpoint");
        });
    }

    /// Removes pod `pod` from its EndpointSlice (the pod keeps running).
    pub fn remove_endpoint(&mut self, pod: &str) {
        self.update_manifests(|m| {
            assert!(m.remove_endpoint(pod), "{pod} is not an endpoint");
        });
    }

    /// Whether `node`'s datapath has the nodePort frontend of protocol `proto` (the first
    /// port's nodePort) with the `externalTrafficPolicy: Local` flag set as `local`.
    pub fn nodeport_policy_is(&self, node: &str, proto: u8, local: bool) -> bool {
        let agent = self.agents().iter().find(|a| a.node == node).unwrap();
        let Ok(maps) = nodeport_agent::datapath::MapReader::open(agent.pin_path()) else {
            return false;
        };
        let port = self.nodeport_addr(node).port().to_be();
        maps.services().unwrap_or_default().iter().any(|(k, v)| {
            k.addr == 0
                && k.port == port
                && k.proto == proto
                && (v.flags & nodeport_common::SVC_F_LOCAL != 0) == local
        })
    }

    /// `node's address:30080` (the first port's nodePort), IPv4.
    pub fn nodeport_addr(&self, node: &str) -> SocketAddr {
        self.nodeport_addr_in(node, IpFamily::V4)
    }

    /// `[node's IPv6 address]:30080`.
    pub fn nodeport_addr6(&self, node: &str) -> SocketAddr {
        self.nodeport_addr_in(node, IpFamily::V6)
    }

    /// The node's address of `family` with the first port's nodePort.
    pub fn nodeport_addr_in(&self, node: &str, family: IpFamily) -> SocketAddr {
        let port = self
            .manifests
            .service
            .ports
            .first()
            .map(|p| p.node_port)
            .unwrap_or(SAMPLE_NODE_PORT);
        SocketAddr::new(self.cluster.node(node).addr(family), port)
    }

    /// Waits (bounded) until, through every node and in every family of the service, the
    /// client gets an HTTP answer (and a UDP one when the service has a UDP port). Err with
    /// the reason and agent logs otherwise.
    pub fn wait_for_service(&mut self, timeout: Duration) -> Result<(), String> {
        let udp = self
            .manifests
            .service
            .ports
            .iter()
            .any(|p| p.protocol == Protocol::Udp);
        let mut addrs: Vec<(String, SocketAddr)> = Vec::new();
        for f in self.manifests.service.families() {
            for n in self.cluster.nodes() {
                addrs.push((n.name.clone(), self.nodeport_addr_in(&n.name, f)));
            }
        }
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        for (node, addr) in addrs {
            loop {
                self.check_agents()?;
                let tcp = client::http_get(self.cluster.client(), addr);
                let ok = match tcp {
                    Ok(_) if !udp => true,
                    Ok(_) => match client::udp_request(self.cluster.client(), addr) {
                        Ok(_) => true,
                        Err(e) => {
                            last = format!("udp: {e}");
                            false
                        }
                    },
                    Err(e) => {
                        last = format!("tcp: {e}");
                        false
                    }
                };
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "service not answering through {node} ({addr}) after {timeout:?}: {last}\n{}",
                        self.agent_logs()
                    ));
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }
}
