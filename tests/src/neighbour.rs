//! Another tool's TC program on the same hook as nodeport's, as CNIs and observability
//! agents attach them: the `test_neighbour` program (it counts and carries on), attached
//! after nodeport's with TCX or as a legacy clsact `cls_bpf` filter, in a node's
//! namespace. Each [`Neighbour`] is its own load of the object, with its own counter;
//! dropping it detaches the program.

use aya::{
    maps::PerCpuArray,
    programs::{
        links::LinkOrder,
        tc::{self, NlOptions, TcAttachOptions, TcAttachType},
        SchedClassifier,
    },
    Ebpf,
};
use nodeport_common::bench::{MAP_NEIGHBOUR_CNT, PROG_NEIGHBOUR};

use crate::{
    netns::{run_in, Netns},
    objects,
};

/// How the neighbour is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A TCX link after every program already there.
    TcxLast,
    /// A clsact `cls_bpf` filter in direct-action mode (netlink), as `tc filter add`.
    Legacy,
}

/// The names of the TCX programs on `iface` of `ns` at `dir`, in their order.
pub fn tcx_programs(ns: &Netns, iface: &str, dir: TcAttachType) -> Vec<String> {
    run_in(ns, || {
        SchedClassifier::query_tcx(iface, dir)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    })
}

pub struct Neighbour {
    ebpf: Ebpf,
}

impl Neighbour {
    /// Loads the program and attaches it to `iface` of `ns`, at `dir`, the way `hook` says.
    pub fn attach(ns: &Netns, iface: &str, dir: TcAttachType, hook: Hook) -> Neighbour {
        let mut ebpf = objects::load_small();
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_NEIGHBOUR)
            .expect(PROG_NEIGHBOUR)
            .try_into()
            .expect("a TC program");
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejected {PROG_NEIGHBOUR}: {e}"));
        run_in(ns, || {
            let options = match hook {
                Hook::TcxLast => TcAttachOptions::TcxOrder(LinkOrder::last()),
                Hook::Legacy => {
                    // The agent attaches with TCX and leaves no qdisc; a legacy tool adds
                    // its own clsact (it goes with the namespace).
                    let _ = tc::qdisc_add_clsact(iface);
                    TcAttachOptions::Netlink(NlOptions::default())
                }
            };
            prog.attach_with_options(iface, dir, options)
                .unwrap_or_else(|e| panic!("attach {PROG_NEIGHBOUR} ({hook:?}, {dir:?}): {e}"));
        });
        Neighbour { ebpf }
    }

    /// Packets it has seen.
    pub fn count(&self) -> u64 {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_NEIGHBOUR_CNT).expect(MAP_NEIGHBOUR_CNT))
                .expect(MAP_NEIGHBOUR_CNT);
        a.get(&0, 0).expect("read NPT_CNT").iter().sum()
    }
}
