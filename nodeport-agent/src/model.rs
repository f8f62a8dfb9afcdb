//! Desired state as a pure function of Kubernetes objects: which addresses of this node take
//! nodePort traffic, and for every service port its frontends, flags and backends. Objects
//! that cannot be served are refused one by one (a [`Refusal`] names the object and the
//! reason) and never affect other services. The rules follow kube-proxy; each is documented
//! on [`desired`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nodeport_common::{
    Backend, FrontendKey, BE_F_LOCAL, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_LOCAL,
};

use crate::error::Error;

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest `timeoutSeconds` the API server accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// An IPv4 network, `a.b.c.d/len` (a bare address means `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network of `addr` with `prefix` bits (host bits are cleared); `None` if `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    /// Network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::Parse {
            what: "IPv4 CIDR",
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.trim().parse().map_err(|e| bad(&format!("{e}")))?;
        let prefix: u8 = p
            .trim()
            .parse()
            .map_err(|_| bad("prefix length is not a number"))?;
        Self::new(addr, prefix).ok_or_else(|| bad("prefix length is larger than 32"))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Agent settings that shape the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Valid nodePorts (the API server's `--service-node-port-range`).
    pub nodeport_range: RangeInclusive<u16>,
    /// Only node addresses inside these networks take nodePort traffic (kube-proxy's
    /// `--nodeport-addresses`); empty means every address of the node.
    pub nodeport_cidrs: Vec<Ipv4Cidr>,
    /// A service with more ports than this is refused.
    pub max_ports_per_service: usize,
    /// A service whose EndpointSlices hold more endpoints than this is refused.
    pub max_endpoints_per_service: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nodeport_range: 30000..=32767,
            nodeport_cidrs: Vec::new(),
            max_ports_per_service: 100,
            max_endpoints_per_service: 10_000,
        }
    }
}

/// Everything [`desired`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
    pub nodes: &'a [Node],
    /// Name of the Node object of this node (matches `endpoints[].nodeName`).
    pub node_name: &'a str,
    /// IPv4 addresses configured on this node's interfaces.
    pub interface_addrs: &'a [Ipv4Addr],
    pub settings: &'a Settings,
}

/// An object, or part of one, that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    /// The object, e.g. `Service default/foo` or `EndpointSlice default/foo-abc12`.
    pub object: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Refusal {
    pub fn new(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused {}: {}", self.object, self.reason)
    }
}

/// Transport protocols the datapath balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number (`PROTO_*`), as used in map keys.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    /// Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port of one service: the unit that owns frontends, a Maglev table and a `svc_id`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name`; empty for the unnamed port of a single-port service.
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortId {
    /// `default/web:http/TCP`, or `default/web/TCP` for an unnamed port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// What the datapath should do for one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// Keys in NP_SVC: `{addr: 0, port: nodePort}` and `{addr: ip, port: port}` for each
    /// LoadBalancer ingress IP, `spec.loadBalancerIP` and external IP. Network order.
    pub frontends: BTreeSet<FrontendKey>,
    /// `SVC_F_*` flags.
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_s: u32,
    /// Endpoints (address, target port, `BE_F_LOCAL`), one per address and port.
    pub backends: BTreeSet<Backend>,
}

/// The desired state of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Addresses of this node that take nodePort traffic.
    pub node_addrs: BTreeSet<Ipv4Addr>,
    pub services: BTreeMap<ServicePortId, DesiredService>,
}

/// Raw network-order form of an address, as in map keys.
pub fn addr_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`addr_raw`].
pub fn addr_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// An endpoint of an EndpointSlice, parsed once.
struct ParsedEndpoint {
    addr: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// A slice port: (name, protocol, port). Name is "" when unset; `None` protocol means TCP.
struct SlicePort<'a> {
    name: &'a str,
    protocol: &'a str,
    port: Option<i32>,
}

struct ParsedSlice<'a> {
    ports: Vec<SlicePort<'a>>,
    endpoints: Vec<ParsedEndpoint>,
}

