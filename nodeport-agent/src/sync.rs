//! Incremental, packet-atomic reconciliation of the desired state into the datapath maps.
//!
//! The [`Reconciler`] remembers what it programmed and, on each [`Reconciler::apply`],
//! touches only the differences, through the [`Maps`] trait (implemented with aya by the
//! agent, with in-memory maps by the tests). A service's Maglev table is never edited in
//! place: the new table is written to a fresh region of NP_MAGLEV, every frontend is then
//! flipped to it with one element update each, and the old region is freed only after that,
//! becoming reusable at the next apply. Freed backend and service ids are quarantined the
//! same way, so a packet that read an old table slot never finds a reused id.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use nodeport_common::{Backend, FrontendKey, Service};

use crate::error::{Error, Result};
use crate::maglev;
use crate::model::{addr_from_raw, addr_raw, describe_frontend, Desired, ServicePortId};

/// Writes to the datapath maps. Every method is one map operation (or, for
/// [`Maps::write_slots`], one range of the NP_MAGLEV array); none of them may leave a map
/// half-updated for a single key.
pub trait Maps {
    /// NP_BE: insert or replace backend `id`.
    fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()>;
    /// NP_BE: remove backend `id`.
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    /// NP_MAGLEV: write `ids` to slots `offset..offset + ids.len()`.
    fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()>;
    /// NP_SVC: insert or replace a frontend.
    fn set_service(&mut self, key: &FrontendKey, val: &Service) -> Result<()>;
    /// NP_SVC: remove a frontend.
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()>;
    /// NP_NODEADDR: add an address of this node (raw network order).
    fn set_node_addr(&mut self, addr: u32) -> Result<()>;
    /// NP_NODEADDR: remove an address of this node.
    fn delete_node_addr(&mut self, addr: u32) -> Result<()>;
}

/// A range of NP_MAGLEV slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

/// First-fit allocator with coalescing over `[0, total)`.
#[derive(Clone, Debug)]
struct RegionAllocator {
    /// Free ranges: offset -> size; never two adjacent ones.
    free: BTreeMap<u32, u32>,
    /// Freed during the current apply; free at the next one.
    quarantine: Vec<Region>,
}

impl RegionAllocator {
    fn new(total: u32) -> Self {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        Self {
            free,
            quarantine: Vec::new(),
        }
    }

    fn alloc(&mut self, size: u32) -> Option<Region> {
        if size == 0 {
            return None;
        }
        let (&offset, &len) = self.free.iter().find(|&(_, &len)| len >= size)?;
        self.free.remove(&offset);
        if len > size {
            self.free.insert(offset + size, len - size);
        }
        Some(Region { offset, size })
    }

    fn free(&mut self, r: Region) {
        let mut offset = r.offset;
        let mut size = r.size;
        if let Some((&p_off, &p_len)) = self.free.range(..offset).next_back() {
            if p_off + p_len == offset {
                self.free.remove(&p_off);
                offset = p_off;
                size += p_len;
            }
        }
        if let Some(n_len) = self.free.remove(&(r.offset + r.size)) {
            size += n_len;
        }
        self.free.insert(offset, size);
    }

    fn release_quarantine(&mut self) {
        for r in std::mem::take(&mut self.quarantine) {
            self.free(r);
        }
    }

    fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    fn quarantined_slots(&self) -> u32 {
        self.quarantine.iter().map(|r| r.size).sum()
    }
}

/// Ids `1..limit`, smallest free first, with one generation of quarantine.
#[derive(Clone, Debug)]
struct IdPool {
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
    quarantine: Vec<u32>,
}

