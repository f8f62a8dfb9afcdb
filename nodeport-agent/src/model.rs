//! Desired state as a pure function of Kubernetes objects: which addresses of this node take
//! nodePort traffic, and for every service port its frontends, flags and backends. Objects
//! that cannot be served are refused one by one (a [`Refusal`] names the object and the
//! reason) and never affect other services. The rules follow kube-proxy; each is documented
//! on [`desired`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{Node, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nodeport_common::{
    Addr, Backend, FrontendKey, FrontendKey6, Ip6, BE_F_DRAINING, BE_F_LOCAL, PROTO_TCP, PROTO_UDP,
    SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_REJECT, SVC_F_SRC_RANGES,
};

pub use crate::family::{addr_from_raw, addr_raw, Family, IpCidr, RawAddr};
use crate::node_addrs::{self, NodeAddrRules, NodeAddrs};
pub use crate::node_addrs::{InterfaceAddr, InterfacePatterns};

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label of a Service that another proxy serves (kube-proxy skips it).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label of the EndpointSlices of a headless Service (kube-proxy does not watch them).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Node label naming the node's zone (what EndpointSlice `hints.forZones` refer to).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// The label selector of the Services `proxy_name` serves, as kube-proxy's informer
/// has it: those without a proxy name, or those naming `proxy_name`.
pub fn service_selector(proxy_name: Option<&str>) -> String {
    match proxy_name {
        None => format!("!{LABEL_SERVICE_PROXY_NAME}"),
        Some(n) => format!("{LABEL_SERVICE_PROXY_NAME}={n}"),
    }
}

/// The label selector of the EndpointSlices worth watching: not a headless Service's.
pub fn slice_selector() -> String {
    format!("!{LABEL_HEADLESS}")
}
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest `timeoutSeconds` the API server accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Agent settings that shape the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Valid nodePorts (the API server's `--service-node-port-range`).
    pub nodeport_range: RangeInclusive<u16>,
    /// Only node addresses inside these networks take nodePort traffic (kube-proxy's
    /// `--nodeport-addresses`, IPv4 and IPv6); empty means every address of the node.
    pub nodeport_cidrs: Vec<IpCidr>,
    /// A service with more ports than this is refused.
    pub max_ports_per_service: usize,
    /// A service whose EndpointSlices hold more endpoints than this is refused.
    pub max_endpoints_per_service: usize,
    /// `--service-proxy-name`: serve only the Services whose
    /// `service.kubernetes.io/service-proxy-name` label names this proxy. Unset (as in
    /// kube-proxy): serve only the Services without the label (they belong to another
    /// proxy).
    pub service_proxy_name: Option<String>,
    /// Whether `spec.externalIPs` become frontends (`--external-ips allow`, kube-proxy's
    /// behaviour and CVE-2020-8554's surface) or are ignored (`deny`).
    pub external_ips: bool,
    /// `--exclude-interfaces`: the addresses of these interfaces never take nodePorts.
    pub exclude_interfaces: InterfacePatterns,
    /// `--max-node-addresses`: room in NP_NODEADDR and in NP_NODEADDR6, each.
    pub max_node_addrs: usize,
    /// `--interface`: the uplinks, whose addresses are kept first (after the Node
    /// object's) when not every address fits.
    pub uplinks: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nodeport_range: 30000..=32767,
            nodeport_cidrs: Vec::new(),
            max_ports_per_service: 100,
            max_endpoints_per_service: 10_000,
            external_ips: true,
            service_proxy_name: None,
            exclude_interfaces: NodeAddrRules::default().exclude_interfaces,
            max_node_addrs: NodeAddrRules::default().max_per_family,
            uplinks: Vec::new(),
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
    /// IPv4 and IPv6 addresses configured on this node's interfaces, with the interface.
    pub interface_addrs: &'a [InterfaceAddr],
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

/// One port of one service in one IP family: the unit that owns frontends, a Maglev table
/// and a `svc_id`. A dual-stack service port is two units.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name`; empty for the unnamed port of a single-port service.
    pub port: String,
    pub protocol: Protocol,
    /// The family of its frontends and backends.
    pub family: Family,
}

impl fmt::Display for ServicePortId {
    /// `default/web:http/TCP`, or `default/web/TCP` for an unnamed port; IPv6 units end in
    /// `/IPv6` (`default/web:http/TCP/IPv6`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)?;
        if self.family == Family::V6 {
            write!(f, "/{}", Family::V6)?;
        }
        Ok(())
    }
}

/// What the datapath should do for one service port of one family (`A`: `u32` for IPv4,
/// [`Ip6`] for IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService<A: Addr = u32> {
    /// Keys in NP_SVC (NP_SVC6): `{addr: 0, port: nodePort}` and `{addr: ip, port: port}`
    /// for each LoadBalancer ingress IP and external IP of the
    /// family. Network order.
    pub frontends: BTreeSet<FrontendKey<A>>,
    /// `SVC_F_*` flags.
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges of the family when `SVC_F_SRC_RANGES` is set: the clients
    /// allowed on the LoadBalancer frontends. Empty with the flag set: none.
    pub source_ranges: BTreeSet<IpCidr>,
    /// Addresses of `frontends` that come from `spec.externalIPs` only (not also a
    /// LoadBalancer ingress IP): `source_ranges` do not apply to them, as in kube-proxy.
    pub external_ips: BTreeSet<A>,
    /// Endpoints (address, target port, `BE_F_LOCAL`, `BE_F_DRAINING`), one per address
    /// and port: every endpoint the slices list, whatever its conditions. The table's
    /// members are those without `BE_F_DRAINING`; the others are kept in NP_BE for the
    /// flows already on them (a terminating pod, a pod that failed its readiness probe,
    /// under Local another node's pod).
    pub backends: BTreeSet<Backend<A>>,
}

/// The desired state of an IPv6 service port.
pub type DesiredService6 = DesiredService<Ip6>;

impl<A: Addr> DesiredService<A> {
    /// The backends the Maglev table is built from: those that take new flows.
    pub fn table_backends(&self) -> impl Iterator<Item = &Backend<A>> {
        self.backends
            .iter()
            .filter(|b| b.flags & BE_F_DRAINING == 0)
    }

    /// The `SVC_F_*` flags of frontend `fe`: `SVC_F_SRC_RANGES` only on LoadBalancer
    /// ingress IPs (kube-proxy filters neither nodePorts nor external IPs by
    /// `loadBalancerSourceRanges`).
    pub fn frontend_flags(&self, fe: &FrontendKey<A>) -> u16 {
        if fe.addr.is_zero() || self.external_ips.contains(&fe.addr) {
            self.flags & !SVC_F_SRC_RANGES
        } else {
            self.flags
        }
    }
}

/// The desired state of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Addresses of this node that take nodePort traffic (both families).
    pub node_addrs: BTreeSet<IpAddr>,
    /// Addresses that would take nodePort traffic but did not fit in their family's map
    /// (`--max-node-addresses`), sorted.
    pub node_addrs_left_out: Vec<IpAddr>,
    /// The IPv4 service ports (`id.family == Family::V4`).
    pub services: BTreeMap<ServicePortId, DesiredService>,
    /// The IPv6 service ports (`id.family == Family::V6`).
    pub services6: BTreeMap<ServicePortId, DesiredService6>,
    /// kube-proxy-style health check servers, by `spec.healthCheckNodePort`.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// The part of [`Desired`] of one family, for code written once for both.
pub trait DesiredFamily: RawAddr {
    fn services(d: &Desired) -> &BTreeMap<ServicePortId, DesiredService<Self>>;
}

impl DesiredFamily for u32 {
    fn services(d: &Desired) -> &BTreeMap<ServicePortId, DesiredService> {
        &d.services
    }
}

impl DesiredFamily for Ip6 {
    fn services(d: &Desired) -> &BTreeMap<ServicePortId, DesiredService6> {
        &d.services6
    }
}

impl Desired {
    /// Service ports of both families.
    pub fn service_count(&self) -> usize {
        self.services.len() + self.services6.len()
    }

    /// Whether service port `id` is in the desired state.
    pub fn contains(&self, id: &ServicePortId) -> bool {
        match id.family {
            Family::V4 => self.services.contains_key(id),
            Family::V6 => self.services6.contains_key(id),
        }
    }

    fn remove(&mut self, id: &ServicePortId) {
        match id.family {
            Family::V4 => {
                self.services.remove(id);
            }
            Family::V6 => {
                self.services6.remove(id);
            }
        }
    }

    fn insert(&mut self, id: ServicePortId, unit: Unit) {
        match unit {
            Unit::V4(ds) => {
                self.services.insert(id, ds);
            }
            Unit::V6(ds) => {
                self.services6.insert(id, ds);
            }
        }
    }
}

/// The desired state of one service port, of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Unit {
    V4(DesiredService),
    V6(DesiredService6),
}

impl From<DesiredService> for Unit {
    fn from(ds: DesiredService) -> Self {
        Unit::V4(ds)
    }
}

impl From<DesiredService6> for Unit {
    fn from(ds: DesiredService6) -> Self {
        Unit::V6(ds)
    }
}

/// A frontend of either family (what service ports compete for).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum AnyFrontend {
    V4(FrontendKey),
    V6(FrontendKey6),
}

impl From<FrontendKey> for AnyFrontend {
    fn from(fe: FrontendKey) -> Self {
        AnyFrontend::V4(fe)
    }
}

impl From<FrontendKey6> for AnyFrontend {
    fn from(fe: FrontendKey6) -> Self {
        AnyFrontend::V6(fe)
    }
}

impl AnyFrontend {
    fn describe(&self) -> String {
        match self {
            AnyFrontend::V4(fe) => describe_frontend(fe),
            AnyFrontend::V6(fe) => describe_frontend(fe),
        }
    }
}

/// What the health check server of one `externalTrafficPolicy: Local` service reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node (distinct addresses).
    pub local_endpoints: usize,
}

/// An endpoint of an EndpointSlice, parsed once.
#[derive(Clone, Debug)]
struct ParsedEndpoint {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// `hints.forZones`: `None` when the endpoint has none, else whether this node's zone
    /// is among them.
    for_zone: Option<bool>,
    /// `hints.forNodes`: `None` when the endpoint has none, else whether this node is
    /// among them.
    for_node: Option<bool>,
}

/// Which endpoints Cluster-policy traffic may use on this node, after the topology hints
/// (kube-proxy's `topologyModeFromHints` in pkg/proxy/topology.go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint (no usable hints).
    Any,
    /// Endpoints hinted for this node's zone.
    SameZone,
    /// Endpoints hinted for this node.
    SameNode,
}

impl Topology {
    /// The mode the ready endpoints' hints call for, as kube-proxy decides it:
    /// - no ready endpoint: [`Topology::Any`];
    /// - every ready endpoint has `forNodes` hints and one is hinted for this node:
    ///   [`Topology::SameNode`] (`trafficDistribution: PreferSameNode`);
    /// - else every ready endpoint has `forZones` hints and one is hinted for this node's
    ///   zone: [`Topology::SameZone`] (`PreferSameZone`, `PreferClose`, topology-aware
    ///   routing);
    /// - else [`Topology::Any`]: one endpoint without hints, or none for this
    ///   node/zone (a node without a zone label matches no zone), falls back to all.
    fn of<'a>(endpoints: impl IntoIterator<Item = &'a ParsedEndpoint>) -> Topology {
        let (mut any, mut all_node, mut for_node, mut all_zone, mut for_zone) =
            (false, true, false, true, false);
        for e in endpoints.into_iter().filter(|e| e.ready) {
            any = true;
            match e.for_node {
                None => all_node = false,
                Some(here) => for_node |= here,
            }
            match e.for_zone {
                None => all_zone = false,
                Some(here) => for_zone |= here,
            }
        }
        if !any {
            Topology::Any
        } else if all_node && for_node {
            Topology::SameNode
        } else if all_zone && for_zone {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    /// Whether `e` may take new flows under this mode.
    fn admits(self, e: &ParsedEndpoint) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameZone => e.for_zone == Some(true),
            Topology::SameNode => e.for_node == Some(true),
        }
    }
}

/// A slice port: (name, protocol, port). Name is "" when unset; protocol defaults to TCP.
#[derive(Clone, Debug)]
struct SlicePort {
    name: String,
    protocol: String,
    port: Option<i32>,
}

#[derive(Clone, Debug, Default)]
struct ParsedSlice {
    /// `addressType` (IPv4 or IPv6); every endpoint is of this family.
    family: Family,
    ports: Vec<SlicePort>,
    endpoints: Vec<ParsedEndpoint>,
}

fn object_name(kind: &str, ns: Option<&str>, name: Option<&str>) -> String {
    let name = name.unwrap_or("<unnamed>");
    match ns {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The service an EndpointSlice belongs to, `(namespace, service name)`, with the slice
/// parsed; `None` for slices that are skipped silently (no service label, `addressType`
/// FQDN or unknown).
/// Refusals of single endpoints go to `refusals`.
fn parse_slice<'a>(
    slice: &'a EndpointSlice,
    node_name: &str,
    zone: &str,
    refusals: &mut Vec<Refusal>,
) -> Option<((&'a str, &'a str), ParsedSlice)> {
    let meta = &slice.metadata;
    let ns = meta.namespace.as_deref().unwrap_or("default");
    let labels = meta.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) {
        return None; // a headless Service's slice: kube-proxy does not even watch it
    }
    let svc = labels.get(LABEL_SERVICE_NAME)?;
    let family = Family::parse(&slice.address_type)?;
    let obj = || object_name("EndpointSlice", Some(ns), meta.name.as_deref());
    let ports = slice
        .ports
        .iter()
        .flatten()
        .map(|p| SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port: p.port,
        })
        .collect();
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for ep in &slice.endpoints {
        let Some(a) = ep.addresses.first() else {
            refusals.push(Refusal::new(obj(), "endpoint without addresses"));
            continue;
        };
        let addr = match a.parse::<IpAddr>() {
            Ok(addr) if Family::of(addr) == family => addr,
            _ => {
                refusals.push(Refusal::new(
                    obj(),
                    format!("endpoint address {a:?} is not an {family} address"),
                ));
                continue;
            }
        };
        let c = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        // Empty hint lists count as none (kube-proxy keeps no set for them).
        let for_zone = hints
            .and_then(|h| h.for_zones.as_ref())
            .filter(|z| !z.is_empty())
            .map(|z| z.iter().any(|z| z.name == zone));
        let for_node = hints
            .and_then(|h| h.for_nodes.as_ref())
            .filter(|n| !n.is_empty())
            .map(|n| n.iter().any(|n| n.name == node_name));
        endpoints.push(ParsedEndpoint {
            addr,
            // Unset conditions as kube-proxy reads them (pkg/proxy/endpointslicecache.go,
            // addEndpoints): ready and serving when unset, terminating only when set.
            ready: c.and_then(|c| c.ready).unwrap_or(true),
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            local: ep.node_name.as_deref() == Some(node_name),
            for_zone,
            for_node,
        });
    }
    Some((
        (ns, svc.as_str()),
        ParsedSlice {
            family,
            ports,
            endpoints,
        },
    ))
}

