//! The reverse-NAT sweep: frees NP_RNAT and NP_RNAT6 entries whose flow is gone.
//!
//! NP_CT is an LRU map: under pressure the kernel evicts its least recently used flows.
//! NP_RNAT is not: an entry is created by the datapath only where none exists
//! (BPF_NOEXIST), so a live flow never loses its reverse entry to another flow or to
//! eviction, and two flows never share a reply tuple (and so a SNAT port). The price is
//! that nothing in the datapath frees an entry: this sweep does, as the single deleter,
//! for every entry whose owner is missing, expired or bound elsewhere
//! (`nodeport_common::ct::revnat_live`). A deleted SNAT entry is that port given back.
//!
//! Under pressure (a drop for a full map or exhausted ports was counted within
//! [`PRESSURE_HOLD`]; sweeps then run every second) the sweep also ends unassured flows (`ct::unassured`: a TCP client that never
//! acknowledged the handshake, a UDP flow never answered) idle for [`EARLY_DROP_AGE`],
//! conntrack entry first, then reverse entry, as netfilter's `early_drop` does when its
//! table is full: a spoofed flood then holds its entries for seconds, not for its
//! timeouts, and new connections get through.
//!
//! A flow may come back to life between the check and the delete (a SYN reopening its
//! tuple re-claims the entry it already holds): after deleting, the sweep looks at the
//! owner once more and puts the entry back if the flow is live again.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use nodeport_common::{
    ct::{bound_to, revnat_live, revnat_owner, unassured, Timeouts},
    CtEntry, FlowKey, Ip6, RevNat, Stat,
};
use tracing::{debug, info, warn};

use crate::{
    datapath::{monotonic_coarse_ns, KernelFlowTables, MapReader},
    family::RawAddr,
    metrics::Metrics,
};

/// Default time between two sweeps (`--conntrack-gc-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How long an unassured flow may idle before a sweep under pressure ends it.
pub const EARLY_DROP_AGE: Duration = Duration::from_secs(2);

/// What kind of sweep is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Free the entries of gone flows.
    Routine,
    /// Also end unassured flows idle for [`EARLY_DROP_AGE`].
    Pressure,
}

/// One family's conntrack maps as the sweep sees them.
pub trait FlowTables<A: RawAddr> {
    /// Every reverse entry (a snapshot: the datapath keeps writing meanwhile).
    fn reverse_entries(&self) -> Vec<(FlowKey<A>, RevNat<A>)>;
    fn reverse(&self, key: &FlowKey<A>) -> Option<RevNat<A>>;
    fn flow(&self, key: &FlowKey<A>) -> Option<CtEntry<A>>;
    /// Delete a conntrack entry; false when it was already gone.
    fn delete_flow(&mut self, key: &FlowKey<A>) -> bool;
    /// Delete a reverse entry; false when it was already gone.
    fn delete_reverse(&mut self, key: &FlowKey<A>) -> bool;
    /// Create a reverse entry where none exists.
    fn restore_reverse(&mut self, key: &FlowKey<A>, value: &RevNat<A>);
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Reverse entries looked at.
    pub scanned: u64,
    /// Entries deleted: their flows were gone (SNAT ports among them are free again).
    pub freed: u64,
    /// Entries put back because their flow came back to life during the sweep.
    pub restored: u64,
    /// Unassured flows ended under pressure (their entries are among `freed`).
    pub early_dropped: u64,
}

impl std::ops::AddAssign for Swept {
    fn add_assign(&mut self, o: Self) {
        self.scanned += o.scanned;
        self.freed += o.freed;
        self.restored += o.restored;
        self.early_dropped += o.early_dropped;
    }
}

