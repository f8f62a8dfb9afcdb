//! Prometheus metrics of the agent (text exposition on `--metrics-addr`): datapath packet
//! counters summed over CPUs, conntrack occupancy against capacity, sync counts, errors and
//! latency, watch restarts and errors, refused objects, and per service port the backends
//! taking new flows and the draining ones. Datapath values are read from the pinned maps at
//! scrape time, so a scrape never waits for the sync loop.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    sync::{atomic::Ordering, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    datapath::MapReader,
    family::Family as IpFamily,
    kube_source::KubeStats,
    model::{Desired, ServicePortId},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabel {
    path: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// One service port of one family, as kube-proxy's and Kubernetes' own names go: the
/// Service's namespace and name, the port's name (empty for an unnamed port), `TCP` or
/// `UDP`, `IPv4` or `IPv6`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: String,
    protocol: String,
    family: String,
}

impl From<&ServicePortId> for ServiceLabels {
    fn from(id: &ServicePortId) -> Self {
        Self {
            namespace: id.namespace.clone(),
            service: id.name.clone(),
            port: id.port.clone(),
            protocol: id.protocol.to_string(),
            family: id.family.as_str().to_string(),
        }
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    packets: Family<VerdictLabel, Counter>,
    events: Family<EventLabel, Counter>,
    conntrack_entries: Gauge,
    conntrack_capacity: Gauge,
    revnat_entries: Gauge,
    revnat_capacity: Gauge,
    conntrack6_entries: Gauge,
    conntrack6_capacity: Gauge,
    revnat6_entries: Gauge,
    revnat6_capacity: Gauge,
    syncs: Counter,
    sync_errors: Counter,
    sync_duration: Histogram,
    refused: Gauge,
    services: Gauge,
    backends: Gauge,
    ready: Gauge,
    watch_restarts: Family<KindLabel, Counter>,
    watch_errors: Family<KindLabel, Counter>,
    probes: Family<ProbeLabel, Counter>,
    healthcheck_listeners: Gauge,
    healthcheck_listeners_failed: Gauge,
    service_backends: Family<ServiceLabels, Gauge>,
    service_draining: Family<ServiceLabels, Gauge>,
    gc_sweeps: Counter,
    gc_freed: Counter,
    gc_early_dropped: Counter,
    gc_duration: Histogram,
    /// Last values read from monotonic sources, to turn them into counter increments.
    last: Mutex<StdHashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodeport");
        let packets = Family::<VerdictLabel, Counter>::default();
        registry.register(
            "datapath_packets",
            "Packets by datapath verdict or drop reason, summed over CPUs",
            packets.clone(),
        );
        let events = Family::<EventLabel, Counter>::default();
        registry.register(
            "datapath_events",
            "Datapath events (new flows, replies, ...)",
            events.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "conntrack_entries",
            "Entries in the conntrack map",
            conntrack_entries.clone(),
        );
        let conntrack_capacity = Gauge::default();
        registry.register(
            "conntrack_capacity",
            "Capacity of the conntrack map",
            conntrack_capacity.clone(),
        );
        let revnat_entries = Gauge::default();
        registry.register(
            "revnat_entries",
            "Entries in the reverse-NAT map (translated flows)",
            revnat_entries.clone(),
        );
        let revnat_capacity = Gauge::default();
        registry.register(
            "revnat_capacity",
            "Capacity of the reverse-NAT map",
            revnat_capacity.clone(),
        );
        let conntrack6_entries = Gauge::default();
        registry.register(
            "conntrack6_entries",
            "Entries in the IPv6 conntrack map",
            conntrack6_entries.clone(),
        );
        let conntrack6_capacity = Gauge::default();
        registry.register(
            "conntrack6_capacity",
            "Capacity of the IPv6 conntrack map",
            conntrack6_capacity.clone(),
        );
        let revnat6_entries = Gauge::default();
        registry.register(
            "revnat6_entries",
            "Entries in the IPv6 reverse-NAT map (translated flows)",
            revnat6_entries.clone(),
        );
        let revnat6_capacity = Gauge::default();
        registry.register(
            "revnat6_capacity",
            "Capacity of the IPv6 reverse-NAT map",
            revnat6_capacity.clone(),
        );
        let syncs = Counter::default();
        registry.register(
            "syncs",
            "Reconciliations of the maps with the desired state",
            syncs.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "sync_errors",
            "Map operations that failed during reconciliation",
            sync_errors.clone(),
        );
        let sync_duration =
            Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "sync_duration_seconds",
            "Time from a new set of objects to the maps updated",
            sync_duration.clone(),
        );
        let refused = Gauge::default();
        registry.register(
            "refused_objects",
            "Objects or ports refused as invalid, currently",
            refused.clone(),
        );
        let services = Gauge::default();
        registry.register("services", "Service ports programmed", services.clone());
        let backends = Gauge::default();
        registry.register("backends", "Distinct backends programmed", backends.clone());
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 once the datapath is attached and the first sync is done",
            ready.clone(),
        );
        let watch_restarts = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_restarts",
            "Kubernetes watch restarts (re-lists) by kind",
            watch_restarts.clone(),
        );
        let watch_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_errors",
            "Kubernetes watch errors by kind",
            watch_errors.clone(),
        );
        let probes = Family::<ProbeLabel, Counter>::default();
        registry.register(
            "health_probes",
            "Answers of /healthz and /livez by status code (kube-proxy's \
             kubeproxy_proxy_healthz_total and kubeproxy_proxy_livez_total)",
            probes.clone(),
        );
        let healthcheck_listeners = Gauge::default();
        registry.register(
            "healthcheck_listeners",
            "healthCheckNodePort listeners serving (one per port and listen address)",
            healthcheck_listeners.clone(),
        );
        let healthcheck_listeners_failed = Gauge::default();
        registry.register(
            "healthcheck_listeners_failed",
            "healthCheckNodePort listeners that could not bind (port taken, address gone), \
             retried with backoff",
            healthcheck_listeners_failed.clone(),
        );
        let service_backends = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "service_backends",
            "Backends taking new flows (the members of the Maglev table), per service port \
             served",
            service_backends.clone(),
        );
        let service_draining = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "service_endpoints_draining",
            "Endpoints kept only for the flows already on them (terminating, not ready, or \
             under Local on another node), per service port served",
            service_draining.clone(),
        );
        let gc_sweeps = Counter::default();
        registry.register(
            "conntrack_gc_sweeps",
            "Sweeps of the reverse-NAT maps for entries of gone flows",
            gc_sweeps.clone(),
        );
        let gc_freed = Counter::default();
        registry.register(
            "conntrack_gc_freed",
            "Reverse-NAT entries freed by the sweep (their SNAT ports among them)",
            gc_freed.clone(),
        );
        let gc_early_dropped = Counter::default();
        registry.register(
            "conntrack_gc_early_dropped",
            "Unassured flows (no handshake ACK, no UDP reply) ended by a sweep under pressure",
            gc_early_dropped.clone(),
        );
        let gc_duration = Histogram::new([0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "conntrack_gc_duration_seconds",
            "Duration of a reverse-NAT sweep",
            gc_duration.clone(),
        );
        Self {
            registry,
            packets,
            events,
            conntrack_entries,
            conntrack_capacity,
            revnat_entries,
            revnat_capacity,
            conntrack6_entries,
            conntrack6_capacity,
            revnat6_entries,
            revnat6_capacity,
            syncs,
            sync_errors,
            sync_duration,
            refused,
            services,
            backends,
            ready,
            watch_restarts,
            watch_errors,
            probes,
            healthcheck_listeners,
            healthcheck_listeners_failed,
            service_backends,
            service_draining,
            gc_sweeps,
            gc_freed,
            gc_early_dropped,
            gc_duration,
            last: Mutex::new(StdHashMap::new()),
        }
    }

    /// Record one reverse-NAT sweep.
    pub fn record_gc(&self, elapsed: Duration, freed: u64, early_dropped: u64) {
        self.gc_sweeps.inc();
        self.gc_freed.inc_by(freed);
        self.gc_early_dropped.inc_by(early_dropped);
        self.gc_duration.observe(elapsed.as_secs_f64());
    }

    /// Record one reconciliation.
    pub fn record_sync(&self, elapsed: Duration, errors: usize, services: usize, backends: usize) {
        self.syncs.inc();
        self.sync_errors.inc_by(errors as u64);
        self.sync_duration.observe(elapsed.as_secs_f64());
        self.services.set(services as i64);
        self.backends.set(backends as i64);
    }

    /// The per-service-port gauges of the service ports in `changed` (those whose desired
    /// state changed since the last call, [`crate::model::Changes::services`]): set from
    /// `desired`, or removed when the port is no longer served.
    pub fn update_services(&self, desired: &Desired, changed: &BTreeSet<ServicePortId>) {
        for id in changed {
            let counts = match id.family {
                IpFamily::V4 => desired
                    .services
                    .get(id)
                    .map(|ds| (ds.table_backends().count(), ds.backends.len())),
                IpFamily::V6 => desired
                    .services6
                    .get(id)
                    .map(|ds| (ds.table_backends().count(), ds.backends.len())),
            };
            let labels = ServiceLabels::from(id);
            match counts {
                Some((taking, all)) => {
                    self.service_backends
                        .get_or_create(&labels)
                        .set(taking as i64);
                    self.service_draining
                        .get_or_create(&labels)
                        .set((all - taking) as i64);
                }
                None => {
                    self.service_backends.remove(&labels);
                    self.service_draining.remove(&labels);
                }
            }
        }
    }

    pub fn set_refused(&self, n: usize) {
        self.refused.set(n as i64);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// One answer of `/healthz` or `/livez`.
    pub fn count_probe(&self, probe: crate::health::Probe, ok: bool) {
        let path = match probe {
            crate::health::Probe::Healthz => "/healthz",
            crate::health::Probe::Livez => "/livez",
        };
        self.probes
            .get_or_create(&ProbeLabel {
                path: path.into(),
                code: if ok { "200" } else { "503" }.into(),
            })
            .inc();
    }

    /// healthCheckNodePort listeners serving and failed now.
    pub fn set_healthcheck_listeners(&self, up: usize, failed: usize) {
        self.healthcheck_listeners.set(up as i64);
        self.healthcheck_listeners_failed.set(failed as i64);
    }

    /// Add the growth of a monotonic source since the last scrape to `counter`.
    fn advance(&self, key: String, now: u64, counter: &Counter) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.insert(key, now).unwrap_or(0);
        counter.inc_by(now.saturating_sub(prev));
    }

    /// Render the exposition text, refreshing datapath and watch values first.
    pub fn render(&self, maps: Option<&MapReader>, kube: &KubeStats) -> String {
        if let Some(maps) = maps {
            if let Ok(stats) = maps.counters() {
                for (name, value) in stats {
                    let key = format!("stat/{name}");
                    match name.strip_prefix("event_") {
                        Some(event) => {
                            let c = self.events.get_or_create(&EventLabel {
                                event: event.into(),
                            });
                            self.advance(key, value, &c);
                        }
                        None => {
                            let c = self.packets.get_or_create(&VerdictLabel {
                                verdict: name.into(),
                            });
                            self.advance(key, value, &c);
                        }
                    }
                }
            }
            if let Ok((entries, capacity)) = maps.conntrack_occupancy() {
                self.conntrack_entries.set(entries as i64);
                self.conntrack_capacity.set(capacity as i64);
            }
            if let Ok((entries, capacity)) = maps.revnat_occupancy() {
                self.revnat_entries.set(entries as i64);
                self.revnat_capacity.set(capacity as i64);
            }
            if let Ok(Some(((ct, ct_cap), (rnat, rnat_cap)))) = maps.conntrack6_occupancy() {
                self.conntrack6_entries.set(ct as i64);
                self.conntrack6_capacity.set(ct_cap as i64);
                self.revnat6_entries.set(rnat as i64);
                self.revnat6_capacity.set(rnat_cap as i64);
            }
        }
        for kind in crate::kube_source::Kind::ALL {
            let stats = kube.kind(kind);
            let label = KindLabel {
                kind: kind.to_string(),
            };
            let restarts = self.watch_restarts.get_or_create(&label);
            self.advance(
                format!("restarts/{kind}"),
                stats.restarts.load(Ordering::Relaxed),
                &restarts,
            );
            let errors = self.watch_errors.get_or_create(&label);
            self.advance(
                format!("errors/{kind}"),
                stats.errors.load(Ordering::Relaxed),
                &errors,
            );
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use nodeport_common::{Backend, FrontendKey, BE_F_DRAINING, PROTO_TCP};

    use super::*;
    use crate::model::{DesiredService, Protocol};

    fn id(name: &str, port: &str, family: IpFamily) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
            family,
        }
    }

    fn with_backends(draining: &[bool]) -> DesiredService {
        DesiredService {
            frontends: BTreeSet::from([FrontendKey {
                addr: 0,
                port: 30080u16.to_be(),
                proto: PROTO_TCP,
                pad: 0,
            }]),
            backends: draining
                .iter()
                .enumerate()
                .map(|(i, d)| Backend {
                    addr: u32::from_ne_bytes([198, 19, 1, 10 + i as u8]),
                    port: 80u16.to_be(),
                    flags: if *d { BE_F_DRAINING } else { 0 },
                    pad: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn per_service_gauges_follow_the_served_ports_and_go_with_them() {
        let m = Metrics::new();
        let web = id("web", "http", IpFamily::V4);
        let db = id("db", "", IpFamily::V4);
        let mut d = Desired::default();
        d.services
            .insert(web.clone(), with_backends(&[false, false, true]));
        d.services.insert(db.clone(), with_backends(&[false]));
        m.update_services(&d, &BTreeSet::from([web.clone(), db.clone()]));
        let out = m.render(None, &KubeStats::default());
        let web_labels = "{namespace=\"default\",service=\"web\",port=\"http\",protocol=\"TCP\",family=\"IPv4\"}";
        assert!(
            out.contains(&format!("nodeport_service_backends{web_labels} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "nodeport_service_endpoints_draining{web_labels} 1\n"
            )),
            "{out}"
        );
        assert!(
            out.contains("nodeport_service_backends{namespace=\"default\",service=\"db\",port=\"\",protocol=\"TCP\",family=\"IPv4\"} 1\n"),
            "{out}"
        );

        // The service goes: its series go; the other's stay.
        d.services.remove(&web);
        m.update_services(&d, &BTreeSet::from([web.clone()]));
        let out = m.render(None, &KubeStats::default());
        assert!(!out.contains("service=\"web\""), "{out}");
        assert!(out.contains("service=\"db\""), "{out}");
    }
}