/// Where a service stands in the "oldest claim wins" order (then input order).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Age {
    no_timestamp: bool,
    created: Option<Time>,
    namespace: String,
    name: String,
}

fn age(svc: &Service) -> Age {
    let m = &svc.metadata;
    let created = m.creation_timestamp.clone();
    Age {
        no_timestamp: created.is_none(),
        created,
        namespace: m.namespace.as_deref().unwrap_or("default").to_string(),
        name: m.name.as_deref().unwrap_or_default().to_string(),
    }
}

/// Everything about one Service that does not depend on other Services: its own
/// refusals and, per port, what it claims and what it would program.
#[derive(Clone, Debug, Default)]
struct Plan {
    /// `Service ns/name`.
    obj: String,
    /// Refusals of the service as a whole, in order (they come before its ports').
    refusals: Vec<Refusal>,
    ports: Vec<PortPlan>,
    /// `spec.healthCheckNodePort` (valid, in range) and what its server reports; served
    /// unless an older service claims the same port.
    health_check: Option<(u16, HealthCheck)>,
}

/// The health checks of `plans` (oldest first): the first claim of a port wins; later
/// claims are refused.
fn health_checks<'a>(
    plans: impl IntoIterator<Item = &'a Plan>,
    refusals: &mut Vec<Refusal>,
) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for plan in plans {
        let Some((port, hc)) = &plan.health_check else {
            continue;
        };
        match out.get(port) {
            Some(owner) => refusals.push(Refusal::new(
                &plan.obj,
                format!(
                    "healthCheckNodePort {port} is already used by Service {}/{}",
                    owner.namespace, owner.name
                ),
            )),
            None => {
                out.insert(*port, hc.clone());
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
enum PortPlan {
    /// Refused whatever other services do (the reason, port named).
    Refused(String),
    /// Served unless another port claims the same id or frontend first.
    Claim(Box<Candidate>),
}

#[derive(Clone, Debug)]
struct Candidate {
    id: ServicePortId,
    /// `spec.ports[i] "name"`, for refusals.
    what: String,
    then: AfterId,
}

/// What follows once the port's id is known to be free.
#[derive(Clone, Debug)]
enum AfterId {
    /// Refused (nodePort problems): the reason, port named.
    Refused(String),
    /// No frontend: left out without refusal (a plain ClusterIP port).
    NoFrontend,
    Frontends {
        /// Sorted.
        frontends: Vec<AnyFrontend>,
        /// The service port, or the refusal (port named) of a bad targetPort, which
        /// claims nothing.
        service: Result<Unit, String>,
    },
}

impl Candidate {
    /// The resources this port looks at: its id, then its frontends.
    fn reads(&self) -> impl Iterator<Item = Resource> + '_ {
        let frontends = match &self.then {
            AfterId::Frontends { frontends, .. } => Some(frontends),
            _ => None,
        };
        std::iter::once(Resource::Id(self.id.clone())).chain(
            frontends
                .into_iter()
                .flatten()
                .map(|fe| Resource::Frontend(*fe)),
        )
    }
}

/// What service ports compete for: their id and their frontends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Resource {
    Id(ServicePortId),
    Frontend(AnyFrontend),
}

/// The claims made by the ports accepted so far (older ports first).
trait Claims {
    fn id_taken(&self, id: &ServicePortId) -> bool;
    fn owner(&self, fe: &AnyFrontend) -> Option<&ServicePortId>;
}

/// What became of one port.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Refused(String),
    Nothing,
    Accepted,
}

/// The outcome of `port` given the claims of the ports before it.
fn decide(port: &PortPlan, claims: &impl Claims) -> Outcome {
    let c = match port {
        PortPlan::Refused(r) => return Outcome::Refused(r.clone()),
        PortPlan::Claim(c) => c,
    };
    if claims.id_taken(&c.id) {
        return Outcome::Refused(format!(
            "a port named {:?} with protocol {} appears twice ({})",
            c.id.port, c.id.protocol, c.what
        ));
    }
    match &c.then {
        AfterId::Refused(r) => Outcome::Refused(r.clone()),
        AfterId::NoFrontend => Outcome::Nothing,
        AfterId::Frontends { frontends, service } => {
            if let Some((fe, owner)) = frontends
                .iter()
                .find_map(|fe| claims.owner(fe).map(|o| (fe, o)))
            {
                return Outcome::Refused(format!(
                    "{} is already used by {} ({})",
                    fe.describe(),
                    owner,
                    c.what
                ));
            }
            match service {
                Ok(_) => Outcome::Accepted,
                Err(r) => Outcome::Refused(r.clone()),
            }
        }
    }
}

/// The claims of [`desired`]: every accepted port so far.
struct AllClaims<'a> {
    services: &'a Desired,
    frontends: &'a BTreeMap<AnyFrontend, ServicePortId>,
}

impl Claims for AllClaims<'_> {
    fn id_taken(&self, id: &ServicePortId) -> bool {
        self.services.contains(id)
    }

    fn owner(&self, fe: &AnyFrontend) -> Option<&ServicePortId> {
        self.frontends.get(fe)
    }
}

/// Computes the desired state and the refusals.
///
/// Node addresses ([`node_addrs::choose`]):
/// - this node's interface addresses (except those of interfaces matching
///   `settings.exclude_interfaces`) plus the `InternalIP` and `ExternalIP` addresses of the
///   Node object named `node_name`, IPv4 and IPv6 (unparsable ones are skipped silently);
/// - when `settings.nodeport_cidrs` is not empty, only addresses inside one of them;
/// - never unspecified, broadcast, multicast, loopback or link-local (169.254.0.0/16,
///   fe80::/10) addresses;
/// - at most `settings.max_node_addrs` per family: the Node object's first, then the
///   uplinks' (`settings.uplinks`), then the others; the rest go to
///   [`Desired::node_addrs_left_out`].
///
/// IP families:
/// - a service's families are `spec.ipFamilies` (`IPv4`, `IPv6`, or both in either order);
///   an unknown entry is refused, naming the field, and the other families are served.
///   Without `spec.ipFamilies`: the families of `spec.clusterIPs`/`spec.clusterIP`, and
///   IPv4 when those are absent or `None`;
/// - each port is one unit per family ([`ServicePortId::family`]), with its own `svc_id`,
///   Maglev table, frontends and backends: IPv4 units in [`Desired::services`], IPv6 ones
///   in [`Desired::services6`]. Everything below applies to each unit, with the addresses,
///   EndpointSlices and source ranges of its family only;
/// - external and LoadBalancer IPs of a family the service does not have are ignored, like
///   kube-proxy does;
/// - `loadBalancerSourceRanges` non-empty but without a CIDR of the unit's family: the
///   unit's LoadBalancer frontends allow no client (fail closed, on purpose: a list meant to
///   restrict access never opens the other family to everyone);
/// - a refusal that is the same for both units of a dual-stack port is reported once.
///
/// Services (one [`DesiredService`] per port and family):
/// - `ExternalName` and headless (`clusterIP: None`) services are skipped, like kube-proxy;
///   an unknown `type` is refused. A missing namespace means `default`.
/// - Services are considered oldest first (`creationTimestamp`, missing timestamps last,
///   then namespace/name), so that the oldest claim of a frontend wins.
/// - More than `max_ports_per_service` ports, or more than `max_endpoints_per_service`
///   endpoints in its IPv4 and IPv6 slices: the whole service is refused, the refusal
///   naming the flag (`--max-ports-per-service`, `--max-endpoints-per-service`).
/// - Protocol `TCP` (default) or `UDP`. `SCTP` ports are refused: the datapath passes SCTP
///   to the kernel stack. Other protocols are refused.
/// - `port` must be 1-65535; an integer `targetPort` too.
/// - Only `NodePort` and `LoadBalancer` services get a nodePort frontend. The nodePort must
///   lie in `settings.nodeport_range`; nodePort 0 or missing is refused (manifests have no
///   allocator), except for a `LoadBalancer` with `allocateLoadBalancerNodePorts: false`,
///   which then simply has no nodePort frontend.
/// - `spec.externalIPs` apply to every type (unless `settings.external_ips` is off);
///   `status.loadBalancer.ingress[].ip` (except `ipMode: Proxy`, where the load balancer
///   delivers to the node address, as kube-proxy) applies to `LoadBalancer` services:
///   frontend `(ip, port)`. `spec.loadBalancerIP` is never a frontend (kube-proxy ignores
///   it too): it only asks the controller for an address.
///   Unparsable addresses are refused one by one (the rest of the service is served).
/// - A frontend `(nodePort, protocol)` or `(ip, port, protocol)` claimed by an older service
///   (or an earlier port of the same service) refuses the later port entirely.
/// - A port with no frontend (a plain ClusterIP port) is left out without refusal.
/// - `sessionAffinity: ClientIP` sets `SVC_F_AFFINITY` with
///   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, clamped to 1-86400).
/// - A non-empty `spec.loadBalancerSourceRanges` sets `SVC_F_SRC_RANGES` (the reconciler
///   puts it on LoadBalancer ingress IP frontends only, as kube-proxy does: nodePorts and
///   external IPs that are not also ingress IPs stay open,
///   [`DesiredService::frontend_flags`]) with the CIDRs of the unit's family in
///   `source_ranges`; unparsable entries are refused and allow nobody.
/// - `externalTrafficPolicy: Local` sets `SVC_F_LOCAL`: the Maglev table holds only
///   endpoints whose `nodeName` is this node ([`DesiredService::table_backends`]); the
///   serving endpoints of other nodes stay in `backends` (programmed in NP_BE, in no table)
///   so that flows bound to them under Cluster keep their backend after a switch.
/// - A `NodePort` or `LoadBalancer` service with `externalTrafficPolicy: Local` and a
///   non-zero `spec.healthCheckNodePort` gets a [`HealthCheck`] on that port, counting the
///   distinct addresses of its ready endpoints on this node, both families (whatever the
///   outcome of its ports). A port outside `settings.nodeport_range` refuses the health check only; a port
///   claimed by an older service too refuses the younger one's health check.
///
/// Backends of a service port:
/// - EndpointSlices with label `kubernetes.io/service-name: <name>` in the service's
///   namespace and `addressType` of the unit's family (`FQDN` slices are skipped silently); an
///   endpoint uses its first address (the API says all addresses are fungible); an
///   unparsable address refuses that endpoint (named by its slice).
/// - Target port, per slice: the slice port whose name equals the service port's name
///   (unset and `""` are equal) with the same protocol. A slice without one contributes
///   nothing: like kube-proxy, only the EndpointSlice controller's resolution of
///   `targetPort` counts (no fallback to a numeric `targetPort` or to a port named after
///   a named one).
/// - One backend per (address, target port): an address listed more than once takes its
///   first non-terminating listing, else its first (kube-proxy's rule: a new pod that got
///   a terminating pod's IP wins); that listing gives conditions, hints and locality.
/// - Ready endpoints (`ready` unset counts as ready) take new flows. If no table member is
///   ready, endpoints that are `serving` (unset counts as serving, as in kube-proxy) and
///   `terminating` do.
/// - Topology, under Cluster policy only: when every ready endpoint has `hints.forNodes`
///   and one names this node, only the ready endpoints hinted for this node take new
///   flows; otherwise when every ready endpoint has `hints.forZones` and one names this
///   node's zone (label `topology.kubernetes.io/zone` of the Node `node_name`), only those
///   hinted for the zone; otherwise every ready endpoint (kube-proxy's
///   `topologyModeFromHints`). The terminating fallback ignores hints.
///   `spec.trafficDistribution` is not read: the EndpointSlice controller turns it into
///   hints, and kube-proxy too acts on the hints alone.
/// - Every other listed endpoint is kept with `BE_F_DRAINING`, whatever its conditions:
///   the flows already on it keep it until it leaves every slice (kube-proxy leaves their
///   conntrack entries alone too).
/// - `BE_F_LOCAL` when the endpoint's `nodeName` is this node.
pub fn desired(inputs: &Inputs) -> (Desired, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let addrs = node_addrs(inputs);
    let mut out = Desired {
        node_addrs: addrs.chosen,
        node_addrs_left_out: addrs.left_out,
        ..Desired::default()
    };
    let mut plans = Vec::new();

    // EndpointSlices by (namespace, service name), parsed once.
    let mut slices: BTreeMap<(&str, &str), Vec<ParsedSlice>> = BTreeMap::new();
    for slice in inputs.slices {
        if let Some((key, parsed)) =
            parse_slice(slice, inputs.node_name, node_zone(inputs), &mut refusals)
        {
            slices.entry(key).or_default().push(parsed);
        }
    }

    // Oldest first, so that the oldest claim of a frontend wins.
    let mut services: Vec<&Service> = inputs.services.iter().collect();
    services.sort_by_cached_key(|s| age(s));

    let mut claims: BTreeMap<AnyFrontend, ServicePortId> = BTreeMap::new();
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let plan = match svc.metadata.name.as_deref() {
            None => unnamed(ns),
            Some(name) => {
                let svc_slices: Vec<&ParsedSlice> =
                    slices.get(&(ns, name)).into_iter().flatten().collect();
                plan_service(svc, ns, name, &svc_slices, inputs.settings)
            }
        };
        refusals.extend(plan.refusals.iter().cloned());
        let first = refusals.len();
        for port in &plan.ports {
            let outcome = decide(
                port,
                &AllClaims {
                    services: &out,
                    frontends: &claims,
                },
            );
            match (outcome, port) {
                (Outcome::Refused(r), _) => push_port_refusal(&mut refusals, first, &plan.obj, r),
                (Outcome::Nothing, _) => {}
                (Outcome::Accepted, PortPlan::Claim(c)) => {
                    if let AfterId::Frontends {
                        frontends,
                        service: Ok(ds),
                    } = &c.then
                    {
                        for fe in frontends {
                            claims.insert(*fe, c.id.clone());
                        }
                        out.insert(c.id.clone(), ds.clone());
                    }
                }
                (Outcome::Accepted, PortPlan::Refused(_)) => unreachable!("refused port accepted"),
            }
        }
        if plan.health_check.is_some() {
            plans.push(plan);
        }
    }
    out.health_checks = health_checks(&plans, &mut refusals);
    (out, refusals)
}

