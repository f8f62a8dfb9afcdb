//! One generator run with circulating frames: a population of frames is injected once
//! (AF_PACKET sends on the sink's return veth), then laps generator -> node -> sink ->
//! generator on its own, rewritten by the generator on every lap, until the generator is
//! told to stop and drops them all. Frames the node drops are replaced: every tick, as
//! many new frames are injected as went missing between generator and sink.
//!
//! The injecting thread is pinned to the measured CPU, so the veths' NAPI polls (which
//! run where they were scheduled) stay on that CPU: generator, node and sink run there in
//! lock step, in softirq, with no per-packet syscall.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};
use nodeport_common::bench::{GenConfig, CNT_GEN, CNT_GEN_STOPPED, CNT_SINK, GEN_F_STOP};

use crate::{
    netns::{run_in, Netns},
    pktbench::{
        cpu::{Busy, BusyClock},
        progs::BenchProgs,
        run::stopped,
    },
};

/// Frames in circulation. Every veth ring holds 256 frames (drivers/net/veth.c,
/// VETH_RING_SIZE), and the top-up rule below can hold up to twice this many while the
/// node is the slowest stage, all queued before it: 112 leaves room.
pub const POPULATION: u64 = 112;
/// How often the population is checked and topped up.
const TICK: Duration = Duration::from_millis(5);
/// How long the frames get to drain after the stop.
const DRAIN: Duration = Duration::from_secs(2);

/// How frames reach the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A population circulates (the sink returns every frame to the generator).
    Circulate,
    /// Fallback where circulation does not run: every frame is an AF_PACKET send into the
    /// generator's veth (rewritten there as in circulation), and the sink drops it. About
    /// a fifth of the rate, and each frame carries a syscall's cost.
    Send,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Circulate => "circulating frames",
            Mode::Send => "AF_PACKET sends",
        }
    }
}

/// One run: a warm-up, then a measured window, whichever bound comes first.
#[derive(Clone, Copy, Debug)]
pub struct GenRun {
    /// The injecting thread runs pinned to this CPU (and with it all the softirq work).
    pub cpu: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Upper bound on frames generated in the measured window.
    pub max_frames: u64,
    pub mode: Mode,
}

/// What the measured window of a run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    /// Frames the generator wrote and sent.
    pub frames: u64,
    /// Frames the sink counted.
    pub delivered: u64,
    /// Frames injected (the population and its top-ups) during the window.
    pub injected: u64,
    /// Frames injected over the whole run.
    pub injected_total: u64,
    pub elapsed: Duration,
    /// Kernel time meanwhile (all work in lock step lands on the pinned CPU).
    pub busy: Busy,
}

/// An AF_PACKET socket bound to the sink's return veth: what it sends arrives at the
/// generator's veth, whose XDP program rewrites it and starts it on its first lap.
struct Injector {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
    frame: Vec<u8>,
}