fn object_name(kind: &str, ns: Option<&str>, name: Option<&str>) -> String {
    let name = name.unwrap_or("<unnamed>");
    match ns {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Computes the desired state and the refusals.
///
/// Node addresses:
/// - this node's interface addresses plus the `InternalIP` and `ExternalIP` addresses of the
///   Node object named `node_name`, IPv4 only (other addresses are skipped silently);
/// - when `settings.nodeport_cidrs` is not empty, only addresses inside one of them;
/// - `0.0.0.0` and `255.255.255.255` never.
///
/// Services (one [`DesiredService`] per port):
/// - `ExternalName` and headless (`clusterIP: None`) services are skipped, like kube-proxy;
///   an unknown `type` is refused. A missing namespace means `default`.
/// - Services are considered oldest first (`creationTimestamp`, missing timestamps last,
///   then namespace/name), so that the oldest claim of a frontend wins.
/// - More than `max_ports_per_service` ports, or more than `max_endpoints_per_service`
///   endpoints in its IPv4 slices: the whole service is refused.
/// - Protocol `TCP` (default) or `UDP`. `SCTP` ports are refused: the datapath passes SCTP
///   to the kernel stack. Other protocols are refused.
/// - `port` must be 1-65535; an integer `targetPort` too.
/// - Only `NodePort` and `LoadBalancer` services get a nodePort frontend. The nodePort must
///   lie in `settings.nodeport_range`; nodePort 0 or missing is refused (manifests have no
///   allocator), except for a `LoadBalancer` with `allocateLoadBalancerNodePorts: false`,
///   which then simply has no nodePort frontend.
/// - `spec.externalIPs` apply to every type; `status.loadBalancer.ingress[].ip` (except
///   `ipMode: Proxy`, where the load balancer delivers to the node address, as kube-proxy)
///   and `spec.loadBalancerIP` apply to `LoadBalancer` services: frontend `(ip, port)`.
///   Unparsable addresses are refused one by one (the rest of the service is served);
///   IPv6 addresses are skipped silently (IPv4-only datapath).
/// - A frontend `(nodePort, protocol)` or `(ip, port, protocol)` claimed by an older service
///   (or an earlier port of the same service) refuses the later port entirely.
/// - A port with no frontend (a plain ClusterIP port) is left out without refusal.
/// - `sessionAffinity: ClientIP` sets `SVC_F_AFFINITY` with
///   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, clamped to 1-86400).
/// - `externalTrafficPolicy: Local` sets `SVC_F_LOCAL` and keeps only endpoints whose
///   `nodeName` is this node.
///
/// Backends of a service port:
/// - EndpointSlices with label `kubernetes.io/service-name: <name>` in the service's
///   namespace and `addressType: IPv4` (other address types are skipped silently); an
///   endpoint uses its first address (the API says all addresses are fungible); an
///   unparsable address refuses that endpoint (named by its slice).
/// - Ready endpoints (`ready` unset counts as ready). If none is ready (after the Local
///   filter), endpoints that are `serving` (unset: same as `ready`) and `terminating`.
/// - Target port, per slice: the slice port whose name equals the service port's name
///   (unset and `""` are equal) with the same protocol; otherwise, when `targetPort` is a
///   name, the slice port of that name and protocol (no such port: the slice contributes
///   nothing); otherwise the numeric `targetPort`, defaulting to `port`.
/// - `BE_F_LOCAL` when the endpoint's `nodeName` is this node. One backend per
///   (address, target port); the first one seen wins.
pub fn desired(inputs: &Inputs) -> (Desired, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let mut out = Desired {
        node_addrs: node_addrs(inputs),
        services: BTreeMap::new(),
    };

    // EndpointSlices by (namespace, service name), parsed once.
    let mut slices: BTreeMap<(&str, &str), Vec<ParsedSlice>> = BTreeMap::new();
    for slice in inputs.slices {
        let meta = &slice.metadata;
        let ns = meta.namespace.as_deref().unwrap_or("default");
        let Some(svc) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        if slice.address_type != "IPv4" {
            continue;
        }
        let obj = || object_name("EndpointSlice", Some(ns), meta.name.as_deref());
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.as_deref().unwrap_or(""),
                protocol: p.protocol.as_deref().unwrap_or("TCP"),
                port: p.port,
            })
            .collect();
        let mut endpoints = Vec::new();
        for ep in &slice.endpoints {
            let Some(a) = ep.addresses.first() else {
                refusals.push(Refusal::new(obj(), "endpoint without addresses"));
                continue;
            };
            let Ok(addr) = a.parse::<Ipv4Addr>() else {
                refusals.push(Refusal::new(
                    obj(),
                    format!("endpoint address {a:?} is not an IPv4 address"),
                ));
                continue;
            };
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(ParsedEndpoint {
                addr,
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: ep.node_name.as_deref() == Some(inputs.node_name),
            });
        }
        slices
            .entry((ns, svc.as_str()))
            .or_default()
            .push(ParsedSlice { ports, endpoints });
    }

    // Oldest first, so that the oldest claim of a frontend wins.
    let mut services: Vec<&Service> = inputs.services.iter().collect();
    services.sort_by_cached_key(|s| {
        let m = &s.metadata;
        let created = m.creation_timestamp.as_ref().map(|t| t.0);
        (
            created.is_none(),
            created,
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or_default(),
        )
    });

    let mut claims: BTreeMap<FrontendKey, ServicePortId> = BTreeMap::new();
    let none = Vec::new();
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let obj = object_name("Service", Some(ns), svc.metadata.name.as_deref());
        let Some(name) = svc.metadata.name.as_deref() else {
            refusals.push(Refusal::new(obj, "metadata.name is missing"));
            continue;
        };
        let svc_slices = slices.get(&(ns, name)).unwrap_or(&none);
        service(
            svc,
            ns,
            name,
            &obj,
            svc_slices,
            inputs.settings,
            &mut claims,
            &mut out.services,
            &mut refusals,
        );
    }
    (out, refusals)
}

