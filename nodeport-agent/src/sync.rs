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

use nodeport_common::{
    Backend, Backend6, FrontendKey, FrontendKey6, Ip6, Service, BACKEND_NONE, BE_F_DRAINING,
};

use crate::error::{Error, Result};
use crate::family::{endpoint_name, Family, IpCidr};
use crate::maglev;
use crate::model::{
    describe_frontend, Changes, Desired, DesiredFamily, DesiredService, ServicePortId,
};

/// Writes to the datapath maps. Every method is one map operation (or, for
/// [`Maps::write_slots`], one range of the NP_MAGLEV array); none of them may leave a map
/// half-updated for a single key. The `*6` methods are the same for the IPv6 maps; backend
/// ids are one space over NP_BE and NP_BE6 (an id is in use in one of them at a time).
pub trait Maps {
    /// NP_BE: insert or replace backend `id`.
    fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()>;
    /// NP_BE: remove backend `id`.
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    /// NP_BE6: insert or replace backend `id`.
    fn set_backend6(&mut self, id: u32, be: &Backend6) -> Result<()>;
    /// NP_BE6: remove backend `id`.
    fn delete_backend6(&mut self, id: u32) -> Result<()>;
    /// NP_MAGLEV: write `ids` to slots `offset..offset + ids.len()`.
    fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()>;
    /// NP_SVC: insert or replace a frontend.
    fn set_service(&mut self, key: &FrontendKey, val: &Service) -> Result<()>;
    /// NP_SVC: remove a frontend.
    fn delete_service(&mut self, key: &FrontendKey) -> Result<()>;
    /// NP_SVC6: insert or replace a frontend.
    fn set_service6(&mut self, key: &FrontendKey6, val: &Service) -> Result<()>;
    /// NP_SVC6: remove a frontend.
    fn delete_service6(&mut self, key: &FrontendKey6) -> Result<()>;
    /// NP_NODEADDR: add an address of this node (raw network order).
    fn set_node_addr(&mut self, addr: u32) -> Result<()>;
    /// NP_NODEADDR: remove an address of this node.
    fn delete_node_addr(&mut self, addr: u32) -> Result<()>;
    /// NP_NODEADDR6: add an address of this node (raw network order).
    fn set_node_addr6(&mut self, addr: Ip6) -> Result<()>;
    /// NP_NODEADDR6: remove an address of this node.
    fn delete_node_addr6(&mut self, addr: Ip6) -> Result<()>;
    /// NP_SRCRANGE (an IPv4 `cidr`) or NP_SRCRANGE6 (IPv6): allow `cidr` on the
    /// LoadBalancer ingress IP frontends of `svc_id`.
    fn set_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()>;
    /// NP_SRCRANGE or NP_SRCRANGE6: remove an allowed range.
    fn delete_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()>;
    /// NP_MAGLEV: read slots `offset..offset + len`; `None` when they cannot be read (the
    /// default). Only used after [`Reconciler::restore`]: a table found in the maps that is
    /// exactly the one the desired state needs is then adopted instead of written again.
    fn read_slots(&mut self, offset: u32, len: u32) -> Option<Vec<u32>> {
        let _ = (offset, len);
        None
    }
}

/// What the pinned maps held when the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapSnapshot {
    /// NP_NODEADDR keys.
    pub node_addrs: Vec<u32>,
    /// NP_BE: backend id and value (ids holding all zero left out).
    pub backends: Vec<(u32, Backend)>,
    /// NP_SVC: frontend and value.
    pub services: Vec<(FrontendKey, Service)>,
    /// NP_NODEADDR6 keys.
    pub node_addrs6: Vec<Ip6>,
    /// NP_BE6: backend id and value (ids holding all zero left out).
    pub backends6: Vec<(u32, Backend6)>,
    /// NP_SVC6: frontend and value.
    pub services6: Vec<(FrontendKey6, Service)>,
    /// NP_SRCRANGE and NP_SRCRANGE6: service id and allowed range.
    pub src_ranges: Vec<(u32, IpCidr)>,
}

impl MapSnapshot {
    /// Whether the maps held nothing the reconciler adopts.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
            && self.services.is_empty()
            && self.backends6.is_empty()
            && self.services6.is_empty()
            && self.src_ranges.is_empty()
    }
}

/// What differs between the families for the reconciler: which maps (through [`Maps`]),
/// which part of [`Desired`] and of the snapshot, which state. Everything else is written
/// once, generic over this.
trait SyncAddr: DesiredFamily {
    fn set_backend(maps: &mut impl Maps, id: u32, be: &Backend<Self>) -> Result<()>;
    fn delete_backend(maps: &mut impl Maps, id: u32) -> Result<()>;
    fn set_service(maps: &mut impl Maps, key: &FrontendKey<Self>, val: &Service) -> Result<()>;
    fn delete_service(maps: &mut impl Maps, key: &FrontendKey<Self>) -> Result<()>;
    fn set_node_addr(maps: &mut impl Maps, addr: Self) -> Result<()>;
    fn delete_node_addr(maps: &mut impl Maps, addr: Self) -> Result<()>;
    /// The snapshot's (node addresses, backends, frontends) of this family.
    #[expect(clippy::type_complexity, reason = "three plain slices of the snapshot")]
    fn snapshot(
        snap: &MapSnapshot,
    ) -> (
        &[Self],
        &[(u32, Backend<Self>)],
        &[(FrontendKey<Self>, Service)],
    );
}

impl SyncAddr for u32 {
    fn set_backend(maps: &mut impl Maps, id: u32, be: &Backend) -> Result<()> {
        maps.set_backend(id, be)
    }
    fn delete_backend(maps: &mut impl Maps, id: u32) -> Result<()> {
        maps.delete_backend(id)
    }
    fn set_service(maps: &mut impl Maps, key: &FrontendKey, val: &Service) -> Result<()> {
        maps.set_service(key, val)
    }
    fn delete_service(maps: &mut impl Maps, key: &FrontendKey) -> Result<()> {
        maps.delete_service(key)
    }
    fn set_node_addr(maps: &mut impl Maps, addr: u32) -> Result<()> {
        maps.set_node_addr(addr)
    }
    fn delete_node_addr(maps: &mut impl Maps, addr: u32) -> Result<()> {
        maps.delete_node_addr(addr)
    }
    fn snapshot(snap: &MapSnapshot) -> (&[u32], &[(u32, Backend)], &[(FrontendKey, Service)]) {
        (&snap.node_addrs, &snap.backends, &snap.services)
    }
}

impl SyncAddr for Ip6 {
    fn set_backend(maps: &mut impl Maps, id: u32, be: &Backend6) -> Result<()> {
        maps.set_backend6(id, be)
    }
    fn delete_backend(maps: &mut impl Maps, id: u32) -> Result<()> {
        maps.delete_backend6(id)
    }
    fn set_service(maps: &mut impl Maps, key: &FrontendKey6, val: &Service) -> Result<()> {
        maps.set_service6(key, val)
    }
    fn delete_service(maps: &mut impl Maps, key: &FrontendKey6) -> Result<()> {
        maps.delete_service6(key)
    }
    fn set_node_addr(maps: &mut impl Maps, addr: Ip6) -> Result<()> {
        maps.set_node_addr6(addr)
    }
    fn delete_node_addr(maps: &mut impl Maps, addr: Ip6) -> Result<()> {
        maps.delete_node_addr6(addr)
    }
    fn snapshot(snap: &MapSnapshot) -> (&[Ip6], &[(u32, Backend6)], &[(FrontendKey6, Service)]) {
        (&snap.node_addrs6, &snap.backends6, &snap.services6)
    }
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

    /// Marks `r` used, whatever part of it is free now (after a restore). `r` must lie
    /// within `[0, total)`.
    fn reserve(&mut self, r: Region) {
        let (start, end) = (u64::from(r.offset), u64::from(r.offset) + u64::from(r.size));
        let before = self
            .free
            .range(..r.offset)
            .next_back()
            .map(|(&o, &l)| (o, l));
        let overlapping: Vec<(u32, u32)> = before
            .into_iter()
            .chain(self.free.range(r.offset..).map(|(&o, &l)| (o, l)))
            .take_while(|&(o, _)| u64::from(o) < end)
            .filter(|&(o, l)| u64::from(o) + u64::from(l) > start)
            .collect();
        for (o, l) in overlapping {
            self.free.remove(&o);
            let o_end = u64::from(o) + u64::from(l);
            if u64::from(o) < start {
                self.free.insert(o, (start - u64::from(o)) as u32);
            }
            if o_end > end {
                self.free.insert(end as u32, (o_end - end) as u32);
            }
        }
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
    /// Every id from `next` on is free, except the reserved ones.
    next: u32,
    limit: u32,
    free: BTreeSet<u32>,
    quarantine: Vec<u32>,
    /// Ids found in use by a restore: never handed out from `next`; they come back through
    /// `free` once retired.
    reserved: BTreeSet<u32>,
}

impl IdPool {
    fn new(limit: u32) -> Self {
        Self {
            next: 1,
            limit,
            free: BTreeSet::new(),
            quarantine: Vec::new(),
            reserved: BTreeSet::new(),
        }
    }

    fn in_range(&self, id: u32) -> bool {
        id != 0 && id < self.limit
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if !self.reserved.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Marks an id found in the maps as used (before any allocation).
    fn reserve(&mut self, id: u32) {
        if self.in_range(id) && id >= self.next {
            self.reserved.insert(id);
        }
    }

    /// Back to the pool at once: the id was never visible to the datapath.
    fn release(&mut self, id: u32) {
        if self.in_range(id) {
            self.free.insert(id);
        }
    }

    /// Back to the pool at the next apply.
    fn retire(&mut self, id: u32) {
        self.quarantine.push(id);
    }

    fn release_quarantine(&mut self) {
        let limit = self.limit;
        self.free.extend(
            self.quarantine
                .drain(..)
                .filter(|&id| id != 0 && id < limit),
        );
    }
}

/// A backend as the reconciler knows it: (address, port), raw network order.
type BeKey<A> = (A, u16);

/// The flags of a backend that two services list: `BE_F_LOCAL` if either has it,
/// `BE_F_DRAINING` only if both have it.
fn merge_be_flags(a: u8, b: u8) -> u8 {
    ((a | b) & !BE_F_DRAINING) | (a & b & BE_F_DRAINING)
}

fn be_key<A: SyncAddr>(b: &Backend<A>) -> BeKey<A> {
    (b.addr, b.port)
}

/// `10.0.0.1:80`, `[2001:db8::1]:80`: also what the Maglev permutation of a backend hashes.
fn be_name<A: SyncAddr>((addr, port): BeKey<A>) -> String {
    endpoint_name(addr, port)
}

/// A Maglev table written to NP_MAGLEV.
#[derive(Clone, Debug)]
struct Table<A> {
    region: Region,
    /// The backends it was built from, sorted.
    backends: Vec<BeKey<A>>,
}

/// What is programmed for one service port.
#[derive(Clone, Debug)]
struct SvcState<A: SyncAddr> {
    svc_id: u32,
    /// The latest table, the one frontends are flipped to; `None` when the service has no
    /// backend (its frontends carry `table_size == 0`).
    table: Option<Table<A>>,
    /// Older tables that some frontend may still point at (a flip or delete failed).
    stale: Vec<Table<A>>,
    /// The value programmed under each frontend of this service.
    frontends: BTreeMap<FrontendKey<A>, Service>,
}

impl<A: SyncAddr> SvcState<A> {
    fn table_keys(&self) -> &[BeKey<A>] {
        self.table.as_ref().map_or(&[], |t| t.backends.as_slice())
    }
}

/// The NP_MAGLEV slots of a table of `size` over `keys` (sorted), whose NP_BE ids are `ids`.
fn build_table<A: SyncAddr>(keys: &[BeKey<A>], ids: &[u32], size: u32) -> Vec<u32> {
    let names: Vec<String> = keys.iter().map(|k| be_name(*k)).collect();
    let name_refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    maglev::build(&name_refs, size)
        .into_iter()
        .map(|i| ids[i as usize])
        .collect()
}

/// The NP_SVC value of frontend `fe` of a service port programmed as `st`, wanting `ds`.
/// Source ranges apply to LoadBalancer IPs only ([`DesiredService::frontend_flags`]).
fn service_value<A: SyncAddr>(
    st: &SvcState<A>,
    ds: &DesiredService<A>,
    fe: &FrontendKey<A>,
) -> Service {
    let region = st.table.as_ref().map(|t| t.region);
    let flags = ds.frontend_flags(fe);
    Service {
        table_off: region.map_or(0, |r| r.offset),
        table_size: region.map_or(0, |r| r.size),
        svc_id: st.svc_id,
        flags,
        pad: 0,
        affinity_timeout_s: ds.affinity_timeout_s,
        pad2: 0,
    }
}

/// The table a frontend value points at (`None`: no table).
fn value_region(v: &Service) -> Option<Region> {
    (v.table_size != 0).then_some(Region {
        offset: v.table_off,
        size: v.table_size,
    })
}

/// NP_MAGLEV slots that no service port owns but some frontend may still point at: tables
/// found by [`Reconciler::restore`], or the table of a service port that is gone while a
/// frontend could not be moved off it. Freed once no frontend points into it.
#[derive(Clone, Debug)]
struct Orphan<A> {
    /// Reserved in the allocator (clipped to NP_MAGLEV); `None` when wholly outside it.
    block: Option<Region>,
    /// The `(table_off, table_size)` values found pointing into the block (several only when
    /// restored tables overlap).
    members: Vec<Region>,
    /// The backends its slots hold; `None`: unknown (found by a restore), which keeps every
    /// restored backend while the block is alive.
    backends: Option<Vec<BeKey<A>>>,
}

/// A backend programmed in NP_BE (NP_BE6).
#[derive(Clone, Copy, Debug)]
struct BeState<A: SyncAddr> {
    id: u32,
    value: Backend<A>,
    /// Found by a restore: a restored table of unknown contents may hold it.
    restored: bool,
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
    /// loadBalancerSourceRanges entries (NP_SRCRANGE, NP_SRCRANGE6).
    pub src_ranges_set: usize,
    pub src_ranges_deleted: usize,
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
            + self.src_ranges_set
            + self.src_ranges_deleted
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node addrs +{} -{}, backends +{} -{}, tables {} ({} slots), frontends +{} -{}, \
             source ranges +{} -{}, {} errors",
            self.node_addrs_set,
            self.node_addrs_deleted,
            self.backends_set,
            self.backends_deleted,
            self.tables_written,
            self.slots_written,
            self.services_set,
            self.services_deleted,
            self.src_ranges_set,
            self.src_ranges_deleted,
            self.errors.len()
        )
    }
}

/// Counts of the reconciler's state, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateSummary {
    pub node_addrs: usize,
    pub services: usize,
    /// Programmed frontends, restored ones not claimed yet included.
    pub frontends: usize,
    /// Backends in NP_BE, restored duplicates included.
    pub backends: usize,
    /// Tables in NP_MAGLEV, current and stale (restored ones included).
    pub tables: usize,
    pub slots_used: u32,
    pub slots_free: u32,
    /// Freed by the last apply, reusable at the next one.
    pub slots_quarantined: u32,
}

/// Programs [`Desired`] states into the maps, one difference at a time.
///
/// After an agent restart, [`Reconciler::restore`] adopts what the pinned maps hold (see
/// there), so that the established flows keep their backends.
///
/// The IPv4 and IPv6 service ports are reconciled the same way, each family into its own
/// maps, sharing NP_MAGLEV, the backend ids (one space over NP_BE and NP_BE6) and the
/// service ids.
#[derive(Clone, Debug)]
pub struct Reconciler {
    sh: Shared,
    v4: FamilyState<u32>,
    v6: FamilyState<Ip6>,
    /// The model and generation of the last [`Reconciler::apply_changes`].
    hinted: Option<(u64, u64)>,
}

