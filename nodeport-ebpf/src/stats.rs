//! Per-CPU counters: one increment per verdict, drop reason or event.

use nodeport_common::Stat;

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat) {
    count_index(stat as u32)
}

/// [`count`] by the counter's index.
#[inline(always)]
pub fn count_index(stat: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}