fn node_addrs(inputs: &Inputs) -> BTreeSet<Ipv4Addr> {
    let from_node = inputs
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(inputs.node_name))
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok());
    let cidrs = &inputs.settings.nodeport_cidrs;
    inputs
        .interface_addrs
        .iter()
        .copied()
        .chain(from_node)
        .filter(|a| !a.is_unspecified() && !a.is_broadcast())
        .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*a)))
        .collect()
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pieces of `desired`'s state"
)]
fn service(
    svc: &Service,
    ns: &str,
    name: &str,
    obj: &str,
    slices: &[ParsedSlice],
    settings: &Settings,
    claims: &mut BTreeMap<FrontendKey, ServicePortId>,
    out: &mut BTreeMap<ServicePortId, DesiredService>,
    refusals: &mut Vec<Refusal>,
) {
    let refuse =
        |refusals: &mut Vec<Refusal>, reason: String| refusals.push(Refusal::new(obj, reason));
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_port = match type_ {
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        "ExternalName" => return,
        other => return refuse(refusals, format!("unknown type {other:?}")),
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        return; // headless: kube-proxy skips it too
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.len() > settings.max_ports_per_service {
        return refuse(
            refusals,
            format!(
                "{} ports, more than the limit of {}",
                ports.len(),
                settings.max_ports_per_service
            ),
        );
    }
    let n_endpoints: usize = slices.iter().map(|s| s.endpoints.len()).sum();
    if n_endpoints > settings.max_endpoints_per_service {
        return refuse(
            refusals,
            format!(
                "{n_endpoints} endpoints, more than the limit of {}",
                settings.max_endpoints_per_service
            ),
        );
    }

    // Addresses that take `port` traffic.
    let mut ips = BTreeSet::new();
    let mut add_ip =
        |refusals: &mut Vec<Refusal>, field: &str, s: &str| match s.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => {
                ips.insert(ip);
            }
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => refuse(refusals, format!("{field} {s:?} is not an IP address")),
        };
    for ip in spec.external_ips.iter().flatten() {
        add_ip(refusals, "externalIPs entry", ip);
    }
    if type_ == "LoadBalancer" {
        if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
            add_ip(refusals, "loadBalancerIP", ip);
        }
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) {
                add_ip(refusals, "status.loadBalancer.ingress ip", ip);
            }
        }
    }

    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    let mut flags = 0;
    if local {
        flags |= SVC_F_LOCAL;
    }
    let mut affinity_timeout_s = 0;
    if affinity {
        flags |= SVC_F_AFFINITY;
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        affinity_timeout_s = match t {
            None => DEFAULT_AFFINITY_TIMEOUT_S,
            Some(t) => u32::try_from(t)
                .unwrap_or(1)
                .clamp(1, MAX_AFFINITY_TIMEOUT_S),
        };
    }

    for (i, sp) in ports.iter().enumerate() {
        let port_name = sp.name.as_deref().unwrap_or("");
        let what = if port_name.is_empty() {
            format!("spec.ports[{i}]")
        } else {
            format!("spec.ports[{i}] {port_name:?}")
        };
        let mut refuse_port =
            |reason: String| refusals.push(Refusal::new(obj, format!("{reason} ({what})")));
        let protocol = match sp.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                refuse_port("protocol SCTP is not balanced by the datapath (SCTP packets pass to the kernel stack)".into());
                continue;
            }
            other => {
                refuse_port(format!("unknown protocol {other:?}"));
                continue;
            }
        };
        let Some(port) = valid_port(sp.port) else {
            refuse_port(format!("port {} is not in 1-65535", sp.port));
            continue;
        };
        let id = ServicePortId {
            namespace: ns.to_string(),
            name: name.to_string(),
            port: port_name.to_string(),
            protocol,
        };
        if out.contains_key(&id) {
            refuse_port(format!(
                "a port named {port_name:?} with protocol {protocol} appears twice"
            ));
            continue;
        }
        let proto = protocol.number();

        let mut frontends = BTreeSet::new();
        if has_node_port {
            match sp.node_port {
                None | Some(0)
                    if type_ == "LoadBalancer"
                        && spec.allocate_load_balancer_node_ports == Some(false) => {}
                None | Some(0) => {
                    refuse_port("nodePort not allocated (set spec.ports[].nodePort; manifests have no allocator)".into());
                    continue;
                }
                Some(np) => {
                    let range = &settings.nodeport_range;
                    let Some(np16) = valid_port(np).filter(|p| range.contains(p)) else {
                        refuse_port(format!(
                            "nodePort {np} is outside the range {}-{}",
                            range.start(),
                            range.end()
                        ));
                        continue;
                    };
                    frontends.insert(FrontendKey {
                        addr: 0,
                        port: np16.to_be(),
                        proto,
                        pad: 0,
                    });
                }
            }
        }
        for ip in &ips {
            frontends.insert(FrontendKey {
                addr: addr_raw(*ip),
                port: port.to_be(),
                proto,
                pad: 0,
            });
        }
        if frontends.is_empty() {
            continue;
        }
        if let Some((fe, owner)) = frontends
            .iter()
            .find_map(|fe| claims.get(fe).map(|o| (fe, o)))
        {
            refuse_port(format!(
                "{} is already used by {}",
                describe_frontend(fe),
                owner
            ));
            continue;
        }

        let target = match &sp.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(t)) => match valid_port(*t) {
                Some(t) => Target::Number(t),
                None => {
                    refuse_port(format!("targetPort {t} is not in 1-65535"));
                    continue;
                }
            },
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(t) if t != 0 => Target::Number(t),
                _ if s.is_empty() => Target::Number(port),
                _ => Target::Name(s),
            },
        };
        let backends = backends(slices, port_name, protocol, &target, local);

        for fe in &frontends {
            claims.insert(*fe, id.clone());
        }
        out.insert(
            id,
            DesiredService {
                frontends,
                flags,
                affinity_timeout_s,
                backends,
            },
        );
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