impl Injector {
    fn open(ns: &Netns, ifindex: u32, frame_len: usize) -> Injector {
        let fd = run_in(ns, || {
            // SAFETY: plain socket(2); the result is checked and owned at once.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if raw < 0 {
                panic!("AF_PACKET socket: {}", io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        });
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        Injector {
            fd,
            addr,
            // The generator writes every byte that matters; the length is the frame's.
            frame: vec![0u8; frame_len],
        }
    }

    /// Sends `n` frames; returns how many the kernel took.
    fn send(&self, n: u64) -> u64 {
        let mut sent = 0;
        for _ in 0..n {
            // SAFETY: the buffer and the address outlive the call; lengths are theirs.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    self.frame.as_ptr().cast(),
                    self.frame.len(),
                    0,
                    (&self.addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r < 0 {
                break;
            }
            sent += 1;
        }
        sent
    }
}

/// Generator and sink counters at one moment.
#[derive(Clone, Copy)]
struct Counts {
    gen: u64,
    sink: u64,
}

fn counts(progs: &BenchProgs) -> Counts {
    Counts {
        gen: progs.count(CNT_GEN),
        sink: progs.count(CNT_SINK),
    }
}

/// This thread pinned to one CPU while the value lives; its old CPU set comes back on drop.
struct Pinned(CpuSet);

impl Pinned {
    fn to(cpu: usize) -> Pinned {
        let old = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        let mut cpus = CpuSet::new();
        cpus.set(cpu).expect("cpu index");
        sched_setaffinity(Pid::from_raw(0), &cpus).expect("sched_setaffinity");
        Pinned(old)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = sched_setaffinity(Pid::from_raw(0), &self.0);
    }
}

/// Runs frames of `cfg` around the loop: injected from `sink` on `ret_ifindex` (the
/// sink's return veth), for `run`'s warm-up and measured window; then stops the generator
/// and waits for the population to drain, so the next run starts from none. `window` is
/// called with `true` when the measured window opens and `false` when it closes.
pub fn circulate(
    progs: &mut BenchProgs,
    sink: &Netns,
    ret_ifindex: u32,
    cfg: &GenConfig,
    run: GenRun,
    window: &mut dyn FnMut(bool),
) -> GenStats {
    progs.set_gen(&GenConfig { flags: 0, ..*cfg });
    let inj = Injector::open(sink, ret_ifindex, cfg.frame_len as usize);
    let stats = {
        let _pin = Pinned::to(run.cpu);
        lap(progs, &inj, run, window)
    };
    progs.set_gen(&GenConfig {
        flags: GEN_F_STOP,
        ..*cfg
    });
    let deadline = Instant::now() + DRAIN;
    let mut last = progs.count(CNT_GEN_STOPPED);
    loop {
        thread::sleep(Duration::from_millis(20));
        let now = progs.count(CNT_GEN_STOPPED);
        if now == last || Instant::now() >= deadline {
            break;
        }
        last = now;
    }
    stats
}

/// The pinned thread's work: inject, keep the population up, measure the window.
///
/// A frame the generator sent a tick ago has reached the sink by now unless the node
/// dropped it (a lap takes microseconds), so `gen(a tick ago) - sink(now)` counts lost
/// frames and never counts one still on its way: the population is never pushed above
/// [`POPULATION`] by frames in transit.
fn lap(
    progs: &BenchProgs,
    inj: &Injector,
    run: GenRun,
    on_window: &mut dyn FnMut(bool),
) -> GenStats {
    let base = counts(progs);
    let mut injected = match run.mode {
        Mode::Circulate => inj.send(POPULATION),
        Mode::Send => 0,
    };
    let mut replaced = 0u64;
    let mut prev = base;
    let mut window: Option<(Instant, Counts, u64, BusyClock)> = None;
    let start = Instant::now();
    loop {
        match run.mode {
            Mode::Circulate => thread::sleep(TICK),
            Mode::Send => {
                let t = Instant::now();
                while t.elapsed() < TICK {
                    injected += inj.send(64);
                }
            }
        }
        let now = counts(progs);
        let lost = (prev.gen - base.gen).saturating_sub(now.sink - base.sink);
        let mut n = lost.saturating_sub(replaced).min(POPULATION);
        if run.mode == Mode::Send {
            n = 0;
        } else if n == 0 && now.gen == prev.gen {
            // Nothing moved and nothing counts as lost: frames vanished after the sink.
            n = POPULATION / 4;
        }
        if n > 0 {
            let k = inj.send(n);
            injected += k;
            replaced += k;
        }
        prev = now;
        match &window {
            None if start.elapsed() >= run.warmup || stopped() => {
                on_window(true);
                window = Some((Instant::now(), now, injected, BusyClock::start(run.cpu)));
            }
            Some((t0, c0, i0, busy))
                if t0.elapsed() >= run.duration
                    || now.gen - c0.gen >= run.max_frames
                    || stopped() =>
            {
                let busy = busy.stop();
                on_window(false);
                return GenStats {
                    frames: now.gen - c0.gen,
                    delivered: now.sink - c0.sink,
                    injected: injected - i0,
                    injected_total: injected,
                    elapsed: t0.elapsed(),
                    busy,
                };
            }
            _ => {}
        }
    }
}