/// Adds the refusal of a port of `obj` to `refusals`, unless the refusal just before it
/// (at `first` or later: the same service) is the same: the units of a dual-stack port
/// are refused for the same reason once.
fn push_port_refusal(refusals: &mut Vec<Refusal>, first: usize, obj: &str, reason: String) {
    let r = Refusal::new(obj, reason);
    if refusals.len() > first && refusals.last() == Some(&r) {
        return;
    }
    refusals.push(r);
}

/// The plan of a Service without a name.
fn unnamed(ns: &str) -> Plan {
    let obj = object_name("Service", Some(ns), None);
    Plan {
        refusals: vec![Refusal::new(&obj, "metadata.name is missing")],
        obj,
        ports: Vec::new(),
        health_check: None,
    }
}

/// This node's zone: the `topology.kubernetes.io/zone` label of the Node object named
/// `node_name`; `""` without one.
fn node_zone<'a>(inputs: &Inputs<'a>) -> &'a str {
    inputs
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(inputs.node_name))
        .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE))
        .map_or("", String::as_str)
}

/// The addresses of this node that take nodePorts, and those that do not fit
/// ([`node_addrs::choose`]).
fn node_addrs(inputs: &Inputs) -> NodeAddrs {
    let from_node = inputs
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(inputs.node_name))
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.trim().parse::<IpAddr>().ok());
    let s = inputs.settings;
    let rules = NodeAddrRules {
        exclude_interfaces: s.exclude_interfaces.clone(),
        cidrs: s.nodeport_cidrs.clone(),
        max_per_family: s.max_node_addrs,
        uplinks: s.uplinks.clone(),
    };
    node_addrs::choose(inputs.interface_addrs, from_node, &rules)
}

/// What `svc` (named `ns/name`, with EndpointSlices `slices` in input order) wants, before
/// other services are looked at.
fn plan_service(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&ParsedSlice],
    settings: &Settings,
) -> Plan {
    let mut plan = Plan {
        obj: object_name("Service", Some(ns), Some(name)),
        ..Plan::default()
    };
    let obj = plan.obj.clone();
    let refusals = &mut plan.refusals;
    let refuse =
        |refusals: &mut Vec<Refusal>, reason: String| refusals.push(Refusal::new(&obj, reason));
    let Some(spec) = svc.spec.as_ref() else {
        return plan;
    };
    let proxy = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME));
    if proxy.map(String::as_str) != settings.service_proxy_name.as_deref() {
        return plan; // another proxy's Service (or, with a proxy name, not ours)
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_port = match type_ {
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        "ExternalName" => return plan,
        other => {
            refuse(refusals, format!("unknown type {other:?}"));
            return plan;
        }
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        return plan; // headless: kube-proxy skips it too
    }
    let families = families(spec, &obj, refusals);
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.len() > settings.max_ports_per_service {
        refuse(
            refusals,
            format!(
                "{} ports, more than the limit of {} (--max-ports-per-service)",
                ports.len(),
                settings.max_ports_per_service
            ),
        );
        return plan;
    }
    let n_endpoints: usize = slices.iter().map(|s| s.endpoints.len()).sum();
    if n_endpoints > settings.max_endpoints_per_service {
        refuse(
            refusals,
            format!(
                "{n_endpoints} endpoints, more than the limit of {} (--max-endpoints-per-service)",
                settings.max_endpoints_per_service
            ),
        );
        return plan;
    }

    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    // kube-proxy's health check server; the API server sets the port only for Local
    // LoadBalancer services, but a NodePort service that has one is served too.
    match spec.health_check_node_port {
        Some(hc) if has_node_port && local && hc != 0 => {
            let range = &settings.nodeport_range;
            match valid_port(hc).filter(|p| range.contains(p)) {
                Some(port) => {
                    // Both families' endpoints: one health check serves the service.
                    let local_endpoints = slices
                        .iter()
                        .flat_map(|s| &s.endpoints)
                        .filter(|e| e.local && e.ready)
                        .map(|e| e.addr)
                        .collect::<BTreeSet<_>>()
                        .len();
                    plan.health_check = Some((
                        port,
                        HealthCheck {
                            namespace: ns.to_string(),
                            name: name.to_string(),
                            local_endpoints,
                        },
                    ));
                }
                None => refuse(
                    refusals,
                    format!(
                        "healthCheckNodePort {hc} is outside the range {}-{} (the service is served without a health check)",
                        range.start(),
                        range.end()
                    ),
                ),
            }
        }
        _ => {}
    }

    // Addresses that take `port` traffic, both families (each unit takes its own).
    let mut ips = BTreeSet::new();
    let mut add_ip = |refusals: &mut Vec<Refusal>, field: &str, s: &str| match s.parse::<IpAddr>() {
        Ok(ip) => {
            ips.insert(ip);
            Some(ip)
        }
        Err(_) => {
            refuse(refusals, format!("{field} {s:?} is not an IP address"));
            None
        }
    };
    // The external IPs that are not also LoadBalancer ingress IPs: source ranges do not
    // apply to them.
    let mut external_ips = BTreeSet::new();
    if settings.external_ips {
        for ip in spec.external_ips.iter().flatten() {
            external_ips.extend(add_ip(refusals, "externalIPs entry", ip));
        }
    }
    // `spec.loadBalancerIP` is a request to the load balancer controller, not an address
    // this node answers on: only what the controller wrote into the status counts (as in
    // kube-proxy). A Service author could otherwise claim any address, a node's own too.
    if type_ == "LoadBalancer" {
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
                if let Some(ip) = add_ip(refusals, "status.loadBalancer.ingress ip", ip) {
                    external_ips.remove(&ip);
                }
            }
        }
    }

    let source_ranges = source_ranges(spec, &mut plan.refusals, &obj);
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    let mut flags = 0;
    if spec
        .load_balancer_source_ranges
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        flags |= SVC_F_SRC_RANGES;
    }
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
    let ctx = ServiceCtx {
        type_,
        has_node_port,
        allocate_lb_node_ports: spec.allocate_load_balancer_node_ports,
        ips: &ips,
        external_ips: &external_ips,
        settings,
        slices,
        flags,
        affinity_timeout_s,
        source_ranges: &source_ranges,
    };

    for (i, sp) in ports.iter().enumerate() {
        let port_name = sp.name.as_deref().unwrap_or("");
        let what = if port_name.is_empty() {
            format!("spec.ports[{i}]")
        } else {
            format!("spec.ports[{i}] {port_name:?}")
        };
        let refused = |reason: String| PortPlan::Refused(format!("{reason} ({what})"));
        let protocol = match sp.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                plan.ports.push(refused("protocol SCTP is not balanced by the datapath (SCTP packets pass to the kernel stack)".into()));
                continue;
            }
            other => {
                plan.ports
                    .push(refused(format!("unknown protocol {other:?}")));
                continue;
            }
        };
        let Some(port) = valid_port(sp.port) else {
            plan.ports
                .push(refused(format!("port {} is not in 1-65535", sp.port)));
            continue;
        };
        // One unit per family of the service, each with its own id, frontends and
        // backends.
        for &family in &families {
            let id = ServicePortId {
                namespace: ns.to_string(),
                name: name.to_string(),
                port: port_name.to_string(),
                protocol,
                family,
            };
            let then = match family {
                Family::V4 => port_unit::<u32>(&ctx, sp, port, protocol, &what),
                Family::V6 => port_unit::<Ip6>(&ctx, sp, port, protocol, &what),
            };
            plan.ports.push(PortPlan::Claim(Box::new(Candidate {
                id,
                what: what.clone(),
                then,
            })));
        }
    }
    plan
}

/// The IP families of a service, in order: `spec.ipFamilies` (an unknown entry is refused,
/// naming the field, and the other families are still served); without it, the families
/// of `spec.clusterIPs`/`spec.clusterIP`; without those (or `None`), IPv4.
fn families(spec: &ServiceSpec, obj: &str, refusals: &mut Vec<Refusal>) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let add = |out: &mut Vec<Family>, f: Family| {
        if !out.contains(&f) {
            out.push(f);
        }
    };
    match spec.ip_families.as_deref() {
        Some(listed) if !listed.is_empty() => {
            for (i, f) in listed.iter().enumerate() {
                match Family::parse(f) {
                    Some(f) => add(&mut out, f),
                    None => refusals.push(Refusal::new(
                        obj,
                        format!("spec.ipFamilies[{i}] {f:?} is not IPv4 or IPv6 (not served in that family)"),
                    )),
                }
            }
        }
        _ => {
            let cluster_ips = spec.cluster_ips.iter().flatten().map(String::as_str);
            for ip in cluster_ips.chain(spec.cluster_ip.as_deref()) {
                if let Ok(ip) = ip.trim().parse::<IpAddr>() {
                    add(&mut out, Family::of(ip));
                }
            }
            if out.is_empty() {
                out.push(Family::V4);
            }
        }
    }
    out
}

/// The CIDRs of `spec.loadBalancerSourceRanges`, both families (each unit takes its own).
/// An unparsable entry is refused (and allows nobody: the list fails closed).
fn source_ranges(spec: &ServiceSpec, refusals: &mut Vec<Refusal>, obj: &str) -> BTreeSet<IpCidr> {
    let mut out = BTreeSet::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let r = r.trim();
        match r.parse::<IpCidr>() {
            Ok(c) => {
                out.insert(c);
            }
            Err(e) => refusals.push(Refusal::new(
                obj,
                format!("loadBalancerSourceRanges[{i}] {r:?}: {e} (the entry allows no client)"),
            )),
        }
    }
    out
}

/// What every unit of a service shares.
struct ServiceCtx<'a> {
    type_: &'a str,
    has_node_port: bool,
    allocate_lb_node_ports: Option<bool>,
    /// LoadBalancer, loadBalancerIP and external IPs, both families.
    ips: &'a BTreeSet<IpAddr>,
    /// The external IPs among `ips` that are not LoadBalancer ingress IPs.
    external_ips: &'a BTreeSet<IpAddr>,
    settings: &'a Settings,
    /// The service's EndpointSlices, both families, in input order.
    slices: &'a [&'a ParsedSlice],
    flags: u16,
    affinity_timeout_s: u32,
    /// loadBalancerSourceRanges, both families.
    source_ranges: &'a BTreeSet<IpCidr>,
}

/// The unit of one port in family `A`: nodePort refusals, no frontend, or its frontends
/// and its desired state (a bad targetPort as `Err`); reasons name the port (`what`).
fn port_unit<A: RawAddr>(
    svc: &ServiceCtx,
    sp: &k8s_openapi::api::core::v1::ServicePort,
    port: u16,
    protocol: Protocol,
    what: &str,
) -> AfterId
where
    FrontendKey<A>: Into<AnyFrontend>,
    DesiredService<A>: Into<Unit>,
{
    let port_name = sp.name.as_deref().unwrap_or("");
    let proto = protocol.number();
    let mut frontends: BTreeSet<FrontendKey<A>> = BTreeSet::new();
    if svc.has_node_port {
        match sp.node_port {
            None | Some(0)
                if svc.type_ == "LoadBalancer" && svc.allocate_lb_node_ports == Some(false) => {}
            None | Some(0) => {
                return AfterId::Refused(format!("nodePort not allocated (set spec.ports[].nodePort; manifests have no allocator) ({what})"));
            }
            Some(np) => {
                let range = &svc.settings.nodeport_range;
                let Some(np16) = valid_port(np).filter(|p| range.contains(p)) else {
                    return AfterId::Refused(format!(
                        "nodePort {np} is outside the range {}-{} ({what})",
                        range.start(),
                        range.end()
                    ));
                };
                frontends.insert(FrontendKey {
                    addr: A::default(),
                    port: np16.to_be(),
                    proto,
                    pad: 0,
                });
            }
        }
    }
    // Only the addresses of this unit's family; like kube-proxy, an external or
    // LoadBalancer IP of a family the service does not have is ignored (no unit takes it).
    for ip in svc.ips.iter().filter_map(|ip| A::from_ip(*ip)) {
        frontends.insert(FrontendKey {
            addr: ip,
            port: port.to_be(),
            proto,
            pad: 0,
        });
    }
    if frontends.is_empty() {
        return AfterId::NoFrontend;
    }
    let keys: Vec<AnyFrontend> = frontends.iter().map(|fe| (*fe).into()).collect();
    // The EndpointSlice controller resolves `targetPort` into the slices' ports; like
    // kube-proxy, only those are used. A number out of range is still refused.
    if let Some(IntOrString::Int(t)) = &sp.target_port {
        if valid_port(*t).is_none() {
            return AfterId::Frontends {
                frontends: keys,
                service: Err(format!("targetPort {t} is not in 1-65535 ({what})")),
            };
        }
    }
    let local = svc.flags & SVC_F_LOCAL != 0;
    // The ranges of this family only. Should the list hold none of this family (but some
    // of the other), the flag stays set and this unit's LoadBalancer frontends allow no
    // client: a list meant to restrict access fails closed rather than opening the other
    // family to everyone. (kube-proxy filters the list per family as well; this choice is
    // deliberate and documented on `desired`.)
    let source_ranges = svc
        .source_ranges
        .iter()
        .filter(|c| c.family() == A::FAMILY)
        .copied()
        .collect();
    let (backends, any_usable) = backends(svc.slices, port_name, protocol, local);
    let ds = DesiredService::<A> {
        frontends,
        flags: svc.flags | if any_usable { 0 } else { SVC_F_REJECT },
        affinity_timeout_s: svc.affinity_timeout_s,
        source_ranges,
        external_ips: svc
            .external_ips
            .iter()
            .filter_map(|ip| A::from_ip(*ip))
            .collect(),
        backends,
    };
    AfterId::Frontends {
        frontends: keys,
        service: Ok(ds.into()),
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

/// Human form of a frontend key for refusals and errors: `nodePort 30080/TCP` (`IPv6
/// nodePort ...` for IPv6), `address 192.0.2.1:80/TCP`, `address [2001:db8::1]:80/TCP`.
pub fn describe_frontend<A: RawAddr>(fe: &FrontendKey<A>) -> String {
    let proto = match fe.proto {
        PROTO_TCP => "TCP".to_string(),
        PROTO_UDP => "UDP".to_string(),
        p => format!("proto {p}"),
    };
    let port = u16::from_be(fe.port);
    match (fe.addr.is_zero(), A::FAMILY) {
        (true, Family::V4) => format!("nodePort {port}/{proto}"),
        (true, Family::V6) => format!("IPv6 nodePort {port}/{proto}"),
        (false, _) => format!(
            "address {}/{proto}",
            crate::family::endpoint_name(fe.addr, fe.port)
        ),
    }
}

/// The backends of family `A` of a service port, and whether any endpoint anywhere can
/// take new flows (ready, or serving while terminating: kube-proxy's "has endpoints",
/// whatever the traffic policy or topology); without one the service refuses
/// (`SVC_F_REJECT`).
fn backends<A: RawAddr>(
    slices: &[&ParsedSlice],
    port_name: &str,
    protocol: Protocol,
    local_only: bool,
) -> (BTreeSet<Backend<A>>, bool) {
    // One endpoint per (address, target port). A slice contributes at the port whose name
    // and protocol are the service port's (kube-proxy matches by name only; a slice
    // without such a port contributes nothing). An address listed twice (a pod moving
    // between slices, or a new pod given a terminating pod's IP) takes the first
    // non-terminating listing, else the first (kube-proxy: endpointslicecache.go,
    // addEndpoints).
    let mut chosen: BTreeMap<(A, u16), &ParsedEndpoint> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == A::FAMILY) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol.as_str())
            .and_then(|p| p.port.and_then(valid_port))
        else {
            continue;
        };
        for e in &slice.endpoints {
            let Some(addr) = A::from_ip(e.addr) else {
                continue;
            };
            chosen
                .entry((addr, port))
                .and_modify(|c| {
                    if c.terminating && !e.terminating {
                        *c = e;
                    }
                })
                .or_insert(e);
        }
    }
    // The table's members: every endpoint, or under Local this node's only.
    let member = |e: &ParsedEndpoint| e.local || !local_only;
    let members = || chosen.values().copied().filter(|e| member(e));
    let any_ready = members().any(|e| e.ready);
    // Topology hints narrow Cluster-policy traffic only (kube-proxy's
    // CategorizeEndpoints); when no member is ready, the serving terminating ones are used
    // whatever their hints.
    let topology = if local_only {
        Topology::Any
    } else {
        Topology::of(members())
    };
    let any_usable = chosen
        .values()
        .any(|e| e.ready || (e.serving && e.terminating));
    let backends = chosen
        .into_iter()
        .map(|((addr, port), e)| {
            let takes_new = if !member(e) {
                false
            } else if any_ready {
                e.ready && topology.admits(e)
            } else {
                e.serving && e.terminating
            };
            let flags =
                if e.local { BE_F_LOCAL } else { 0 } | if takes_new { 0 } else { BE_F_DRAINING };
            Backend {
                addr,
                port: port.to_be(),
                flags,
                pad: 0,
            }
        })
        .collect();
    (backends, any_usable)
}

