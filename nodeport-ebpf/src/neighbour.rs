//! `test_neighbour`, for the tests only and never loaded by the agent: a stand-in for
//! another tool's TC program on nodeport's hook (a CNI's policy program, an observability
//! agent). It counts every packet it sees and carries on, as such programs do.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};

/// NPT_CNT: 0 -> packets seen (per CPU).
#[map(name = "NPT_CNT")]
static CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn test_neighbour(_ctx: TcContext) -> i32 {
    if let Some(c) = CNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
    TC_ACT_UNSPEC
}