/// Human form of a frontend key for refusals.
pub fn describe_frontend(fe: &FrontendKey) -> String {
    let proto = match fe.proto {
        PROTO_TCP => "TCP".to_string(),
        PROTO_UDP => "UDP".to_string(),
        p => format!("proto {p}"),
    };
    let port = u16::from_be(fe.port);
    if fe.addr == 0 {
        format!("nodePort {port}/{proto}")
    } else {
        format!("address {}:{port}/{proto}", addr_from_raw(fe.addr))
    }
}

enum Target<'a> {
    Number(u16),
    Name(&'a str),
}

fn backends(
    slices: &[ParsedSlice],
    port_name: &str,
    protocol: Protocol,
    target: &Target,
    local_only: bool,
) -> BTreeSet<Backend> {
    // (endpoint, target port) of every endpoint that passes the Local filter.
    let mut candidates: Vec<(&ParsedEndpoint, u16)> = Vec::new();
    for slice in slices {
        let find = |name: &str| {
            slice
                .ports
                .iter()
                .find(|p| p.name == name && p.protocol == protocol.as_str())
                .map(|p| p.port.and_then(valid_port))
        };
        let port = match (find(port_name), target) {
            (Some(p), _) => p,
            (None, Target::Name(n)) => find(n).flatten(),
            (None, Target::Number(n)) => Some(*n),
        };
        let Some(port) = port else { continue };
        candidates.extend(
            slice
                .endpoints
                .iter()
                .filter(|e| e.local || !local_only)
                .map(|e| (e, port)),
        );
    }
    let any_ready = candidates.iter().any(|(e, _)| e.ready);
    let mut seen = BTreeSet::new();
    let mut out = BTreeSet::new();
    for (e, port) in candidates {
        let usable = if any_ready {
            e.ready
        } else {
            e.serving && e.terminating
        };
        if usable && seen.insert((e.addr, port)) {
            out.insert(Backend {
                addr: addr_raw(e.addr),
                port: port.to_be(),
                flags: if e.local { BE_F_LOCAL } else { 0 },
                pad: 0,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("test Service YAML")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("test EndpointSlice YAML")
    }

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).expect("test Node YAML")
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> (Desired, Vec<Refusal>) {
        run_with(services, slices, &Settings::default())
    }

    fn run_with(
        services: &[Service],
        slices: &[EndpointSlice],
        settings: &Settings,
    ) -> (Desired, Vec<Refusal>) {
        desired(&Inputs {
            services,
            slices,
            nodes: &[],
            node_name: "node-a",
            interface_addrs: &[],
            settings,
        })
    }

    fn id(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
        ServicePortId {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol,
        }
    }

    fn np(port: u16, proto: u8) -> FrontendKey {
        FrontendKey {
            addr: 0,
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }

    fn ext(ip: &str, port: u16, proto: u8) -> FrontendKey {
        FrontendKey {
            addr: addr_raw(ip.parse().unwrap()),
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }

    fn be(ip: &str, port: u16, local: bool) -> Backend {
        Backend {
            addr: addr_raw(ip.parse().unwrap()),
            port: port.to_be(),
            flags: if local { BE_F_LOCAL } else { 0 },
            pad: 0,
        }
    }

    const WEB: &str = "
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
";

    const WEB_SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.1.1]
  nodeName: node-a
- addresses: [10.0.2.1]
  nodeName: node-b
  conditions: {ready: true}
";

    #[test]
    fn nodeport_basic() {
        let (d, r) = run(&[svc(WEB)], &[slice(WEB_SLICE)]);
        assert!(r.is_empty(), "{r:?}");
        let s = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        assert_eq!(s.frontends, BTreeSet::from([np(30080, PROTO_TCP)]));
        assert_eq!(s.flags, 0);
        assert_eq!(s.affinity_timeout_s, 0);
        assert_eq!(
            s.backends,
            BTreeSet::from([be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)])
        );
    }

    #[test]
    fn service_port_id_display() {
        assert_eq!(
            id("default", "web", "http", Protocol::Tcp).to_string(),
            "default/web:http/TCP"
        );
        assert_eq!(id("ns", "dns", "", Protocol::Udp).to_string(), "ns/dns/UDP");
    }

    #[test]
    fn refusal_display() {
        let r = Refusal::new(
            "Service default/foo",
            "nodePort 8888 is outside the range 30000-32767",
        );
        assert_eq!(
            r.to_string(),
            "refused Service default/foo: nodePort 8888 is outside the range 30000-32767"
        );
    }

    #[test]
    fn nodeport_out_of_range() {
        let s = svc("
metadata: {name: foo}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 8888}]
");
        let (d, r) = run(&[s, svc(WEB)], &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].object, "Service default/foo");
        assert!(
            r[0].to_string().starts_with(
                "refused Service default/foo: nodePort 8888 is outside the range 30000-32767"
            ),
            "{}",
            r[0]
        );
        assert_eq!(d.services.len(), 1, "the other service is unaffected");

        let settings = Settings {
            nodeport_range: 8000..=9000,
            ..Settings::default()
        };
        let s = svc("
metadata: {name: foo}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 8888}]
");
        let (d, r) = run_with(&[s], &[], &settings);
        assert!(r.is_empty());
        assert_eq!(d.services.len(), 1);
    }

    #[test]
    fn nodeport_missing_or_zero() {
        for np in ["", ", nodePort: 0"] {
            let s = svc(&format!(
                "
metadata: {{name: foo}}
spec:
  type: NodePort
  ports: [{{port: 80{np}}}]
"
            ));
            let (d, r) = run(&[s], &[]);
            assert!(d.services.is_empty());
            assert_eq!(r.len(), 1, "{r:?}");
            assert!(r[0].reason.contains("nodePort not allocated"), "{}", r[0]);
        }
    }

    #[test]
    fn port_zero_refused() {
        let s = svc("
metadata: {name: foo}
spec:
  type: NodePort
  ports: [{port: 0, nodePort: 30001}]
");
        let (d, r) = run(&[s], &[]);
        assert!(d.services.is_empty());
        assert!(r[0].reason.contains("port 0 is not in 1-65535"), "{}", r[0]);
    }

    #[test]
    fn types() {
        // ClusterIP: no nodePort frontend, externalIPs apply.
        let c = svc("
metadata: {name: c}
spec:
  externalIPs: [192.0.2.10, '2001:db8::1']
  ports: [{port: 80, nodePort: 30005}]
");
        // ClusterIP without external IPs: nothing, no refusal.
        let plain = svc("
metadata: {name: plain}
spec:
  ports: [{port: 80}]
");
        // LoadBalancer: nodePort, ingress IPs, loadBalancerIP, externalIPs.
        let lb = svc("
metadata: {name: lb}
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.20
  externalIPs: [192.0.2.21]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.22}, {hostname: lb.example.com}, {ip: 192.0.2.23, ipMode: Proxy}]
");
        // LoadBalancer without node ports.
        let lb2 = svc("
metadata: {name: lb2}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  ports: [{port: 8443}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.30}]
");
        let ename = svc("
metadata: {name: ename}
spec:
  type: ExternalName
  externalName: example.com
");
        let (d, r) = run(&[c, plain, lb, lb2, ename], &[]);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(d.services.len(), 3);
        assert_eq!(
            d.services[&id("default", "c", "", Protocol::Tcp)].frontends,
            BTreeSet::from([ext("192.0.2.10", 80, PROTO_TCP)])
        );
        assert_eq!(
            d.services[&id("default", "lb", "", Protocol::Tcp)].frontends,
            BTreeSet::from([
                np(30443, PROTO_TCP),
                ext("192.0.2.20", 443, PROTO_TCP),
                ext("192.0.2.21", 443, PROTO_TCP),
                ext("192.0.2.22", 443, PROTO_TCP),
            ])
        );
        assert_eq!(
            d.services[&id("default", "lb2", "", Protocol::Tcp)].frontends,
            BTreeSet::from([ext("192.0.2.30", 8443, PROTO_TCP)])
        );
    }

    #[test]
    fn lb_without_nodeport_refused_unless_disabled() {
        let lb = svc("
metadata: {name: lb}
spec:
  type: LoadBalancer
  ports: [{port: 443}]
");
        let (d, r) = run(&[lb], &[]);
        assert!(d.services.is_empty());
        assert!(r[0].reason.contains("nodePort not allocated"));
    }

    #[test]
    fn unknown_type_and_headless() {
        let bad = svc("
metadata: {name: bad}
spec: {type: Weird, ports: [{port: 80}]}
");
        let headless = svc("
metadata: {name: h}
spec: {clusterIP: None, externalIPs: [192.0.2.1], ports: [{port: 80}]}
");
        let (d, r) = run(&[bad, headless], &[]);
        assert!(d.services.is_empty());
        assert_eq!(r.len(), 1);
        assert!(r[0].reason.contains("unknown type \"Weird\""));
    }

    #[test]
    fn protocols() {
        let s = svc("
metadata: {name: multi, namespace: ns}
spec:
  type: NodePort
  ports:
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
  - {name: dns-tcp, port: 53, protocol: TCP, nodePort: 30053}
  - {name: sctp, port: 99, protocol: SCTP, nodePort: 30099}
  - {name: weird, port: 98, protocol: ICMP, nodePort: 30098}
");
        let (d, r) = run(&[s], &[]);
        assert_eq!(d.services.len(), 2, "UDP and TCP may share a nodePort");
        assert_eq!(
            d.services[&id("ns", "multi", "dns", Protocol::Udp)].frontends,
            BTreeSet::from([np(30053, PROTO_UDP)])
        );
        assert_eq!(r.len(), 2);
        assert!(
            r[0].reason.contains("SCTP") && r[0].reason.contains("\"sctp\""),
            "{}",
            r[0]
        );
        assert!(
            r[1].reason.contains("unknown protocol \"ICMP\""),
            "{}",
            r[1]
        );
        assert_eq!(r[0].object, "Service ns/multi");
    }

    fn aged(name: &str, ts: &str, np: u16, extra: &str) -> Service {
        svc(&format!(
            "
metadata: {{name: {name}, creationTimestamp: '{ts}'}}
spec:
  type: NodePort
  {extra}
  ports: [{{port: 80, nodePort: {np}}}]
"
        ))
    }

    #[test]
    fn nodeport_conflict_oldest_wins() {
        let older = aged("zzz-older", "2024-01-01T00:00:00Z", 30100, "");
        let newer = aged("aaa-newer", "2024-06-01T00:00:00Z", 30100, "");
        for order in [
            [older.clone(), newer.clone()],
            [newer.clone(), older.clone()],
        ] {
            let (d, r) = run(&order, &[]);
            assert_eq!(d.services.len(), 1);
            assert!(d
                .services
                .contains_key(&id("default", "zzz-older", "", Protocol::Tcp)));
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].object, "Service default/aaa-newer");
            assert!(
                r[0].reason
                    .contains("nodePort 30100/TCP is already used by default/zzz-older/TCP"),
                "{}",
                r[0]
            );
        }
        // Same timestamp (or none): namespace/name decides.
        let a = aged("a", "2024-01-01T00:00:00Z", 30100, "");
        let b = aged("b", "2024-01-01T00:00:00Z", 30100, "");
        let (d, r) = run(&[b, a], &[]);
        assert!(d
            .services
            .contains_key(&id("default", "a", "", Protocol::Tcp)));
        assert_eq!(r[0].object, "Service default/b");
    }

    #[test]
    fn external_ip_conflict() {
        let older = aged(
            "older",
            "2024-01-01T00:00:00Z",
            30100,
            "externalIPs: [192.0.2.5]",
        );
        let newer = aged(
            "newer",
            "2024-06-01T00:00:00Z",
            30101,
            "externalIPs: [192.0.2.5]",
        );
        let other_port = svc("
metadata: {name: other, creationTimestamp: '2024-07-01T00:00:00Z'}
spec:
  externalIPs: [192.0.2.5]
  ports: [{port: 81}]
");
        let (d, r) = run(&[newer, older, other_port], &[]);
        assert_eq!(d.services.len(), 2);
        assert!(d
            .services
            .contains_key(&id("default", "other", "", Protocol::Tcp)));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].object, "Service default/newer");
        assert!(r[0]
            .reason
            .contains("address 192.0.2.5:80/TCP is already used by default/older/TCP"));
    }

    #[test]
    fn unparsable_ips() {
        let s = svc("
metadata: {name: s}
spec:
  type: LoadBalancer
  externalIPs: [not-an-ip, 192.0.2.1]
  loadBalancerIP: 300.1.1.1
  ports: [{port: 80, nodePort: 30200}]
");
        let bad_slice = slice(
            "
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints: [{addresses: [bogus]}, {addresses: [10.0.0.9]}]
",
        );
        let (d, r) = run(&[s], &[bad_slice]);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r
            .iter()
            .any(|r| r.object == "EndpointSlice default/s-1" && r.reason.contains("\"bogus\"")));
        assert!(r
            .iter()
            .any(|r| r.reason.contains("externalIPs entry \"not-an-ip\"")));
        assert!(r
            .iter()
            .any(|r| r.reason.contains("loadBalancerIP \"300.1.1.1\"")));
        let s = &d.services[&id("default", "s", "", Protocol::Tcp)];
        assert_eq!(s.frontends.len(), 2);
        assert_eq!(s.backends, BTreeSet::from([be("10.0.0.9", 80, false)]));
    }

    #[test]
    fn limits() {
        let settings = Settings {
            max_ports_per_service: 1,
            max_endpoints_per_service: 2,
            ..Settings::default()
        };
        let two_ports = svc("
metadata: {name: two}
spec:
  type: NodePort
  ports: [{name: a, port: 80, nodePort: 30001}, {name: b, port: 81, nodePort: 30002}]
");
        let many = svc("
metadata: {name: many}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 30003}]
");
        let sl = slice(
            "
metadata: {name: many-1, labels: {kubernetes.io/service-name: many}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}, {addresses: [10.0.0.3]}]
",
        );
        let (d, r) = run_with(&[two_ports, many, svc(WEB)], &[sl], &settings);
        assert_eq!(d.services.len(), 1);
        assert_eq!(r.len(), 2);
        assert!(r.iter().any(|r| r.object == "Service default/two"
            && r.reason.contains("2 ports, more than the limit of 1")));
        assert!(r.iter().any(|r| r.object == "Service default/many"
            && r.reason.contains("3 endpoints, more than the limit of 2")));
    }

    #[test]
    fn policy_and_affinity() {
        let s = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
");
        let (d, _) = run(&[s], &[slice(WEB_SLICE)]);
        let s = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        assert_eq!(s.flags, SVC_F_LOCAL | SVC_F_AFFINITY);
        assert_eq!(s.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
        assert_eq!(s.backends, BTreeSet::from([be("10.0.1.1", 8080, true)]));

        let s = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}
  ports: [{name: http, port: 80, nodePort: 30080}]
");
        let (d, _) = run(&[s], &[]);
        let s = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        assert_eq!(s.flags, SVC_F_AFFINITY);
        assert_eq!(s.affinity_timeout_s, 10);
        assert!(s.backends.is_empty());
    }

    #[test]
    fn readiness_fallback() {
        let sl = slice(
            "
metadata: {name: web-x, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.0.3], conditions: {ready: false}}
",
        );
        let ready = slice(
            "
metadata: {name: web-y, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.4], conditions: {}}
",
        );
        let key = id("default", "web", "http", Protocol::Tcp);
        // Only terminating ones: serving && terminating are used.
        let (d, _) = run(&[svc(WEB)], std::slice::from_ref(&sl));
        assert_eq!(
            d.services[&key].backends,
            BTreeSet::from([be("10.0.0.1", 8080, false)])
        );
        // A ready endpoint in another slice of the same service: only ready ones.
        let (d, _) = run(&[svc(WEB)], &[sl, ready]);
        assert_eq!(
            d.services[&key].backends,
            BTreeSet::from([be("10.0.0.4", 8080, false)])
        );
    }

    #[test]
    fn local_fallback_is_per_node() {
        // Local policy: a remote ready endpoint does not prevent the fallback to a local
        // terminating one.
        let s = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080}]