/// Free every reverse entry of `tables` whose flow is gone at `now()` (CLOCK_MONOTONIC_COARSE
/// ns, the datapath's clock) under timeouts `t`; under [`Mode::Pressure`], end unassured
/// flows idle for [`EARLY_DROP_AGE`] too.
pub fn sweep<A: RawAddr, T: FlowTables<A>>(
    tables: &mut T,
    t: &Timeouts,
    mode: Mode,
    now: impl Fn() -> u64,
) -> Swept {
    let entries = tables.reverse_entries();
    let mut out = Swept {
        scanned: entries.len() as u64,
        ..Swept::default()
    };
    let at = now();
    let early_age = EARLY_DROP_AGE.as_nanos() as u64;
    // (reverse key, value, owner to end first)
    let mut doomed = Vec::new();
    for (key, value) in entries {
        let owner_key = revnat_owner(&key, &value);
        let owner = tables.flow(&owner_key);
        if !revnat_live(t, &key, owner.as_ref(), at) {
            doomed.push((key, value, None));
        } else if let Some(ct) = owner.filter(|ct| {
            mode == Mode::Pressure
                && unassured(key.proto, ct)
                && at.saturating_sub(ct.last_seen_ns) >= early_age
        }) {
            doomed.push((key, value, Some((owner_key, ct))));
        }
    }
    for (key, value, end) in doomed {
        if let Some((owner_key, ct)) = end {
            // Still the same idle, unassured flow (not answered or used since).
            let same = tables.flow(&owner_key).is_some_and(|now_ct| {
                now_ct.last_seen_ns == ct.last_seen_ns
                    && unassured(key.proto, &now_ct)
                    && bound_to(&now_ct, &key)
            });
            if !same || !tables.delete_flow(&owner_key) {
                continue;
            }
            out.early_dropped += 1;
        }
        // Only the value judged dead: a local flow's bind may have written over it since.
        if tables.reverse(&key) != Some(value) || !tables.delete_reverse(&key) {
            continue;
        }
        out.freed += 1;
        let owner = tables.flow(&revnat_owner(&key, &value));
        if revnat_live(t, &key, owner.as_ref(), now()) {
            tables.restore_reverse(&key, &value);
            out.restored += 1;
            out.freed -= 1;
        }
    }
    out
}

/// How long after the last counted pressure drop sweeps keep running every second under
/// [`Mode::Pressure`]: long enough for a flood's flows to idle past [`EARLY_DROP_AGE`].
pub const PRESSURE_HOLD: Duration = Duration::from_secs(10);

/// When the next sweep is due: every `interval`; and every second, under pressure, for
/// [`PRESSURE_HOLD`] after the datapath counted a drop for a full table or exhausted SNAT
/// ports, which is when freed entries are wanted at once.
#[derive(Debug)]
pub struct Schedule {
    interval: Duration,
    last: Option<Instant>,
    pressure_seen: u64,
    pressure_until: Option<Instant>,
}

impl Schedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            pressure_seen: 0,
            pressure_until: None,
        }
    }

    /// Whether to sweep at `now`, and how, given the datapath's running count of pressure
    /// drops.
    pub fn due(&mut self, now: Instant, pressure_drops: u64) -> Option<Mode> {
        if pressure_drops != self.pressure_seen {
            self.pressure_seen = pressure_drops;
            self.pressure_until = Some(now + PRESSURE_HOLD);
        }
        let pressure = self.pressure_until.is_some_and(|u| now < u);
        let since = self.last.map(|l| now.saturating_duration_since(l));
        let due = match since {
            None => true,
            Some(s) => s >= self.interval || (pressure && s >= Duration::from_secs(1)),
        };
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(if pressure {
            Mode::Pressure
        } else {
            Mode::Routine
        })
    }
}