impl IdPool {
    fn new(limit: u32) -> Self {
        Self {
            next: 1,
            limit,
            free: BTreeSet::new(),
            quarantine: Vec::new(),
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Back to the pool at once: the id was never visible to the datapath.
    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Back to the pool at the next apply.
    fn retire(&mut self, id: u32) {
        self.quarantine.push(id);
    }

    fn release_quarantine(&mut self) {
        self.free.extend(self.quarantine.drain(..));
    }
}

/// A backend as the reconciler knows it: (address, port), raw network order.
type BeKey = (u32, u16);

fn be_key(b: &Backend) -> BeKey {
    (b.addr, b.port)
}

fn be_name((addr, port): BeKey) -> String {
    format!("{}:{}", addr_from_raw(addr), u16::from_be(port))
}

/// A Maglev table written to NP_MAGLEV.
#[derive(Clone, Debug)]
struct Table {
    region: Region,
    /// The backends it was built from, sorted.
    backends: Vec<BeKey>,
}

/// What is programmed for one service port.
#[derive(Clone, Debug)]
struct SvcState {
    svc_id: u32,
    /// The latest table, the one frontends are flipped to; `None` when the service has no
    /// backend (its frontends carry `table_size == 0`).
    table: Option<Table>,
    /// Older tables that some frontend may still point at (a flip or delete failed).
    stale: Vec<Table>,
    /// The value programmed under each frontend of this service.
    frontends: BTreeMap<FrontendKey, Service>,
}

impl SvcState {
    fn table_keys(&self) -> &[BeKey] {
        self.table.as_ref().map_or(&[], |t| t.backends.as_slice())
    }

    fn references(&self, r: Region) -> bool {
        self.frontends
            .values()
            .any(|v| v.table_size != 0 && v.table_off == r.offset)
    }
}

/// A backend programmed in NP_BE.
#[derive(Clone, Copy, Debug)]
struct BeState {
    id: u32,
    value: Backend,
}

/// What one [`Reconciler::apply`] did: successful map operations and the errors.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub node_addrs_set: usize,
    pub node_addrs_deleted: usize,
    pub backends_set: usize,
    pub backends_deleted: usize,
    /// `write_slots` calls (one per table).
    pub tables_written: usize,
    /// Slots written by those calls.
    pub slots_written: u64,
    pub services_set: usize,
    pub services_deleted: usize,
    /// Failures, each naming its service, frontend, backend or address. The rest of the
    /// state was still programmed; a failed part is retried by the next apply.
    pub errors: Vec<Error>,
}

impl SyncReport {
    /// Successful map calls.
    pub fn calls(&self) -> usize {
        self.node_addrs_set
            + self.node_addrs_deleted
            + self.backends_set
            + self.backends_deleted
            + self.tables_written
            + self.services_set
            + self.services_deleted
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node addrs +{} -{}, backends +{} -{}, tables {} ({} slots), frontends +{} -{}, {} errors",
            self.node_addrs_set,
            self.node_addrs_deleted,
            self.backends_set,
            self.backends_deleted,
            self.tables_written,
            self.slots_written,
            self.services_set,
            self.services_deleted,
            self.errors.len()
        )
    }
}

/// Counts of the reconciler's state, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateSummary {
    pub node_addrs: usize,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Tables in NP_MAGLEV, current and stale.
    pub tables: usize,
    pub slots_used: u32,
    pub slots_free: u32,
    /// Freed by the last apply, reusable at the next one.
    pub slots_quarantined: u32,
}

/// Programs [`Desired`] states into the maps, one difference at a time.
///
/// Restoring after an agent restart (not implemented yet) needs, from the pinned maps:
/// NP_NODEADDR (the address set); NP_BE (id -> backend: rebuild the (addr, port) -> id map
/// and the id pool's `next` and free ids); NP_SVC (frontend -> value: group frontends by
/// `svc_id`; each distinct `(table_off, table_size)` is an allocated region); and, for each
/// region, its NP_MAGLEV slots (the distinct ids in it give the table's backend set, since
/// every backend owns at least one slot when `table_size >= 100 * n`). What the maps do not
/// hold is the [`ServicePortId`] of a `svc_id`: a restore takes the first desired state and
/// matches each group of frontends to the desired service port that owns those frontends
/// (keeping its `svc_id`, so conntrack entries stay valid); unmatched groups are kept as
/// orphans that the first apply deletes. Regions not referenced by any frontend are free.
#[derive(Clone, Debug)]
pub struct Reconciler {
    maglev_slots: u32,
    regions: RegionAllocator,
    be_ids: IdPool,
    svc_ids: IdPool,
    backends: BTreeMap<BeKey, BeState>,
    services: BTreeMap<ServicePortId, SvcState>,
    /// Which service port each programmed frontend belongs to.
    fe_owner: BTreeMap<FrontendKey, ServicePortId>,
    node_addrs: BTreeSet<u32>,
}