");
        let sl = slice("
metadata: {name: web-x, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.2], nodeName: node-b}
");
        let (d, _) = run(&[s], &[sl]);
        let key = id("default", "web", "http", Protocol::Tcp);
        assert_eq!(
            d.services[&key].backends,
            BTreeSet::from([be("10.0.0.1", 8080, true)])
        );
    }

    #[test]
    fn slice_membership() {
        let other_ns = slice(
            "
metadata: {name: web-o, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.0.1]}]
",
        );
        let ipv6 = slice(
            "
metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['2001:db8::1']}]
",
        );
        let unlabeled = slice(
            "
metadata: {name: web-u, namespace: default}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.0.2]}]
",
        );
        let second = slice(
            "
metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.3.1]}, {addresses: [10.0.1.1], nodeName: node-a}]
",
        );
        let (d, r) = run(
            &[svc(WEB)],
            &[slice(WEB_SLICE), other_ns, ipv6, unlabeled, second],
        );
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(
            d.services[&id("default", "web", "http", Protocol::Tcp)].backends,
            BTreeSet::from([
                be("10.0.1.1", 8080, true),
                be("10.0.2.1", 8080, false),
                be("10.0.3.1", 8080, false)
            ])
        );
    }

    #[test]
    fn target_port_resolution() {
        let s = svc("
metadata: {name: app}
spec:
  type: NodePort
  ports:
  - {name: web, port: 80, targetPort: http, nodePort: 30001}
  - {name: metrics, port: 9090, targetPort: 9100, nodePort: 30002}
  - {name: admin, port: 81, targetPort: admin-port, nodePort: 30003}
  - {name: dflt, port: 82, nodePort: 30004}
  - {name: udp, port: 83, protocol: UDP, nodePort: 30005}
");
        // `web` resolves by the service port name; `admin` through its targetPort name;
        // `metrics` and `dflt` by number; `udp` must not match the TCP port named "udp".
        let sl = slice(
            "
metadata: {name: app-1, labels: {kubernetes.io/service-name: app}}
addressType: IPv4
ports:
- {name: web, port: 8080}
- {name: admin-port, port: 7070, protocol: TCP}
- {name: udp, port: 5353, protocol: TCP}
endpoints: [{addresses: [10.0.0.1]}]
",
        );
        let (d, r) = run(&[s], &[sl]);
        assert!(r.is_empty(), "{r:?}");
        let port_of = |name: &str, p: Protocol| {
            let b = &d.services[&id("default", "app", name, p)].backends;
            b.iter().map(|b| u16::from_be(b.port)).collect::<Vec<_>>()
        };
        assert_eq!(port_of("web", Protocol::Tcp), [8080]);
        assert_eq!(port_of("metrics", Protocol::Tcp), [9100]);
        assert_eq!(port_of("admin", Protocol::Tcp), [7070]);
        assert_eq!(port_of("dflt", Protocol::Tcp), [82]);
        assert_eq!(port_of("udp", Protocol::Udp), [83]);

        // Unnamed port matches an unnamed slice port; a name that resolves nowhere gives
        // no backend.
        let s = svc("
metadata: {name: one}
spec:
  type: NodePort
  ports: [{port: 80, targetPort: missing, nodePort: 30010}]
");
        let sl = slice(
            "
metadata: {name: one-1, labels: {kubernetes.io/service-name: one}}
addressType: IPv4
ports: [{name: '', port: 8081}]
endpoints: [{addresses: [10.0.0.2]}]
",
        );
        let (d, _) = run(std::slice::from_ref(&s), &[sl]);
        let b = &d.services[&id("default", "one", "", Protocol::Tcp)].backends;
        assert_eq!(
            b.iter().map(|b| u16::from_be(b.port)).collect::<Vec<_>>(),
            [8081]
        );
        let sl = slice(
            "
metadata: {name: one-1, labels: {kubernetes.io/service-name: one}}
addressType: IPv4
ports: [{name: other, port: 8081}]
endpoints: [{addresses: [10.0.0.2]}]
",
        );
        let (d, _) = run(&[s], &[sl]);
        assert!(d.services[&id("default", "one", "", Protocol::Tcp)]
            .backends
            .is_empty());
    }

    #[test]
    fn target_port_zero_refused() {
        let s = svc("
metadata: {name: t}
spec:
  type: NodePort
  ports: [{port: 80, targetPort: 0, nodePort: 30001}, {name: b, port: 81, nodePort: 30002}]
");
        let (d, r) = run(&[s], &[]);
        assert_eq!(d.services.len(), 1);
        assert!(r[0].reason.contains("targetPort 0"));
    }

    #[test]
    fn node_addresses() {
        let n = node(
            "
metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 10.1.0.5}
  - {type: ExternalIP, address: 203.0.113.5}
  - {type: InternalIP, address: 'fd00::5'}
  - {type: Hostname, address: node-a}
",
        );
        let other = node(
            "
metadata: {name: node-b}
status:
  addresses: [{type: InternalIP, address: 10.1.0.6}]
",
        );
        let nodes = [n, other];
        let ifaces: [Ipv4Addr; 3] = [
            "10.1.0.5".parse().unwrap(),
            "192.168.7.1".parse().unwrap(),
            Ipv4Addr::UNSPECIFIED,
        ];
        let settings = Settings::default();
        let inputs = |settings| Inputs {
            services: &[],
            slices: &[],
            nodes: &nodes,
            node_name: "node-a",
            interface_addrs: &ifaces,
            settings,
        };
        let (d, _) = desired(&inputs(&settings));
        let want: BTreeSet<Ipv4Addr> = ["10.1.0.5", "192.168.7.1", "203.0.113.5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(d.node_addrs, want);
        let narrowed = Settings {
            nodeport_cidrs: vec![
                "10.0.0.0/8".parse().unwrap(),
                "203.0.113.5".parse().unwrap(),
            ],
            ..Settings::default()
        };
        let (d, _) = desired(&inputs(&narrowed));
        let want: BTreeSet<Ipv4Addr> = ["10.1.0.5", "203.0.113.5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(d.node_addrs, want);
    }

    #[test]
    fn cidr_parse() {
        let c: Ipv4Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn duplicate_endpoints_and_ports() {
        // The same endpoint in two slices (slice migration) gives one backend.
        let dup = slice(
            "
metadata: {name: web-d, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.2.1], nodeName: node-b}]
",
        );
        let (d, _) = run(&[svc(WEB)], &[slice(WEB_SLICE), dup]);
        assert_eq!(
            d.services[&id("default", "web", "http", Protocol::Tcp)]
                .backends
                .len(),
            2
        );
        // Two ports with the same name and protocol: the second is refused.
        let s = svc("
metadata: {name: d}
spec:
  type: NodePort
  ports: [{name: a, port: 80, nodePort: 30001}, {name: a, port: 81, nodePort: 30002}]
");
        let (d, r) = run(&[s], &[]);
        assert_eq!(d.services.len(), 1);
        assert!(r[0].reason.contains("appears twice"), "{}", r[0]);
    }
}