/// How [`Model`] tells that an object is the same as in the previous call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fingerprint {
    /// `metadata.uid` and `metadata.resourceVersion` (the API server changes the latter on
    /// every write).
    Version(Option<String>, String),
    /// A hash of the whole object.
    Content(u64),
}

/// One object of the previous call, in input order.
#[derive(Clone, Debug)]
struct Slot {
    namespace: Option<String>,
    name: Option<String>,
    fingerprint: Fingerprint,
    /// Its record in [`Model`].
    handle: u64,
}

/// A 64-bit hash of the JSON form of `obj`.
fn content_hash<O: serde::Serialize>(obj: &O) -> u64 {
    use std::hash::Hasher;
    struct Sink(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut sink = Sink(std::collections::hash_map::DefaultHasher::new());
    // Serializing Kubernetes objects to JSON does not fail.
    let _ = serde_json::to_writer(&mut sink, obj);
    sink.0.finish()
}

fn fingerprint<O: serde::Serialize>(meta: &ObjectMeta, obj: &O, versions: bool) -> Fingerprint {
    match &meta.resource_version {
        Some(rv) if versions => Fingerprint::Version(meta.uid.clone(), rv.clone()),
        _ => Fingerprint::Content(content_hash(obj)),
    }
}

fn unchanged<O: serde::Serialize>(slot: &Slot, meta: &ObjectMeta, obj: &O, versions: bool) -> bool {
    match (&meta.resource_version, &slot.fingerprint) {
        (Some(rv), Fingerprint::Version(uid, old_rv)) if versions => {
            rv == old_rv && *uid == meta.uid
        }
        (Some(_), _) if versions => false,
        (_, Fingerprint::Content(h)) => *h == content_hash(obj),
        (_, Fingerprint::Version(..)) => false,
    }
}

/// What changed between the objects of the previous call (`slots`) and `objs`.
#[derive(Debug, Default)]
struct ObjectDiff {
    /// Records of objects that are gone or changed.
    gone: Vec<u64>,
    /// Positions of new or changed objects; their slot's handle is for the caller to set.
    fresh: Vec<usize>,
    /// Whether unchanged objects moved (their records' positions must be updated).
    moved: bool,
}

/// Lines `slots` up with `objs` by namespace and name (in order for duplicates), cheaply
/// when the objects come in the same order as last time, and leaves `slots` describing
/// `objs`.
fn diff_objects<O: serde::Serialize>(
    slots: &mut Vec<Slot>,
    objs: &[O],
    meta: impl Fn(&O) -> &ObjectMeta,
    versions: bool,
) -> ObjectDiff {
    let mut d = ObjectDiff::default();
    let mut aligned = 0;
    for (slot, obj) in slots.iter_mut().zip(objs) {
        let m = meta(obj);
        // The same uid and resourceVersion: the same object (a uid names one object, whose
        // namespace and name never change).
        if let (true, Fingerprint::Version(Some(uid), rv), Some(m_uid), Some(m_rv)) =
            (versions, &slot.fingerprint, &m.uid, &m.resource_version)
        {
            if rv == m_rv && uid == m_uid {
                aligned += 1;
                continue;
            }
        }
        if slot.namespace != m.namespace || slot.name != m.name {
            break;
        }
        if !unchanged(slot, m, obj, versions) {
            d.gone.push(slot.handle);
            slot.fingerprint = fingerprint(m, obj, versions);
            d.fresh.push(aligned);
        }
        aligned += 1;
    }
    if aligned == slots.len() && aligned == objs.len() {
        return d;
    }

    // Something was added, removed or reordered: match the rest by name.
    d.moved = true;
    let mut old: Vec<Option<Slot>> = slots.split_off(aligned).into_iter().map(Some).collect();
    let mut by_name: std::collections::HashMap<(Option<String>, Option<String>), VecDeque<usize>> =
        std::collections::HashMap::new();
    for (i, s) in old.iter().enumerate() {
        let s = s.as_ref().expect("not taken yet");
        by_name
            .entry((s.namespace.clone(), s.name.clone()))
            .or_default()
            .push_back(i);
    }
    for (pos, obj) in objs.iter().enumerate().skip(aligned) {
        let m = meta(obj);
        let found = by_name
            .get_mut(&(m.namespace.clone(), m.name.clone()))
            .and_then(VecDeque::pop_front)
            .and_then(|i| old[i].take());
        match found {
            Some(slot) if unchanged(&slot, m, obj, versions) => slots.push(slot),
            other => {
                if let Some(slot) = other {
                    d.gone.push(slot.handle);
                }
                slots.push(Slot {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    fingerprint: fingerprint(m, obj, versions),
                    handle: 0,
                });
                d.fresh.push(pos);
            }
        }
    }
    d.gone.extend(old.into_iter().flatten().map(|s| s.handle));
    d
}

/// An EndpointSlice as [`Model`] keeps it.
#[derive(Clone, Debug)]
struct SliceRecord {
    /// Position in the input.
    pos: usize,
    /// `(namespace, service name)`; `None` for slices skipped silently.
    service: Option<(String, String)>,
    parsed: ParsedSlice,
    refusals: Vec<Refusal>,
}

/// A Service as [`Model`] keeps it.
#[derive(Clone, Debug)]
struct ServiceRecord {
    /// Position in the input.
    pos: usize,
    /// `(namespace, name)`; `None` without a name.
    name: Option<(String, String)>,
    age: Age,
    plan: Plan,
    /// Per port of the plan.
    outcomes: Vec<Outcome>,
}

/// A port of a service record: (handle, index in its plan).
type PortRef = (u64, usize);

/// Who reads which [`Resource`].
#[derive(Clone, Debug, Default)]
struct Contest {
    readers: HashMap<Resource, Vec<PortRef>>,
    /// Resources read by two ports or more.
    contested: HashSet<Resource>,
    /// Ports that shared a resource with a port removed since [`Model::decide`] last
    /// looked (some may be gone since).
    touched: Vec<PortRef>,
}

impl Contest {
    fn add(&mut self, res: &Resource, port: PortRef) {
        match self.readers.get_mut(res) {
            Some(v) => {
                v.push(port);
                // (Its readers now meet in `contested`.)
                if v.len() == 2 {
                    self.contested.insert(res.clone());
                }
            }
            None => {
                self.readers.insert(res.clone(), vec![port]);
            }
        }
    }

    fn remove(&mut self, res: &Resource, port: PortRef) {
        if let Some(v) = self.readers.get_mut(res) {
            v.retain(|p| *p != port);
            self.touched.extend_from_slice(v);
            if v.len() < 2 {
                self.contested.remove(res);
            }
            if v.is_empty() {
                self.readers.remove(res);
            }
        }
    }
}

/// The claims of the ports [`Model`] re-decides, older first.
#[derive(Default)]
struct SomeClaims<'a> {
    ids: HashSet<&'a ServicePortId>,
    frontends: HashMap<AnyFrontend, &'a ServicePortId>,
}

impl Claims for SomeClaims<'_> {
    fn id_taken(&self, id: &ServicePortId) -> bool {
        self.ids.contains(id)
    }

    fn owner(&self, fe: &AnyFrontend) -> Option<&ServicePortId> {
        self.frontends.get(fe).copied()
    }
}

/// [`desired`], kept up to date from one call to the next: only the Services whose object
/// or EndpointSlices changed are computed again, and only the ports competing for an id or
/// a frontend with them are decided again. [`Model::update`] returns what [`desired`] returns
/// for the same inputs (refusals sorted).
///
/// An object is unchanged when it has the same namespace, name and `uid` and
/// `resourceVersion` as in the previous call (objects read from the API server), or, without
/// a `resourceVersion` (or with [`Model::by_content`]), the same content. Objects are
/// matched cheaply when they come in the same order as in the previous call (the sources
/// sort them by namespace and name). A change of settings, node name or this node's zone
/// label starts over.
#[derive(Clone, Debug)]
pub struct Model {
    /// Whether `resourceVersion`s identify content.
    versions: bool,
    /// The settings, node name and zone of the kept state.
    config: Option<(Settings, String, String)>,
    next_handle: u64,
    slice_slots: Vec<Slot>,
    slices: HashMap<u64, SliceRecord>,
    /// Slices by service `(namespace, name)`.
    slices_of: HashMap<(String, String), Vec<u64>>,
    service_slots: Vec<Slot>,
    services: HashMap<u64, ServiceRecord>,
    /// Services by `(namespace, name)` (several only when the input repeats one).
    services_named: HashMap<(String, String), Vec<u64>>,
    contest: Contest,
    /// Records (slices and services) with refusals.
    refused: BTreeSet<u64>,
    /// Service records whose plan has a health check.
    health_checked: BTreeSet<u64>,
    desired: Desired,
    /// Service ports of `desired` added, removed or replaced since the last
    /// [`Model::take_changes`].
    changed: BTreeSet<ServicePortId>,
    /// This model, for [`Changes`].
    id: u64,
    /// How many times [`Model::take_changes`] was called.
    generation: u64,
}

