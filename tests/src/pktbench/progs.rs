//! The benchmark's eBPF programs (nodeport-ebpf/src/bench.rs), taken from the agent's
//! embedded object: the generator run through BPF_PROG_TEST_RUN with XDP live frames, the
//! bare forwarder and the sink attached to veths of the topology, and their counters.
//! aya creates every map of an object, so the datapath's own maps are shrunk to one entry
//! here; the bench programs never touch them.

use std::{
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use nix::{
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};
use nodeport_agent::datapath::EBPF_OBJECT;
use nodeport_common::{
    bench::{FwdConfig, GenConfig, MAP_CNT, MAP_FWD, MAP_GEN, PROG_FWD, PROG_GEN, PROG_SINK},
    maps as m,
};

use crate::{
    netns::{run_in, Netns},
    pktbench::{cpu::BusyClock, run::stopped},
};

/// Frames per live-frames batch (the kernel's default).
const LIVE_BATCH: u32 = 64;
/// Frames of the first BPF_PROG_TEST_RUN call when the rate is unlimited.
const FIRST_CHUNK: u64 = 8_192;
/// How long later calls should take.
const CALL_TARGET: Duration = Duration::from_millis(500);

/// One generator run: bounded by `max_frames` and `duration`, whichever comes first.
#[derive(Clone, Copy, Debug)]
pub struct GenRun {
    /// The generator's thread runs pinned to this CPU (and with it the softirq work it
    /// triggers on the node and the sink: lock step on one CPU).
    pub cpu: usize,
    pub duration: Duration,
    pub max_frames: u64,
    /// Frames per second; 0 for as fast as possible.
    pub rate: u64,
}

/// What a generator run did.
#[derive(Clone, Copy, Debug)]
pub struct GenStats {
    pub frames: u64,
    pub elapsed: Duration,
    /// Kernel time of the generator's CPU meanwhile (all work in lock step lands there).
    pub busy: Duration,
}

pub struct BenchProgs {
    ebpf: Ebpf,
}

impl BenchProgs {
    /// Loads the object and the three bench programs (verifier included).
    pub fn load() -> BenchProgs {
        assert!(
            !EBPF_OBJECT.is_empty(),
            "nodeport-agent was built with AYA_BUILD_SKIP: no eBPF object"
        );
        let mut loader = EbpfLoader::new();
        for name in [
            m::MAP_SERVICES,
            m::MAP_BACKENDS,
            m::MAP_MAGLEV,
            m::MAP_CONNTRACK,
            m::MAP_REVNAT,
        ] {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).expect("loading the eBPF object");
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

    /// One plain (not live) run of the generator on a zeroed `frame_len`-byte frame:
    /// its verdict and the frame it wrote (to check what it sends).
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

    /// Runs the generator from `ns`, transmitting out of `ifindex` (XDP_TX in live-frames
    /// mode), with `frame_len`-byte frames, until `run` says stop.
    pub fn generate(
        &mut self,
        ns: &Netns,
        ifindex: u32,
        frame_len: usize,
        run: GenRun,
    ) -> GenStats {
        let prog = self.xdp(PROG_GEN);
        run_in(ns, move || {
            let mut cpus = CpuSet::new();
            cpus.set(run.cpu).expect("cpu index");
            sched_setaffinity(Pid::from_raw(0), &cpus).expect("sched_setaffinity");
            let frame = vec![0u8; frame_len];
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue, egress.
            let md: [u32; 6] = [0, frame_len as u32, 0, ifindex, 0, 0];
            let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
            // Every call sets up and tears down a page pool, which takes ~25 ms here
            // (mostly waiting, not computing): calls are sized to last about
            // CALL_TARGET, from the rate the previous call reached.
            let mut chunk: u64 = if run.rate == 0 {
                FIRST_CHUNK
            } else {
                (run.rate / 20).max(1)
            };
            let busy = BusyClock::start(run.cpu);
            let start = Instant::now();
            let mut frames = 0u64;
            while frames < run.max_frames && start.elapsed() < run.duration && !stopped() {
                let n = chunk.min(run.max_frames - frames).min(u32::MAX as u64) as u32;
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(&frame);
                opts.ctx_in = Some(&ctx);
                opts.repeat = n;
                opts.attrs = TestRunAttrs::new().xdp_live_frames(LIVE_BATCH);
                let t0 = Instant::now();
                prog.test_run(opts)
                    .expect("BPF_PROG_TEST_RUN (live frames)");
                frames += n as u64;
                if run.rate == 0 {
                    let rate = n as f64 / t0.elapsed().as_secs_f64();
                    let left = run.duration.saturating_sub(start.elapsed());
                    chunk = (rate * left.min(CALL_TARGET).as_secs_f64()) as u64;
                    chunk = chunk.max(FIRST_CHUNK);
                } else {
                    let due = Duration::from_secs_f64(frames as f64 / run.rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            }
            GenStats {
                frames,
                elapsed: start.elapsed(),
                busy: busy.stop(),
            }
        })
    }
}
