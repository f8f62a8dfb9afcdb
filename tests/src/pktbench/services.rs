//! The NodePort services every configuration is given: `n` TCP services on consecutive
//! nodePorts, each with the same number of endpoints in the backend network behind the
//! sink (remote backends: the node forwards with DNAT and SNAT). Written as manifests for
//! the agent and as rules for kube-proxy's modes (`kubeproxy`).

use std::{fs, io, net::Ipv4Addr, path::Path};

use crate::{
    manifests::{write_atomic, Endpoint, Manifests, NodeObject, Protocol, Service, ServicePort},
    pktbench::topo::{BACKEND_NET, NODE_ADDR, SINK_ADDR},
};

/// The first nodePort; the agent runs with `--nodeport-range` covering `NODE_PORT_BASE..`.
pub const NODE_PORT_BASE: u16 = 20_000;
/// The agent's flags for up to 10,000 services: a wider nodePort range, and SNAT ports
/// outside it and outside the node namespace's ephemeral range, which the benchmark moves
/// to NODE_EPHEMERAL_RANGE to leave the SNAT range 30,000 ports.
pub const AGENT_NODEPORT_RANGE: &str = "20000-30999";
pub const AGENT_SNAT_RANGE: &str = "31000-60999";
pub const NODE_EPHEMERAL_RANGE: &str = "61000 65535";
pub const TARGET_PORT: u16 = 8080;
/// Endpoints per service (np-pktbench --endpoints changes it): 10, the control-plane
/// benchmark's design point; 10,000 services of 16 do not fit the agent's default Maglev
/// array. nodeport's new flows to remote backends each hold a SNAT port of (backend, node
/// address) until their conntrack entry expires or is evicted, so a new-flow flood at one
/// service (10 x 30,000 ports against 262,144 conntrack entries) runs the ports low.
pub const ENDPOINTS: usize = 10;
/// The node's and the sink's names in the manifests.
pub const NODE_NAME: &str = "node1";
pub const SINK_NODE: &str = "sink";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSet {
    pub count: usize,
    pub endpoints: usize,
}

impl ServiceSet {
    pub fn new(count: usize) -> ServiceSet {
        ServiceSet::with_endpoints(count, ENDPOINTS)
    }

    pub fn with_endpoints(count: usize, endpoints: usize) -> ServiceSet {
        assert!(
            (1..=11_000).contains(&count),
            "{count} services do not fit the nodePort range"
        );
        assert!(
            (1..=256).contains(&endpoints),
            "{endpoints} endpoints per service"
        );
        ServiceSet { count, endpoints }
    }

    pub fn name(&self, i: usize) -> String {
        format!("svc-{i}")
    }

    pub fn node_port(&self, i: usize) -> u16 {
        NODE_PORT_BASE + i as u16
    }

    /// Endpoint `e` of service `i` (addresses are shared between services past 65,000).
    pub fn endpoint(&self, i: usize, e: usize) -> Ipv4Addr {
        let host = (i * self.endpoints + e) % 65_000 + 1;
        Ipv4Addr::from(u32::from(BACKEND_NET) + host as u32)
    }

    fn manifests(&self, i: usize) -> Manifests {
        let name = self.name(i);
        Manifests {
            service: Service {
                name: name.clone(),
                namespace: "bench".into(),
                app: name.clone(),
                ports: vec![ServicePort {
                    name: "p".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TARGET_PORT,
                    node_port: self.node_port(i),
                }],
                external_traffic_policy: None,
                health_check_node_port: None,
                session_affinity_timeout: None,
                ip_families: Vec::new(),
                ip_family_policy: None,
                external_ips: Vec::new(),
                load_balancer: None,
            },
            endpoints: (0..self.endpoints)
                .map(|e| Endpoint {
                    pod: format!("{name}-{e}"),
                    ip: self.endpoint(i, e).into(),
                    node_name: SINK_NODE.into(),
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
            nodes: Vec::new(),
        }
    }

    /// Writes the Node objects, every Service and its EndpointSlice into `dir`.
    pub fn write_manifests(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        for (name, ip) in [(NODE_NAME, NODE_ADDR), (SINK_NODE, SINK_ADDR)] {
            let node = NodeObject {
                name: name.into(),
                internal_ip: ip,
                internal_ip6: None,
            };
            write_atomic(dir, &format!("10-node-{name}.yaml"), &node.to_yaml())?;
        }
        for i in 0..self.count {
            let m = self.manifests(i);
            let svc = &m.service.name;
            write_atomic(dir, &format!("20-service-{svc}.yaml"), &m.service.to_yaml())?;
            write_atomic(
                dir,
                &format!("30-endpointslice-{svc}.yaml"),
                &m.endpoint_slice_yaml(SINK_NODE),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{run_id, TempDir};

    #[test]
    fn manifests_hold_every_service_and_slice() {
        let set = ServiceSet::new(3);
        let dir = TempDir::new(&run_id(), "pktbench-manifests");
        set.write_manifests(dir.path()).unwrap();
        let n = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
            .count();
        assert_eq!(n, 2 + 3 * 2);
        let slice = fs::read_to_string(dir.path().join("30-endpointslice-svc-2.yaml")).unwrap();
        assert!(slice.contains("198.19.0.21"), "{slice}");
        assert_eq!(set.node_port(2), 20_002);
    }
}