/// What both families allocate from.
#[derive(Clone, Debug)]
struct Shared {
    maglev_slots: u32,
    regions: RegionAllocator,
    be_ids: IdPool,
    svc_ids: IdPool,
    /// Restored backend ids found in NP_BE and NP_BE6 both: IPv4 keeps the id, and IPv6
    /// deletes its entry without handing the id back.
    dup_be_ids: BTreeSet<u32>,
    /// Bumped whenever a service port takes or gives up a `svc_id`
    /// ([`Reconciler::names_generation`]).
    names_gen: u64,
}

/// What is programmed for the service ports of one family.
#[derive(Clone, Debug, Default)]
struct FamilyState<A: SyncAddr> {
    backends: BTreeMap<BeKey<A>, BeState<A>>,
    services: BTreeMap<ServicePortId, SvcState<A>>,
    /// Which service port each programmed frontend belongs to.
    fe_owner: BTreeMap<FrontendKey<A>, ServicePortId>,
    node_addrs: BTreeSet<A>,
    /// Restored frontends no service port has claimed yet, with their programmed value.
    orphans: BTreeMap<FrontendKey<A>, Service>,
    /// Tables no service port owns, by their first member.
    orphan_tables: BTreeMap<Region, Orphan<A>>,
    /// Restored backend ids whose (addr, port) another, lower id holds (or id 0).
    stale_ids: BTreeMap<u32, Backend<A>>,
    /// Restored `svc_id`s no service port has taken over yet.
    restored_svc_ids: BTreeSet<u32>,
    /// NP_SRCRANGE (NP_SRCRANGE6) as programmed: (svc_id, range).
    src_ranges: BTreeSet<(u32, IpCidr)>,
    /// The service ports of the last desired state (what `refs` counts).
    last: BTreeMap<ServicePortId, DesiredService<A>>,
    /// Per backend: its uses by `last` and by tables.
    refs: BTreeMap<BeKey<A>, BeRefs>,
    /// Wanted backends whose programmed value may be wrong (a write failed).
    be_retry: BTreeSet<BeKey<A>>,
    /// Backends that may be referenced by nothing any more (to delete).
    be_check: BTreeSet<BeKey<A>>,
    /// Service ports whose programmed state may differ from their desired one (a failure,
    /// a stale table, a frontend taken over by another port), or that are gone but still
    /// programmed: visited by every apply.
    unsettled: BTreeSet<ServicePortId>,
    /// Service ports that lost a frontend to another one during the current apply.
    taken: Vec<ServicePortId>,
    /// The next apply must visit everything (after a restore, until the restored leftovers
    /// are gone).
    full: bool,
    /// Tests: visit everything on every apply.
    #[cfg(test)]
    always_full: bool,
}

/// How one backend is used: by the desired service ports (with the flags they give it) and
/// by the tables programmed in NP_MAGLEV.
#[derive(Clone, Copy, Debug, Default)]
struct BeRefs {
    /// Entries in the desired services' backend sets.
    users: u32,
    /// Per `BE_F_*` bit, how many of those entries set it.
    bits: [u32; 8],
    /// Tables holding it: current and stale ones of service ports, orphans of known contents.
    tables: u32,
}

impl BeRefs {
    /// The flags of the programmed value: every bit some user sets.
    fn flags(&self) -> u8 {
        (0..8)
            .filter(|&b| self.bits[b] != 0)
            .fold(0, |f, b| f | (1 << b))
    }

    fn unused(&self) -> bool {
        self.users == 0 && self.tables == 0
    }
}

/// Whether a table built from `table` is the one `backends` need (one key per (addr, port),
/// sorted, as `FamilyState::sync_service` builds it).
fn same_keys<'a, A: SyncAddr>(
    table: &[BeKey<A>],
    backends: impl Iterator<Item = &'a Backend<A>>,
) -> bool {
    let mut want = backends.map(be_key);
    let mut prev = None;
    let mut i = 0;
    for k in want.by_ref() {
        if prev == Some(k) {
            continue;
        }
        prev = Some(k);
        if table.get(i) != Some(&k) {
            return false;
        }
        i += 1;
    }
    i == table.len()
}

impl Reconciler {
    /// A reconciler for empty maps: NP_MAGLEV of `maglev_slots` slots, NP_BE and NP_BE6
    /// holding ids `1..max_backends`.
    pub fn new(maglev_slots: u32, max_backends: u32) -> Self {
        Self {
            sh: Shared {
                maglev_slots,
                regions: RegionAllocator::new(maglev_slots),
                be_ids: IdPool::new(max_backends),
                svc_ids: IdPool::new(u32::MAX),
                dup_be_ids: BTreeSet::new(),
                names_gen: 0,
            },
            v4: FamilyState::default(),
            v6: FamilyState::default(),
            hinted: None,
        }
    }

    /// A reconciler that owns what `snap` describes, read from the pinned maps after an
    /// agent restart (an empty snapshot gives [`Reconciler::new`]). It makes no map call;
    /// nothing is deleted before the first [`Reconciler::apply`], which then brings the maps
    /// to exactly the desired state:
    ///
    /// - every backend keeps its NP_BE id (conntrack entries check that NP_BE[id] still
    ///   holds the address they were bound to); the ids are never handed out to another
    ///   backend while they exist. Should two ids hold the same (addr, port), the lowest is
    ///   kept and the other deleted once no restored table may hold it;
    /// - every restored frontend is kept until a service port claims it (the first apply
    ///   re-points it to the port's table, or leaves it alone when its value is already
    ///   right) or the first apply deletes it, not being desired;
    /// - a service port claiming restored frontends takes over their `svc_id`; the other
    ///   restored `svc_id`s are not handed out while some frontend carries them;
    /// - every region of NP_MAGLEV a restored frontend points at stays allocated until no
    ///   frontend points into it (then it is freed with the usual quarantine). Restored
    ///   tables are rewritten into fresh regions unless [`Maps::read_slots`] shows that a
    ///   table already is the one the desired backends need: it is then adopted as is.
    ///   Overlapping regions are reserved together; the parts outside NP_MAGLEV are ignored;
    /// - backends of restored tables are kept while such a table may still be in use;
    /// - node addresses: the first apply diffs against the restored set.
    ///
    /// Both families are restored the same way, each from its own maps. A backend id found
    /// in NP_BE and NP_BE6 both stays IPv4's; the IPv6 entry is deleted as a stale one.
    pub fn restore(maglev_slots: u32, max_backends: u32, snap: &MapSnapshot) -> Self {
        let mut r = Self::new(maglev_slots, max_backends);
        let v4_ids: BTreeSet<u32> = snap.backends.iter().map(|(id, _)| *id).collect();
        r.sh.dup_be_ids = snap
            .backends6
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| v4_ids.contains(id))
            .collect();
        r.v4.restore(&mut r.sh, snap, &BTreeSet::new());
        let dup = r.sh.dup_be_ids.clone();
        r.v6.restore(&mut r.sh, snap, &dup);
        r
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
    ///
    /// The cost is proportional to what changed: service ports whose [`DesiredService`]
    /// equals the one of the previous apply, and whose programming then succeeded, are
    /// skipped after one comparison each (the map calls are exactly those of a full pass).
    /// The first apply after a [`Reconciler::restore`] visits everything, and so do the
    /// following ones while restored leftovers (frontends, tables, ids) remain.
    ///
    /// Each family goes through these steps in turn, IPv4 first.
    pub fn apply(&mut self, desired: &Desired, maps: &mut impl Maps) -> SyncReport {
        self.hinted = None;
        self.apply_inner(desired, None, maps)
    }

    /// [`Reconciler::apply`] of the desired state of a [`Model`](crate::model::Model), with
    /// the [`Changes`] it reported since the state of the previous call: the service ports
    /// it does not list are not even compared. Changes that do not follow on from those of
    /// the previous call (another model, a generation skipped, a plain
    /// [`Reconciler::apply`] in between) are ignored: everything is compared then.
    pub fn apply_changes(
        &mut self,
        desired: &Desired,
        changes: &Changes,
        maps: &mut impl Maps,
    ) -> SyncReport {
        let follows = self.hinted == Some((changes.model, changes.from));
        self.hinted = Some((changes.model, changes.to));
        self.apply_inner(desired, follows.then_some(&changes.services), maps)
    }

    fn apply_inner(
        &mut self,
        desired: &Desired,
        hint: Option<&BTreeSet<ServicePortId>>,
        maps: &mut impl Maps,
    ) -> SyncReport {
        self.sh.regions.release_quarantine();
        self.sh.be_ids.release_quarantine();
        self.sh.svc_ids.release_quarantine();
        let mut report = SyncReport::default();
        self.v4
            .apply(&mut self.sh, desired, hint, maps, &mut report);
        self.v6
            .apply(&mut self.sh, desired, hint, maps, &mut report);
        report
    }

    /// Tests: visit every service port on every apply.
    #[cfg(test)]
    fn set_always_full(&mut self) {
        self.v4.always_full = true;
        self.v6.always_full = true;
    }
}

impl<A: SyncAddr> FamilyState<A> {
    /// [`Reconciler::restore`] for this family; ids in `foreign` belong to the other
    /// family: their entries here are stale. Each family reserves and later frees the
    /// NP_MAGLEV blocks its own restored frontends point at; the tables of the two
    /// families never overlap unless the pinned maps are corrupt.
    fn restore(&mut self, sh: &mut Shared, snap: &MapSnapshot, foreign: &BTreeSet<u32>) {
        let (node_addrs, backends, services) = A::snapshot(snap);
        let r = self;
        let maglev_slots = sh.maglev_slots;
        r.node_addrs = node_addrs.iter().copied().collect();
        r.src_ranges = snap
            .src_ranges
            .iter()
            .filter(|(_, c)| c.family() == A::FAMILY)
            .copied()
            .collect();
        // What the maps hold is not indexed yet: the first apply visits everything.
        r.full = !backends.is_empty() || !services.is_empty() || !r.src_ranges.is_empty();

        let mut by_id: BTreeMap<u32, Backend<A>> = BTreeMap::new();
        for (id, be) in backends {
            by_id.entry(*id).or_insert(*be);
        }
        for (id, value) in by_id {
            sh.be_ids.reserve(id);
            if id == BACKEND_NONE
                || foreign.contains(&id)
                || r.backends.contains_key(&be_key(&value))
            {
                r.stale_ids.insert(id, value);
            } else {
                r.backends.insert(
                    be_key(&value),
                    BeState {
                        id,
                        value,
                        restored: true,
                    },
                );
            }
        }

        for (fe, value) in services {
            r.orphans.entry(*fe).or_insert(*value);
        }
        for v in r.orphans.values() {
            sh.svc_ids.reserve(v.svc_id);
            if v.svc_id != 0 {
                r.restored_svc_ids.insert(v.svc_id);
            }
        }

        // Distinct tables, grouped into blocks of overlapping ones (sorted by offset).
        let tables: BTreeSet<Region> = r.orphans.values().filter_map(value_region).collect();
        let mut blocks: Vec<(u64, u64, Vec<Region>)> = Vec::new();
        for t in tables {
            let (start, end) = (u64::from(t.offset), u64::from(t.offset) + u64::from(t.size));
            match blocks.last_mut() {
                Some(last) if start < last.1 => {
                    last.1 = last.1.max(end);
                    last.2.push(t);
                }
                _ => blocks.push((start, end, vec![t])),
            }
        }
        let total = u64::from(maglev_slots);
        for (start, end, members) in blocks {
            let (start, end) = (start.min(total), end.min(total));
            let block = (start < end).then(|| Region {
                offset: start as u32,
                size: (end - start) as u32,
            });
            if let Some(b) = block {
                sh.regions.reserve(b);
            }
            r.orphan_tables.insert(
                members[0],
                Orphan {
                    block,
                    members,
                    backends: None,
                },
            );
        }
    }

    /// One apply of this family (the quarantines were released by the caller).
    fn apply(
        &mut self,
        sh: &mut Shared,
        desired: &Desired,
        hint: Option<&BTreeSet<ServicePortId>>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        self.sync_node_addrs(desired, maps, report);
        if self.needs_full_pass() {
            let wanted_backends = self.sync_backends(sh, desired, maps, report);
            for (id, ds) in A::services(desired) {
                if let Err(e) = self.sync_service(sh, id, ds, maps, report) {
                    report.errors.push(Error::Service {
                        service: id.to_string(),
                        source: Box::new(e),
                    });
                }
            }
            self.delete_frontends(sh, desired, maps, report);
            self.delete_backends(sh, &wanted_backends, maps, report);
            self.reindex(desired);
        } else {
            self.apply_incremental(sh, desired, hint, maps, report);
        }
    }

    /// Whether the next apply must visit every service port and backend: restored state
    /// that the incremental pass does not track is left.
    fn needs_full_pass(&self) -> bool {
        #[cfg(test)]
        if self.always_full {
            return true;
        }
        self.full
            || !self.orphans.is_empty()
            || !self.orphan_tables.is_empty()
            || !self.stale_ids.is_empty()
            || !self.restored_svc_ids.is_empty()
    }

    /// Rebuilds what [`Reconciler::apply_changes`] relies on after a full pass.
    fn reindex(&mut self, desired: &Desired) {
        self.taken.clear();
        self.last = A::services(desired).clone();
        self.refs.clear();
        for ds in A::services(desired).values() {
            for b in &ds.backends {
                let r = self.refs.entry(be_key(b)).or_default();
                r.users += 1;
                for bit in 0..8 {
                    r.bits[bit] += u32::from(b.flags >> bit & 1);
                }
            }
        }
        let mut held: Vec<BeKey<A>> = Vec::new();
        for st in self.services.values() {
            for t in st.table.iter().chain(&st.stale) {
                held.extend_from_slice(&t.backends);
            }
        }
        for o in self.orphan_tables.values() {
            held.extend(o.backends.iter().flatten().copied());
        }
        for k in held {
            self.refs.entry(k).or_default().tables += 1;
        }
        self.be_retry = self
            .refs
            .iter()
            .filter(|(k, r)| {
                r.users > 0
                    && self.backends.get(k).map(|b| b.value)
                        != Some(Backend {
                            addr: k.0,
                            port: k.1,
                            flags: r.flags(),
                            pad: 0,
                        })
            })
            .map(|(k, _)| *k)
            .collect();
        self.be_check = self
            .backends
            .keys()
            .filter(|k| self.refs.get(k).is_none_or(BeRefs::unused))
            .copied()
            .collect();
        self.refs.retain(|_, r| !r.unused());
        let ids: BTreeSet<&ServicePortId> = A::services(desired)
            .keys()
            .chain(self.services.keys())
            .collect();
        self.unsettled = ids
            .into_iter()
            .filter(|id| !self.settled(id, desired))
            .cloned()
            .collect();
        // Restored frontends may point at another port's table (one that was adopted): the
        // per-port bookkeeping of `apply_changes` holds only when every frontend points at a
        // table of its own port.
        self.full = self.services.values().any(|st| {
            st.frontends
                .values()
                .filter_map(value_region)
                .any(|r| !st.table.iter().chain(&st.stale).any(|t| t.region == r))
        });
    }

    /// Whether service port `id` is programmed exactly as `desired` wants (or is gone from
    /// both), so that a pass over it would make no map call.
    fn settled(&self, id: &ServicePortId, desired: &Desired) -> bool {
        let (ds, st) = match (A::services(desired).get(id), self.services.get(id)) {
            (None, None) => return true,
            (Some(ds), Some(st)) => (ds, st),
            _ => return false,
        };
        if !st.stale.is_empty() || !same_keys(st.table_keys(), ds.table_backends()) {
            return false;
        }
        st.frontends.len() == ds.frontends.len()
            && ds
                .frontends
                .iter()
                .all(|fe| st.frontends.get(fe) == Some(&service_value(st, ds, fe)))
            && self
                .ranges_of(st.svc_id)
                .eq(ds.source_ranges.iter().copied())
    }

    /// Counts a table's hold on its backends.
    fn hold(&mut self, keys: &[BeKey<A>]) {
        for k in keys {
            self.refs.entry(*k).or_default().tables += 1;
        }
    }