/// The service ports whose [`DesiredService`] changed (was added, removed or replaced)
/// between two calls of [`Model::take_changes`]; lets
/// [`Reconciler::apply_changes`](crate::sync::Reconciler::apply_changes) skip comparing the
/// others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The model, and the generations the changes lead from and to.
    pub model: u64,
    pub from: u64,
    pub to: u64,
    pub services: BTreeSet<ServicePortId>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    /// A model that trusts `resourceVersion`s (objects from the API server).
    pub fn new() -> Self {
        Self {
            versions: true,
            ..Self::by_content()
        }
    }

    /// A model that compares objects by content only, for objects whose
    /// `resourceVersion` may stay the same across edits (manifest files).
    pub fn by_content() -> Self {
        static MODELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self::blank(
            false,
            MODELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn blank(versions: bool, id: u64) -> Self {
        Self {
            versions,
            config: None,
            next_handle: 0,
            slice_slots: Vec::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            service_slots: Vec::new(),
            services: HashMap::new(),
            services_named: HashMap::new(),
            contest: Contest::default(),
            refused: BTreeSet::new(),
            health_checked: BTreeSet::new(),
            desired: Desired::default(),
            changed: BTreeSet::new(),
            id,
            generation: 0,
        }
    }

    /// The service ports changed since the previous call (all of them at the first call).
    pub fn take_changes(&mut self) -> Changes {
        self.generation += 1;
        Changes {
            model: self.id,
            from: self.generation - 1,
            to: self.generation,
            services: std::mem::take(&mut self.changed),
        }
    }

    /// The desired state of the last [`Model::update`].
    pub fn current(&self) -> &Desired {
        &self.desired
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    /// Brings the state up to `inputs`; returns the desired state and the refusals (sorted)
    /// that [`desired`] returns for them.
    pub fn update(&mut self, inputs: &Inputs) -> (&Desired, Vec<Refusal>) {
        let zone = node_zone(inputs);
        let same = self
            .config
            .as_ref()
            .is_some_and(|(s, n, z)| s == inputs.settings && n == inputs.node_name && z == zone);
        if !same {
            let mut changed = std::mem::take(&mut self.changed);
            let old = std::mem::take(&mut self.desired);
            changed.extend(old.services.into_keys());
            changed.extend(old.services6.into_keys());
            *self = Self {
                config: Some((
                    inputs.settings.clone(),
                    inputs.node_name.to_string(),
                    zone.to_string(),
                )),
                next_handle: self.next_handle,
                changed,
                generation: self.generation,
                ..Self::blank(self.versions, self.id)
            };
        }
        let addrs = node_addrs(inputs);
        self.desired.node_addrs = addrs.chosen;
        self.desired.node_addrs_left_out = addrs.left_out;
        let replan = self.update_objects(inputs);
        self.decide(inputs, replan);

        let mut refusals = Vec::new();
        // Health checks: the claims of every service that has one, oldest first.
        let mut claimants: Vec<&ServiceRecord> = self
            .health_checked
            .iter()
            .filter_map(|h| self.services.get(h))
            .collect();
        claimants.sort_by(|a, b| (&a.age, a.pos).cmp(&(&b.age, b.pos)));
        self.desired.health_checks =
            health_checks(claimants.into_iter().map(|r| &r.plan), &mut refusals);
        for h in &self.refused {
            if let Some(s) = self.slices.get(h) {
                refusals.extend(s.refusals.iter().cloned());
            } else if let Some(r) = self.services.get(h) {
                refusals.extend(r.plan.refusals.iter().cloned());
                let first = refusals.len();
                for o in &r.outcomes {
                    if let Outcome::Refused(reason) = o {
                        push_port_refusal(&mut refusals, first, &r.plan.obj, reason.clone());
                    }
                }
            }
        }
        refusals.sort();
        (&self.desired, refusals)
    }

    /// Takes in the objects that changed; returns the services to plan again (their ports
    /// already withdrawn).
    fn update_objects(&mut self, inputs: &Inputs) -> BTreeSet<u64> {
        // EndpointSlices: the services whose slices changed.
        let mut names: BTreeSet<(String, String)> = BTreeSet::new();
        let d = diff_objects(
            &mut self.slice_slots,
            inputs.slices,
            |s| &s.metadata,
            self.versions,
        );
        for h in d.gone {
            let Some(rec) = self.slices.remove(&h) else {
                continue;
            };
            self.refused.remove(&h);
            if let Some(k) = rec.service {
                if let Some(v) = self.slices_of.get_mut(&k) {
                    v.retain(|x| *x != h);
                    if v.is_empty() {
                        self.slices_of.remove(&k);
                    }
                }
                names.insert(k);
            }
        }
        for pos in d.fresh {
            let h = self.handle();
            self.slice_slots[pos].handle = h;
            let mut refusals = Vec::new();
            let parsed = parse_slice(
                &inputs.slices[pos],
                inputs.node_name,
                node_zone(inputs),
                &mut refusals,
            );
            let (service, parsed) = match parsed {
                Some(((ns, svc), p)) => (Some((ns.to_string(), svc.to_string())), p),
                None => (None, ParsedSlice::default()),
            };
            if let Some(k) = &service {
                self.slices_of.entry(k.clone()).or_default().push(h);
                names.insert(k.clone());
            }
            if !refusals.is_empty() {
                self.refused.insert(h);
            }
            self.slices.insert(
                h,
                SliceRecord {
                    pos,
                    service,
                    parsed,
                    refusals,
                },
            );
        }
        if d.moved {
            for (pos, s) in self.slice_slots.iter().enumerate() {
                if let Some(r) = self.slices.get_mut(&s.handle) {
                    r.pos = pos;
                }
            }
        }

        // Services.
        let mut replan = BTreeSet::new();
        let d = diff_objects(
            &mut self.service_slots,
            inputs.services,
            |s| &s.metadata,
            self.versions,
        );
        for h in d.gone {
            let Some(rec) = self.services.remove(&h) else {
                continue;
            };
            self.refused.remove(&h);
            self.health_checked.remove(&h);
            withdraw(
                h,
                &rec,
                &mut self.contest,
                &mut self.desired,
                &mut self.changed,
            );
            if let Some(k) = &rec.name {
                if let Some(v) = self.services_named.get_mut(k) {
                    v.retain(|x| *x != h);
                    if v.is_empty() {
                        self.services_named.remove(k);
                    }
                }
            }
        }
        for pos in d.fresh {
            let h = self.handle();
            self.service_slots[pos].handle = h;
            let m = &inputs.services[pos].metadata;
            let ns = m.namespace.as_deref().unwrap_or("default");
            let name = m.name.as_ref().map(|n| (ns.to_string(), n.clone()));
            if let Some(k) = &name {
                self.services_named.entry(k.clone()).or_default().push(h);
            }
            self.services.insert(
                h,
                ServiceRecord {
                    pos,
                    name,
                    age: age(&inputs.services[pos]),
                    plan: Plan::default(),
                    outcomes: Vec::new(),
                },
            );
            replan.insert(h);
        }
        if d.moved {
            for (pos, s) in self.service_slots.iter().enumerate() {
                if let Some(r) = self.services.get_mut(&s.handle) {
                    r.pos = pos;
                }
            }
        }
        // Unchanged services whose slices changed.
        for k in &names {
            for h in self.services_named.get(k).into_iter().flatten() {
                if !replan.contains(h) {
                    if let Some(rec) = self.services.get_mut(h) {
                        withdraw(
                            *h,
                            rec,
                            &mut self.contest,
                            &mut self.desired,
                            &mut self.changed,
                        );
                        rec.outcomes.clear();
                        replan.insert(*h);
                    }
                }
            }
        }
        replan
    }

    /// Plans the services `replan` and decides again every port whose outcome may have
    /// changed.
    fn decide(&mut self, inputs: &Inputs, replan: BTreeSet<u64>) {
        let mut eval: Vec<PortRef> = Vec::new();
        for &h in &replan {
            let Some(rec) = self.services.get(&h) else {
                continue;
            };
            let svc = &inputs.services[rec.pos];
            let plan = match &rec.name {
                None => unnamed(svc.metadata.namespace.as_deref().unwrap_or("default")),
                Some(key) => {
                    let mut slices: Vec<&SliceRecord> = self
                        .slices_of
                        .get(key)
                        .into_iter()
                        .flatten()
                        .filter_map(|s| self.slices.get(s))
                        .collect();
                    slices.sort_by_key(|s| s.pos);
                    let parsed: Vec<&ParsedSlice> = slices.iter().map(|s| &s.parsed).collect();
                    plan_service(svc, &key.0, &key.1, &parsed, inputs.settings)
                }
            };
            for (i, port) in plan.ports.iter().enumerate() {
                eval.push((h, i));
                if let PortPlan::Claim(c) = port {
                    for res in c.reads() {
                        self.contest.add(&res, (h, i));
                    }
                }
            }
            let rec = self
                .services
                .get_mut(&h)
                .expect("record of a replanned service");
            rec.outcomes = vec![Outcome::Nothing; plan.ports.len()];
            if plan.health_check.is_some() {
                self.health_checked.insert(h);
            } else {
                self.health_checked.remove(&h);
            }
            rec.plan = plan;
        }

        // Ports that may be decided differently: those just planned, the other readers of
        // what they (or withdrawn ports) read, and every port in a contest (a change may
        // travel along a chain of them).
        eval.extend(
            std::mem::take(&mut self.contest.touched)
                .into_iter()
                .filter(|(h, i)| {
                    self.services
                        .get(h)
                        .is_some_and(|r| *i < r.plan.ports.len())
                }),
        );
        for res in &self.contest.contested {
            eval.extend(self.contest.readers.get(res).into_iter().flatten());
        }
        let mut keyed: Vec<((&Age, usize, usize), PortRef)> = eval
            .into_iter()
            .map(|p| {
                let r = &self.services[&p.0];
                ((&r.age, r.pos, p.1), p)
            })
            .collect();
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        keyed.dedup_by(|a, b| a.1 == b.1);
        let eval: Vec<PortRef> = keyed.into_iter().map(|(_, p)| p).collect();

        let mut claims = SomeClaims::default();
        let mut decided: Vec<(PortRef, Outcome)> = Vec::with_capacity(eval.len());
        for p in eval {
            let port = &self.services[&p.0].plan.ports[p.1];
            let outcome = decide(port, &claims);
            if let (Outcome::Accepted, PortPlan::Claim(c)) = (&outcome, port) {
                claims.ids.insert(&c.id);
                if let AfterId::Frontends { frontends, .. } = &c.then {
                    for fe in frontends {
                        claims.frontends.insert(*fe, &c.id);
                    }
                }
            }
            decided.push((p, outcome));
        }

        // Withdraw what is no longer accepted before adding what now is (ports may trade
        // an id).
        for ((h, i), outcome) in &decided {
            let rec = &self.services[h];
            if rec.outcomes[*i] == Outcome::Accepted && *outcome != Outcome::Accepted {
                if let PortPlan::Claim(c) = &rec.plan.ports[*i] {
                    self.desired.remove(&c.id);
                    self.changed.insert(c.id.clone());
                }
            }
        }
        let mut records: BTreeSet<u64> = replan;
        for ((h, i), outcome) in decided {
            let rec = self.services.get_mut(&h).expect("record of a decided port");
            if outcome == Outcome::Accepted && rec.outcomes[i] != Outcome::Accepted {
                if let PortPlan::Claim(c) = &rec.plan.ports[i] {
                    if let AfterId::Frontends {
                        service: Ok(ds), ..
                    } = &c.then
                    {
                        self.desired.insert(c.id.clone(), ds.clone());
                        self.changed.insert(c.id.clone());
                    }
                }
            }
            rec.outcomes[i] = outcome;
            records.insert(h);
        }
        for h in records {
            let Some(rec) = self.services.get(&h) else {
                continue;
            };
            let refused = !rec.plan.refusals.is_empty()
                || rec
                    .outcomes
                    .iter()
                    .any(|o| matches!(o, Outcome::Refused(_)));
            if refused {
                self.refused.insert(h);
            } else {
                self.refused.remove(&h);
            }
        }
    }
}

/// Takes the ports of service record `h` out of the contest, and out of `desired` where
/// they were accepted.
fn withdraw(
    h: u64,
    rec: &ServiceRecord,
    contest: &mut Contest,
    desired: &mut Desired,
    changed: &mut BTreeSet<ServicePortId>,
) {
    for (i, port) in rec.plan.ports.iter().enumerate() {
        let PortPlan::Claim(c) = port else { continue };
        for res in c.reads() {
            contest.remove(&res, (h, i));
        }
        if rec.outcomes.get(i) == Some(&Outcome::Accepted) {
            desired.remove(&c.id);
            changed.insert(c.id.clone());
        }
    }
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
            family: Family::V4,
        }
    }

    fn id6(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
        ServicePortId {
            family: Family::V6,
            ..id(ns, name, port, protocol)
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

    /// `b`, listed but taking no new flows.
    fn draining<A: Addr>(b: Backend<A>) -> Backend<A> {
        Backend {
            flags: b.flags | BE_F_DRAINING,
            ..b
        }
    }

    fn table<A: Addr>(ds: &DesiredService<A>) -> BTreeSet<Backend<A>> {
        ds.table_backends().copied().collect()
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
        // LoadBalancer: nodePort, ingress IPs, externalIPs; not loadBalancerIP.
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
    fn load_balancer_ip_never_claims_an_address() {
        // A Service author asks for a node's own address and port: nothing is claimed
        // (the node's own server keeps the port), the nodePort is served.
        let squat = svc("
metadata: {name: squat}
spec:
  type: LoadBalancer
  loadBalancerIP: 198.18.0.11
  ports: [{port: 8080, nodePort: 30443}]
");
        let (d, r) = run(&[squat], &[]);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(
            d.services[&id("default", "squat", "", Protocol::Tcp)].frontends,
            BTreeSet::from([np(30443, PROTO_TCP)])
        );
    }

    #[test]
    fn other_proxies_services_and_headless_slices_are_skipped() {
        let labelled = |proxy: &str| {
            svc(&format!(
                "
metadata:
  name: web
  namespace: default
  labels: {{service.kubernetes.io/service-proxy-name: {proxy}}}
spec:
  type: NodePort
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
"
            ))
        };
        let key = id("default", "web", "http", Protocol::Tcp);
        let (d, r) = run(&[labelled("other")], &[slice(WEB_SLICE)]);
        assert!(r.is_empty() && d.services.is_empty(), "{r:?} {d:?}");
        let ours = Settings {
            service_proxy_name: Some("nodeport".into()),
            ..Settings::default()
        };
        let (d, _) = run_with(&[labelled("nodeport")], &[slice(WEB_SLICE)], &ours);
        assert!(d.services.contains_key(&key));
        let (d, _) = run_with(&[svc(WEB)], &[slice(WEB_SLICE)], &ours);
        assert!(
            d.services.is_empty(),
            "an unlabelled Service with a proxy name set"
        );
        // A headless Service's slice naming this Service is not read.
        let headless = WEB_SLICE.replace(
            "kubernetes.io/service-name: web",
            "kubernetes.io/service-name: web, service.kubernetes.io/headless: ''",
        );
        assert_ne!(headless, WEB_SLICE);
        let (d, r) = run(&[svc(WEB)], &[slice(&headless)]);
        assert!(r.is_empty(), "{r:?}");
        assert!(d.services[&key].backends.is_empty());
    }

    #[test]
    fn external_ips_can_be_denied() {
        let s = svc("
metadata: {name: e}
spec:
  type: LoadBalancer
  externalIPs: [192.0.2.21]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.22}]
");
        let deny = Settings {
            external_ips: false,
            ..Settings::default()
        };
        let (d, r) = run_with(std::slice::from_ref(&s), &[], &deny);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(
            d.services[&id("default", "e", "", Protocol::Tcp)].frontends,
            BTreeSet::from([np(30443, PROTO_TCP), ext("192.0.2.22", 443, PROTO_TCP)])
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
ports: [{name: '', port: 80}]
endpoints: [{addresses: [bogus]}, {addresses: [10.0.0.9]}]
",
        );
        let (d, r) = run(&[s], &[bad_slice]);
        // loadBalancerIP is not read at all (not a frontend), so not refused either.
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r
            .iter()
            .any(|r| r.object == "EndpointSlice default/s-1" && r.reason.contains("\"bogus\"")));
        assert!(r
            .iter()
            .any(|r| r.reason.contains("externalIPs entry \"not-an-ip\"")));
        let s = &d.services[&id("default", "s", "", Protocol::Tcp)];
        assert_eq!(s.frontends.len(), 2);
        assert_eq!(s.backends, BTreeSet::from([be("10.0.0.9", 80, false)]));
    }

    #[test]
    fn unset_serving_reads_as_serving() {
        // kube-proxy: `Serving: Conditions.Serving == nil || *Conditions.Serving`. With no
        // ready endpoint, a terminating one without `serving` takes new flows; one with
        // `serving: false` does not.
        let sl = slice(
            "
metadata: {name: web-x, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: false, terminating: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}
",
        );
        let (d, _) = run(&[svc(WEB)], &[sl]);
        let ds = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        assert_eq!(table(ds), BTreeSet::from([be("10.0.0.1", 8080, false)]));
    }

    #[test]
    fn a_duplicate_endpoint_takes_its_non_terminating_listing() {
        // 10.0.0.1 is listed by a terminating pod (another node) and by a new ready pod on
        // this node that got its IP: the new listing wins in either slice order, local
        // flag included.
        let old = slice(
            "
metadata: {name: web-old, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.2], nodeName: node-b}
",
        );
        let new = slice(
            "
metadata: {name: web-new, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a, conditions: {ready: true}}
",
        );
        let key = id("default", "web", "http", Protocol::Tcp);
        let want = BTreeSet::from([be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)]);
        for slices in [[old.clone(), new.clone()], [new, old]] {
            let (d, _) = run(&[svc(WEB)], &slices);
            assert_eq!(d.services[&key].backends, want);
        }

        // The non-terminating listing wins even when it is not ready: with no ready
        // endpoint left, the address is not used although its terminating listing serves.
        let a = slice(
            "
metadata: {name: web-a, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}]
",
        );
        let b = slice(
            "
metadata: {name: web-b, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false}}]
",
        );
        for slices in [[a.clone(), b.clone()], [b, a]] {
            let (d, _) = run(&[svc(WEB)], &slices);
            assert_eq!(
                d.services[&key].backends,
                BTreeSet::from([draining(be("10.0.0.1", 8080, false))])
            );
        }
    }

    #[test]
    fn source_ranges_leave_external_ips_open() {
        // kube-proxy filters only LoadBalancer ingress IPs by loadBalancerSourceRanges;
        // an address that is both an external IP and an ingress IP is filtered.
        let s = svc("
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  externalIPs: [192.0.2.1, 192.0.2.3]
  loadBalancerSourceRanges: [198.18.0.0/24]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 192.0.2.2}, {ip: 192.0.2.3}]}