impl Reconciler {
    /// A reconciler for empty maps: NP_MAGLEV of `maglev_slots` slots, NP_BE holding ids
    /// `1..max_backends`.
    pub fn new(maglev_slots: u32, max_backends: u32) -> Self {
        Self {
            maglev_slots,
            regions: RegionAllocator::new(maglev_slots),
            be_ids: IdPool::new(max_backends),
            svc_ids: IdPool::new(u32::MAX),
            backends: BTreeMap::new(),
            services: BTreeMap::new(),
            fe_owner: BTreeMap::new(),
            node_addrs: BTreeSet::new(),
        }
    }

    /// Brings the maps from the last applied state to `desired`, touching only the
    /// differences, in this order:
    ///
    /// 1. node addresses (added, then removed);
    /// 2. new or changed backends (NP_BE), so that every id a new table holds exists;
    /// 3. per service port: a new table in a fresh region when its backend set changed,
    ///    then every frontend whose value changed is flipped (`set_service`);
    /// 4. frontends no longer desired are deleted, then services that are gone entirely;
    ///    tables no frontend points at any more are freed (reusable at the next apply);
    /// 5. backends no service references any more are deleted (ids reusable at the next
    ///    apply).
    ///
    /// A failure is confined to its service port (or backend, or address): it is reported
    /// in [`SyncReport::errors`], the previous state of that part stays in force, and the
    /// next apply retries it.
    pub fn apply(&mut self, desired: &Desired, maps: &mut impl Maps) -> SyncReport {
        self.regions.release_quarantine();
        self.be_ids.release_quarantine();
        self.svc_ids.release_quarantine();
        let mut report = SyncReport::default();

        self.sync_node_addrs(desired, maps, &mut report);
        let wanted_backends = self.sync_backends(desired, maps, &mut report);
        for (id, ds) in &desired.services {
            if let Err(e) = self.sync_service(id, ds, maps, &mut report) {
                report.errors.push(Error::Service {
                    service: id.to_string(),
                    source: Box::new(e),
                });
            }
        }
        self.delete_frontends(desired, maps, &mut report);
        self.delete_backends(&wanted_backends, maps, &mut report);
        report
    }