    /// Releases a table's hold on its backends; those no longer used are checked for
    /// deletion at the end of the apply.
    fn unhold(&mut self, keys: &[BeKey<A>]) {
        for k in keys {
            if let Some(r) = self.refs.get_mut(k) {
                r.tables = r.tables.saturating_sub(1);
                if r.unused() {
                    self.be_check.insert(*k);
                }
            }
        }
    }

    /// A table no frontend points at any more: its region is reusable at the next apply.
    fn quarantine_table(&mut self, sh: &mut Shared, t: Table<A>) {
        self.unhold(&t.backends);
        sh.regions.quarantine.push(t.region);
    }

    /// The incremental apply: the same map calls as the full pass, in the same order, found
    /// by visiting only the service ports that changed or are not settled, and the backends
    /// whose uses changed.
    fn apply_incremental(
        &mut self,
        sh: &mut Shared,
        desired: &Desired,
        hint: Option<&BTreeSet<ServicePortId>>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        // 1. Service ports whose desired state differs from the last one: among those the
        //    hint lists, or else by a merge of the two sorted maps.
        let mut visit: BTreeSet<ServicePortId> = std::mem::take(&mut self.unsettled);
        let mut changed: Vec<ServicePortId> = Vec::new();
        if let Some(hint) = hint {
            changed.extend(
                hint.iter()
                    .filter(|id| A::services(desired).get(*id) != self.last.get(*id))
                    .cloned(),
            );
        } else {
            let mut old = self.last.iter().peekable();
            for (id, ds) in A::services(desired) {
                loop {
                    match old.peek() {
                        Some((oid, ods)) => match (*oid).cmp(id) {
                            std::cmp::Ordering::Less => {
                                changed.push((*oid).clone());
                                old.next();
                            }
                            std::cmp::Ordering::Equal => {
                                if *ods != ds {
                                    changed.push(id.clone());
                                }
                                old.next();
                                break;
                            }
                            std::cmp::Ordering::Greater => {
                                changed.push(id.clone());
                                break;
                            }
                        },
                        None => {
                            changed.push(id.clone());
                            break;
                        }
                    }
                }
            }
            changed.extend(old.map(|(id, _)| id.clone()));
        }

        // 2. Backend uses of the changed ports; then new and changed backends.
        let mut touched: BTreeSet<BeKey<A>> = std::mem::take(&mut self.be_retry);
        let empty = BTreeSet::new();
        for id in changed {
            let new = A::services(desired).get(&id);
            let old = self.last.get(&id);
            let new_be = new.map_or(&empty, |d| &d.backends);
            let old_be = old.map_or(&empty, |d| &d.backends);
            for b in old_be.difference(new_be) {
                let k = be_key(b);
                if let Some(r) = self.refs.get_mut(&k) {
                    r.users -= 1;
                    for bit in 0..8 {
                        r.bits[bit] -= u32::from(b.flags >> bit & 1);
                    }
                    touched.insert(k);
                    if r.unused() {
                        self.be_check.insert(k);
                    }
                }
            }
            for b in new_be.difference(old_be) {
                let r = self.refs.entry(be_key(b)).or_default();
                r.users += 1;
                for bit in 0..8 {
                    r.bits[bit] += u32::from(b.flags >> bit & 1);
                }
                touched.insert(be_key(b));
            }
            match new {
                Some(ds) => {
                    self.last.insert(id.clone(), ds.clone());
                }
                None => {
                    self.last.remove(&id);
                }
            }
            visit.insert(id);
        }
        for key in touched {
            let Some(r) = self.refs.get(&key) else {
                continue;
            };
            if r.users == 0 {
                continue;
            }
            let value = Backend::<A> {
                addr: key.0,
                port: key.1,
                flags: r.flags(),
                pad: 0,
            };
            if !self.set_backend(sh, key, &value, maps, report) {
                self.be_retry.insert(key);
            }
        }

        // 3. The visited service ports, in order. A port that loses a frontend to another
        //    one is visited too (later in this apply if it comes later, as the full pass).
        let mut cursor: Option<ServicePortId> = None;
        loop {
            let next = match &cursor {
                None => visit.first(),
                Some(c) => visit
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next(),
            };
            let Some(id) = next.cloned() else { break };
            if let Some(ds) = A::services(desired).get(&id) {
                if let Err(e) = self.sync_service(sh, &id, ds, maps, report) {
                    report.errors.push(Error::Service {
                        service: id.to_string(),
                        source: Box::new(e),
                    });
                }
            }
            for prev in std::mem::take(&mut self.taken) {
                visit.insert(prev);
            }
            cursor = Some(id);
        }

        // 4. Frontends no longer desired, service ports that are gone, tables nothing points
        //    at any more (a frontend only ever points at a table of its own port here).
        for id in &visit {
            let Some(mut st) = self.services.remove(id) else {
                continue;
            };
            let want = A::services(desired).get(id).map(|d| &d.frontends);
            self.delete_gone_frontends(id, &mut st, want, maps, report);
            if want.is_none() && st.frontends.is_empty() {
                for t in st.table.take().into_iter().chain(st.stale.drain(..)) {
                    self.quarantine_table(sh, t);
                }
                self.retire_svc_id(sh, st.svc_id, Some(id), maps, report);
                continue;
            }
            if !st.stale.is_empty() {
                let (keep, free): (Vec<Table<A>>, Vec<Table<A>>) =
                    std::mem::take(&mut st.stale).into_iter().partition(|t| {
                        st.frontends
                            .values()
                            .any(|v| value_region(v) == Some(t.region))
                    });
                st.stale = keep;
                for t in free {
                    self.quarantine_table(sh, t);
                }
            }
            self.services.insert(id.clone(), st);
        }

        // 5. Backends nothing uses any more.
        for key in std::mem::take(&mut self.be_check) {
            if !self.refs.get(&key).is_none_or(BeRefs::unused) {
                continue;
            }
            if let Some(st) = self.backends.get(&key).copied() {
                match A::delete_backend(maps, st.id) {
                    Ok(()) => {
                        self.backends.remove(&key);
                        sh.be_ids.retire(st.id);
                        report.backends_deleted += 1;
                    }
                    Err(e) => {
                        report.errors.push(e);
                        self.be_check.insert(key);
                        continue;
                    }
                }
            }
            self.refs.remove(&key);
        }

        // 6. What the next apply must visit again.
        for id in visit {
            if !self.settled(&id, desired) {
                self.unsettled.insert(id);
            }
        }
        debug_assert!(
            self.last == *A::services(desired),
            "the changes given to apply_changes missed some"
        );
    }

