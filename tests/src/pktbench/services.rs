//! The NodePort services every configuration is given: `n` services on consecutive
//! nodePorts, each with a TCP port (and optionally a UDP port on the same nodePort, and
//! IPv6 endpoints beside the IPv4 ones: dual stack), each with the same number of
//! endpoints in the backend network behind the sink (remote backends: the node forwards
//! with DNAT and SNAT). Written as manifests for the agent and as rules for kube-proxy's
//! modes (`kubeproxy`, IPv4 only).

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::{
    manifests::{
        write_atomic, Endpoint, IpFamily, Manifests, NodeObject, Protocol, Service, ServicePort,
    },
    pktbench::topo::{BACKEND_NET, BACKEND_NET6, NODE_ADDR, NODE_ADDR6, SINK_ADDR, SINK_ADDR6},
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
    /// A UDP port beside the TCP one, on the same nodePort.
    pub udp: bool,
    /// IPv6 endpoints beside the IPv4 ones (nodeport only: kube-proxy's rules here are
    /// IPv4).
    pub dual_stack: bool,
}

/// The largest set that is also given UDP ports and IPv6 endpoints: four Maglev tables
/// per service, 4 x 10,000 of 1,021 slots, would not fit the agent's default NP_MAGLEV.
pub const MAX_FULL_SET: usize = 1_000;

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
        ServiceSet {
            count,
            endpoints,
            udp: false,
            dual_stack: false,
        }
    }

    /// The set the benchmark gives a configuration: TCP and UDP ports, dual stack, up to
    /// [`MAX_FULL_SET`] services; TCP over IPv4 only above.
    pub fn for_bench(count: usize, endpoints: usize) -> ServiceSet {
        let full = count <= MAX_FULL_SET;
        ServiceSet {
            udp: full,
            dual_stack: full,
            ..ServiceSet::with_endpoints(count, endpoints)
        }
    }

    /// Every service port: (service index, (protocol as kube-proxy spells it, port name)).
    pub fn ports(&self) -> impl Iterator<Item = (usize, (&'static str, &'static str))> + '_ {
        let protos: &'static [(&'static str, &'static str)] = if self.udp {
            &[("tcp", "p"), ("udp", "u")]
        } else {
            &[("tcp", "p")]
        };
        (0..self.count).flat_map(move |i| protos.iter().map(move |&p| (i, p)))
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

    /// Endpoint `e` of service `i` over IPv6 (same host number as over IPv4).
    pub fn endpoint6(&self, i: usize, e: usize) -> Ipv6Addr {
        let host = (i * self.endpoints + e) % 65_000 + 1;
        Ipv6Addr::from(u128::from(BACKEND_NET6) + host as u128)
    }

    fn manifests(&self, i: usize) -> Manifests {
        let name = self.name(i);
        let port = |name: &str, protocol| ServicePort {
            name: name.into(),
            protocol,
            port: 80,
            target_port: TARGET_PORT,
            node_port: self.node_port(i),
        };
        let mut ports = vec![port("p", Protocol::Tcp)];
        if self.udp {
            ports.push(port("u", Protocol::Udp));
        }
        let mut addrs: Vec<(usize, IpAddr)> = (0..self.endpoints)
            .map(|e| (e, self.endpoint(i, e).into()))
            .collect();
        if self.dual_stack {
            addrs.extend((0..self.endpoints).map(|e| (e, self.endpoint6(i, e).into())));
        }
        Manifests {
            service: Service {
                name: name.clone(),
                namespace: "bench".into(),
                app: name.clone(),
                ports,
                external_traffic_policy: None,
                health_check_node_port: None,
                session_affinity_timeout: None,
                ip_families: if self.dual_stack {
                    vec![IpFamily::V4, IpFamily::V6]
                } else {
                    Vec::new()
                },
                ip_family_policy: self.dual_stack.then(|| "RequireDualStack".into()),
                external_ips: Vec::new(),
                load_balancer: None,
            },
            endpoints: addrs
                .into_iter()
                .map(|(e, ip)| Endpoint {
                    pod: format!("{name}-{e}"),
                    ip,
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
        for (name, ip, ip6) in [
            (NODE_NAME, NODE_ADDR, NODE_ADDR6),
            (SINK_NODE, SINK_ADDR, SINK_ADDR6),
        ] {
            let node = NodeObject {
                name: name.into(),
                internal_ip: ip,
                internal_ip6: self.dual_stack.then_some(ip6),
            };
            write_atomic(dir, &format!("10-node-{name}.yaml"), &node.to_yaml())?;
        }
        for i in 0..self.count {
            let m = self.manifests(i);
            let svc = &m.service.name;
            write_atomic(dir, &format!("20-service-{svc}.yaml"), &m.service.to_yaml())?;
            for family in m.service.families() {
                write_atomic(
                    dir,
                    &format!(
                        "30-endpointslice-{}.yaml",
                        m.endpoint_slice_name(SINK_NODE, family)
                    ),
                    &m.endpoint_slice_yaml_of(SINK_NODE, family),
                )?;
            }
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
        let slice =
            fs::read_to_string(dir.path().join("30-endpointslice-svc-2-sink.yaml")).unwrap();
        assert!(slice.contains("198.19.0.21"), "{slice}");
        assert_eq!(set.node_port(2), 20_002);
    }

    #[test]
    fn bench_sets_are_dual_stack_tcp_and_udp_up_to_1000() {
        let set = ServiceSet::for_bench(2, 3);
        assert_eq!(set.ports().count(), 4);
        let dir = TempDir::new(&run_id(), "pktbench-manifests");
        set.write_manifests(dir.path()).unwrap();
        let svc = fs::read_to_string(dir.path().join("20-service-svc-1.yaml")).unwrap();
        assert!(svc.contains("UDP") && svc.contains("IPv6"), "{svc}");
        let v6 =
            fs::read_to_string(dir.path().join("30-endpointslice-svc-1-sink-ipv6.yaml")).unwrap();
        assert!(v6.contains("fd00:b:19::5"), "{v6}");
        let big = ServiceSet::for_bench(10_000, 10);
        assert!(!big.udp && !big.dual_stack);
        assert_eq!(big.ports().count(), 10_000);
    }
}