    fn sync_node_addrs(&mut self, desired: &Desired, maps: &mut impl Maps, report: &mut SyncReport) {
        let want: BTreeSet<u32> = desired.node_addrs.iter().map(|a| addr_raw(*a)).collect();
        for &a in want.difference(&self.node_addrs.clone()) {
            match maps.set_node_addr(a) {
                Ok(()) => {
                    self.node_addrs.insert(a);
                    report.node_addrs_set += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
        for a in self.node_addrs.difference(&want).copied().collect::<Vec<_>>() {
            match maps.delete_node_addr(a) {
                Ok(()) => {
                    self.node_addrs.remove(&a);
                    report.node_addrs_deleted += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
    }

    /// Programs new and changed backends; returns every backend the desired state uses.
    fn sync_backends(&mut self, desired: &Desired, maps: &mut impl Maps, report: &mut SyncReport) -> BTreeSet<BeKey> {
        // One value per (addr, port); flags of all services using it are merged.
        let mut want: BTreeMap<BeKey, Backend> = BTreeMap::new();
        for ds in desired.services.values() {
            for b in &ds.backends {
                want.entry(be_key(b))
                    .and_modify(|v| v.flags |= b.flags)
                    .or_insert(Backend { pad: 0, ..*b });
            }
        }
        for (&key, value) in &want {
            match self.backends.get_mut(&key) {
                Some(st) if st.value == *value => {}
                Some(st) => match maps.set_backend(st.id, value) {
                    Ok(()) => {
                        st.value = *value;
                        report.backends_set += 1;
                    }
                    Err(e) => report.errors.push(e),
                },
                None => {
                    let Some(id) = self.be_ids.alloc() else {
                        report.errors.push(Error::BackendIdsExhausted {
                            backend: be_name(key),
                            max: self.be_ids.limit.saturating_sub(1),
                        });
                        continue;
                    };
                    match maps.set_backend(id, value) {
                        Ok(()) => {
                            self.backends.insert(key, BeState { id, value: *value });
                            report.backends_set += 1;
                        }
                        Err(e) => {
                            self.be_ids.release(id);
                            report.errors.push(e);
                        }
                    }
                }
            }
        }
        want.into_keys().collect()
    }

    fn sync_service(
        &mut self,
        id: &ServicePortId,
        ds: &crate::model::DesiredService,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) -> Result<()> {
        // Sorted by (addr, port); one entry per (addr, port) even if flags differ.
        let mut keys: Vec<BeKey> = ds.backends.iter().map(be_key).collect();
        keys.dedup();
        let ids: Vec<u32> = keys
            .iter()
            .map(|k| {
                self.backends.get(k).map(|b| b.id).ok_or_else(|| Error::BackendUnavailable {
                    backend: be_name(*k),
                })
            })
            .collect::<Result<_>>()?;

        let existing = self.services.get(id);
        let need_table = existing.is_none_or(|s| s.table_keys() != keys.as_slice());

        // Step 1: write the new table aside.
        let new_table: Option<Option<Table>> = if !need_table {
            None
        } else if keys.is_empty() {
            Some(None)
        } else {
            let size = maglev::table_size(keys.len());
            let region = self.regions.alloc(size).ok_or(Error::MaglevFull {
                service: id.to_string(),
                size,
                total: self.maglev_slots,
            })?;
            let names: Vec<String> = keys.iter().map(|k| be_name(*k)).collect();
            let name_refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
            let slots: Vec<u32> = maglev::build(&name_refs, size)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            if let Err(e) = maps.write_slots(region.offset, &slots) {
                self.regions.free(region); // never referenced
                return Err(e);
            }
            report.tables_written += 1;
            report.slots_written += u64::from(size);
            Some(Some(Table { region, backends: keys }))
        };

        let mut st = match self.services.remove(id) {
            Some(st) => st,
            None => {
                let Some(svc_id) = self.svc_ids.alloc() else {
                    if let Some(Some(t)) = new_table {
                        self.regions.free(t.region);
                    }
                    return Err(Error::ServiceIdsExhausted {
                        service: id.to_string(),
                    });
                };
                SvcState {
                    svc_id,
                    table: None,
                    stale: Vec::new(),
                    frontends: BTreeMap::new(),
                }
            }
        };
        if let Some(t) = new_table {
            if let Some(old) = std::mem::replace(&mut st.table, t) {
                st.stale.push(old);
            }
        }

        // Step 2: flip the frontends whose value changed.
        let region = st.table.as_ref().map(|t| t.region);
        let value = Service {
            table_off: region.map_or(0, |r| r.offset),
            table_size: region.map_or(0, |r| r.size),
            svc_id: st.svc_id,
            flags: ds.flags,
            pad: 0,
            affinity_timeout_s: ds.affinity_timeout_s,
            pad2: 0,
        };
        for fe in &ds.frontends {
            if st.frontends.get(fe) == Some(&value) {
                continue;
            }
            match maps.set_service(fe, &value) {
                Ok(()) => {
                    report.services_set += 1;
                    st.frontends.insert(*fe, value);
                    // A frontend taken over from another service port: that one no longer
                    // programs it (and must not delete it).
                    if let Some(prev) = self.fe_owner.insert(*fe, id.clone()) {
                        if prev != *id {
                            if let Some(p) = self.services.get_mut(&prev) {
                                p.frontends.remove(fe);
                            }
                        }
                    }
                }
                Err(e) => report.errors.push(Error::Service {
                    service: id.to_string(),
                    source: Box::new(Error::Frontend {
                        frontend: describe_frontend(fe),
                        source: Box::new(e),
                    }),
                }),
            }
        }
        self.services.insert(id.clone(), st);
        Ok(())
    }

    /// Deletes frontends that are no longer desired, forgets services that are gone, and
    /// frees the tables nothing points at any more.
    fn delete_frontends(&mut self, desired: &Desired, maps: &mut impl Maps, report: &mut SyncReport) {
        let ids: Vec<ServicePortId> = self.services.keys().cloned().collect();
        for id in ids {
            let Some(mut st) = self.services.remove(&id) else {
                continue;
            };
            let want = desired.services.get(&id).map(|d| &d.frontends);
            let gone: Vec<FrontendKey> = st
                .frontends
                .keys()
                .filter(|fe| want.is_none_or(|w| !w.contains(fe)))
                .copied()
                .collect();
            for fe in gone {
                match maps.delete_service(&fe) {
                    Ok(()) => {
                        st.frontends.remove(&fe);
                        self.fe_owner.remove(&fe);
                        report.services_deleted += 1;
                    }
                    Err(e) => report.errors.push(Error::Service {
                        service: id.to_string(),
                        source: Box::new(Error::Frontend {
                            frontend: describe_frontend(&fe),
                            source: Box::new(e),
                        }),
                    }),
                }
            }
            // Tables no frontend points at any more.
            let (keep, free): (Vec<Table>, Vec<Table>) = std::mem::take(&mut st.stale)
                .into_iter()
                .partition(|t| st.references(t.region));
            st.stale = keep;
            self.regions.quarantine.extend(free.into_iter().map(|t| t.region));

            if want.is_none() && st.frontends.is_empty() {
                if let Some(t) = st.table.take() {
                    self.regions.quarantine.push(t.region);
                }
                self.regions.quarantine.extend(st.stale.drain(..).map(|t| t.region));
                self.svc_ids.retire(st.svc_id);
            } else {
                self.services.insert(id, st);
            }
        }
    }

    /// Deletes backends that neither the desired state nor a table still in use references.
    fn delete_backends(&mut self, wanted: &BTreeSet<BeKey>, maps: &mut impl Maps, report: &mut SyncReport) {
        let mut referenced = wanted.clone();
        for st in self.services.values() {
            for t in st.table.iter().chain(&st.stale) {
                referenced.extend(t.backends.iter().copied());
            }
        }
        let unused: Vec<BeKey> = self
            .backends
            .keys()
            .filter(|k| !referenced.contains(k))
            .copied()
            .collect();
        for key in unused {
            let Some(st) = self.backends.get(&key).copied() else {
                continue;
            };
            match maps.delete_backend(st.id) {
                Ok(()) => {
                    self.backends.remove(&key);
                    self.be_ids.retire(st.id);
                    report.backends_deleted += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
    }

    /// The backend id of `addr:port` (raw network order), if programmed.
    pub fn backend_id(&self, addr: u32, port: u16) -> Option<u32> {
        self.backends.get(&(addr, port)).map(|b| b.id)
    }

    /// The `svc_id` of a service port, if programmed.
    pub fn svc_id(&self, id: &ServicePortId) -> Option<u32> {
        self.services.get(id).map(|s| s.svc_id)
    }

    /// The current table region of a service port (`None`: not programmed, or no backend).
    pub fn table(&self, id: &ServicePortId) -> Option<Region> {
        self.services.get(id)?.table.as_ref().map(|t| t.region)
    }

    /// Counts of the programmed state.
    pub fn state_summary(&self) -> StateSummary {
        let tables: Vec<&Table> = self
            .services
            .values()
            .flat_map(|s| s.table.iter().chain(&s.stale))
            .collect();
        StateSummary {
            node_addrs: self.node_addrs.len(),
            services: self.services.len(),
            frontends: self.services.values().map(|s| s.frontends.len()).sum(),
            backends: self.backends.len(),
            tables: tables.len(),
            slots_used: tables.iter().map(|t| t.region.size).sum(),
            slots_free: self.regions.free_slots(),
            slots_quarantined: self.regions.quarantined_slots(),
        }
    }
}