    fn sync_node_addrs(
        &mut self,
        desired: &Desired,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        let want: BTreeSet<A> = desired
            .node_addrs
            .iter()
            .filter_map(|a| A::from_ip(*a))
            .collect();
        for &a in want.difference(&self.node_addrs.clone()) {
            match A::set_node_addr(maps, a) {
                Ok(()) => {
                    self.node_addrs.insert(a);
                    report.node_addrs_set += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
        for a in self
            .node_addrs
            .difference(&want)
            .copied()
            .collect::<Vec<_>>()
        {
            match A::delete_node_addr(maps, a) {
                Ok(()) => {
                    self.node_addrs.remove(&a);
                    report.node_addrs_deleted += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
    }

    /// Programs new and changed backends; returns every backend the desired state uses.
    fn sync_backends(
        &mut self,
        sh: &mut Shared,
        desired: &Desired,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) -> BTreeSet<BeKey<A>> {
        // One value per (addr, port); flags of all services using it are merged: local
        // if any says so, draining only if all do (a backend one service still chooses
        // stays a sticky choice for it).
        let mut want: BTreeMap<BeKey<A>, Backend<A>> = BTreeMap::new();
        for ds in A::services(desired).values() {
            for b in &ds.backends {
                want.entry(be_key(b))
                    .and_modify(|v| v.flags = merge_be_flags(v.flags, b.flags))
                    .or_insert(Backend { pad: 0, ..*b });
            }
        }
        for (&key, value) in &want {
            self.set_backend(sh, key, value, maps, report);
        }
        want.into_keys().collect()
    }

    /// Programs backend `key` with `value` unless it already holds it; false on failure.
    fn set_backend(
        &mut self,
        sh: &mut Shared,
        key: BeKey<A>,
        value: &Backend<A>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) -> bool {
        match self.backends.get_mut(&key) {
            Some(st) if st.value == *value => true,
            Some(st) => match A::set_backend(maps, st.id, value) {
                Ok(()) => {
                    st.value = *value;
                    report.backends_set += 1;
                    true
                }
                Err(e) => {
                    report.errors.push(e);
                    false
                }
            },
            None => {
                let Some(id) = sh.be_ids.alloc() else {
                    report.errors.push(Error::BackendIdsExhausted {
                        backend: be_name(key),
                        max: sh.be_ids.limit.saturating_sub(1),
                    });
                    return false;
                };
                match A::set_backend(maps, id, value) {
                    Ok(()) => {
                        self.backends.insert(
                            key,
                            BeState {
                                id,
                                value: *value,
                                restored: false,
                            },
                        );
                        report.backends_set += 1;
                        true
                    }
                    Err(e) => {
                        sh.be_ids.release(id);
                        report.errors.push(e);
                        false
                    }
                }
            }
        }
    }

    fn sync_service(
        &mut self,
        sh: &mut Shared,
        id: &ServicePortId,
        ds: &DesiredService<A>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) -> Result<()> {
        // Sorted by (addr, port); one entry per (addr, port) even if flags differ.
        let mut keys: Vec<BeKey<A>> = ds.table_backends().map(be_key).collect();
        keys.dedup();
        let ids: Vec<u32> = keys
            .iter()
            .map(|k| {
                self.backends
                    .get(k)
                    .map(|b| b.id)
                    .ok_or_else(|| Error::BackendUnavailable {
                        backend: be_name(*k),
                    })
            })
            .collect::<Result<_>>()?;

        let existing = self.services.get(id);
        let need_table = existing.is_none_or(|s| s.table_keys() != keys.as_slice());

        // Step 1: write the new table aside (or adopt a restored one that is right).
        let new_table: Option<Option<Table<A>>> = if !need_table {
            None
        } else if keys.is_empty() {
            Some(None)
        } else {
            let size = maglev::table_size(keys.len());
            let build = |keys: &[BeKey<A>]| build_table(keys, &ids, size);
            let candidates = if existing.is_none() {
                self.adoptable_tables(ds, size)
            } else {
                Vec::new()
            };
            let mut slots = None;
            let mut adopted = None;
            for r in candidates {
                let want = slots.get_or_insert_with(|| build(&keys));
                if maps.read_slots(r.offset, r.size).as_ref() == Some(want) {
                    self.orphan_tables.remove(&r);
                    adopted = Some(r);
                    break;
                }
            }
            let region = match adopted {
                Some(r) => r,
                None => {
                    let region = sh.regions.alloc(size).ok_or(Error::MaglevFull {
                        service: id.to_string(),
                        size,
                        total: sh.maglev_slots,
                    })?;
                    let slots = slots.unwrap_or_else(|| build(&keys));
                    if let Err(e) = maps.write_slots(region.offset, &slots) {
                        sh.regions.free(region); // never referenced
                        return Err(e);
                    }
                    report.tables_written += 1;
                    report.slots_written += u64::from(size);
                    region
                }
            };
            self.hold(&keys);
            Some(Some(Table {
                region,
                backends: keys,
            }))
        };

        let mut st = match self.services.remove(id) {
            Some(st) => st,
            None => {
                // Restored frontends of this port: keep their svc_id (the first one free).
                let restored_id = ds
                    .frontends
                    .iter()
                    .filter_map(|fe| self.orphans.get(fe))
                    .map(|v| v.svc_id)
                    .filter(|s| self.restored_svc_ids.contains(s))
                    .min();
                let svc_id = match restored_id {
                    Some(s) => {
                        self.restored_svc_ids.remove(&s);
                        Some(s)
                    }
                    None => sh.svc_ids.alloc(),
                };
                let Some(svc_id) = svc_id else {
                    if let Some(Some(t)) = new_table {
                        self.release_table(sh, t);
                    }
                    return Err(Error::ServiceIdsExhausted {
                        service: id.to_string(),
                    });
                };
                sh.names_gen += 1;
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
        // Claim the restored frontends this port wants, with the value they hold.
        if !self.orphans.is_empty() {
            for fe in &ds.frontends {
                if let Some(v) = self.orphans.remove(fe) {
                    st.frontends.insert(*fe, v);
                    self.fe_owner.insert(*fe, id.clone());
                }
            }
        }

        // Allowed source ranges go in before a frontend starts checking them.
        self.sync_src_ranges(st.svc_id, Some(id), &ds.source_ranges, true, maps, report);

        // Step 2: flip the frontends whose value changed.
        for fe in &ds.frontends {
            let value = service_value(&st, ds, fe);
            if st.frontends.get(fe) == Some(&value) {
                continue;
            }
            match A::set_service(maps, fe, &value) {
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
                            self.taken.push(prev);
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
        // Ranges no longer allowed go once the frontends carry their new value.
        self.sync_src_ranges(st.svc_id, Some(id), &ds.source_ranges, false, maps, report);
        self.services.insert(id.clone(), st);
        Ok(())
    }

    /// Restored tables of `size` slots that restored frontends of `ds` point at and that
    /// could be adopted whole (one table, wholly inside NP_MAGLEV).
    fn adoptable_tables(&self, ds: &DesiredService<A>, size: u32) -> Vec<Region> {
        if self.orphan_tables.is_empty() {
            return Vec::new();
        }
        let found: BTreeSet<Region> = ds
            .frontends
            .iter()
            .filter_map(|fe| self.orphans.get(fe).and_then(value_region))
            .filter(|r| r.size == size)
            .collect();
        found
            .into_iter()
            .filter(|r| {
                self.orphan_tables
                    .get(r)
                    .is_some_and(|o| o.block == Some(*r) && o.members == [*r])
            })
            .collect()
    }

    /// A table no frontend was pointed at: written aside (free it now) or adopted (back to
    /// the orphans, where it came from).
    fn release_table(&mut self, sh: &mut Shared, t: Table<A>) {
        match self
            .orphans
            .values()
            .any(|v| value_region(v) == Some(t.region))
        {
            true => {
                self.orphan_tables.insert(
                    t.region,
                    Orphan {
                        block: Some(t.region),
                        members: vec![t.region],
                        backends: Some(t.backends),
                    },
                );
            }
            false => {
                self.unhold(&t.backends);
                sh.regions.free(t.region);
            }
        }
    }

    /// Deletes frontends that are no longer desired, forgets services that are gone, and
    /// frees the tables nothing points at any more.
    fn delete_frontends(
        &mut self,
        sh: &mut Shared,
        desired: &Desired,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        // Tables of service ports that are gone, freed below unless still pointed at.
        let mut dropped: Vec<Table<A>> = Vec::new();
        let ids: Vec<ServicePortId> = self.services.keys().cloned().collect();
        for id in ids {
            let Some(mut st) = self.services.remove(&id) else {
                continue;
            };
            let want = A::services(desired).get(&id).map(|d| &d.frontends);
            self.delete_gone_frontends(&id, &mut st, want, maps, report);
            if want.is_none() && st.frontends.is_empty() {
                dropped.extend(st.table.take());
                dropped.append(&mut st.stale);
                self.retire_svc_id(sh, st.svc_id, Some(&id), maps, report);
            } else {
                self.services.insert(id, st);
            }
        }
        self.delete_orphans(desired, maps, report);

        // What frontends still point at.
        let mut live: BTreeSet<Region> = BTreeSet::new();
        let mut held_svc_ids: BTreeSet<u32> = BTreeSet::new();
        for v in self
            .services
            .values()
            .flat_map(|s| s.frontends.values())
            .chain(self.orphans.values())
        {
            live.extend(value_region(v));
            held_svc_ids.insert(v.svc_id);
        }

        // Tables no frontend points at any more.
        for st in self.services.values_mut() {
            let (keep, free): (Vec<Table<A>>, Vec<Table<A>>) = std::mem::take(&mut st.stale)
                .into_iter()
                .partition(|t| live.contains(&t.region));
            st.stale = keep;
            sh.regions
                .quarantine
                .extend(free.into_iter().map(|t| t.region));
        }
        for t in dropped {
            if live.contains(&t.region) {
                self.orphan_tables.insert(
                    t.region,
                    Orphan {
                        block: Some(t.region),
                        members: vec![t.region],
                        backends: Some(t.backends),
                    },
                );
            } else {
                sh.regions.quarantine.push(t.region);
            }
        }
        let unused: Vec<Region> = self
            .orphan_tables
            .iter()
            .filter(|(_, o)| !o.members.iter().any(|m| live.contains(m)))
            .map(|(k, _)| *k)
            .collect();
        for k in unused {
            if let Some(block) = self.orphan_tables.remove(&k).and_then(|o| o.block) {
                sh.regions.quarantine.push(block);
            }
        }

        // Restored svc_ids nothing carries any more.
        let released: Vec<u32> = self
            .restored_svc_ids
            .iter()
            .filter(|s| !held_svc_ids.contains(s))
            .copied()
            .collect();
        for s in released {
            self.restored_svc_ids.remove(&s);
            self.retire_svc_id(sh, s, None, maps, report);
        }
    }

    /// The ranges programmed for `svc_id`, in order.
    fn ranges_of(&self, svc_id: u32) -> impl Iterator<Item = IpCidr> + '_ {
        let lo = (svc_id, IpCidr::min_of(A::FAMILY));
        self.src_ranges
            .range(lo..)
            .take_while(move |(s, _)| *s == svc_id)
            .map(|(_, c)| *c)
    }

    /// Brings the NP_SRCRANGE entries of `svc_id` (of service port `owner`; `None`: a
    /// restored id no port took) to `want`: adds the missing ones and, unless `add_only`,
    /// deletes the others. Failures are reported, naming the port; the entry is retried at
    /// the next visit of the service port.
    fn sync_src_ranges(
        &mut self,
        svc_id: u32,
        owner: Option<&ServicePortId>,
        want: &BTreeSet<IpCidr>,
        add_only: bool,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        for c in want {
            if self.src_ranges.contains(&(svc_id, *c)) {
                continue;
            }
            match maps.set_src_range(svc_id, *c) {
                Ok(()) => {
                    self.src_ranges.insert((svc_id, *c));
                    report.src_ranges_set += 1;
                }
                Err(e) => report.errors.push(Error::SourceRange {
                    service: owner.map_or_else(|| "a restored service".into(), |o| o.to_string()),
                    svc_id,
                    range: c.to_string(),
                    source: Box::new(e),
                }),
            }
        }
        if add_only {
            return;
        }
        let extra: Vec<IpCidr> = self
            .ranges_of(svc_id)
            .filter(|c| !want.contains(c))
            .collect();
        for c in extra {
            match maps.delete_src_range(svc_id, c) {
                Ok(()) => {
                    self.src_ranges.remove(&(svc_id, c));
                    report.src_ranges_deleted += 1;
                }
                Err(e) => report.errors.push(Error::SourceRange {
                    service: owner.map_or_else(|| "a restored service".into(), |o| o.to_string()),
                    svc_id,
                    range: c.to_string(),
                    source: Box::new(e),
                }),
            }
        }
    }

    /// A service id no frontend carries any more: its source ranges go, and the id is
    /// quarantined before reuse.
    fn retire_svc_id(
        &mut self,
        sh: &mut Shared,
        svc_id: u32,
        owner: Option<&ServicePortId>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        self.sync_src_ranges(svc_id, owner, &BTreeSet::new(), false, maps, report);
        sh.svc_ids.retire(svc_id);
        sh.names_gen += 1;
    }

    /// Deletes the frontends of `st` that `want` (the port's desired frontends, `None` when
    /// the port is gone) does not list.
    fn delete_gone_frontends(
        &mut self,
        id: &ServicePortId,
        st: &mut SvcState<A>,
        want: Option<&BTreeSet<FrontendKey<A>>>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        let gone: Vec<FrontendKey<A>> = st
            .frontends
            .keys()
            .filter(|fe| want.is_none_or(|w| !w.contains(fe)))
            .copied()
            .collect();
        for fe in gone {
            match A::delete_service(maps, &fe) {
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
    }

    /// Deletes the restored frontends no desired service port wants. Those a service port
    /// wants but could not claim (its sync failed) stay as they are.
    fn delete_orphans(&mut self, desired: &Desired, maps: &mut impl Maps, report: &mut SyncReport) {
        if self.orphans.is_empty() {
            return;
        }
        let wanted: BTreeSet<&FrontendKey<A>> = A::services(desired)
            .values()
            .flat_map(|d| &d.frontends)
            .collect();
        let gone: Vec<FrontendKey<A>> = self
            .orphans
            .keys()
            .filter(|fe| !wanted.contains(fe))
            .copied()
            .collect();
        for fe in gone {
            match A::delete_service(maps, &fe) {
                Ok(()) => {
                    self.orphans.remove(&fe);
                    report.services_deleted += 1;
                }
                Err(e) => report.errors.push(Error::Frontend {
                    frontend: describe_frontend(&fe),
                    source: Box::new(e),
                }),
            }
        }
    }

    /// Deletes backends that neither the desired state nor a table still in use references.
    fn delete_backends(
        &mut self,
        sh: &mut Shared,
        wanted: &BTreeSet<BeKey<A>>,
        maps: &mut impl Maps,
        report: &mut SyncReport,
    ) {
        let mut referenced = wanted.clone();
        for st in self.services.values() {
            for t in st.table.iter().chain(&st.stale) {
                referenced.extend(t.backends.iter().copied());
            }
        }
        // A restored table of unknown contents may hold any restored backend.
        let mut unknown = false;
        for o in self.orphan_tables.values() {
            match &o.backends {
                Some(b) => referenced.extend(b.iter().copied()),
                None => unknown = true,
            }
        }
        let unused: Vec<BeKey<A>> = self
            .backends
            .iter()
            .filter(|(k, st)| {
                let kept = referenced.contains(k) || (unknown && st.restored);
                !kept
            })
            .map(|(k, _)| *k)
            .collect();
        for key in unused {
            let Some(st) = self.backends.get(&key).copied() else {
                continue;
            };
            match A::delete_backend(maps, st.id) {
                Ok(()) => {
                    self.backends.remove(&key);
                    sh.be_ids.retire(st.id);
                    report.backends_deleted += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
        if unknown {
            return;
        }
        for (id, value) in std::mem::take(&mut self.stale_ids) {
            match A::delete_backend(maps, id) {
                Ok(()) => {
                    // An id the other family holds too stays that family's.
                    if !sh.dup_be_ids.remove(&id) {
                        sh.be_ids.retire(id);
                    }
                    report.backends_deleted += 1;
                }
                Err(e) => {
                    self.stale_ids.insert(id, value);
                    report.errors.push(e);
                }
            }
        }
    }
}

impl Reconciler {
    /// The backend id of IPv4 backend `addr:port` (raw network order), if programmed.
    pub fn backend_id(&self, addr: u32, port: u16) -> Option<u32> {
        self.v4.backends.get(&(addr, port)).map(|b| b.id)
    }

    /// The backend id of IPv6 backend `addr:port` (raw network order), if programmed.
    #[cfg(test)]
    pub fn backend_id6(&self, addr: Ip6, port: u16) -> Option<u32> {
        self.v6.backends.get(&(addr, port)).map(|b| b.id)
    }

    /// The `svc_id` of a service port, if programmed.
    pub fn svc_id(&self, id: &ServicePortId) -> Option<u32> {
        match id.family {
            Family::V4 => self.v4.services.get(id).map(|s| s.svc_id),
            Family::V6 => self.v6.services.get(id).map(|s| s.svc_id),
        }
    }

    /// The programmed service ports by `svc_id`, named as [`ServicePortId`] displays them
    /// (`default/web:http/TCP`, `.../IPv6`): what `inspect` shows beside the ids.
    pub fn service_names(&self) -> BTreeMap<u32, String> {
        let v4 = self.v4.services.iter().map(|(id, s)| (s.svc_id, id));
        let v6 = self.v6.services.iter().map(|(id, s)| (s.svc_id, id));
        v4.chain(v6).map(|(s, id)| (s, id.to_string())).collect()
    }

    /// Changes whenever [`Reconciler::service_names`] may have: a service port took or gave
    /// up a `svc_id`.
    pub fn names_generation(&self) -> u64 {
        self.sh.names_gen
    }

    /// The current table region of a service port (`None`: not programmed, or no backend).
    pub fn table(&self, id: &ServicePortId) -> Option<Region> {
        match id.family {
            Family::V4 => self.v4.table(id),
            Family::V6 => self.v6.table(id),
        }
    }

    /// Backends held in NP_BE and NP_BE6 (what `state_summary().backends` counts), in O(1).
    pub fn backend_count(&self) -> usize {
        self.v4.backend_count() + self.v6.backend_count()
    }

    /// Counts of the programmed state, both families.
    pub fn state_summary(&self) -> StateSummary {
        let mut sum = StateSummary {
            slots_free: self.sh.regions.free_slots(),
            slots_quarantined: self.sh.regions.quarantined_slots(),
            ..StateSummary::default()
        };
        self.v4.add_summary(&mut sum);
        self.v6.add_summary(&mut sum);
        sum
    }
}

impl<A: SyncAddr> FamilyState<A> {
    fn table(&self, id: &ServicePortId) -> Option<Region> {
        self.services.get(id)?.table.as_ref().map(|t| t.region)
    }

    fn backend_count(&self) -> usize {
        self.backends.len() + self.stale_ids.len()
    }

    fn add_summary(&self, sum: &mut StateSummary) {
        let tables = || {
            self.services
                .values()
                .flat_map(|s| s.table.iter().chain(&s.stale))
        };
        let orphan_slots: u32 = self
            .orphan_tables
            .values()
            .filter_map(|o| o.block)
            .map(|b| b.size)
            .sum();
        sum.node_addrs += self.node_addrs.len();
        sum.services += self.services.len();
        sum.frontends += self
            .services
            .values()
            .map(|s| s.frontends.len())
            .sum::<usize>()
            + self.orphans.len();
        sum.backends += self.backend_count();
        sum.tables += tables().count() + self.orphan_tables.len();
        sum.slots_used += tables().map(|t| t.region.size).sum::<u32>() + orphan_slots;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use nodeport_common::{
        BACKEND_NONE, BE_F_LOCAL, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_SRC_RANGES,
    };

    use super::*;
    use crate::family::{addr6_raw, addr_raw};
    use crate::model::{DesiredService, DesiredService6, Protocol};

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        SetAddr(u32),
        DelAddr(u32),
        SetBackend(u32),
        DelBackend(u32),
        Slots(u32, u32),
        SetSvc(FrontendKey, Service),
        DelSvc(FrontendKey),
        SetAddr6(Ip6),
        DelAddr6(Ip6),
        SetBackend6(u32),
        DelBackend6(u32),
        SetSvc6(FrontendKey6, Service),
        DelSvc6(FrontendKey6),
    }

    impl Call {
        /// The phase of `apply` the call belongs to.
        fn phase(&self) -> u8 {
            match self {
                Call::SetAddr(_) | Call::DelAddr(_) | Call::SetAddr6(_) | Call::DelAddr6(_) => 0,
                Call::SetBackend(_) | Call::SetBackend6(_) => 1,
                Call::Slots(..) | Call::SetSvc(..) | Call::SetSvc6(..) => 2,
                Call::DelSvc(_) | Call::DelSvc6(_) => 3,
                Call::DelBackend(_) | Call::DelBackend6(_) => 4,
            }
        }

        /// The family of the maps the call writes (NP_MAGLEV: `None`).
        fn family(&self) -> Option<Family> {
            match self {
                Call::Slots(..) => None,
                Call::SetAddr(_)
                | Call::DelAddr(_)
                | Call::SetBackend(_)
                | Call::DelBackend(_)
                | Call::SetSvc(..)
                | Call::DelSvc(_) => Some(Family::V4),
                _ => Some(Family::V6),
            }
        }
    }

    /// In-memory maps that check the datapath's invariants on every call: a table is
    /// fully written (with existing backends) before a frontend points at it, a live
    /// table is never overwritten, and a backend is never deleted while a live table
    /// holds its id.
    ///
    /// The IPv6 maps check the same, and that backend ids are one space: an id is never
    /// in NP_BE and NP_BE6 at once, and a table only holds ids of its family's backends.
    struct FakeMaps {
        backends: BTreeMap<u32, Backend>,
        slots: Vec<u32>,
        services: BTreeMap<FrontendKey, Service>,
        node_addrs: BTreeSet<u32>,
        backends6: BTreeMap<u32, Backend6>,
        services6: BTreeMap<FrontendKey6, Service>,
        node_addrs6: BTreeSet<Ip6>,
        src_ranges: BTreeSet<(u32, IpCidr)>,
        calls: Vec<Call>,
        /// NP_SVC capacity.
        max_services: usize,
        /// Frontends whose `set_service` fails.
        broken: BTreeSet<FrontendKey>,
        /// Every `(offset, len)` ever passed to `write_slots`.
        written: BTreeSet<(u32, u32)>,
        /// Whether `read_slots` answers.
        readable: bool,
        /// Per mille of backend, table and frontend calls that fail (pseudo-random, seeded).
        fail_rate: u64,
        rng: u64,
    }

    impl FakeMaps {
        fn new(slots: u32) -> Self {
            Self {
                backends: BTreeMap::new(),
                slots: vec![BACKEND_NONE; slots as usize],
                services: BTreeMap::new(),
                node_addrs: BTreeSet::new(),
                backends6: BTreeMap::new(),
                services6: BTreeMap::new(),
                node_addrs6: BTreeSet::new(),
                src_ranges: BTreeSet::new(),
                calls: Vec::new(),
                max_services: usize::MAX,
                broken: BTreeSet::new(),
                written: BTreeSet::new(),
                readable: false,
                fail_rate: 0,
                rng: 0x9E37_79B9_7F4A_7C15,
            }
        }

        /// Whether the current call is an injected failure.
        fn fails(&mut self) -> bool {
            if self.fail_rate == 0 {
                return false;
            }
            self.rng = xorshift(self.rng);
            self.rng % 1000 < self.fail_rate
        }

        /// Slot ranges frontends (of both families) point at, clipped to the array.
        fn live_regions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
            self.live_regions_of(self.services.values().chain(self.services6.values()))
        }

        /// Slot ranges the frontend values `of` point at, clipped to the array.
        fn live_regions_of<'a>(
            &self,
            of: impl Iterator<Item = &'a Service> + 'a,
        ) -> impl Iterator<Item = (usize, usize)> + 'a {
            let len = self.slots.len();
            of.filter(|v| v.table_size != 0).map(move |v| {
                let off = v.table_off as usize;
                (off.min(len), (off + v.table_size as usize).min(len))
            })
        }

        /// What a restarted agent reads from the pinned maps.
        fn snapshot(&self) -> MapSnapshot {
            MapSnapshot {
                node_addrs: self.node_addrs.iter().copied().collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                node_addrs6: self.node_addrs6.iter().copied().collect(),
                backends6: self.backends6.iter().map(|(k, v)| (*k, *v)).collect(),
                services6: self.services6.iter().map(|(k, v)| (*k, *v)).collect(),
                src_ranges: self.src_ranges.iter().copied().collect(),
            }
        }

        /// A backend id may be deleted from the array of family `A`: no live table of
        /// that family holds it (tables hold ids of their family's backends only).
        fn check_unused<A: FakeFamily>(&self, id: u32) {
            for (start, end) in self.live_regions_of(A::frontends(self).values()) {
                assert!(
                    !self.slots[start..end].contains(&id),
                    "backend {id} deleted while a live table holds it"
                );
            }
        }

        /// A frontend may point at `val`: its table was written whole, and every slot holds
        /// a backend of the frontend's family (`has`).
        fn check_flip(&self, val: &Service, has: impl Fn(&u32) -> bool) {
            if val.table_size == 0 {
                return;
            }
            let written = self.written.contains(&(val.table_off, val.table_size));
            assert!(written, "flip to a table that was never written: {val:?}");
            let r = val.table_off as usize..(val.table_off + val.table_size) as usize;
            for id in &self.slots[r] {
                assert!(has(id), "table {val:?} holds {id}, not of its family");
            }
        }

        /// The backends a frontend's table resolves to, through NP_BE (NP_BE6).
        fn resolve<A: FakeFamily>(&self, fe: &FrontendKey<A>) -> BTreeSet<BeKey<A>> {
            let v = &A::frontends(self)[fe];
            let r = v.table_off as usize..(v.table_off + v.table_size) as usize;
            self.slots[r]
                .iter()
                .map(|id| {
                    let b = A::backends(self)
                        .get(id)
                        .expect("slot holds an existing backend id of the family");
                    (b.addr, b.port)
                })
                .collect()
        }

        fn take_calls(&mut self) -> Vec<Call> {
            std::mem::take(&mut self.calls)
        }
    }

    /// The maps of one family in [`FakeMaps`].
    trait FakeFamily: SyncAddr {
        fn frontends(m: &FakeMaps) -> &BTreeMap<FrontendKey<Self>, Service>;
        fn backends(m: &FakeMaps) -> &BTreeMap<u32, Backend<Self>>;
        fn node_addrs(m: &FakeMaps) -> &BTreeSet<Self>;
    }

    impl FakeFamily for u32 {
        fn frontends(m: &FakeMaps) -> &BTreeMap<FrontendKey, Service> {
            &m.services
        }
        fn backends(m: &FakeMaps) -> &BTreeMap<u32, Backend> {
            &m.backends
        }
        fn node_addrs(m: &FakeMaps) -> &BTreeSet<u32> {
            &m.node_addrs
        }
    }

    impl FakeFamily for Ip6 {
        fn frontends(m: &FakeMaps) -> &BTreeMap<FrontendKey6, Service> {
            &m.services6
        }
        fn backends(m: &FakeMaps) -> &BTreeMap<u32, Backend6> {
            &m.backends6
        }
        fn node_addrs(m: &FakeMaps) -> &BTreeSet<Ip6> {
            &m.node_addrs6
        }
    }

    fn map_err(op: &'static str) -> Error {
        Error::Map {
            map: "fake",
            op,
            key: String::new(),
            reason: "injected".into(),
        }
    }

    impl Maps for FakeMaps {
        fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()> {
            assert_ne!(id, BACKEND_NONE);
            assert!(!self.backends6.contains_key(&id), "id {id} in NP_BE6 too");
            if let Some(old) = self.backends.get(&id) {
                assert_eq!(be_key(old), be_key(be), "backend id {id} re-pointed");
            }
            if self.fails() {
                return Err(map_err("set_backend"));
            }
            self.calls.push(Call::SetBackend(id));
            self.backends.insert(id, *be);
            Ok(())
        }

        fn delete_backend(&mut self, id: u32) -> Result<()> {
            self.check_unused::<u32>(id);
            if self.fails() {
                return Err(map_err("delete_backend"));
            }
            self.calls.push(Call::DelBackend(id));
            assert!(
                self.backends.remove(&id).is_some(),
                "deleting a missing backend {id}"
            );
            Ok(())
        }

        fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
            let end = offset + ids.len() as u32;
            for (start, stop) in self.live_regions() {
                assert!(
                    end as usize <= start || offset as usize >= stop,
                    "table [{offset}, {end}) overwrites the live table [{start}, {stop})"
                );
            }
            for id in ids {
                assert!(
                    self.backends.contains_key(id) || self.backends6.contains_key(id),
                    "slot written with unknown backend {id}"
                );
            }
            if self.fails() {
                return Err(map_err("write_slots"));
            }
            self.calls.push(Call::Slots(offset, ids.len() as u32));
            self.written.insert((offset, ids.len() as u32));
            self.slots[offset as usize..end as usize].copy_from_slice(ids);
            Ok(())
        }

        fn set_service(&mut self, key: &FrontendKey, val: &Service) -> Result<()> {
            if self.broken.contains(key)
                || (!self.services.contains_key(key) && self.services.len() >= self.max_services)
            {
                return Err(map_err("insert"));
            }
            self.check_flip(val, |id| self.backends.contains_key(id));
            if self.fails() {
                return Err(map_err("set_service"));
            }
            self.calls.push(Call::SetSvc(*key, *val));
            self.services.insert(*key, *val);
            Ok(())
        }

        fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
            if self.fails() {
                return Err(map_err("delete_service"));
            }
            self.calls.push(Call::DelSvc(*key));
            assert!(
                self.services.remove(key).is_some(),
                "deleting a missing frontend"
            );
            Ok(())
        }

        fn set_node_addr(&mut self, addr: u32) -> Result<()> {
            self.calls.push(Call::SetAddr(addr));
            self.node_addrs.insert(addr);
            Ok(())
        }

        fn set_backend6(&mut self, id: u32, be: &Backend6) -> Result<()> {
            assert_ne!(id, BACKEND_NONE);
            assert!(!self.backends.contains_key(&id), "id {id} in NP_BE too");
            if let Some(old) = self.backends6.get(&id) {
                assert_eq!(be_key(old), be_key(be), "backend id {id} re-pointed");
            }
            if self.fails() {
                return Err(map_err("set_backend6"));
            }
            self.calls.push(Call::SetBackend6(id));
            self.backends6.insert(id, *be);
            Ok(())
        }

        fn delete_backend6(&mut self, id: u32) -> Result<()> {
            self.check_unused::<Ip6>(id);
            if self.fails() {
                return Err(map_err("delete_backend6"));
            }
            self.calls.push(Call::DelBackend6(id));
            assert!(
                self.backends6.remove(&id).is_some(),
                "deleting a missing IPv6 backend {id}"
            );
            Ok(())
        }

        fn set_service6(&mut self, key: &FrontendKey6, val: &Service) -> Result<()> {
            self.check_flip(val, |id| self.backends6.contains_key(id));
            if self.fails() {
                return Err(map_err("set_service6"));
            }
            self.calls.push(Call::SetSvc6(*key, *val));
            self.services6.insert(*key, *val);
            Ok(())
        }

        fn delete_service6(&mut self, key: &FrontendKey6) -> Result<()> {
            if self.fails() {
                return Err(map_err("delete_service6"));
            }
            self.calls.push(Call::DelSvc6(*key));
            assert!(
                self.services6.remove(key).is_some(),
                "deleting a missing IPv6 frontend"
            );
            Ok(())
        }

        fn set_node_addr6(&mut self, addr: Ip6) -> Result<()> {
            self.calls.push(Call::SetAddr6(addr));
            self.node_addrs6.insert(addr);
            Ok(())
        }

        fn delete_node_addr6(&mut self, addr: Ip6) -> Result<()> {
            self.calls.push(Call::DelAddr6(addr));
            self.node_addrs6.remove(&addr);
            Ok(())
        }

        fn set_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()> {
            if self.fails() {
                return Err(map_err("set_src_range"));
            }
            self.src_ranges.insert((svc_id, cidr));
            Ok(())
        }

        fn delete_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()> {
            if self.fails() {
                return Err(map_err("delete_src_range"));
            }
            assert!(
                self.src_ranges.remove(&(svc_id, cidr)),
                "deleting a missing range"
            );
            Ok(())
        }

        fn delete_node_addr(&mut self, addr: u32) -> Result<()> {
            self.calls.push(Call::DelAddr(addr));
            self.node_addrs.remove(&addr);
            Ok(())
        }

        fn read_slots(&mut self, offset: u32, len: u32) -> Option<Vec<u32>> {
            let r = offset as usize..offset as usize + len as usize;
            self.readable
                .then(|| self.slots.get(r).map(<[u32]>::to_vec))
                .flatten()
        }
    }

    fn xorshift(mut x: u64) -> u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }

    fn sid(name: &str) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port: String::new(),
            protocol: Protocol::Tcp,
            family: Family::V4,
        }
    }

    fn sid6(name: &str) -> ServicePortId {
        ServicePortId {
            family: Family::V6,
            ..sid(name)
        }
    }

    fn ip6(s: &str) -> Ip6 {
        addr6_raw(s.parse().expect("test IPv6 address"))
    }

    fn np6(port: u16) -> FrontendKey6 {
        FrontendKey6 {
            addr: [0; 4],
            port: port.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        }
    }

    fn ext6(ip: &str, port: u16) -> FrontendKey6 {
        FrontendKey6 {
            addr: ip6(ip),
            port: port.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        }
    }

    /// Backend `2001:db8::<last>` (IPv6).
    fn be6(last: u16, port: u16) -> Backend6 {
        Backend6 {
            addr: addr6_raw(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
            port: port.to_be(),
            flags: 0,
            pad: 0,
        }
    }

    fn dsvc6(frontends: &[FrontendKey6], backends: &[Backend6]) -> DesiredService6 {
        DesiredService6 {
            frontends: frontends.iter().copied().collect(),
            flags: 0,
            affinity_timeout_s: 0,
            source_ranges: BTreeSet::new(),
            external_ips: BTreeSet::new(),
            backends: backends.iter().copied().collect(),
        }
    }

    fn np(port: u16) -> FrontendKey {
        FrontendKey {
            addr: 0,
            port: port.to_be(),
            proto: PROTO_TCP,
            pad: 0,
        }
    }

    fn ext(ip: [u8; 4], port: u16) -> FrontendKey {
        FrontendKey {
            addr: addr_raw(Ipv4Addr::from(ip)),
            port: port.to_be(),
            proto: PROTO_UDP,
            pad: 0,
        }
    }

    fn be(last: u8, port: u16) -> Backend {
        Backend {
            addr: addr_raw(Ipv4Addr::new(10, 0, 0, last)),
            port: port.to_be(),
            flags: 0,
            pad: 0,
        }
    }

    fn dsvc(frontends: &[FrontendKey], backends: &[Backend]) -> DesiredService {
        DesiredService {
            frontends: frontends.iter().copied().collect(),
            flags: 0,
            affinity_timeout_s: 0,
            source_ranges: BTreeSet::new(),
            external_ips: BTreeSet::new(),
            backends: backends.iter().copied().collect(),
        }
    }

    fn state(services: Vec<(&str, DesiredService)>) -> Desired {
        Desired {
            node_addrs: [IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))].into(),
            services: services.into_iter().map(|(n, s)| (sid(n), s)).collect(),
            ..Desired::default()
        }
    }

    /// `v4` and `v6` service ports, with an address of each family.
    fn dual_state(v4: Vec<(&str, DesiredService)>, v6: Vec<(&str, DesiredService6)>) -> Desired {
        let mut d = state(v4);
        d.node_addrs.insert("2001:db8:ffff::1".parse().unwrap());
        d.services6 = v6.into_iter().map(|(n, s)| (sid6(n), s)).collect();
        d
    }

    /// The maps hold exactly `d`: every frontend resolves to the desired backends, in the
    /// maps of its family.
    fn verify(d: &Desired, m: &FakeMaps) {
        let mut ranges = BTreeSet::new();
        verify_family::<u32>(d, m, &mut ranges);
        verify_family::<Ip6>(d, m, &mut ranges);
        assert_eq!(
            m.src_ranges, ranges,
            "source ranges of the services' ids, no others"
        );
    }

    fn verify_family<A: FakeFamily>(
        d: &Desired,
        m: &FakeMaps,
        ranges: &mut BTreeSet<(u32, IpCidr)>,
    ) {
        let want_addrs: BTreeSet<A> = d.node_addrs.iter().filter_map(|a| A::from_ip(*a)).collect();
        assert_eq!(*A::node_addrs(m), want_addrs);
        let mut frontends = BTreeSet::new();
        let mut used = BTreeSet::new();
        for (id, ds) in A::services(d) {
            assert_eq!(id.family, A::FAMILY, "{id}");
            let svc_id = ds
                .frontends
                .first()
                .and_then(|fe| A::frontends(m).get(fe))
                .map(|v| v.svc_id);
            if let Some(svc_id) = svc_id {
                ranges.extend(ds.source_ranges.iter().map(|c| (svc_id, *c)));
            }
            let keys: BTreeSet<BeKey<A>> = ds.table_backends().map(be_key).collect();
            for fe in &ds.frontends {
                frontends.insert(*fe);
                let v = A::frontends(m)
                    .get(fe)
                    .unwrap_or_else(|| panic!("{id}: frontend {fe:?} missing"));
                assert_eq!(v.flags, ds.frontend_flags(fe), "{id}");
                assert_eq!(v.affinity_timeout_s, ds.affinity_timeout_s, "{id}");
                assert_eq!(v.table_size, maglev::table_size(keys.len()), "{id}");
                assert_eq!(
                    m.resolve(fe),
                    keys,
                    "{id}: table resolves to the desired backends"
                );
                for b in &ds.backends {
                    let id = A::backends(m)
                        .iter()
                        .find(|(_, v)| be_key(v) == be_key(b))
                        .map(|(k, _)| *k);
                    let id = id.unwrap_or_else(|| panic!("backend {b:?} missing"));
                    assert_eq!(A::backends(m)[&id].flags, b.flags);
                    used.insert(id);
                }
            }
        }
        assert_eq!(
            A::frontends(m).keys().copied().collect::<BTreeSet<_>>(),
            frontends,
            "no stray {} frontends",
            A::FAMILY
        );
        assert_eq!(
            A::backends(m).keys().copied().collect::<BTreeSet<_>>(),
            used,
            "no stray {} backends",
            A::FAMILY
        );
    }

    /// The calls of each family go in phase order, IPv4's first; a table write counts as
    /// a call of the family of the next call that has one.
    fn phases_in_order(calls: &[Call]) {
        let mut family = Family::V6;
        let mut phases: Vec<(Family, u8)> = calls
            .iter()
            .rev()
            .map(|c| {
                family = c.family().unwrap_or(family);
                (family, c.phase())
            })
            .collect();
        phases.reverse();
        assert!(
            phases.windows(2).all(|w| w[0] <= w[1]),
            "calls out of order: {calls:?}"
        );
    }

    const SLOTS: u32 = 100_000;

    fn two_services() -> Desired {
        state(vec![
            (
                "a",
                dsvc(
                    &[np(30001), ext([192, 0, 2, 1], 53)],
                    &[be(1, 80), be(2, 80), be(3, 80)],
                ),
            ),
            ("b", dsvc(&[np(30002)], &[be(3, 80), be(4, 8080)])),
        ])
    }

    #[test]
    fn programs_everything() {
        let d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        phases_in_order(&m.calls);
        assert_eq!(rep.backends_set, 4);
        assert_eq!(rep.tables_written, 2);
        assert_eq!(rep.services_set, 3);
        assert_eq!(rep.node_addrs_set, 1);
        assert_eq!(rep.calls(), m.calls.len());
        // One table per service, sized by the ladder: 3 backends -> 509, 2 -> 251.
        let used = maglev::table_size(3) + maglev::table_size(2);
        assert_eq!(used, 509 + 251);
        assert_eq!(
            r.state_summary(),
            StateSummary {
                node_addrs: 1,
                services: 2,
                frontends: 3,
                backends: 4,
                tables: 2,
                slots_used: used,
                slots_free: SLOTS - used,
                slots_quarantined: 0,
            }
        );
        // Ids start at 1; backend 10.0.0.3:80 is shared by both services.
        let ids: BTreeSet<u32> = m.backends.keys().copied().collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3, 4]));
        assert_ne!(r.svc_id(&sid("a")), r.svc_id(&sid("b")));
    }

    /// `a` and `b` in IPv4 (as [`two_services`]) and `a` and `c` in IPv6.
    fn dual_services() -> Desired {
        let v4 = two_services().services.into_iter().map(|(id, ds)| {
            let name = if id.name == "a" { "a" } else { "b" };
            (name, ds)
        });
        dual_state(
            v4.collect(),
            vec![
                (
                    "a",
                    dsvc6(
                        &[np6(30001), ext6("2001:db8:53::1", 53)],
                        &[be6(1, 80), be6(2, 80)],
                    ),
                ),
                ("c", dsvc6(&[np6(30003)], &[be6(2, 80), be6(3, 8080)])),
            ],
        )
    }

    #[test]
    fn dual_stack_lands_in_the_maps_of_each_family() {
        let d = dual_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        phases_in_order(&m.calls);
        assert_eq!(m.node_addrs6, BTreeSet::from([ip6("2001:db8:ffff::1")]));
        assert_eq!(m.node_addrs.len(), 1);
        assert_eq!((m.backends.len(), m.backends6.len()), (4, 3));
        assert_eq!((m.services.len(), m.services6.len()), (3, 3));
        // One id space: no id in both arrays (the fake asserts it on every write too).
        let v4_ids: BTreeSet<u32> = m.backends.keys().copied().collect();
        let v6_ids: BTreeSet<u32> = m.backends6.keys().copied().collect();
        assert!(v4_ids.is_disjoint(&v6_ids), "{v4_ids:?} {v6_ids:?}");
        assert_eq!(
            r.backend_id6(be6(3, 8080).addr, 8080u16.to_be()),
            m.backends6
                .iter()
                .find(|(_, b)| **b == be6(3, 8080))
                .map(|(id, _)| *id)
        );
        // The IPv4 and IPv6 units of `a` are distinct service ports with their own ids and
        // tables.
        let (a4, a6) = (r.svc_id(&sid("a")), r.svc_id(&sid6("a")));
        assert!(a4.is_some() && a6.is_some() && a4 != a6, "{a4:?} {a6:?}");
        assert_ne!(r.table(&sid("a")), r.table(&sid6("a")));
        assert_eq!(m.services6[&np6(30001)].svc_id, a6.unwrap());
        let summary = r.state_summary();
        assert_eq!(
            (summary.services, summary.backends, summary.tables),
            (4, 7, 4)
        );
        assert_eq!(summary.node_addrs, 2);
        // Nothing to do the second time.
        m.take_calls();
        assert_eq!(r.apply(&d, &mut m).calls(), 0);
    }

    #[test]
    fn service_names_follow_the_svc_ids_of_both_families() {
        let mut d = dual_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        let gen0 = r.names_generation();
        r.apply(&d, &mut m);
        let names = r.service_names();
        let a4 = r.svc_id(&sid("a")).unwrap();
        let a6 = r.svc_id(&sid6("a")).unwrap();
        assert_eq!(names[&a4], "default/a/TCP");
        assert_eq!(names[&a6], "default/a/TCP/IPv6");
        assert_eq!(names.len(), 4, "{names:?}");
        // Every svc_id in the maps has a name.
        for v in m.services.values().chain(m.services6.values()) {
            assert!(names.contains_key(&v.svc_id), "{} unnamed", v.svc_id);
        }
        let gen1 = r.names_generation();
        assert_ne!(gen0, gen1);
        // Endpoint churn leaves the names (and their generation) alone.
        d.services6
            .get_mut(&sid6("c"))
            .unwrap()
            .backends
            .insert(be6(9, 80));
        r.apply(&d, &mut m);
        assert_eq!(r.names_generation(), gen1);
        // A port that goes takes its name with it.
        d.services6.remove(&sid6("a"));
        r.apply(&d, &mut m);
        assert_ne!(r.names_generation(), gen1);
        let names = r.service_names();
        assert!(
            !names.contains_key(&a6) && names.contains_key(&a4),
            "{names:?}"
        );
    }

    #[test]
    fn ipv6_changes_touch_only_the_ipv6_maps_and_ids_are_reused_across_families() {
        let mut d = dual_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        // An IPv6 endpoint change: IPv6 calls only.
        d.services6
            .get_mut(&sid6("c"))
            .unwrap()
            .backends
            .insert(be6(4, 8080));
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        let calls = m.take_calls();
        assert!(
            calls.iter().all(|c| c.family() != Some(Family::V4)),
            "{calls:?}"
        );
        // The IPv6 ports go: their backends leave NP_BE6, and once out of quarantine the
        // ids serve IPv4 backends.
        let freed: BTreeSet<u32> = m.backends6.keys().copied().collect();
        d.services6.clear();
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);
        assert!(m.backends6.is_empty() && m.services6.is_empty());
        assert!(m.node_addrs6.len() == 1, "node addresses are not services");
        let many: Vec<Backend> = (10..30).map(|i| be(i, 80)).collect();
        d.services.insert(sid("z"), dsvc(&[np(30009)], &many));
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);
        let now: BTreeSet<u32> = m.backends.keys().copied().collect();
        assert!(freed.is_subset(&now), "freed {freed:?}, in NP_BE {now:?}");
    }