");
        let (d, r) = run(&[s], &[]);
        assert!(r.is_empty(), "{r:?}");
        let ds = &d.services[&id("default", "lb", "", Protocol::Tcp)];
        let ranged = |fe: FrontendKey| ds.frontend_flags(&fe) & SVC_F_SRC_RANGES != 0;
        assert!(!ranged(np(30080, PROTO_TCP)));
        assert!(!ranged(ext("192.0.2.1", 80, PROTO_TCP)));
        assert!(ranged(ext("192.0.2.2", 80, PROTO_TCP)));
        assert!(ranged(ext("192.0.2.3", 80, PROTO_TCP)));
    }

    /// `desired` as seen from node-a, with Node objects.
    fn run_on_node_a(
        services: &[Service],
        slices: &[EndpointSlice],
        nodes: &[Node],
    ) -> (Desired, Vec<Refusal>) {
        desired(&Inputs {
            services,
            slices,
            nodes,
            node_name: "node-a",
            interface_addrs: &[],
            settings: &Settings::default(),
        })
    }

    fn zoned_node(name: &str, zone: &str) -> Node {
        node(&format!(
            "metadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}"
        ))
    }

    /// A slice of `web` whose endpoints are `(address, extra YAML of the endpoint)`.
    fn web_slice_with(name: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
        let mut y = format!(
            "
metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
"
        );
        for (addr, extra) in endpoints {
            y.push_str(&format!("- {{addresses: [{addr}]{extra}}}\n"));
        }
        slice(&y)
    }

    fn table_addrs(d: &Desired) -> Vec<String> {
        table(&d.services[&id("default", "web", "http", Protocol::Tcp)])
            .iter()
            .map(|b| addr_from_raw(b.addr).to_string())
            .collect()
    }

    #[test]
    fn zone_hints_narrow_cluster_traffic_to_this_zone() {
        let nodes = [
            zoned_node("node-a", "zone-a"),
            zoned_node("node-b", "zone-b"),
        ];
        let a = ", hints: {forZones: [{name: zone-a}]}";
        let b = ", hints: {forZones: [{name: zone-b}]}";
        let both = ", hints: {forZones: [{name: zone-b}, {name: zone-a}]}";
        // Every ready endpoint hinted, some for zone-a: only those.
        let sl = web_slice_with(
            "web-1",
            &[("10.0.0.1", a), ("10.0.0.2", b), ("10.0.0.3", both)],
        );
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.3"]);
        // The others stay listed, draining.
        assert_eq!(
            d.services[&id("default", "web", "http", Protocol::Tcp)]
                .backends
                .len(),
            3
        );

        // None for zone-a: every endpoint.
        let sl = web_slice_with("web-1", &[("10.0.0.2", b), ("10.0.0.4", b)]);
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.2", "10.0.0.4"]);

        // One ready endpoint without hints: every endpoint. A not-ready one without hints
        // does not count.
        let sl = web_slice_with("web-1", &[("10.0.0.1", a), ("10.0.0.2", "")]);
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.2"]);
        let sl = web_slice_with(
            "web-1",
            &[
                ("10.0.0.1", a),
                ("10.0.0.2", b),
                ("10.0.0.5", ", conditions: {ready: false}"),
            ],
        );
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1"]);

        // This node without a zone label: every endpoint.
        let sl = web_slice_with("web-1", &[("10.0.0.1", a), ("10.0.0.2", b)]);
        let (d, _) = run_on_node_a(&[svc(WEB)], std::slice::from_ref(&sl), &[]);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.2"]);

        // Local policy ignores hints: this node's endpoints.
        let local = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080}]
");
        let sl = web_slice_with(
            "web-1",
            &[
                (
                    "10.0.0.1",
                    ", nodeName: node-b, hints: {forZones: [{name: zone-a}]}",
                ),
                (
                    "10.0.0.2",
                    ", nodeName: node-a, hints: {forZones: [{name: zone-b}]}",
                ),
            ],
        );
        let (d, _) = run_on_node_a(&[local], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.2"]);
    }

    #[test]
    fn zone_hints_step_aside_for_terminating_fallback() {
        // No ready endpoint: the serving terminating ones, whatever their hints.
        let nodes = [zoned_node("node-a", "zone-a")];
        let term = |z: &str| {
            format!(
                ", conditions: {{ready: false, serving: true, terminating: true}}, hints: {{forZones: [{{name: {z}}}]}}"
            )
        };
        let (za, zb) = (term("zone-a"), term("zone-b"));
        let sl = web_slice_with("web-1", &[("10.0.0.1", &za), ("10.0.0.2", &zb)]);
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let nodes = [zoned_node("node-a", "zone-a")];
        // Every ready endpoint has node hints and one names node-a: that one, though all
        // are hinted for zone-a too.
        let hint = |n: &str| {
            format!(", hints: {{forNodes: [{{name: {n}}}], forZones: [{{name: zone-a}}]}}")
        };
        let (ha, hb) = (hint("node-a"), hint("node-b"));
        let sl = web_slice_with("web-1", &[("10.0.0.1", &ha), ("10.0.0.2", &hb)]);
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1"]);
        // None for node-a: the zone hints decide (both zone-a).
        let sl = web_slice_with("web-1", &[("10.0.0.1", &hb), ("10.0.0.2", &hb)]);
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.2"]);
        // One endpoint without node hints: the zone hints decide.
        let sl = web_slice_with(
            "web-1",
            &[
                ("10.0.0.1", &ha),
                ("10.0.0.2", ", hints: {forZones: [{name: zone-a}]}"),
                ("10.0.0.3", ", hints: {forZones: [{name: zone-b}]}"),
            ],
        );
        let (d, _) = run_on_node_a(&[svc(WEB)], &[sl], &nodes);
        assert_eq!(table_addrs(&d), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn model_follows_a_change_of_this_nodes_zone() {
        let a = ", hints: {forZones: [{name: zone-a}]}";
        let b = ", hints: {forZones: [{name: zone-b}]}";
        let sl = [web_slice_with("web-1", &[("10.0.0.1", a), ("10.0.0.2", b)])];
        let services = [svc(WEB)];
        let mut m = Model::new();
        for (zone, want) in [("zone-a", "10.0.0.1"), ("zone-b", "10.0.0.2")] {
            let nodes = [zoned_node("node-a", zone)];
            let inputs = Inputs {
                services: &services,
                slices: &sl,
                nodes: &nodes,
                node_name: "node-a",
                interface_addrs: &[],
                settings: &Settings::default(),
            };
            let (d, _) = m.update(&inputs);
            assert_eq!(table_addrs(d), [want], "{zone}");
            assert_eq!(*d, desired(&inputs).0);
        }
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
            && r.reason == "2 ports, more than the limit of 1 (--max-ports-per-service)"));
        assert!(r.iter().any(|r| r.object == "Service default/many"
            && r.reason == "3 endpoints, more than the limit of 2 (--max-endpoints-per-service)"));
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
        let table: BTreeSet<Backend> = s.table_backends().copied().collect();
        assert_eq!(table, BTreeSet::from([be("10.0.1.1", 8080, true)]));
        // The other node's endpoint stays programmed (in no table) for flows bound to it
        // before a switch from Cluster.
        assert_eq!(s.backends.len(), 2);

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
        assert_eq!(s.flags, SVC_F_AFFINITY | SVC_F_REJECT);
        assert_eq!(s.affinity_timeout_s, 10);
        assert!(s.backends.is_empty());
    }

    #[test]
    fn services_without_any_usable_endpoint_refuse() {
        let key = id("default", "web", "http", Protocol::Tcp);
        let refuses = |services: &[Service], slices: &[EndpointSlice]| {
            let (d, _) = run(services, slices);
            d.services[&key].flags & SVC_F_REJECT != 0
        };
        let with = |conditions: &str, node: &str| {
            slice(&format!(
                "
metadata: {{name: web-x, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.0.2.9], nodeName: {node}, conditions: {conditions}}}
"
            ))
        };
        assert!(refuses(&[svc(WEB)], &[]), "no slice at all");
        let gone = with(
            "{ready: false, serving: false, terminating: true}",
            "node-b",
        );
        assert!(refuses(&[svc(WEB)], &[gone]), "terminating, not serving");
        assert!(
            refuses(&[svc(WEB)], &[with("{ready: false}", "node-b")]),
            "not ready"
        );
        let serving = with("{ready: false, serving: true, terminating: true}", "node-b");
        assert!(
            !refuses(&[svc(WEB)], &[serving]),
            "serving while terminating"
        );
        assert!(!refuses(&[svc(WEB)], &[slice(WEB_SLICE)]));
        // Local with ready endpoints on other nodes only: an empty table, dropped (not
        // refused), as kube-proxy does.
        let local = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
