//! Kubernetes manifests for the agent's manifests mode: the seeds' `sample-nodeport`
//! Service (optionally with a UDP port on the same nodePort), one EndpointSlice per node and
//! the Node objects, written one object per file into a folder. Every file is replaced
//! atomically (write `.NAME.tmp`, then rename), so an agent polling the folder never reads a
//! half-written file; it should skip names starting with `.`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

pub use crate::cluster::IpFamily;
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
    /// `spec.ipFamilies`; empty: not written (the cluster's default, IPv4).
    pub ip_families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy` when set (`SingleStack`, `PreferDualStack`, `RequireDualStack`).
    pub ip_family_policy: Option<String>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// Makes the Service `type: LoadBalancer` when set.
    pub load_balancer: Option<LoadBalancer>,
}

/// The LoadBalancer part of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancer {
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (CIDRs of either family); empty: not written.
    pub source_ranges: Vec<String>,
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
            ip_families: Vec::new(),
            ip_family_policy: None,
            external_ips: Vec::new(),
            load_balancer: None,
        }
    }

    /// Sets `spec.ipFamilies` to `families` (in that order: the first is the primary) and
    /// `ipFamilyPolicy` to `SingleStack` for one family, `RequireDualStack` for two.
    pub fn with_families(mut self, families: &[IpFamily]) -> Service {
        self.ip_families = families.to_vec();
        self.ip_family_policy = Some(
            if families.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            }
            .into(),
        );
        self
    }

    /// The families the Service serves: `ip_families`, or IPv4 when unset.
    pub fn families(&self) -> Vec<IpFamily> {
        if self.ip_families.is_empty() {
            vec![IpFamily::V4]
        } else {
            self.ip_families.clone()
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
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: {}\n",
            self.name,
            self.namespace,
            if self.load_balancer.is_some() {
                "LoadBalancer"
            } else {
                "NodePort"
            }
        );
        if !self.ip_families.is_empty() {
            let list: Vec<&str> = self.ip_families.iter().map(|f| f.as_str()).collect();
            let _ = writeln!(y, "  ipFamilies: [{}]", list.join(", "));
        }
        if let Some(p) = &self.ip_family_policy {
            let _ = writeln!(y, "  ipFamilyPolicy: {p}");
        }
        if !self.external_ips.is_empty() {
            let _ = writeln!(y, "  externalIPs: [{}]", quoted(&self.external_ips));
        }
        if let Some(lb) = self
            .load_balancer
            .as_ref()
            .filter(|l| !l.source_ranges.is_empty())
        {
            let _ = writeln!(
                y,
                "  loadBalancerSourceRanges: [{}]",
                quoted(&lb.source_ranges)
            );
        }
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
        if let Some(lb) = self
            .load_balancer
            .as_ref()
            .filter(|l| !l.ingress.is_empty())
        {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &lb.ingress {
                let _ = writeln!(y, "    - ip: \"{ip}\"");
            }
        }
        y
    }
}

/// `"a", "b"`: YAML flow-list items, quoted (an IPv6 address or CIDR holds colons).
fn quoted<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One endpoint (a pod's address of one family) of the service: it goes into the
/// EndpointSlice of its node and of its address's family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: IpAddr,
    pub node_name: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A Node object: name and InternalIP (and an IPv6 InternalIP on a dual-stack node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObject {
    pub name: String,
    pub internal_ip: Ipv4Addr,
    pub internal_ip6: Option<Ipv6Addr>,
}

impl NodeObject {
    pub fn to_yaml(&self) -> String {
        let v6 = self
            .internal_ip6
            .map(|ip| format!("  - type: InternalIP\n    address: \"{ip}\"\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {0}\n  labels:\n    kubernetes.io/hostname: {0}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: \"{1}\"\n{v6}  - type: Hostname\n    address: {0}\n",
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
    /// `service` with every pod of `cluster` as a ready endpoint in both families (only the
    /// slices of the service's families are written), and every node with both addresses.
    pub fn from_cluster(cluster: &Cluster, service: Service) -> Manifests {
        Manifests {
            service,
            endpoints: IpFamily::BOTH
                .iter()
                .flat_map(|&f| cluster.pods().iter().map(move |p| (f, p)))
                .map(|(f, p)| Endpoint {
                    pod: p.name.clone(),
                    ip: p.addr(f),
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
                    internal_ip6: Some(n.ip6),
                })
                .collect(),
        }
    }

    /// Adds a ready endpoint (replacing the pod's endpoint of the same family).
    pub fn add_endpoint(&mut self, pod: &str, ip: impl Into<IpAddr>, node: &str) {
        let ip = ip.into();
        let family = IpFamily::of(ip);
        self.endpoints
            .retain(|e| e.pod != pod || IpFamily::of(e.ip) != family);
        self.endpoints.push(Endpoint {
            pod: pod.into(),
            ip,
            node_name: node.into(),
            ready: true,
            serving: true,
            terminating: false,
        });
    }

    /// Removes pod `pod` from its slices (both families); returns whether it was there.
    pub fn remove_endpoint(&mut self, pod: &str) -> bool {
        let before = self.endpoints.len();
        self.endpoints.retain(|e| e.pod != pod);
        before != self.endpoints.len()
    }

    /// Removes pod `pod`'s endpoint of `family` only; returns whether it was there.
    pub fn remove_endpoint_of(&mut self, pod: &str, family: IpFamily) -> bool {
        let before = self.endpoints.len();
        self.endpoints
            .retain(|e| e.pod != pod || IpFamily::of(e.ip) != family);
        before != self.endpoints.len()
    }

    /// The IPv4 EndpointSlice of node `node` (also when it has no endpoints: an empty slice
    /// says "none here" explicitly).
    pub fn endpoint_slice_yaml(&self, node: &str) -> String {
        self.endpoint_slice_yaml_of(node, IpFamily::V4)
    }

    /// The name of the EndpointSlice of `node` and `family`: `<svc>-<node>` for IPv4,
    /// `<svc>-<node>-ipv6` for IPv6 (kube: `<svc>-<suffix>`, one slice per family).
    pub fn endpoint_slice_name(&self, node: &str, family: IpFamily) -> String {
        match family {
            IpFamily::V4 => format!("{}-{node}", self.service.name),
            IpFamily::V6 => format!("{}-{node}-ipv6", self.service.name),
        }
    }

    /// The EndpointSlice of node `node` with `addressType` `family`: that family's
    /// endpoints on the node.
    pub fn endpoint_slice_yaml_of(&self, node: &str, family: IpFamily) -> String {
        let svc = &self.service;
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\n    endpointslice.kubernetes.io/managed-by: np-tests\naddressType: {}\nports:\n",
            self.endpoint_slice_name(node, family),
            svc.namespace,
            svc.name,
            family.as_str()
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
            .filter(|e| e.node_name == node && IpFamily::of(e.ip) == family)
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

    /// All files: `(file name, content)`, nodes first, then the Service, then the slices
    /// (one per node and family of the Service).
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
        for family in self.service.families() {
            for &node in &slice_nodes {
                out.push((
                    format!(
                        "30-endpointslice-{}.yaml",
                        self.endpoint_slice_name(node, family)
                    ),
                    self.endpoint_slice_yaml_of(node, family),
                ));
            }
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

/// `default/lb-svc`: a LoadBalancer Service (ingress IP 198.18.0.100, external IP
/// 198.18.0.101, port 8080, nodePort 31080) with one endpoint on each node (pa1 on node1,
/// pb1 on node2), as a manifests-folder file.
pub const LB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: lb-svc
  namespace: default
spec:
  type: LoadBalancer
  selector:
    app: lb
  externalIPs: [198.18.0.101]
  ports:
  - name: web
    protocol: TCP
    port: 8080
    targetPort: 80
    nodePort: 31080
status:
  loadBalancer:
    ingress:
    - ip: 198.18.0.100
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-svc-1
  namespace: default
  labels:
    kubernetes.io/service-name: lb-svc
addressType: IPv4
ports:
- name: web
  protocol: TCP
  port: 80
endpoints:
- addresses: [198.19.1.10]
  conditions: {ready: true}
  nodeName: node1
- addresses: [198.19.2.10]
  conditions: {ready: true}
  nodeName: node2
";

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
                    ip: Ipv4Addr::new(198, 19, 1, 10).into(),
                    node_name: "node1".into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                Endpoint {
                    pod: "pb1".into(),
                    ip: Ipv4Addr::new(198, 19, 2, 10).into(),
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
                    internal_ip6: None,
                },
                NodeObject {
                    name: "node2".into(),
                    internal_ip: Ipv4Addr::new(198, 18, 0, 12),
                    internal_ip6: None,
                },
                NodeObject {
                    name: "node3".into(),
                    internal_ip: Ipv4Addr::new(198, 18, 0, 13),
                    internal_ip6: None,
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
    fn dual_stack_service_and_ipv6_slices() {
        let mut m = sample();
        m.nodes[0].internal_ip6 = Some("fd00:18::11".parse().unwrap());
        m.add_endpoint("pa1", "fd00:19:1::a".parse::<IpAddr>().unwrap(), "node1");
        m.service = Service::sample_nodeport().with_families(&[IpFamily::V4, IpFamily::V6]);
        m.service.external_ips = vec!["fd00:18::101".parse().unwrap()];
        m.service.load_balancer = Some(LoadBalancer {
            ingress: vec!["fd00:18::100".parse().unwrap()],
            source_ranges: vec!["fd00:18::10/128".into(), "198.18.0.0/24".into()],
        });
        let svc: Value = serde_yaml::from_str(&m.service.to_yaml()).unwrap();
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["ipFamilies"][0], "IPv4");
        assert_eq!(svc["spec"]["ipFamilies"][1], "IPv6");
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(svc["spec"]["externalIPs"][0], "fd00:18::101");
        assert_eq!(
            svc["spec"]["loadBalancerSourceRanges"][0],
            "fd00:18::10/128"
        );
        assert_eq!(
            svc["status"]["loadBalancer"]["ingress"][0]["ip"],
            "fd00:18::100"
        );
        // Both families of pa1 are endpoints, each in its own slice.
        let v4: Value = serde_yaml::from_str(&m.endpoint_slice_yaml("node1")).unwrap();
        assert_eq!(v4["metadata"]["name"], "sample-nodeport-node1");
        assert_eq!(v4["endpoints"][0]["addresses"][0], "198.19.1.10");
        let v6: Value =
            serde_yaml::from_str(&m.endpoint_slice_yaml_of("node1", IpFamily::V6)).unwrap();
        assert_eq!(v6["metadata"]["name"], "sample-nodeport-node1-ipv6");
        assert_eq!(
            v6["metadata"]["labels"]["kubernetes.io/service-name"],
            "sample-nodeport"
        );
        assert_eq!(v6["addressType"], "IPv6");
        assert_eq!(v6["endpoints"][0]["addresses"][0], "fd00:19:1::a");
        assert_eq!(v6["endpoints"].as_sequence().unwrap().len(), 1);
        let node: Value = serde_yaml::from_str(&m.nodes[0].to_yaml()).unwrap();
        assert_eq!(node["status"]["addresses"][1]["type"], "InternalIP");
        assert_eq!(node["status"]["addresses"][1]["address"], "fd00:18::11");
        let names: Vec<String> = m.files().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"30-endpointslice-sample-nodeport-node2-ipv6.yaml".into()));
        assert!(names.contains(&"30-endpointslice-sample-nodeport-node2.yaml".into()));
        // IPv6 only: no IPv4 slices; removing pa1's IPv6 endpoint keeps the IPv4 one.
        m.service = m.service.clone().with_families(&[IpFamily::V6]);
        assert_eq!(m.service.ip_family_policy.as_deref(), Some("SingleStack"));
        assert!(m
            .files()
            .iter()
            .all(|(n, _)| !n.starts_with("30-") || n.ends_with("-ipv6.yaml")));
        assert!(m.remove_endpoint_of("pa1", IpFamily::V6));
        assert!(m.endpoints.iter().any(|e| e.pod == "pa1"));
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