    #[test]
    fn ipv6_source_ranges_go_to_the_ipv6_unit() {
        let cidr = |s: &str| s.parse::<IpCidr>().unwrap();
        let mut d = dual_services();
        let a6 = d.services6.get_mut(&sid6("a")).unwrap();
        a6.flags |= SVC_F_SRC_RANGES;
        a6.source_ranges = [cidr("2001:db8:1::/48")].into();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);
        let a6_id = r.svc_id(&sid6("a")).unwrap();
        assert_eq!(
            m.src_ranges,
            BTreeSet::from([(a6_id, cidr("2001:db8:1::/48"))])
        );
        assert_ne!(
            m.services6[&ext6("2001:db8:53::1", 53)].flags & SVC_F_SRC_RANGES,
            0
        );
        assert_eq!(m.services6[&np6(30001)].flags & SVC_F_SRC_RANGES, 0);
        // Restored from the maps, then the range goes away.
        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        let a6 = d.services6.get_mut(&sid6("a")).unwrap();
        a6.source_ranges.clear();
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);
        assert!(m.src_ranges.is_empty());
    }

    #[test]
    fn dual_stack_restart_keeps_ids_and_deletes_nothing() {
        let d = dual_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut old = Reconciler::new(SLOTS, 1024);
        old.apply(&d, &mut m);
        m.take_calls();
        let (backends, backends6) = (m.backends.clone(), m.backends6.clone());
        let services6 = m.services6.clone();
        let used = old.state_summary().slots_used;

        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        let summary = r.state_summary();
        assert_eq!(
            (
                summary.frontends,
                summary.backends,
                summary.tables,
                summary.node_addrs
            ),
            (6, 7, 4, 2)
        );
        assert_eq!(summary.slots_used, used);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        let calls = m.take_calls();
        phases_in_order(&calls);
        assert_eq!(deletions(&calls), [], "nothing deleted");
        assert!(!calls
            .iter()
            .any(|c| matches!(c, Call::SetBackend(_) | Call::SetBackend6(_))));
        assert_eq!(
            (m.backends.clone(), m.backends6.clone()),
            (backends, backends6)
        );
        for (fe, v) in &m.services6 {
            assert_eq!(v.svc_id, services6[fe].svc_id);
        }
        assert_eq!(r.svc_id(&sid6("a")), old.svc_id(&sid6("a")));
        assert_eq!(r.svc_id(&sid6("c")), old.svc_id(&sid6("c")));
        // New backends after the restart never take a restored id of either family.
        let mut d2 = d.clone();
        d2.services6
            .get_mut(&sid6("c"))
            .unwrap()
            .backends
            .insert(be6(9, 80));
        d2.services
            .get_mut(&sid("b"))
            .unwrap()
            .backends
            .insert(be(9, 80));
        assert!(r.apply(&d2, &mut m).errors.is_empty());
        verify(&d2, &m);
        assert_eq!(r.apply(&d2, &mut m).calls(), 0);
    }

    #[test]
    fn restore_with_an_id_in_both_arrays_keeps_it_ipv4s() {
        let d = dual_services();
        let mut m = FakeMaps::new(SLOTS);
        Reconciler::new(SLOTS, 1024).apply(&d, &mut m);
        // A corrupt leftover: NP_BE6 also holds an id NP_BE holds.
        let shared = *m.backends.keys().next().unwrap();
        let mut snap = m.snapshot();
        snap.backends6.push((shared, be6(77, 80)));
        m.backends6.insert(shared, be6(77, 80));
        let mut r = Reconciler::restore(SLOTS, 1024, &snap);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        assert!(
            !m.backends6.contains_key(&shared),
            "the stale IPv6 entry goes"
        );
        assert!(m.backends.contains_key(&shared), "the IPv4 backend stays");
        verify(&d, &m);
        // The id is still IPv4's: many new IPv6 backends never get it.
        let mut d2 = d.clone();
        let many: Vec<Backend6> = (100..140).map(|i| be6(i, 80)).collect();
        d2.services6.insert(sid6("z"), dsvc6(&[np6(30009)], &many));
        for _ in 0..3 {
            assert!(r.apply(&d2, &mut m).errors.is_empty());
        }
        verify(&d2, &m);
        assert!(!m.backends6.contains_key(&shared));
    }

    #[test]
    fn source_ranges_follow_the_service() {
        let cidr = |s: &str| s.parse::<IpCidr>().unwrap();
        let mut d = two_services();
        let a = d.services.get_mut(&sid("a")).unwrap();
        a.flags |= SVC_F_SRC_RANGES;
        a.source_ranges = [cidr("198.18.0.0/24"), cidr("198.18.5.7/32")].into();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        assert_eq!(rep.src_ranges_set, 2, "{rep}");
        verify(&d, &m);
        // Nothing to do the second time, ranges included.
        assert_eq!(r.apply(&d, &mut m).calls(), 0);
        // Only the external-IP frontend checks the ranges; the nodePort does not.
        assert_ne!(
            m.services[&ext([192, 0, 2, 1], 53)].flags & SVC_F_SRC_RANGES,
            0
        );
        assert_eq!(m.services[&np(30001)].flags & SVC_F_SRC_RANGES, 0);
        assert_eq!(m.src_ranges.len(), 2);

        // A changed list: the new range goes in, the old one out.
        let a = d.services.get_mut(&sid("a")).unwrap();
        a.source_ranges = [cidr("198.18.0.0/24"), cidr("198.19.0.0/16")].into();
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        assert_eq!(
            (rep.src_ranges_set, rep.src_ranges_deleted),
            (1, 1),
            "{rep}"
        );
        verify(&d, &m);

        // A restarted agent finds a range that is no longer wanted and removes it.
        let a = d.services.get_mut(&sid("a")).unwrap();
        a.source_ranges = [cidr("198.19.0.0/16")].into();
        let snap = m.snapshot();
        let mut r = Reconciler::restore(SLOTS, 1024, &snap);
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);

        // The service goes: its ranges go with it.
        d.services.remove(&sid("a"));
        assert!(r.apply(&d, &mut m).errors.is_empty());
        verify(&d, &m);
        assert!(m.src_ranges.is_empty());
    }

    #[test]
    fn second_apply_is_a_no_op() {
        let d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.calls(), 0);
        assert!(rep.errors.is_empty());
        assert_eq!(m.calls, []);
    }

    #[test]
    fn endpoint_change_touches_only_its_service() {
        let mut d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        let ids_before: Vec<Option<u32>> = (1..=4)
            .map(|i| r.backend_id(be(i, 80).addr, 80u16.to_be()))
            .collect();
        let svc_ids = (r.svc_id(&sid("a")), r.svc_id(&sid("b")));
        let b_value = m.services[&np(30002)];

        // Add an endpoint to "a".
        d.services
            .get_mut(&sid("a"))
            .unwrap()
            .backends
            .insert(be(5, 80));
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        let calls = m.take_calls();
        phases_in_order(&calls);
        assert_eq!(calls.len(), 4, "backend, table, two flips: {calls:?}");
        assert!(matches!(calls[0], Call::SetBackend(5)));
        // 3 -> 4 backends stays on the 509 rung: a new table of the same size.
        assert_eq!(maglev::table_size(4), maglev::table_size(3));
        assert!(matches!(calls[1], Call::Slots(_, 509)), "{calls:?}");
        assert!(calls[2..]
            .iter()
            .all(|c| matches!(c, Call::SetSvc(fe, _) if *fe != np(30002))));
        assert_eq!(m.services[&np(30002)], b_value, "b untouched");

        // Remove an endpoint of "a" that "b" does not share.
        d.services
            .get_mut(&sid("a"))
            .unwrap()
            .backends
            .remove(&be(1, 80));
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        let calls = m.take_calls();
        phases_in_order(&calls);
        assert_eq!(
            calls.len(),
            4,
            "table, two flips, backend delete: {calls:?}"
        );
        assert!(
            matches!(calls[0], Call::Slots(_, 509)),
            "same rung: {calls:?}"
        );
        assert_eq!(calls[3], Call::DelBackend(1));
        assert_eq!(m.services[&np(30002)], b_value, "b untouched");

        // Stable ids.
        let ids_after: Vec<Option<u32>> = (2..=4)
            .map(|i| r.backend_id(be(i, 80).addr, 80u16.to_be()))
            .collect();
        assert_eq!(ids_after, ids_before[1..]);
        assert_eq!((r.svc_id(&sid("a")), r.svc_id(&sid("b"))), svc_ids);
    }

    #[test]
    fn table_is_written_before_the_flip_and_freed_after() {
        let mut d = state(vec![("a", dsvc(&[np(30001), np(30003)], &[be(1, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        let old = r.table(&sid("a")).unwrap();
        m.take_calls();
        d.services.get_mut(&sid("a")).unwrap().backends = [be(2, 80)].into();
        r.apply(&d, &mut m);
        verify(&d, &m);
        let calls = m.take_calls();
        let new = r.table(&sid("a")).unwrap();
        assert_ne!(new.offset, old.offset, "a fresh region");
        let write = calls
            .iter()
            .position(|c| *c == Call::Slots(new.offset, new.size))
            .unwrap();
        let flips: Vec<usize> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c, Call::SetSvc(_, v) if v.table_off == new.offset))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(flips.len(), 2);
        assert!(flips.iter().all(|&f| f > write));
        let del = calls
            .iter()
            .position(|c| *c == Call::DelBackend(1))
            .unwrap();
        assert!(flips.iter().all(|&f| f < del));
        // The old region is quarantined, not yet free.
        let s = r.state_summary();
        assert_eq!(s.slots_quarantined, old.size);
        assert_eq!(s.slots_free, SLOTS - new.size - old.size);
    }

    #[test]
    fn backend_ids_are_quarantined_one_generation() {
        let mut d = state(vec![("a", dsvc(&[np(30001)], &[be(1, 80), be(2, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        assert_eq!(r.backend_id(be(1, 80).addr, be(1, 80).port), Some(1));
        // Replace 1 by 3 in one apply: 3 must not get id 1.
        d.services.get_mut(&sid("a")).unwrap().backends = [be(2, 80), be(3, 80)].into();
        r.apply(&d, &mut m);
        verify(&d, &m);
        assert_eq!(r.backend_id(be(3, 80).addr, be(3, 80).port), Some(3));
        assert_eq!(r.backend_id(be(1, 80).addr, be(1, 80).port), None);
        // Next apply: id 1 is free again.
        d.services
            .get_mut(&sid("a"))
            .unwrap()
            .backends
            .insert(be(4, 80));
        r.apply(&d, &mut m);
        verify(&d, &m);
        assert_eq!(r.backend_id(be(4, 80).addr, be(4, 80).port), Some(1));
    }

    #[test]
    fn regions_are_reused_after_quarantine_and_allocator_full_is_per_service() {
        // Room for exactly three tables of one backend (127 slots each).
        let one = maglev::table_size(1);
        assert_eq!(one, 127);
        let total = 3 * one;
        let mut d = state(vec![
            ("a", dsvc(&[np(30001)], &[be(1, 80)])),
            ("b", dsvc(&[np(30002)], &[be(2, 80)])),
        ]);
        let mut m = FakeMaps::new(total);
        let mut r = Reconciler::new(total, 1024);
        assert!(r.apply(&d, &mut m).errors.is_empty());
        assert_eq!(
            r.table(&sid("a")),
            Some(Region {
                offset: 0,
                size: one
            })
        );
        assert_eq!(
            r.table(&sid("b")),
            Some(Region {
                offset: one,
                size: one
            })
        );

        // Both change: a takes the last free region; b finds none (a's old one is in
        // quarantine) and keeps its old table, reported.
        d.services.get_mut(&sid("a")).unwrap().backends = [be(3, 80)].into();
        d.services.get_mut(&sid("b")).unwrap().backends = [be(4, 80)].into();
        let rep = r.apply(&d, &mut m);
        assert_eq!(
            r.table(&sid("a")),
            Some(Region {
                offset: 2 * one,
                size: one
            })
        );
        assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
        let msg = rep.errors[0].to_string();
        assert!(msg.starts_with("default/b/TCP: "), "{msg}");
        assert!(
            msg.contains(&format!("no free region of {one} Maglev slots")),
            "{msg}"
        );
        assert_eq!(
            m.resolve(&np(30002)),
            BTreeSet::from([be_key(&be(2, 80))]),
            "b still on its old table"
        );
        assert_eq!(
            m.resolve(&np(30001)),
            BTreeSet::from([be_key(&be(3, 80))]),
            "a programmed despite b"
        );

        // Next apply: the quarantined region is reused for b.
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        assert_eq!(
            r.table(&sid("b")),
            Some(Region {
                offset: 0,
                size: one
            })
        );
        verify(&d, &m);
    }

    #[test]
    fn oversized_service_is_reported_and_others_programmed() {
        let big: Vec<Backend> = (1..=20).map(|i| be(i, 80)).collect();
        let d = state(vec![
            ("a", dsvc(&[np(30001)], &[be(100, 80)])),
            ("big", dsvc(&[np(30002)], &big)),
            ("c", dsvc(&[np(30003)], &[be(101, 80)])),
        ]);
        let mut m = FakeMaps::new(1000);
        let mut r = Reconciler::new(1000, 1024);
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.errors.len(), 1);
        assert!(rep.errors[0].to_string().contains("default/big/TCP"));
        assert!(!m.services.contains_key(&np(30002)));
        assert_eq!(
            m.resolve(&np(30001)),
            BTreeSet::from([be_key(&be(100, 80))])
        );
        assert_eq!(
            m.resolve(&np(30003)),
            BTreeSet::from([be_key(&be(101, 80))])
        );
        // The big service's backends are kept for the retry, not churned.
        m.take_calls();
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.errors.len(), 1);
        assert!(m.calls.is_empty(), "{:?}", m.calls);
    }

    #[test]
    fn map_full_is_per_service_and_retried() {
        let d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        m.max_services = 2;
        let mut r = Reconciler::new(SLOTS, 1024);
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
        let msg = rep.errors[0].to_string();
        assert!(
            msg.starts_with("default/b/TCP: frontend nodePort 30002/TCP: "),
            "{msg}"
        );
        assert_eq!(m.services.len(), 2);
        assert!(m.services.contains_key(&np(30001)));
        m.max_services = 10;
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
    }

    #[test]
    fn failed_flip_keeps_the_old_table_alive() {
        let mut d = state(vec![("a", dsvc(&[np(30001), np(30003)], &[be(1, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        let old = r.table(&sid("a")).unwrap();
        d.services.get_mut(&sid("a")).unwrap().backends = [be(2, 80)].into();
        m.broken.insert(np(30003));
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.errors.len(), 1);
        // 30003 still points at the old table, whose region and backend stay.
        assert_eq!(m.services[&np(30003)].table_off, old.offset);
        assert_eq!(m.resolve(&np(30003)), BTreeSet::from([be_key(&be(1, 80))]));
        assert_eq!(m.resolve(&np(30001)), BTreeSet::from([be_key(&be(2, 80))]));
        assert_eq!(r.state_summary().tables, 2);
        // Repaired: the flip is retried, then the old table and backend go.
        m.broken.clear();
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        assert_eq!(r.state_summary().tables, 1);
        assert_eq!(r.state_summary().slots_quarantined, old.size);
    }

    #[test]
    fn zero_backends_keep_a_service_entry() {
        let mut d = state(vec![("a", dsvc(&[np(30001)], &[be(1, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        d.services.get_mut(&sid("a")).unwrap().backends.clear();
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        let v = m.services[&np(30001)];
        assert_eq!((v.table_off, v.table_size), (0, 0));
        assert_eq!(v.svc_id, r.svc_id(&sid("a")).unwrap());
        assert!(m.backends.is_empty());
        assert_eq!(r.table(&sid("a")), None);
        // A new service without backends, too.
        d.services.insert(sid("n"), dsvc(&[np(30009)], &[]));
        r.apply(&d, &mut m);
        verify(&d, &m);
        assert_eq!(m.services[&np(30009)].table_size, 0);
    }

    #[test]
    fn removal_deletes_frontends_then_backends() {
        let mut d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        let a_id = r.svc_id(&sid("a")).unwrap();
        d.services.remove(&sid("a"));
        d.node_addrs = [IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))].into();
        // Added in the same apply: must not get a's svc_id.
        d.services.insert(sid("c"), dsvc(&[np(30005)], &[]));
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        let calls = m.take_calls();
        phases_in_order(&calls);
        assert_eq!(rep.services_deleted, 2);
        assert_eq!(rep.services_set, 1);
        assert_eq!(rep.backends_deleted, 2, "10.0.0.3 is still used by b");
        assert_eq!(rep.node_addrs_set + rep.node_addrs_deleted, 2);
        assert_eq!(r.svc_id(&sid("a")), None);
        // The svc_id is reusable from the next apply on, not before.
        assert_ne!(r.svc_id(&sid("c")), Some(a_id));
        d.services.insert(sid("d"), dsvc(&[np(30006)], &[]));
        r.apply(&d, &mut m);
        assert_eq!(r.svc_id(&sid("d")), Some(a_id));
    }

    #[test]
    fn frontend_moves_between_services() {
        let d1 = state(vec![("old", dsvc(&[np(30001)], &[be(1, 80)]))]);
        let d2 = state(vec![("new", dsvc(&[np(30001)], &[be(2, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d1, &mut m);
        m.take_calls();
        let rep = r.apply(&d2, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d2, &m);
        let calls = m.take_calls();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::DelSvc(_))),
            "{calls:?}"
        );
        assert_eq!(r.svc_id(&sid("old")), None);
        assert_eq!(r.state_summary().tables, 1);
    }

    #[test]
    fn flag_changes_do_not_rewrite_tables() {
        let mut d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        {
            let a = d.services.get_mut(&sid("a")).unwrap();
            a.flags = SVC_F_AFFINITY;
            a.affinity_timeout_s = 10;
        }
        r.apply(&d, &mut m);
        verify(&d, &m);
        let calls = m.take_calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| matches!(c, Call::SetSvc(..))));

        // A backend becoming local: one NP_BE update, no table.
        let b = d.services.get_mut(&sid("b")).unwrap();
        b.backends.remove(&be(4, 8080));
        b.backends.insert(Backend {
            flags: BE_F_LOCAL,
            ..be(4, 8080)
        });
        r.apply(&d, &mut m);
        verify(&d, &m);
        let calls = m.take_calls();
        assert_eq!(calls, [Call::SetBackend(4)]);
    }

    #[test]
    fn frontends_added_and_removed() {
        let mut d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut r = Reconciler::new(SLOTS, 1024);
        r.apply(&d, &mut m);
        m.take_calls();
        let a = d.services.get_mut(&sid("a")).unwrap();
        a.frontends.remove(&ext([192, 0, 2, 1], 53));
        a.frontends.insert(ext([192, 0, 2, 2], 53));
        r.apply(&d, &mut m);
        verify(&d, &m);
        let calls = m.take_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(matches!(calls[0], Call::SetSvc(fe, _) if fe == ext([192, 0, 2, 2], 53)));
        assert_eq!(calls[1], Call::DelSvc(ext([192, 0, 2, 1], 53)));
    }

    #[test]
    fn backend_ids_exhausted() {
        let d = state(vec![
            ("a", dsvc(&[np(30001)], &[be(1, 80), be(2, 80)])),
            ("b", dsvc(&[np(30002)], &[be(3, 80)])),
        ]);
        let mut m = FakeMaps::new(SLOTS);
        // Ids 1 and 2 only.
        let mut r = Reconciler::new(SLOTS, 3);
        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.errors.len(), 2, "{:?}", rep.errors);
        assert!(rep.errors[0]
            .to_string()
            .contains("no free backend id for 10.0.0.3:80"));
        assert!(rep.errors[1]
            .to_string()
            .starts_with("default/b/TCP: backend 10.0.0.3:80"));
        assert_eq!(m.resolve(&np(30001)).len(), 2);
    }

    #[test]
    fn region_allocator_coalesces() {
        let mut a = RegionAllocator::new(100);
        let r1 = a.alloc(10).unwrap();
        let r2 = a.alloc(20).unwrap();
        let r3 = a.alloc(30).unwrap();
        assert_eq!((r1.offset, r2.offset, r3.offset), (0, 10, 30));
        assert!(a.alloc(41).is_none());
        a.free(r2);
        assert_eq!(a.alloc(15).unwrap().offset, 10, "first fit");
        a.free(Region {
            offset: 10,
            size: 15,
        });
        a.free(r1);
        a.free(r3);
        assert_eq!(a.free.len(), 1, "{:?}", a.free);
        assert_eq!(a.free_slots(), 100);
        assert_eq!(
            a.alloc(100),
            Some(Region {
                offset: 0,
                size: 100
            })
        );
        assert!(a.alloc(0).is_none());
        assert!(RegionAllocator::new(0).alloc(1).is_none());
    }

    #[test]
    fn same_table_on_every_node() {
        // Two reconcilers fed the same backends in different insertion histories write the
        // same table contents (through backend addresses, ids may differ).
        let d = state(vec![(
            "a",
            dsvc(&[np(30001)], &[be(1, 80), be(2, 80), be(3, 80)]),
        )]);
        let mut m1 = FakeMaps::new(SLOTS);
        let mut r1 = Reconciler::new(SLOTS, 1024);
        r1.apply(&d, &mut m1);
        let mut m2 = FakeMaps::new(SLOTS);
        let mut r2 = Reconciler::new(SLOTS, 1024);
        r2.apply(
            &state(vec![("x", dsvc(&[np(30009)], &[be(3, 80), be(9, 80)]))]),
            &mut m2,
        );
        r2.apply(&d, &mut m2);
        let table = |m: &FakeMaps| {
            let v = m.services[&np(30001)];
            m.slots[v.table_off as usize..(v.table_off + v.table_size) as usize]
                .iter()
                .map(|id| be_key(&m.backends[id]))
                .collect::<Vec<_>>()
        };
        assert_eq!(table(&m1), table(&m2));
    }

    // ---- Restore after an agent restart ----

    /// NP_BE as (addr, port) -> id.
    fn ids_by_key(m: &FakeMaps) -> BTreeMap<BeKey<u32>, u32> {
        m.backends.iter().map(|(id, b)| (be_key(b), *id)).collect()
    }

    /// What each frontend does, independent of ids and regions.
    /// Per frontend: the backends its table resolves to, its table size, flags and svc_id.
    type Content = BTreeMap<FrontendKey, (BTreeSet<BeKey<u32>>, u32, u16, u32)>;

    fn content(m: &FakeMaps) -> Content {
        m.services
            .iter()
            .map(|(fe, v)| {
                let keys = if v.table_size == 0 {
                    BTreeSet::new()
                } else {
                    m.resolve(fe)
                };
                (*fe, (keys, v.table_size, v.flags, v.affinity_timeout_s))
            })
            .collect()
    }

    fn deletions(calls: &[Call]) -> Vec<Call> {
        calls
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Call::DelAddr(_)
                        | Call::DelBackend(_)
                        | Call::DelSvc(_)
                        | Call::DelAddr6(_)
                        | Call::DelBackend6(_)
                        | Call::DelSvc6(_)
                )
            })
            .cloned()
            .collect()
    }

    #[test]
    fn restore_from_an_empty_snapshot_is_new() {
        let restored = Reconciler::restore(SLOTS, 1024, &MapSnapshot::default());
        let new = Reconciler::new(SLOTS, 1024);
        assert_eq!(format!("{restored:?}"), format!("{new:?}"));
        let d = two_services();
        let (mut m1, mut m2) = (FakeMaps::new(SLOTS), FakeMaps::new(SLOTS));
        let (mut r1, mut r2) = (restored, new);
        r1.apply(&d, &mut m1);
        r2.apply(&d, &mut m2);
        assert_eq!(m1.calls, m2.calls);
        assert_eq!(r1.state_summary(), r2.state_summary());
    }

    #[test]
    fn restart_with_the_same_state_keeps_ids_and_deletes_nothing() {
        let d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        let mut old = Reconciler::new(SLOTS, 1024);
        old.apply(&d, &mut m);
        m.take_calls();
        let backends = m.backends.clone();
        let services = m.services.clone();
        let used = old.state_summary().slots_used;

        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        assert!(m.calls.is_empty(), "restore touches no map");
        assert_eq!(
            r.state_summary(),
            StateSummary {
                node_addrs: 1,
                services: 0,
                frontends: 3,
                backends: 4,
                tables: 2,
                slots_used: used,
                slots_free: SLOTS - used,
                slots_quarantined: 0,
            }
        );
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        let calls = m.take_calls();
        phases_in_order(&calls);
        assert_eq!(deletions(&calls), [], "nothing deleted");
        assert!(!calls.iter().any(|c| matches!(c, Call::SetBackend(_))));
        assert_eq!(m.backends, backends, "same ids, same values");
        // Tables are rewritten aside (the maps cannot be read back) and frontends flipped,
        // keeping their svc_id.
        assert_eq!(rep.tables_written, 2);
        assert_eq!(rep.services_set, 3);
        for (fe, v) in &m.services {
            assert_eq!(v.svc_id, services[fe].svc_id);
        }
        assert_eq!(r.svc_id(&sid("a")), old.svc_id(&sid("a")));
        assert_eq!(r.svc_id(&sid("b")), old.svc_id(&sid("b")));
        // The restored regions are freed after the flip.
        assert_eq!(r.state_summary().slots_quarantined, used);
        assert_eq!(r.state_summary().tables, 2);

        let rep = r.apply(&d, &mut m);
        assert_eq!(rep.calls(), 0);
        assert!(m.calls.is_empty(), "{:?}", m.calls);
        assert_eq!(r.state_summary().slots_free, SLOTS - used);
    }

    #[test]
    fn restart_adopts_tables_that_are_already_right() {
        let mut d = two_services();
        let mut m = FakeMaps::new(SLOTS);
        m.readable = true;
        let mut old = Reconciler::new(SLOTS, 1024);
        old.apply(&d, &mut m);
        m.take_calls();
        let services = m.services.clone();

        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        assert_eq!(m.calls, [], "nothing to do");
        assert_eq!(m.services, services);
        assert_eq!(r.table(&sid("a")), old.table(&sid("a")));
        assert_eq!(r.state_summary(), old.state_summary());

        // And it goes on as usual.
        d.services
            .get_mut(&sid("a"))
            .unwrap()
            .backends
            .insert(be(5, 80));
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty());
        verify(&d, &m);
        let calls = m.take_calls();
        assert_eq!(calls.len(), 4, "backend, table, two flips: {calls:?}");
        assert_eq!(r.apply(&d, &mut m).calls(), 0);
    }

    #[test]
    fn restart_with_changes_reaches_the_desired_state() {
        for readable in [false, true] {
            let d1 = two_services();
            let mut m = FakeMaps::new(SLOTS);
            m.readable = readable;
            let mut old = Reconciler::new(SLOTS, 1024);
            old.apply(&d1, &mut m);
            m.take_calls();
            let before = ids_by_key(&m);

            // a loses 10.0.0.1 and a frontend, gains 10.0.0.5; b goes; c comes with one of
            // b's backends and a new one; a node address changes.
            let mut d2 = state(vec![
                ("a", dsvc(&[np(30001)], &[be(2, 80), be(3, 80), be(5, 80)])),
                ("c", dsvc(&[np(30003)], &[be(4, 8080), be(6, 80)])),
            ]);
            d2.node_addrs = [IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))].into();

            let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
            let rep = r.apply(&d2, &mut m);
            assert!(rep.errors.is_empty(), "{:?}", rep.errors);
            verify(&d2, &m);
            let calls = m.take_calls();
            phases_in_order(&calls);

            let after = ids_by_key(&m);
            for (key, id) in &after {
                match before.get(key) {
                    Some(old_id) => assert_eq!(id, old_id, "{}: id kept", be_name(*key)),
                    None => assert!(
                        !before.values().any(|i| i == id),
                        "{}: new backend reuses id {id}",
                        be_name(*key)
                    ),
                }
            }
            assert!(
                !calls.iter().any(|c| matches!(c, Call::SetBackend(id)
                    if before.values().any(|i| i == id))),
                "kept backends are not rewritten: {calls:?}"
            );
            let be1 = before[&be_key(&be(1, 80))];
            let expected = [
                Call::DelAddr(addr_raw(Ipv4Addr::new(192, 168, 0, 1))),
                Call::DelSvc(np(30002)),
                Call::DelSvc(ext([192, 0, 2, 1], 53)),
                Call::DelBackend(be1),
            ];
            let mut got = deletions(&calls);
            got.sort_by_key(|c| format!("{c:?}"));
            let mut expected = expected.to_vec();
            expected.sort_by_key(|c| format!("{c:?}"));
            assert_eq!(got, expected, "only what is not desired is deleted");
            assert_eq!(r.svc_id(&sid("a")), old.svc_id(&sid("a")));
            assert_ne!(
                r.svc_id(&sid("c")),
                old.svc_id(&sid("b")),
                "b's id in quarantine"
            );

            // Same content as a reconciler that never restarted would program.
            let mut fresh_m = FakeMaps::new(SLOTS);
            let mut fresh = Reconciler::new(SLOTS, 1024);
            fresh.apply(&d2, &mut fresh_m);
            assert_eq!(content(&m), content(&fresh_m));

            let rep = r.apply(&d2, &mut m);
            assert_eq!(rep.calls(), 0, "readable {readable}");
            assert!(m.calls.is_empty(), "{:?}", m.calls);
            fresh.apply(&d2, &mut fresh_m);
            assert_eq!(r.state_summary(), fresh.state_summary());
        }
    }

    #[test]
    fn restore_keeps_the_lowest_of_duplicate_ids_and_ids_beyond_the_pool() {
        let d1 = state(vec![("a", dsvc(&[np(30001)], &[be(1, 80), be(2, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        let mut old = Reconciler::new(SLOTS, 1024);
        old.apply(&d1, &mut m);
        // Entries that should not be there: a duplicate of 10.0.0.1:80, id 0, and ids beyond
        // this run's pool (an earlier run had a larger one).
        m.backends.insert(7, be(1, 80));
        m.backends.insert(BACKEND_NONE, be(9, 80));
        m.backends.insert(1500, be(8, 80));
        m.backends.insert(2000, be(9, 80));
        m.take_calls();

        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        assert_eq!(r.backend_id(be(1, 80).addr, be(1, 80).port), Some(1));
        assert_eq!(r.backend_id(be(8, 80).addr, be(8, 80).port), Some(1500));
        assert_eq!(r.backend_id(be(9, 80).addr, be(9, 80).port), Some(2000));
        let d2 = state(vec![(
            "a",
            dsvc(&[np(30001)], &[be(1, 80), be(2, 80), be(8, 80), be(10, 80)]),
        )]);
        let rep = r.apply(&d2, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d2, &m);
        let calls = m.take_calls();
        assert_eq!(r.backend_id(be(8, 80).addr, be(8, 80).port), Some(1500));
        assert_eq!(r.backend_id(be(10, 80).addr, be(10, 80).port), Some(3));
        let mut deleted: Vec<u32> = calls
            .iter()
            .filter_map(|c| match c {
                Call::DelBackend(id) => Some(*id),
                _ => None,
            })
            .collect();
        deleted.sort();
        assert_eq!(deleted, [0, 7, 2000]);
        assert_eq!(
            m.backends.keys().copied().collect::<Vec<_>>(),
            [1, 2, 3, 1500]
        );
        assert_eq!(r.apply(&d2, &mut m).calls(), 0);
        // Freed ids come back (after quarantine), those beyond the pool never.
        let d3 = state(vec![("a", dsvc(&[np(30001)], &[be(11, 80)]))]);
        r.apply(&d3, &mut m);
        r.apply(&d3, &mut m);
        let d4 = state(vec![(
            "a",
            dsvc(&[np(30001)], &[be(11, 80), be(12, 80), be(13, 80)]),
        )]);
        r.apply(&d4, &mut m);
        verify(&d4, &m);
        assert!(m.backends.keys().all(|&id| id < 1024), "{:?}", m.backends);
    }

    #[test]
    fn restore_survives_odd_regions() {
        let mut m = FakeMaps::new(SLOTS);
        m.backends.insert(1, be(1, 80));
        let val = |off: u32, svc_id: u32| Service {
            table_off: off,
            table_size: 127,
            svc_id,
            ..Service::default()
        };
        // Two overlapping tables, one that runs past the end, one wholly outside.
        m.services.insert(np(31001), val(0, 1));
        m.services.insert(np(31002), val(64, 2));
        m.services.insert(np(31003), val(SLOTS - 10, 3));
        m.services.insert(np(31004), val(u32::MAX - 5, 4));
        m.services.insert(np(31005), val(0, 1));
        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        let s = r.state_summary();
        assert_eq!(
            (s.tables, s.slots_used),
            (3, 191 + 10),
            "overlapping ones as one"
        );
        assert_eq!(s.slots_free, SLOTS - 191 - 10);

        let d = state(vec![(
            "a",
            dsvc(&[np(31001), np(31005)], &[be(1, 80), be(2, 80)]),
        )]);
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        let size = maglev::table_size(2);
        assert_eq!(r.table(&sid("a")), Some(Region { offset: 191, size }));
        assert_eq!(r.svc_id(&sid("a")), Some(1));
        assert_eq!(m.backends[&1], be(1, 80), "id kept");
        let s = r.state_summary();
        assert_eq!((s.tables, s.frontends), (1, 2));
        assert_eq!(s.slots_quarantined, 191 + 10);
        m.take_calls();
        assert_eq!(r.apply(&d, &mut m).calls(), 0);
        assert_eq!(r.state_summary().slots_free, SLOTS - size);
        // Restored svc ids come back once nothing carries them.
        let mut d2 = d.clone();
        d2.services.insert(sid("n"), dsvc(&[np(30009)], &[]));
        r.apply(&d2, &mut m);
        assert_eq!(r.svc_id(&sid("n")), Some(2));
    }

    #[test]
    fn failed_flip_after_restore_keeps_the_restored_table_and_its_backends() {
        let d1 = state(vec![("a", dsvc(&[np(30001), np(30003)], &[be(1, 80)]))]);
        let mut m = FakeMaps::new(SLOTS);
        Reconciler::new(SLOTS, 1024).apply(&d1, &mut m);
        let mut r = Reconciler::restore(SLOTS, 1024, &m.snapshot());
        let d2 = state(vec![("a", dsvc(&[np(30001), np(30003)], &[be(2, 80)]))]);
        m.broken.insert(np(30003));
        let rep = r.apply(&d2, &mut m);
        assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
        assert_eq!(m.resolve(&np(30003)), BTreeSet::from([be_key(&be(1, 80))]));
        assert_eq!(m.resolve(&np(30001)), BTreeSet::from([be_key(&be(2, 80))]));
        m.broken.clear();
        let rep = r.apply(&d2, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d2, &m);
        m.take_calls();
        assert_eq!(r.apply(&d2, &mut m).calls(), 0);
    }

    #[test]
    fn restart_without_room_for_new_tables_converges() {
        // Room for three tables of one backend: two restored, one free.
        let one = maglev::table_size(1);
        let total = 3 * one;
        let d = state(vec![
            ("a", dsvc(&[np(30001)], &[be(1, 80)])),
            ("b", dsvc(&[np(30002)], &[be(2, 80)])),
        ]);
        let mut m = FakeMaps::new(total);
        let mut old = Reconciler::new(total, 1024);
        old.apply(&d, &mut m);
        let backends = m.backends.clone();
        m.take_calls();

        let mut r = Reconciler::restore(total, 1024, &m.snapshot());
        let rep = r.apply(&d, &mut m);
        // a moves to the free region; b finds none and keeps serving its restored table.
        assert_eq!(rep.errors.len(), 1, "{:?}", rep.errors);
        assert!(rep.errors[0].to_string().starts_with("default/b/TCP: "));
        assert_eq!(deletions(&m.take_calls()), []);
        assert_eq!(m.resolve(&np(30002)), BTreeSet::from([be_key(&be(2, 80))]));
        // Next apply: a's restored region is free again.
        let rep = r.apply(&d, &mut m);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        verify(&d, &m);
        assert_eq!(deletions(&m.take_calls()), []);
        assert_eq!(m.backends, backends);
        assert_eq!(r.svc_id(&sid("b")), old.svc_id(&sid("b")));
        assert_eq!(r.apply(&d, &mut m).calls(), 0);
    }

    /// A random desired state over small pools of names, frontends and backends, so that
    /// services share backends, frontends move (or are wanted twice), and maps fill up.
    fn random_state(rng: &mut u64, prev: &Desired) -> Desired {
        let mut next = |n: u64| {
            *rng = xorshift(*rng);
            *rng % n
        };
        let mut d = prev.clone();
        for _ in 0..=next(3) {
            let name = format!("s{}", next(12));
            if next(3) == 0 {
                // An IPv6 unit (its own state in the reconciler, shared ids and slots).
                if next(5) == 0 {
                    d.services6.remove(&sid6(&name));
                    continue;
                }
                let frontends: Vec<FrontendKey6> = (0..=next(2))
                    .map(|_| match next(3) {
                        0 => ext6(&format!("2001:db8:5::{}", 1 + next(3)), 53),
                        _ => np6(30000 + next(16) as u16),
                    })
                    .collect();
                let backends: Vec<Backend6> =
                    (0..next(6)).map(|_| be6(1 + next(10) as u16, 80)).collect();
                d.services6
                    .insert(sid6(&name), dsvc6(&frontends, &backends));
                continue;
            }
            if next(5) == 0 {
                d.services.remove(&sid(&name));
                continue;
            }
            let frontends: Vec<FrontendKey> = (0..=next(2))
                .map(|_| match next(3) {
                    0 => ext([192, 0, 2, next(3) as u8], 53),
                    _ => np(30000 + next(16) as u16),
                })
                .collect();
            let backends: Vec<Backend> = (0..next(6))
                .map(|_| Backend {
                    flags: if next(4) == 0 { BE_F_LOCAL } else { 0 },
                    ..be(1 + next(10) as u8, 80)
                })
                .collect();
            let mut ds = dsvc(&frontends, &backends);
            if next(4) == 0 {
                ds.flags = SVC_F_AFFINITY;
                ds.affinity_timeout_s = 1 + next(3) as u32;
            }
            d.services.insert(sid(&name), ds);
        }
        if next(10) == 0 {
            d.node_addrs = [IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1 + next(2) as u8))].into();
        }
        d
    }

    #[test]
    fn incremental_apply_matches_the_full_pass() {
        // Tight NP_MAGLEV, NP_BE and NP_SVC, and injected failures: the incremental pass must
        // make exactly the calls of the full pass, and end in the same state.
        for seed in 1..=40u64 {
            let slots = 4 * maglev::table_size(3);
            let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let (mut mf, mut mi) = (FakeMaps::new(slots), FakeMaps::new(slots));
            let mut mh = FakeMaps::new(slots);
            for m in [&mut mf, &mut mi, &mut mh] {
                m.fail_rate = 40;
                m.rng = seed;
                m.max_services = 12;
            }
            let mut full = Reconciler::new(slots, 9);
            full.set_always_full();
            let mut inc = Reconciler::new(slots, 9);
            // Given the changes (and a few more), as by a model.
            let mut hinted = Reconciler::new(slots, 9);
            let mut d = Desired::default();
            for step in 0..60u64 {
                let prev = d.clone();
                d = random_state(&mut rng, &d);
                let mut changes = Changes {
                    model: 7,
                    from: step,
                    to: step + 1,
                    services: prev
                        .services
                        .keys()
                        .chain(d.services.keys())
                        .filter(|id| prev.services.get(*id) != d.services.get(*id))
                        .chain(
                            prev.services6
                                .keys()
                                .chain(d.services6.keys())
                                .filter(|id| prev.services6.get(*id) != d.services6.get(*id)),
                        )
                        .cloned()
                        .collect(),
                };
                changes.services.insert(sid(&format!("s{}", step % 13)));
                if step == 30 {
                    // Restart: both adopt what their maps hold.
                    full = Reconciler::restore(slots, 9, &mf.snapshot());
                    full.set_always_full();
                    inc = Reconciler::restore(slots, 9, &mi.snapshot());
                    hinted = Reconciler::restore(slots, 9, &mh.snapshot());
                    mf.readable = true;
                    mi.readable = true;
                    mh.readable = true;
                }
                let rf = full.apply(&d, &mut mf);
                let ri = inc.apply(&d, &mut mi);
                let rh = hinted.apply_changes(&d, &changes, &mut mh);
                assert_eq!(mh.take_calls(), mi.calls, "seed {seed} step {step}: hinted");
                assert_eq!(
                    rh.to_string(),
                    ri.to_string(),
                    "seed {seed} step {step}: hinted"
                );
                assert_eq!(mh.services, mi.services, "seed {seed} step {step}: hinted");
                let ctx = format!("seed {seed} step {step}");
                assert_eq!(mf.take_calls(), mi.take_calls(), "{ctx}");
                assert_eq!(rf.to_string(), ri.to_string(), "{ctx}");
                let errs =
                    |r: &SyncReport| r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>();
                assert_eq!(errs(&rf), errs(&ri), "{ctx}");
                assert_eq!(full.state_summary(), inc.state_summary(), "{ctx}");
                assert_eq!(mf.services, mi.services, "{ctx}");
                assert_eq!(mf.backends, mi.backends, "{ctx}");
                assert_eq!(mh.services6, mi.services6, "{ctx}: hinted");
                assert_eq!(mf.services6, mi.services6, "{ctx}");
                assert_eq!(mf.backends6, mi.backends6, "{ctx}");
            }
            // Without failures both converge to exactly the desired state.
            for m in [&mut mf, &mut mi] {
                m.fail_rate = 0;
                m.max_services = usize::MAX;
            }
            // (Room for every table and backend, each frontend wanted once, one flag value
            // per backend.)
            // (The convergence check below is for IPv4 units; IPv6 ones share its slots.)
            d.services6.clear();
            d.services = d.services.into_iter().take(3).collect();
            for ds in d.services.values_mut() {
                ds.backends = ds.backends.iter().take(2).copied().collect();
            }
            let mut seen = BTreeSet::new();
            for ds in d.services.values_mut() {
                ds.frontends.retain(|fe| seen.insert(*fe));
                ds.backends = ds
                    .backends
                    .iter()
                    .map(|b| Backend {
                        flags: u8::from(
                            crate::family::addr_from_raw(b.addr).octets()[3].is_multiple_of(3),
                        ),
                        ..*b
                    })
                    .collect();
            }
            d.services.retain(|_, ds| !ds.frontends.is_empty());
            // First everything goes (NP_MAGLEV may be too fragmented otherwise).
            let empty = Desired {
                node_addrs: d.node_addrs.clone(),
                ..Desired::default()
            };
            for d in [&empty, &empty, &d, &d, &d] {
                full.apply(d, &mut mf);
                inc.apply(d, &mut mi);
                assert_eq!(mf.take_calls(), mi.take_calls(), "seed {seed}: converging");
            }
            let rep = inc.apply(&d, &mut mi);
            assert_eq!(rep.calls(), 0, "seed {seed}: {rep}");
            assert!(rep.errors.is_empty(), "seed {seed}: {:?}", rep.errors);
            verify(&d, &mi);
        }
    }
}
