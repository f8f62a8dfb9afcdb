//! Kubernetes manifests for the agent's manifests mode: the seeds' `sample-nodeport`
//! Service (optionally with a UDP port on the same nodePort), one EndpointSlice per node and
//! the Node objects, written one object per file into a folder. Every file is replaced
//! atomically (write `.NAME.tmp`, then rename), so an agent polling the folder never reads a
//! half-written file; it should skip names starting with `.`.

use std::{collections::BTreeSet, fmt::Write as _, fs, io, net::Ipv4Addr, path::Path};

use crate::cluster::{Cluster, ECHO_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name, also the EndpointSlice port name.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub node_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `spec.selector.app`.
    pub app: String,
    pub ports: Vec<ServicePort>,
    /// `spec.externalTrafficPolicy` when set (`Cluster` or `Local`).
    pub external_traffic_policy: Option<String>,
    /// `spec.healthCheckNodePort` when set (the agent serves it for `Local` NodePort
    /// services too).
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` with this `timeoutSeconds` when set.
    pub session_affinity_timeout: Option<u32>,
}

/// The seeds' nodePort.
pub const SAMPLE_NODE_PORT: u16 = 30080;

impl Service {
    /// The seeds' `sample-nodeport`: NodePort, port 8080, targetPort 80, nodePort 30080, TCP,
    /// port name `http-port`, selector app=sample-app.
    pub fn sample_nodeport() -> Service {
        Service {
            name: "sample-nodeport".into(),
            namespace: "default".into(),
            app: "sample-app".into(),
            ports: vec![ServicePort {
                name: "http-port".into(),
                protocol: Protocol::Tcp,
                port: 8080,
                target_port: ECHO_PORT,
                node_port: SAMPLE_NODE_PORT,
            }],
            external_traffic_policy: None,
            health_check_node_port: None,
            session_affinity_timeout: None,
        }
    }

    /// `sample-nodeport` plus `udp-port` (UDP 8080 -> 80, nodePort 30080: TCP and UDP may
    /// share a nodePort number).
    pub fn sample_nodeport_with_udp() -> Service {
        let mut s = Service::sample_nodeport();
        s.ports.push(ServicePort {
            name: "udp-port".into(),
            protocol: Protocol::Udp,
            port: 8080,
            target_port: ECHO_PORT,
            node_port: SAMPLE_NODE_PORT,
        });
        s
    }

    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: NodePort\n",
            self.name, self.namespace
        );
        if let Some(p) = &self.external_traffic_policy {
            let _ = writeln!(y, "  externalTrafficPolicy: {p}");
        }
        if let Some(p) = self.health_check_node_port {
            let _ = writeln!(y, "  healthCheckNodePort: {p}");
        }
        if let Some(t) = self.session_affinity_timeout {
            let _ = writeln!(
                y,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}"
            );
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = write!(
                y,
                "  - name: \"{}\"\n    protocol: {}\n    port: {}\n    targetPort: {}\n    nodePort: {}\n",
                p.name,
                p.protocol.as_str(),
                p.port,
                p.target_port,
                p.node_port
            );
        }
        let _ = write!(y, "  selector:\n    app: {}\n", self.app);
        y
    }
}

/// One endpoint (a pod) of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub node_name: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A Node object: name and InternalIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObject {
    pub name: String,
    pub internal_ip: Ipv4Addr,
}

impl NodeObject {
    pub fn to_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {0}\n  labels:\n    kubernetes.io/hostname: {0}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: \"{1}\"\n  - type: Hostname\n    address: {0}\n",
            self.name, self.internal_ip
        )
    }
}

/// Everything the agent reads: one Service, its endpoints, the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifests {
    pub service: Service,
    pub endpoints: Vec<Endpoint>,
    pub nodes: Vec<NodeObject>,
}

impl Manifests {
    /// `service` with every pod of `cluster` as a ready endpoint, and every node.
    pub fn from_cluster(cluster: &Cluster, service: Service) -> Manifests {
        Manifests {
            service,
            endpoints: cluster
                .pods()
                .iter()
                .map(|p| Endpoint {
                    pod: p.name.clone(),
                    ip: p.ip,
                    node_name: p.node.clone(),
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
            nodes: cluster
                .nodes()
                .iter()
                .map(|n| NodeObject {
                    name: n.name.clone(),
                    internal_ip: n.ip,
                })
                .collect(),
        }
    }

    /// Adds a ready endpoint.
    pub fn add_endpoint(&mut self, pod: &str, ip: Ipv4Addr, node: &str) {
        self.endpoints.retain(|e| e.pod != pod);
        self.endpoints.push(Endpoint {
            pod: pod.into(),
            ip,
            node_name: node.into(),
            ready: true,
            serving: true,
            terminating: false,
        });
    }

    /// Removes pod `pod` from its slice; returns whether it was there.
    pub fn remove_endpoint(&mut self, pod: &str) -> bool {
        let before = self.endpoints.len();
        self.endpoints.retain(|e| e.pod != pod);
        before != self.endpoints.len()
    }

    /// The EndpointSlice of node `node` (also when it has no endpoints: an empty slice
    /// says "none here" explicitly).
    pub fn endpoint_slice_yaml(&self, node: &str) -> String {
        let svc = &self.service;
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-{1}\n  namespace: {2}\n  labels:\n    kubernetes.io/service-name: {0}\n    endpointslice.kubernetes.io/managed-by: np-tests\naddressType: IPv4\nports:\n",
            svc.name, node, svc.namespace
        );
        for p in &svc.ports {
            let _ = write!(
                y,
                "- name: \"{}\"\n  protocol: {}\n  port: {}\n",
                p.name,
                p.protocol.as_str(),
                p.target_port
            );
        }
        let eps: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| e.node_name == node)
            .collect();
        if eps.is_empty() {
            y.push_str("endpoints: []\n");
        } else {
            y.push_str("endpoints:\n");
        }
        for e in eps {
            let _ = write!(
                y,
                "- addresses:\n  - \"{}\"\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    namespace: {}\n    name: {}\n",
                e.ip, e.ready, e.serving, e.terminating, e.node_name, svc.namespace, e.pod
            );
        }
        y
    }

    /// All files: `(file name, content)`, nodes first, then the Service, then the slices.
    pub fn files(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push((format!("10-node-{}.yaml", n.name), n.to_yaml()));
        }
        out.push((
            format!("20-service-{}.yaml", self.service.name),
            self.service.to_yaml(),
        ));
        let mut slice_nodes: BTreeSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        slice_nodes.extend(self.endpoints.iter().map(|e| e.node_name.as_str()));
        for node in slice_nodes {
            out.push((
                format!("30-endpointslice-{}-{node}.yaml", self.service.name),
                self.endpoint_slice_yaml(node),
            ));
        }
        out
    }

    /// Rewrites folder `dir` to hold exactly these manifests: each file is replaced
    /// atomically; unchanged files are left alone (their mtime too); `*.yaml` files that
    /// are no longer part of the set are removed.
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let files = self.files();
        for (name, content) in &files {
            if fs::read_to_string(dir.join(name)).is_ok_and(|old| &old == content) {
                continue;
            }
            write_atomic(dir, name, content)?;
        }
        let keep: BTreeSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && !name.starts_with('.') && !keep.contains(name.as_str()) {
                fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

/// Writes `dir/name` atomically: `dir/.name.tmp`, fsync, rename.
pub fn write_atomic(dir: &Path, name: &str, content: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, content.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use serde_yaml::Value;

    use super::*;
    use crate::netns::{run_id, TempDir};

    fn sample() -> Manifests {
        Manifests {
            service: Service::sample_nodeport_with_udp(),
            endpoints: vec![
                Endpoint {
                    pod: "pa1".into(),
                    ip: Ipv4Addr::new(198, 19, 1, 10),
                    node_name: "node1".into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                Endpoint {
                    pod: "pb1".into(),
                    ip: Ipv4Addr::new(198, 19, 2, 10),
                    node_name: "node2".into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
            ],
            nodes: vec![
                NodeObject {
                    name: "node1".into(),
                    internal_ip: Ipv4Addr::new(198, 18, 0, 11),
                },
                NodeObject {
                    name: "node2".into(),
                    internal_ip: Ipv4Addr::new(198, 18, 0, 12),
                },
                NodeObject {
                    name: "node3".into(),
                    internal_ip: Ipv4Addr::new(198, 18, 0, 13),
                },
            ],
        }
    }

    #[test]
    fn yaml_is_well_formed_and_has_the_fields() {
        let m = sample();
        let svc: Value = serde_yaml::from_str(&m.service.to_yaml()).unwrap();
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["metadata"]["name"], "sample-nodeport");
        assert_eq!(svc["metadata"]["namespace"], "default");
        assert_eq!(svc["spec"]["type"], "NodePort");
        assert_eq!(svc["spec"]["selector"]["app"], "sample-app");
        let p0 = &svc["spec"]["ports"][0];
        assert_eq!(p0["name"], "http-port");
        assert_eq!(p0["protocol"], "TCP");
        assert_eq!(p0["port"], 8080);
        assert_eq!(p0["targetPort"], 80);
        assert_eq!(p0["nodePort"], 30080);
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 30080);

        let es: Value = serde_yaml::from_str(&m.endpoint_slice_yaml("node1")).unwrap();
        assert_eq!(es["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(
            es["metadata"]["labels"]["kubernetes.io/service-name"],
            "sample-nodeport"
        );
        assert_eq!(es["addressType"], "IPv4");
        assert_eq!(es["ports"][0]["name"], "http-port");
        assert_eq!(es["ports"][0]["port"], 80);
        assert_eq!(es["ports"][1]["name"], "udp-port");
        assert_eq!(es["endpoints"][0]["addresses"][0], "198.19.1.10");
        assert_eq!(es["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(es["endpoints"][0]["nodeName"], "node1");
        assert_eq!(es["endpoints"].as_sequence().unwrap().len(), 1);

        let empty: Value = serde_yaml::from_str(&m.endpoint_slice_yaml("node3")).unwrap();
        assert!(empty["endpoints"].as_sequence().unwrap().is_empty());

        let node: Value = serde_yaml::from_str(&m.nodes[0].to_yaml()).unwrap();
        assert_eq!(node["kind"], "Node");
        assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(node["status"]["addresses"][0]["address"], "198.18.0.11");
    }

    #[test]
    fn folder_rewrite_replaces_and_prunes() {
        let dir = TempDir::new(&run_id(), "manifests-unit");
        let mut m = sample();
        m.write_to(dir.path()).unwrap();
        let names = |d: &Path| {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(dir.path()),
            [
                "10-node-node1.yaml",
                "10-node-node2.yaml",
                "10-node-node3.yaml",
                "20-service-sample-nodeport.yaml",
                "30-endpointslice-sample-nodeport-node1.yaml",
                "30-endpointslice-sample-nodeport-node2.yaml",
                "30-endpointslice-sample-nodeport-node3.yaml",
            ]
        );
        m.nodes.pop();
        assert!(m.remove_endpoint("pa1"));
        m.write_to(dir.path()).unwrap();
        assert_eq!(names(dir.path()).len(), 5);
        let s = fs::read_to_string(
            dir.path()
                .join("30-endpointslice-sample-nodeport-node1.yaml"),
        )
        .unwrap();
        assert!(s.contains("endpoints: []"), "{s}");
        assert!(fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
    }
}
