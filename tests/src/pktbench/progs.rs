//! The benchmark's eBPF programs (nodeport-ebpf/src/bench.rs), taken from the agent's
//! embedded object: the generator, the bare forwarder and the sink attached to veths of
//! the topology, their settings and their counters. (circulate.rs drives a run.)

use aya::{
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use nodeport_common::bench::{
    FwdConfig, GenConfig, SinkConfig, MAP_CNT, MAP_FWD, MAP_GEN, MAP_SINK, PROG_FWD, PROG_GEN,
    PROG_SINK,
};

use crate::{
    netns::{run_in, Netns},
    objects,
};

pub struct BenchProgs {
    ebpf: Ebpf,
}

impl BenchProgs {
    /// Loads the object and the three bench programs (verifier included).
    pub fn load() -> BenchProgs {
        let mut ebpf = objects::load_small();
        for name in [PROG_GEN, PROG_FWD, PROG_SINK] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name} in the object"))
                .try_into()
                .expect("an XDP program");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        BenchProgs { ebpf }
    }

    fn xdp(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .expect("loaded program")
            .try_into()
            .expect("an XDP program")
    }

    /// Attaches program `name` (native mode) to `iface` in `ns`; it stays attached while
    /// this value lives (bpf_link, detached when the program is dropped).
    pub fn attach(&mut self, name: &str, ns: &Netns, iface: &str) {
        let prog = self.xdp(name);
        run_in(ns, || {
            prog.attach(iface, XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attach {name} to {iface}: {e}"));
        });
    }

    pub fn set_gen(&mut self, cfg: &GenConfig) {
        let mut a: Array<_, GenConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_GEN).expect(MAP_GEN)).expect(MAP_GEN);
        a.set(0, cfg, 0).expect("write NPB_GEN");
    }

    pub fn set_sink(&mut self, cfg: &SinkConfig) {
        let mut a: Array<_, SinkConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_SINK).expect(MAP_SINK)).expect(MAP_SINK);
        a.set(0, cfg, 0).expect("write NPB_SINK");
    }

    pub fn set_fwd(&mut self, cfg: &FwdConfig) {
        let mut a: Array<_, FwdConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_FWD).expect(MAP_FWD)).expect(MAP_FWD);
        a.set(0, cfg, 0).expect("write NPB_FWD");
    }

    /// Counter `slot` (`CNT_*`), summed over CPUs.
    pub fn count(&self, slot: u32) -> u64 {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_CNT).expect(MAP_CNT)).expect(MAP_CNT);
        a.get(&slot, 0).expect("read NPB_CNT").iter().sum()
    }

    /// One plain run of the generator (BPF_PROG_TEST_RUN) on a zeroed `frame_len`-byte
    /// frame: its verdict and the frame it wrote (to check what it sends).
    pub fn gen_frame(&mut self, frame_len: usize) -> (u32, Vec<u8>) {
        let prog = self.xdp(PROG_GEN);
        let frame = vec![0u8; frame_len];
        let mut out = vec![0u8; frame_len + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}