/// Sweep the maps pinned in `pin_dir` on [`Schedule`], for as long as the agent runs, on
/// a thread of its own (a sweep of a full map takes a while and must not hold up the
/// sync loop).
pub fn spawn(pin_dir: PathBuf, t: Timeouts, interval: Duration, metrics: Arc<Metrics>) {
    let run = move || {
        let (mut v4, mut v6, reader) = match (
            KernelFlowTables::<u32>::open(&pin_dir),
            KernelFlowTables::<Ip6>::open(&pin_dir),
            MapReader::open(&pin_dir),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (a, b, c) => {
                let e = [a.err(), b.err(), c.err()].into_iter().flatten().next();
                warn!("conntrack sweep not started: {e:?}; SNAT ports of gone flows are not freed");
                return;
            }
        };
        let mut schedule = Schedule::new(interval);
        let mut last_error = String::new();
        loop {
            let pressure = reader
                .counters()
                .map(|c| {
                    c.iter()
                        .filter(|(name, _)| {
                            *name == Stat::DropMapFull.name()
                                || *name == Stat::DropSnatExhausted.name()
                        })
                        .map(|(_, n)| n)
                        .sum()
                })
                .unwrap_or(0);
            if let Some(mode) = schedule.due(Instant::now(), pressure) {
                let start = Instant::now();
                let mut swept = sweep(&mut v4, &t, mode, monotonic_coarse_ns);
                swept += sweep(&mut v6, &t, mode, monotonic_coarse_ns);
                metrics.record_gc(start.elapsed(), swept.freed, swept.early_dropped);
                if swept.early_dropped > 0 {
                    info!(?swept, elapsed = ?start.elapsed(), "conntrack under pressure: ended unassured flows");
                } else {
                    debug!(?swept, elapsed = ?start.elapsed(), "reverse-NAT sweep");
                }
                let error = [v4.take_error(), v6.take_error()]
                    .into_iter()
                    .flatten()
                    .map(|e| e.to_string())
                    .next()
                    .unwrap_or_default();
                if !error.is_empty() && error != last_error {
                    warn!("conntrack sweep: {error}");
                }
                last_error = error;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(run)
    {
        warn!("conntrack sweep not started: {e}; SNAT ports of gone flows are not freed");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nodeport_common::{Config, CT_F_SNAT, CT_F_SYN_ONLY, PROTO_TCP};

    use super::*;

    const S: u64 = 1_000_000_000;

    /// In-memory tables; `on_delete` lets a test change the flows mid-sweep.
    #[derive(Default)]
    struct Tables {
        ct: BTreeMap<(u32, u32, u16, u16), CtEntry>,
        rnat: BTreeMap<(u32, u32, u16, u16), RevNat>,
        revive_on_delete: Option<((u32, u32, u16, u16), CtEntry)>,
    }

    fn k(key: &FlowKey) -> (u32, u32, u16, u16) {
        (key.saddr, key.daddr, key.sport, key.dport)
    }

    fn fk((s, d, sp, dp): (u32, u32, u16, u16)) -> FlowKey {
        FlowKey::new(s, d, sp, dp, PROTO_TCP)
    }

    impl FlowTables<u32> for Tables {
        fn reverse_entries(&self) -> Vec<(FlowKey, RevNat)> {
            self.rnat.iter().map(|(key, v)| (fk(*key), *v)).collect()
        }
        fn reverse(&self, key: &FlowKey) -> Option<RevNat> {
            self.rnat.get(&k(key)).copied()
        }
        fn flow(&self, key: &FlowKey) -> Option<CtEntry> {
            self.ct.get(&k(key)).copied()
        }
        fn delete_flow(&mut self, key: &FlowKey) -> bool {
            self.ct.remove(&k(key)).is_some()
        }
        fn delete_reverse(&mut self, key: &FlowKey) -> bool {
            if let Some((ck, ce)) = self.revive_on_delete.take() {
                self.ct.insert(ck, ce);
            }
            self.rnat.remove(&k(key)).is_some()
        }
        fn restore_reverse(&mut self, key: &FlowKey, value: &RevNat) {
            self.rnat.entry(k(key)).or_insert(*value);
        }
    }

    /// A flow from client `c`:`cport` to frontend 100:80, SNATed to 200:`port` towards
    /// backend 50:8080, last seen at `seen_s`.
    fn flow(t: &mut Tables, c: u32, cport: u16, port: u16, seen_s: u64) {
        let ct = CtEntry {
            last_seen_ns: seen_s * S,
            backend_addr: 50,
            backend_port: 8080,
            nat_addr: 200,
            nat_port: port,
            flags: CT_F_SNAT,
            ..CtEntry::default()
        };
        t.ct.insert((c, 100, cport, 80), ct);
        t.rnat.insert(
            (50, 200, 8080, port),
            RevNat {
                fe_addr: 100,
                client_addr: c,
                fe_port: 80,
                client_port: cport,
            },
        );
    }

    #[test]
    fn frees_exactly_the_entries_of_gone_flows() {
        let t = Timeouts::of(&Config::default());
        let mut tables = Tables::default();
        flow(&mut tables, 1, 1000, 20_000, 1_000);
        flow(&mut tables, 2, 1000, 20_001, 1_000);
        flow(&mut tables, 3, 1000, 20_002, 1_000);
        flow(&mut tables, 4, 1000, 20_003, 1_000);
        // 2: evicted from NP_CT; 3: reopened with another port; 4: expired.
        tables.ct.remove(&(2, 100, 1000, 80));
        tables.ct.get_mut(&(3, 100, 1000, 80)).unwrap().nat_port = 20_009;
        tables.ct.get_mut(&(4, 100, 1000, 80)).unwrap().last_seen_ns = 0;
        let swept = sweep(&mut tables, &t, Mode::Routine, || 22_000 * S);
        assert_eq!(
            swept,
            Swept {
                scanned: 4,
                freed: 3,
                ..Swept::default()
            }
        );
        assert_eq!(
            tables.rnat.keys().copied().collect::<Vec<_>>(),
            vec![(50, 200, 8080, 20_000)]
        );
        assert_eq!(
            sweep(&mut tables, &t, Mode::Routine, || 22_000 * S),
            Swept {
                scanned: 1,
                ..Swept::default()
            }
        );
    }

    #[test]
    fn a_flow_that_comes_back_during_the_sweep_keeps_its_entry() {
        let t = Timeouts::of(&Config::default());
        let mut tables = Tables::default();
        flow(&mut tables, 1, 1000, 20_000, 1_000);
        let owner = (1, 100, 1000, 80);
        let live = tables.ct.remove(&owner).unwrap();
        tables.revive_on_delete = Some((owner, live));
        let swept = sweep(&mut tables, &t, Mode::Routine, || 1_001 * S);
        assert_eq!(swept.restored, 1);
        assert_eq!(swept.freed, 0);
        assert!(tables.rnat.contains_key(&(50, 200, 8080, 20_000)));
    }

    #[test]
    fn under_pressure_unassured_idle_flows_end_first() {
        let t = Timeouts::of(&Config::default());
        let mut tables = Tables::default();
        // 1: answered (client ACKed); 2: SYN only, idle 5 s; 3: SYN only, 1 s old.
        flow(&mut tables, 1, 1000, 20_000, 95);
        flow(&mut tables, 2, 1000, 20_001, 95);
        flow(&mut tables, 3, 1000, 20_002, 99);
        for c in [2, 3] {
            tables.ct.get_mut(&(c, 100, 1000, 80)).unwrap().flags |= CT_F_SYN_ONLY;
        }
        let routine = sweep(&mut tables, &t, Mode::Routine, || 100 * S);
        assert_eq!(routine.freed, 0, "all three are live");
        let swept = sweep(&mut tables, &t, Mode::Pressure, || 100 * S);
        assert_eq!((swept.freed, swept.early_dropped), (1, 1));
        assert!(!tables.ct.contains_key(&(2, 100, 1000, 80)), "flow 2 ended");
        assert!(!tables.rnat.contains_key(&(50, 200, 8080, 20_001)));
        assert_eq!(tables.ct.len(), 2);
        assert_eq!(tables.rnat.len(), 2);
    }

    #[test]
    fn sweeps_on_interval_and_every_second_under_pressure() {
        let mut s = Schedule::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(s.due(t0, 0), Some(Mode::Routine), "first sweep at start");
        assert_eq!(s.due(at(5_000), 0), None);
        assert_eq!(s.due(at(5_500), 3), Some(Mode::Pressure), "drops counted");
        assert_eq!(s.due(at(6_000), 3), None, "not twice within a second");
        // The flood stopped (no new drops), but its flows are still young: keep sweeping
        // every second under pressure for PRESSURE_HOLD.
        assert_eq!(s.due(at(6_600), 3), Some(Mode::Pressure));
        assert_eq!(s.due(at(7_700), 3), Some(Mode::Pressure));
        assert_eq!(s.due(at(15_000), 3), Some(Mode::Pressure));
        assert_eq!(
            s.due(at(15_600), 3),
            None,
            "hold over: back to the interval"
        );
        assert_eq!(s.due(at(24_000), 3), None);
        assert_eq!(s.due(at(25_000), 3), Some(Mode::Routine), "interval");
    }
}