");
        let remote = with("{ready: true}", "node-b");
        let (d, _) = run(std::slice::from_ref(&local), std::slice::from_ref(&remote));
        assert_eq!(table(&d.services[&key]), BTreeSet::new());
        assert!(!refuses(std::slice::from_ref(&local), &[remote]));
        assert!(refuses(&[local], &[]));
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
        // Only terminating ones: serving && terminating take new flows; every listed
        // endpoint stays, draining, for the flows already on it.
        let (d, _) = run(&[svc(WEB)], std::slice::from_ref(&sl));
        let listed = [
            draining(be("10.0.0.1", 8080, false)),
            draining(be("10.0.0.2", 8080, false)),
            draining(be("10.0.0.3", 8080, false)),
        ];
        assert_eq!(
            table(&d.services[&key]),
            BTreeSet::from([be("10.0.0.1", 8080, false)])
        );
        assert_eq!(
            d.services[&key].backends,
            BTreeSet::from([be("10.0.0.1", 8080, false), listed[1], listed[2]])
        );
        // A ready endpoint in another slice of the same service: only ready ones take new
        // flows; the terminating one drains now.
        let (d, _) = run(&[svc(WEB)], &[sl, ready]);
        assert_eq!(
            table(&d.services[&key]),
            BTreeSet::from([be("10.0.0.4", 8080, false)])
        );
        let mut all = BTreeSet::from(listed);
        all.insert(be("10.0.0.4", 8080, false));
        assert_eq!(d.services[&key].backends, all);
    }

    #[test]
    fn source_ranges() {
        let s = svc("
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  externalIPs: [198.18.9.1]
  loadBalancerSourceRanges: [198.18.0.0/24, ' 198.18.7.7/32', 'fd00::/8', 10.0.0.0/33]
  ports: [{name: http, port: 80, nodePort: 30080}]
");
        let (d, r) = run(&[s], &[]);
        let s = &d.services[&id("default", "lb", "http", Protocol::Tcp)];
        assert_ne!(s.flags & SVC_F_SRC_RANGES, 0);
        let want: BTreeSet<IpCidr> = ["198.18.0.0/24", "198.18.7.7/32"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(s.source_ranges, want);
        assert!(
            r.iter().any(|r| r.object == "Service default/lb"
                && r.reason
                    .contains("loadBalancerSourceRanges[3] \"10.0.0.0/33\"")),
            "{r:?}"
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
        let ds = &d.services[&key];
        assert_eq!(
            ds.table_backends().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([be("10.0.0.1", 8080, true)])
        );
        assert_eq!(
            ds.backends,
            BTreeSet::from([
                be("10.0.0.1", 8080, true),
                draining(be("10.0.0.2", 8080, false))
            ])
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
        // Slice ports match service ports by name and protocol only, as in kube-proxy
        // (the EndpointSlice controller has already resolved targetPort into them): `web`
        // takes 8080; `admin` has no slice port named "admin" (one named after its
        // targetPort does not count); `metrics` and `dflt` have none either (no fallback
        // to the numeric targetPort or port); `udp` must not match the TCP port "udp".
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
        assert_eq!(port_of("metrics", Protocol::Tcp), [] as [u16; 0]);
        assert_eq!(port_of("admin", Protocol::Tcp), [] as [u16; 0]);
        assert_eq!(port_of("dflt", Protocol::Tcp), [] as [u16; 0]);
        assert_eq!(port_of("udp", Protocol::Udp), [] as [u16; 0]);

        // Unnamed port matches an unnamed slice port (unset and "" alike); a slice port
        // of another name gives no backend, whatever the targetPort.
        let s = svc("
metadata: {name: one}
spec:
  type: NodePort
  ports: [{port: 80, targetPort: 8081, nodePort: 30010}]
");
        for ports in ["[{name: '', port: 8081}]", "[{port: 8081}]"] {
            let sl = slice(&format!(
                "
metadata: {{name: one-1, labels: {{kubernetes.io/service-name: one}}}}
addressType: IPv4
ports: {ports}
endpoints: [{{addresses: [10.0.0.2]}}]
"
            ));
            let (d, _) = run(std::slice::from_ref(&s), &[sl]);
            let b = &d.services[&id("default", "one", "", Protocol::Tcp)].backends;
            assert_eq!(
                b.iter().map(|b| u16::from_be(b.port)).collect::<Vec<_>>(),
                [8081],
                "{ports}"
            );
        }
        for ports in ["[{name: other, port: 8081}]", "[]"] {
            let sl = slice(&format!(
                "
metadata: {{name: one-1, labels: {{kubernetes.io/service-name: one}}}}
addressType: IPv4
ports: {ports}
endpoints: [{{addresses: [10.0.0.2]}}]
"
            ));
            let (d, _) = run(std::slice::from_ref(&s), &[sl]);
            assert!(
                d.services[&id("default", "one", "", Protocol::Tcp)]
                    .backends
                    .is_empty(),
                "{ports}"
            );
        }
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
        let ifaces = [
            InterfaceAddr::new("eth0", "10.1.0.5".parse().unwrap()),
            InterfaceAddr::new("eth1", "192.168.7.1".parse().unwrap()),
            InterfaceAddr::new("eth1", IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            InterfaceAddr::new("eth1", "2001:db8:7::1".parse().unwrap()),
            // Link-local and loopback addresses never take nodePorts.
            InterfaceAddr::new("eth1", "fe80::1".parse().unwrap()),
            InterfaceAddr::new("eth1", "169.254.0.9".parse().unwrap()),
            InterfaceAddr::new("lo", "::1".parse().unwrap()),
            // Nor do the Service addresses IPVS binds to kube-ipvs0.
            InterfaceAddr::new("kube-ipvs0", "10.96.0.1".parse().unwrap()),
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
        let want: BTreeSet<IpAddr> = [
            "10.1.0.5",
            "192.168.7.1",
            "203.0.113.5",
            "fd00::5",
            "2001:db8:7::1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(d.node_addrs, want);
        assert!(d.node_addrs_left_out.is_empty());
        // A map with room for one address per family keeps the Node object's first and
        // names the rest.
        let small = Settings {
            max_node_addrs: 1,
            ..Settings::default()
        };
        let (d, _) = desired(&inputs(&small));
        assert_eq!(d.node_addrs.len(), 2);
        assert!(d.node_addrs.contains(&"fd00::5".parse().unwrap()));
        assert_eq!(d.node_addrs_left_out.len(), 3);
        let narrowed = Settings {
            nodeport_cidrs: vec![
                "10.0.0.0/8".parse().unwrap(),
                "203.0.113.5".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..Settings::default()
        };
        let (d, _) = desired(&inputs(&narrowed));
        let want: BTreeSet<IpAddr> = ["10.1.0.5", "203.0.113.5", "2001:db8:7::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(d.node_addrs, want);
    }

    #[test]
    fn cidr_parse() {
        let c: IpCidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        let all: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpCidr>().is_err());
        assert!("10.0.0/8".parse::<IpCidr>().is_err());
        assert!("10.0.0.0/x".parse::<IpCidr>().is_err());
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

    const LOCAL_LB: &str = "
metadata: {name: lb, namespace: default, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 30100
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";

    const LOCAL_LB_SLICE: &str = "
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a}
- {addresses: [10.0.0.2], nodeName: node-a}
- {addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false}}
- {addresses: [10.0.0.4], nodeName: node-b}
";

    fn np6(port: u16, proto: u8) -> FrontendKey6 {
        FrontendKey6 {
            addr: [0; 4],
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }

    fn ext6(ip: &str, port: u16, proto: u8) -> FrontendKey6 {
        FrontendKey6 {
            addr: crate::family::addr6_raw(ip.parse().unwrap()),
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }

    fn be6(ip: &str, port: u16, local: bool) -> nodeport_common::Backend6 {
        nodeport_common::Backend6 {
            addr: crate::family::addr6_raw(ip.parse().unwrap()),
            port: port.to_be(),
            flags: if local { BE_F_LOCAL } else { 0 },
            pad: 0,
        }
    }

    /// Service `web` (port `http` 80 -> 8080, nodePort 30080) with `extra` spec lines.
    fn web_with(extra: &str) -> Service {
        svc(&format!(
            "
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
{extra}"
        ))
    }

    const WEB_SLICE6: &str = "
metadata:
  name: web-v6
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ['fd00:1::1']
  nodeName: node-a
- addresses: ['fd00:2::1']
  nodeName: node-b
- addresses: ['fd00:2::2']
  nodeName: node-b
  conditions: {ready: false}
";

    const WEB_SLICE_FQDN: &str = "
metadata:
  name: web-fqdn
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: FQDN
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [example.com]
";

    #[test]
    fn service_port_id_display_marks_ipv6() {
        assert_eq!(
            id6("default", "web", "http", Protocol::Tcp).to_string(),
            "default/web:http/TCP/IPv6"
        );
        assert_eq!(
            id6("ns", "dns", "", Protocol::Udp).to_string(),
            "ns/dns/UDP/IPv6"
        );
    }

    #[test]
    fn dual_stack_service_gets_one_unit_per_family() {
        let s = web_with(
            "  ipFamilies: [IPv6, IPv4]
  externalIPs: [198.18.9.1, '2001:db8::9']
",
        );
        let slices = [slice(WEB_SLICE), slice(WEB_SLICE6), slice(WEB_SLICE_FQDN)];
        let (d, r) = run(&[s], &slices);
        assert!(r.is_empty(), "{r:?}");
        let v4 = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        assert_eq!(
            v4.frontends,
            BTreeSet::from([np(30080, PROTO_TCP), ext("198.18.9.1", 80, PROTO_TCP)])
        );
        assert_eq!(
            table(v4),
            BTreeSet::from([be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)])
        );
        let v6 = &d.services6[&id6("default", "web", "http", Protocol::Tcp)];
        assert_eq!(
            v6.frontends,
            BTreeSet::from([np6(30080, PROTO_TCP), ext6("2001:db8::9", 80, PROTO_TCP)])
        );
        assert_eq!(
            table(v6),
            BTreeSet::from([be6("fd00:1::1", 8080, true), be6("fd00:2::1", 8080, false)])
        );
        assert_eq!((d.services.len(), d.services6.len()), (1, 1));
        assert_eq!(d.service_count(), 2);
    }

    #[test]
    fn ipv6_only_service_has_no_ipv4_unit() {
        let s = web_with(
            "  ipFamilies: [IPv6]
  externalIPs: [198.18.9.1, '2001:db8::9']
",
        );
        let (d, r) = run(&[s], &[slice(WEB_SLICE), slice(WEB_SLICE6)]);
        assert!(r.is_empty(), "{r:?}");
        assert!(d.services.is_empty(), "{:?}", d.services);
        let v6 = &d.services6[&id6("default", "web", "http", Protocol::Tcp)];
        // The IPv4 external IP is ignored (no IPv4 unit takes it), as kube-proxy does.
        assert_eq!(
            v6.frontends,
            BTreeSet::from([np6(30080, PROTO_TCP), ext6("2001:db8::9", 80, PROTO_TCP)])
        );
        assert_eq!(table(v6).len(), 2);
    }

    #[test]
    fn families_come_from_cluster_ips_without_ip_families() {
        let (d, _) = run(&[web_with("  clusterIP: 'fd00:96::10'\n")], &[]);
        assert!(d.services.is_empty());
        assert!(d
            .services6
            .contains_key(&id6("default", "web", "http", Protocol::Tcp)));
        let (d, _) = run(
            &[web_with(
                "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:96::10']\n",
            )],
            &[],
        );
        assert_eq!((d.services.len(), d.services6.len()), (1, 1));
        // Neither: IPv4, as before.
        let (d, _) = run(&[web_with("")], &[]);
        assert_eq!((d.services.len(), d.services6.len()), (1, 0));
    }

    #[test]
    fn lb_ips_of_a_family_become_frontends_only_when_the_family_is_enabled() {
        let status = "status:
  loadBalancer:
    ingress: [{ip: 198.18.5.1}, {ip: '2001:db8:5::1'}]
";
        let v4_only = svc(&format!(
            "{}  loadBalancerIP: '2001:db8:5::2'\n{status}",
            WEB.replace("NodePort", "LoadBalancer")
        ));
        let (d, r) = run(&[v4_only], &[]);
        assert!(r.is_empty(), "{r:?}");
        assert!(d.services6.is_empty());
        assert_eq!(
            d.services[&id("default", "web", "http", Protocol::Tcp)].frontends,
            BTreeSet::from([np(30080, PROTO_TCP), ext("198.18.5.1", 80, PROTO_TCP)])
        );
        let dual = svc(&format!(
            "{}  ipFamilies: [IPv4, IPv6]\n  loadBalancerIP: '2001:db8:5::2'\n{status}",
            WEB.replace("NodePort", "LoadBalancer")
        ));
        let (d, _) = run(&[dual], &[]);
        assert_eq!(
            d.services6[&id6("default", "web", "http", Protocol::Tcp)].frontends,
            BTreeSet::from([np6(30080, PROTO_TCP), ext6("2001:db8:5::1", 80, PROTO_TCP)])
        );
    }

    #[test]
    fn source_ranges_go_to_the_unit_of_their_family() {
        let dual = web_with(
            "  ipFamilies: [IPv4, IPv6]
  loadBalancerSourceRanges: [198.18.0.0/24, '2001:db8:1::/48']
",
        );
        let (d, r) = run(&[dual], &[]);
        assert!(r.is_empty(), "{r:?}");
        let v4 = &d.services[&id("default", "web", "http", Protocol::Tcp)];
        let v6 = &d.services6[&id6("default", "web", "http", Protocol::Tcp)];
        let cidrs =
            |l: &[&str]| -> BTreeSet<IpCidr> { l.iter().map(|c| c.parse().unwrap()).collect() };
        assert_eq!(v4.source_ranges, cidrs(&["198.18.0.0/24"]));
        assert_eq!(v6.source_ranges, cidrs(&["2001:db8:1::/48"]));
        assert_ne!(v4.flags & SVC_F_SRC_RANGES, 0);
        assert_ne!(v6.flags & SVC_F_SRC_RANGES, 0);
        // Only IPv4 ranges: the IPv6 unit keeps the flag with no range (allows nobody).
        let v4_ranges = web_with(
            "  ipFamilies: [IPv4, IPv6]
  loadBalancerSourceRanges: [198.18.0.0/24]
",
        );
        let (d, _) = run(&[v4_ranges], &[]);
        let v6 = &d.services6[&id6("default", "web", "http", Protocol::Tcp)];
        assert_ne!(v6.flags & SVC_F_SRC_RANGES, 0);
        assert!(v6.source_ranges.is_empty());
    }

    #[test]
    fn unknown_family_is_refused_by_name_and_the_other_still_served() {
        let s = web_with("  ipFamilies: [IPv6, IPv5]\n");
        let (d, r) = run(&[s], &[slice(WEB_SLICE6)]);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].object, "Service default/web");
        assert!(
            r[0].reason.contains("spec.ipFamilies[1]") && r[0].reason.contains("IPv5"),
            "{r:?}"
        );
        assert!(d.services.is_empty());
        assert_eq!(
            table(&d.services6[&id6("default", "web", "http", Protocol::Tcp)]).len(),
            2
        );
    }

    #[test]
    fn local_policy_with_ipv6_local_endpoints() {
        let s = web_with(
            "  ipFamilies: [IPv4, IPv6]
  externalTrafficPolicy: Local
  healthCheckNodePort: 30100
",
        );
        let (d, r) = run(&[s], &[slice(WEB_SLICE), slice(WEB_SLICE6)]);
        assert!(r.is_empty(), "{r:?}");
        let v6 = &d.services6[&id6("default", "web", "http", Protocol::Tcp)];
        assert_ne!(v6.flags & SVC_F_LOCAL, 0);
        let table: Vec<_> = v6.table_backends().copied().collect();
        assert_eq!(table, vec![be6("fd00:1::1", 8080, true)]);
        // The other node's serving endpoint stays programmed for old flows.
        assert!(v6
            .backends
            .contains(&draining(be6("fd00:2::1", 8080, false))));
        // One local ready endpoint of each family.
        assert_eq!(d.health_checks[&30100], hc("default", "web", 2));
    }

    #[test]
    fn a_refusal_shared_by_both_units_is_reported_once() {
        let s = svc("
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, nodePort: 99}]
");
        let (d, r) = run(std::slice::from_ref(&s), &[]);
        assert_eq!(d.service_count(), 0);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].reason.contains("nodePort 99"), "{r:?}");
        let mut m = Model::new();
        let (_, r2) = m.update(&Inputs {
            services: &[s],
            slices: &[],
            nodes: &[],
            node_name: "node-a",
            interface_addrs: &[],
            settings: &Settings::default(),
        });
        assert_eq!(r2, r);
    }

    #[test]
    fn an_address_of_the_other_family_in_a_slice_is_refused() {
        let bad = WEB_SLICE6.replace("'fd00:2::2'", "10.9.9.9");
        let s = web_with("  ipFamilies: [IPv6]\n");
        let (d, r) = run(&[s], &[slice(&bad)]);
        assert!(
            r.iter().any(|r| r.object == "EndpointSlice default/web-v6"
                && r.reason.contains("\"10.9.9.9\" is not an IPv6 address")),
            "{r:?}"
        );
        assert_eq!(
            d.services6[&id6("default", "web", "http", Protocol::Tcp)]
                .backends
                .len(),
            2
        );
    }

    #[test]
    fn model_tracks_dual_stack_changes() {
        let s = web_with("  ipFamilies: [IPv4, IPv6]\n");
        let slices = [slice(WEB_SLICE), slice(WEB_SLICE6)];
        let settings = Settings::default();
        let inputs = |services, slices| Inputs {
            services,
            slices,
            nodes: &[],
            node_name: "node-a",
            interface_addrs: &[],
            settings: &settings,
        };
        let mut m = Model::by_content();
        let (got, _) = m.update(&inputs(std::slice::from_ref(&s), &slices));
        assert_eq!(*got, desired(&inputs(std::slice::from_ref(&s), &slices)).0);
        let c = m.take_changes();
        assert_eq!(
            c.services,
            BTreeSet::from([
                id("default", "web", "http", Protocol::Tcp),
                id6("default", "web", "http", Protocol::Tcp)
            ])
        );
        // Only the IPv6 slice goes: the model reports the IPv6 unit.
        let (got, _) = m.update(&inputs(std::slice::from_ref(&s), &slices[..1]));
        assert!(got.services6[&id6("default", "web", "http", Protocol::Tcp)]
            .backends
            .is_empty());
        let c = m.take_changes();
        assert!(c
            .services
            .contains(&id6("default", "web", "http", Protocol::Tcp)));
        // IPv6 dropped from the families: the IPv6 unit is gone.
        let v4 = web_with("  ipFamilies: [IPv4]\n");
        let (got, _) = m.update(&inputs(std::slice::from_ref(&v4), &slices));
        assert!(got.services6.is_empty());
        assert_eq!(got.services.len(), 1);
    }

    fn hc(ns: &str, name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: ns.into(),
            name: name.into(),
            local_endpoints,
        }
    }

    #[test]
    fn health_check_counts_local_ready_endpoints() {
        let (d, r) = run(&[svc(LOCAL_LB)], &[slice(LOCAL_LB_SLICE)]);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(
            d.health_checks,
            BTreeMap::from([(30100, hc("default", "lb", 2))])
        );
        // No endpoints yet: served, with 0.
        let (d, _) = run(&[svc(LOCAL_LB)], &[]);
        assert_eq!(d.health_checks[&30100], hc("default", "lb", 0));
        // A NodePort service with the field is served too.
        let np_local = LOCAL_LB.replace("LoadBalancer", "NodePort");
        let (d, _) = run(&[svc(&np_local)], &[]);
        assert_eq!(d.health_checks.len(), 1);
        // Without the Local policy, or as a ClusterIP service, there is none.
        let cluster = LOCAL_LB.replace("Local", "Cluster");
        let (d, r) = run(&[svc(&cluster)], &[]);
        assert!(d.health_checks.is_empty() && r.is_empty());
        let cip = "
metadata: {name: c}
spec:
  externalTrafficPolicy: Local
  healthCheckNodePort: 30100
  ports: [{port: 80}]
";
        let (d, r) = run(&[svc(cip)], &[]);
        assert!(d.health_checks.is_empty() && r.is_empty());
    }

    #[test]
    fn health_check_port_refusals() {
        // Outside the nodePort range: refused, the service itself is served.
        let bad = LOCAL_LB.replace("30100", "40000");
        let (d, r) = run(&[svc(&bad)], &[]);
        assert!(d.health_checks.is_empty());
        assert_eq!(d.services.len(), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].object, "Service default/lb");
        assert!(
            r[0].reason.contains("healthCheckNodePort 40000"),
            "{}",
            r[0]
        );
        // Claimed twice: the older service keeps it, whatever the input order.
        let younger = LOCAL_LB
            .replace("name: lb,", "name: lb2,")
            .replace("2024-01-01", "2024-01-02")
            .replace("30080", "30081");
        for services in [
            [svc(&younger), svc(LOCAL_LB)],
            [svc(LOCAL_LB), svc(&younger)],
        ] {
            let (d, r) = run(&services, &[slice(LOCAL_LB_SLICE)]);
            assert_eq!(
                d.health_checks,
                BTreeMap::from([(30100, hc("default", "lb", 2))])
            );
            assert_eq!(d.services.len(), 2);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].object, "Service default/lb2");
            assert!(r[0].reason.contains("already used by Service default/lb"));
        }
    }

    #[test]
    fn model_tracks_health_checks() {
        let settings = Settings::default();
        let mut model = Model::by_content();
        let younger = LOCAL_LB
            .replace("name: lb,", "name: lb2,")
            .replace("2024-01-01", "2024-01-02")
            .replace("30080", "30081");
        let mut services = vec![svc(&younger), svc(LOCAL_LB)];
        let mut slices = vec![slice(LOCAL_LB_SLICE)];
        for step in 0..4 {
            match step {
                1 => {
                    slices[0].endpoints.truncate(1);
                }
                2 => {
                    services.remove(1);
                }
                3 => {
                    services.clear();
                }
                _ => {}
            }
            let inputs = Inputs {
                services: &services,
                slices: &slices,
                nodes: &[],
                node_name: "node-a",
                interface_addrs: &[],
                settings: &settings,
            };
            let (want, mut want_r) = desired(&inputs);
            want_r.sort();
            let (got, got_r) = model.update(&inputs);
            assert_eq!(*got, want, "step {step}");
            assert_eq!(got_r, want_r, "step {step}");
            let expect = match step {
                0 => Some(hc("default", "lb", 2)),
                1 => Some(hc("default", "lb", 1)),
                2 => Some(hc("default", "lb2", 0)),
                _ => None,
            };
            assert_eq!(
                got.health_checks.get(&30100),
                expect.as_ref(),
                "step {step}"
            );
        }
    }

    /// A tiny deterministic generator for the property tests.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len() as u64) as usize]
        }
    }

    /// A random Service `ns/name` over small pools of nodePorts, addresses and port names, so
    /// that ports collide, repeat and get refused in every way.
    fn random_service(rng: &mut Rng, ns: &str, name: &str, rv: Option<u64>) -> Service {
        let mut meta = serde_json::json!({"name": name, "namespace": ns});
        if let Some(rv) = rv {
            meta["resourceVersion"] = rv.to_string().into();
            meta["uid"] = format!("uid-{ns}-{name}").into();
        }
        if rng.below(4) != 0 {
            meta["creationTimestamp"] = format!("2024-01-0{}T00:00:00Z", 1 + rng.below(3)).into();
        }
        let type_ = rng.pick(&[
            "NodePort",
            "NodePort",
            "LoadBalancer",
            "ClusterIP",
            "ExternalName",
            "Weird",
        ]);
        let ports: Vec<serde_json::Value> = (0..1 + rng.below(3))
            .map(|_| {
                let port = if rng.below(8) == 0 {
                    0
                } else {
                    80 + rng.below(2)
                };
                let mut p = serde_json::json!({
                    "name": rng.pick(&["", "a", "b", "a"]),
                    "port": port,
                    "protocol": rng.pick(&["TCP", "TCP", "UDP", "SCTP"]),
                });
                if rng.below(6) != 0 {
                    p["nodePort"] =
                        [30000, 30001, 30002, 30003, 0, 8000][rng.below(6) as usize].into();
                }
                match rng.below(5) {
                    0 => p["targetPort"] = rng.pick(&["http", "other", "", "8080"]).into(),
                    1 => p["targetPort"] = [8080, 0, 70000][rng.below(3) as usize].into(),
                    _ => {}
                }
                p
            })
            .collect();
        let mut spec = serde_json::json!({"type": type_, "ports": ports});
        if rng.below(3) == 0 {
            spec["externalIPs"] = (0..1 + rng.below(2))
                .map(|_| rng.pick(&["192.0.2.1", "192.0.2.2", "bogus", "2001:db8::1"]))
                .collect::<Vec<_>>()
                .into();
        }
        if rng.below(4) == 0 {
            spec["externalTrafficPolicy"] = "Local".into();
        }
        if rng.below(4) == 0 {
            spec["sessionAffinity"] = "ClientIP".into();
        }
        if type_ == "LoadBalancer" && rng.below(2) == 0 {
            spec["allocateLoadBalancerNodePorts"] = false.into();
        }
        if rng.below(10) == 0 {
            spec["clusterIP"] = "None".into();
        }
        if rng.below(3) == 0 {
            spec["healthCheckNodePort"] =
                [30000, 30001, 30002, 40000, 0][rng.below(5) as usize].into();
        }
        let mut svc = serde_json::json!({"metadata": meta, "spec": spec});
        if type_ == "LoadBalancer" {
            svc["status"] = serde_json::json!(
                {"loadBalancer": {"ingress": [{"ip": rng.pick(&["192.0.2.1", "192.0.2.3"])}]}});
        }
        serde_json::from_value(svc).expect("random Service")
    }

    /// A random EndpointSlice `ns/name` of service `svc`.
    fn random_slice(
        rng: &mut Rng,
        ns: &str,
        name: &str,
        svc: &str,
        rv: Option<u64>,
    ) -> EndpointSlice {
        let mut meta = serde_json::json!({"name": name, "namespace": ns,
            "labels": {LABEL_SERVICE_NAME: svc}});
        if let Some(rv) = rv {
            meta["resourceVersion"] = rv.to_string().into();
        }
        let endpoints: Vec<serde_json::Value> = (0..rng.below(4))
            .map(|_| {
                let addr = rng.pick(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "bad"]);
                let mut e = serde_json::json!({"addresses": [addr],
                    "nodeName": rng.pick(&["node-a", "node-b"])});
                if rng.below(3) == 0 {
                    e["conditions"] = serde_json::json!({"ready": rng.below(2) == 0,
                        "serving": rng.below(2) == 0, "terminating": rng.below(2) == 0});
                }
                if rng.below(2) == 0 {
                    e["hints"] = serde_json::json!({
                        "forZones": [{"name": rng.pick(&["zone-a", "zone-b"])}]});
                    if rng.below(3) == 0 {
                        e["hints"]["forNodes"] =
                            serde_json::json!([{"name": rng.pick(&["node-a", "node-b"])}]);
                    }
                }
                e
            })
            .collect();
        let ports: Vec<serde_json::Value> = (0..rng.below(3))
            .map(|_| {
                serde_json::json!({"name": rng.pick(&["", "a", "http"]),
                "port": 8080 + 1010 * rng.below(2),
                "protocol": rng.pick(&["TCP", "UDP"])})
            })
            .collect();
        serde_json::from_value(serde_json::json!({"metadata": meta,
            "addressType": rng.pick(&["IPv4", "IPv4", "IPv4", "IPv6"]),
            "ports": ports, "endpoints": endpoints}))
        .expect("random EndpointSlice")
    }

    fn sorted_by_name<T: k8s_openapi::Metadata<Ty = ObjectMeta>>(v: &mut [T]) {
        v.sort_by(|a, b| {
            let (a, b) = (a.metadata(), b.metadata());
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        });
    }

    #[test]
    fn model_matches_desired_on_random_changes() {
        let mut nodes = [node(
            "
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.1.0.5}]}
",
        )];
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            // Versions trusted (objects carry them, bumped on change), or content only.
            let versions = seed % 2 == 0;
            let mut model = if versions {
                Model::new()
            } else {
                Model::by_content()
            };
            let mut rv = 0u64;
            let mut next_rv = |rng: &mut Rng| {
                rv += 1;
                (versions || rng.below(4) == 0).then_some(rv)
            };
            let names = ["s0", "s1", "s2", "s3", "s4", "s5"];
            let nss = ["default", "other"];
            let mut services: Vec<Service> = Vec::new();
            let mut slices: Vec<EndpointSlice> = Vec::new();
            let mut settings = Settings::default();
            let mut node_name = "node-a";
            let mut prev = Desired::default();
            for step in 0..80u64 {
                for _ in 0..1 + rng.below(3) {
                    let ns = rng.pick(&nss);
                    let name = rng.pick(&names);
                    let found = |v: &[Service]| {
                        v.iter().position(|s| {
                            s.metadata.name.as_deref() == Some(name)
                                && s.metadata.namespace.as_deref() == Some(ns)
                        })
                    };
                    match rng.below(8) {
                        // A new or changed Service.
                        0 | 1 => {
                            let r = next_rv(&mut rng);
                            let s = random_service(&mut rng, ns, name, r);
                            match found(&services) {
                                Some(i) => services[i] = s,
                                None => services.push(s),
                            }
                        }
                        // A Service goes.
                        2 => {
                            if let Some(i) = found(&services) {
                                services.remove(i);
                            }
                        }
                        // The same Service twice (a manifest folder may hold that).
                        3 if rng.below(4) == 0 => {
                            let r = next_rv(&mut rng);
                            services.push(random_service(&mut rng, ns, name, r));
                        }
                        // A slice is new, changed or gone.
                        _ => {
                            let slice_name = format!("{name}-{}", rng.below(2));
                            let at = slices.iter().position(|s| {
                                s.metadata.name.as_deref() == Some(&slice_name)
                                    && s.metadata.namespace.as_deref() == Some(ns)
                            });
                            let r = next_rv(&mut rng);
                            let sl = random_slice(&mut rng, ns, &slice_name, name, r);
                            match (at, rng.below(5)) {
                                (Some(i), 0) => {
                                    slices.remove(i);
                                }
                                (Some(i), _) => slices[i] = sl,
                                (None, _) => slices.push(sl),
                            }
                        }
                    }
                }
                // Mostly in the sources' order; sometimes not at all.
                if rng.below(5) == 0 {
                    let n = services.len();
                    if n > 1 {
                        services.swap(0, rng.below(n as u64) as usize);
                    }
                } else {
                    sorted_by_name(&mut services);
                    sorted_by_name(&mut slices);
                }
                if rng.below(30) == 0 {
                    settings.nodeport_range = 30000..=30000 + rng.below(3) as u16;
                }
                if rng.below(30) == 0 {
                    node_name = rng.pick(&["node-a", "node-b"]);
                }
                if rng.below(20) == 0 {
                    let zone = rng.pick(&["zone-a", "zone-b"]);
                    nodes[0].metadata.labels = Some([(LABEL_ZONE.to_string(), zone.into())].into());
                }
                let ifaces = [InterfaceAddr::new("eth0", "192.168.7.1".parse().unwrap())];
                let inputs = Inputs {
                    services: &services,
                    slices: &slices,
                    nodes: &nodes,
                    node_name,
                    interface_addrs: &ifaces,
                    settings: &settings,
                };
                let (want, mut want_refusals) = desired(&inputs);
                want_refusals.sort();
                let (got, got_refusals) = model.update(&inputs);
                assert_eq!(*got, want, "seed {seed} step {step}");
                assert_eq!(got_refusals, want_refusals, "seed {seed} step {step}");
                // The changes name every service port that differs from the last state.
                let changes = model.take_changes();
                assert_eq!((changes.from, changes.to), (step, step + 1));
                for id in prev.services.keys().chain(want.services.keys()) {
                    if prev.services.get(id) != want.services.get(id) {
                        assert!(
                            changes.services.contains(id),
                            "seed {seed} step {step}: {id}"
                        );
                    }
                }
                prev = want;
            }
        }
    }
}
