//! The one place the agent touches the kernel: loads the embedded eBPF object, sizes and
//! pins its maps, attaches XDP and TC to interfaces, writes map entries, reads counters.
//! Dropping a [`Datapath`] detaches the programs and removes the pins.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use aya::{
    maps::{DevMapHash, HashMap, Map, MapData, PerCpuArray},
    programs::{
        tc::{self, SchedClassifierLinkId, TcAttachType},
        xdp::XdpLinkId,
        SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use nodeport_common::{
    maps as m, stats::STAT_COUNT, Backend, Config, FrontendKey, NodeAddr, Service, Stat,
};

use crate::{
    error::{Error, Result},
    sync::Maps,
};

/// The eBPF object built from nodeport-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport-ebpf"));

/// Reader of the datapath's aya-log ring buffer, forwarding records to the `log` facade.
pub type EbpfLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Map capacities chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: m::DEFAULT_MAX_SERVICES,
            backends: m::DEFAULT_MAX_BACKENDS,
            maglev_slots: m::DEFAULT_MAGLEV_SLOTS,
            conntrack: m::DEFAULT_CT_ENTRIES,
        }
    }
}

/// How XDP is attached: `Auto` tries the driver (native) mode, then generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    Auto,
    Native,
    Generic,
}

/// An interface the programs are attached to.
struct Attachment {
    name: String,
    xdp: XdpLinkId,
    mode: XdpMode,
    tc_in: SchedClassifierLinkId,
    tc_out: SchedClassifierLinkId,
}

/// The shared-memory view of NP_MAGLEV (BPF_F_MMAPABLE array of `MaglevEntry`, two
/// 4-byte slots per 8-byte element, so the mapping is one flat run of u32 slots).
struct MaglevMmap {
    ptr: NonNull<u32>,
    len: usize,
    _map: MapData,
}

impl MaglevMmap {
    fn new(map: MapData, slots: u32) -> Result<Self> {
        let page = 4096usize;
        let bytes = (slots as usize * 4).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd created with BPF_F_MMAPABLE, of at least `bytes`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Kernel(format!(
                "mmap of {} failed: {}",
                m::MAP_MAGLEV,
                std::io::Error::last_os_error()
            )));
        }
        let ptr = NonNull::new(ptr.cast::<u32>())
            .ok_or_else(|| Error::Kernel("mmap returned null".into()))?;
        Ok(Self {
            ptr,
            len: slots as usize,
            _map: map,
        })
    }

    fn slots(&mut self) -> &mut [u32] {
        // SAFETY: the mapping is `len` u32s long and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: the mapping is owned memory; access goes through `&mut self`.
unsafe impl Send for MaglevMmap {}

impl Drop for MaglevMmap {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                (self.len * 4).div_ceil(4096) * 4096,
            )
        };
    }
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: Vec<Attachment>,
    services: HashMap<MapData, FrontendKey, Service>,
    backends: HashMap<MapData, u32, Backend>,
    node_addrs: HashMap<MapData, u32, NodeAddr>,
    config: aya::maps::Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    devices: DevMapHash<MapData>,
    maglev: MaglevMmap,
    logger: Option<EbpfLog>,
}

fn kerr(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("{what}: {e}"))
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::Kernel(format!("map {name} missing from the object")))
}

/// Mount the BPF filesystem at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| kerr("mounting bpffs at /sys/fs/bpf", e))
}

impl Datapath {
    /// Load the programs and create the maps (pinned under `pin_dir` when given).
    pub fn load(sizes: MapSizes, pin_dir: Option<&Path>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::Kernel(
                "this binary was built with AYA_BUILD_SKIP and carries no eBPF object".into(),
            ));
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(m::MAP_SERVICES, sizes.services)
            .map_max_entries(m::MAP_BACKENDS, sizes.backends)
            .map_max_entries(
                m::MAP_MAGLEV,
                sizes.maglev_slots.div_ceil(m::MAGLEV_SLOTS_PER_ENTRY),
            )
            .map_max_entries(m::MAP_CONNTRACK, sizes.conntrack)
            .map_max_entries(m::MAP_REVNAT, sizes.conntrack)
            .load(EBPF_OBJECT)
            .map_err(|e| kerr("loading the eBPF object", e))?;
        let xdp: &mut Xdp = prog(&mut ebpf, m::PROG_XDP)?;
        xdp.load().map_err(|e| verifier_err(m::PROG_XDP, e))?;
        for name in [m::PROG_TC_INGRESS, m::PROG_TC_EGRESS] {
            let p: &mut SchedClassifier = prog(&mut ebpf, name)?;
            p.load().map_err(|e| verifier_err(name, e))?;
        }
        if let Some(dir) = pin_dir {
            ensure_bpffs()?;
            if dir.exists() {
                // A previous run died without cleaning up: start from fresh maps.
                fs::remove_dir_all(dir).map_err(|e| kerr(dir.display(), e))?;
            }
            fs::create_dir_all(dir).map_err(|e| kerr(dir.display(), e))?;
            for (name, map) in ebpf.maps().filter(|(name, _)| name.starts_with("NP_")) {
                map.pin(dir.join(name))
                    .map_err(|e| kerr(format!("pinning {name}"), e))?;
            }
        }
        // Per-packet logs (only emitted when the debug switch is on) drain into `log`.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| tracing::debug!(error = %e, "no eBPF log buffer"))
            .ok();
        let services = HashMap::try_from(take(&mut ebpf, m::MAP_SERVICES)?)
            .map_err(|e| kerr(m::MAP_SERVICES, e))?;
        let backends = HashMap::try_from(take(&mut ebpf, m::MAP_BACKENDS)?)
            .map_err(|e| kerr(m::MAP_BACKENDS, e))?;
        let node_addrs = HashMap::try_from(take(&mut ebpf, m::MAP_NODE_ADDRS)?)
            .map_err(|e| kerr(m::MAP_NODE_ADDRS, e))?;
        let config = aya::maps::Array::try_from(take(&mut ebpf, m::MAP_CONFIG)?)
            .map_err(|e| kerr(m::MAP_CONFIG, e))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, m::MAP_STATS)?)
            .map_err(|e| kerr(m::MAP_STATS, e))?;
        let devices = DevMapHash::try_from(take(&mut ebpf, m::MAP_DEVICES)?)
            .map_err(|e| kerr(m::MAP_DEVICES, e))?;
        let Map::Array(maglev) = take(&mut ebpf, m::MAP_MAGLEV)? else {
            return Err(Error::Kernel(format!("{} is not an array", m::MAP_MAGLEV)));
        };
        let slots =
            sizes.maglev_slots.div_ceil(m::MAGLEV_SLOTS_PER_ENTRY) * m::MAGLEV_SLOTS_PER_ENTRY;
        let maglev = MaglevMmap::new(maglev, slots)?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attached: Vec::new(),
            services,
            backends,
            node_addrs,
            config,
            stats,
            devices,
            maglev,
            logger,
        };
        dp.set_config(&Config::default())?;
        Ok(dp)
    }

    /// Attach XDP (ingress), TC ingress and TC egress to `iface`. Returns the XDP mode used.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<XdpMode> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|e| Error::Kernel(format!("interface {iface}: {e}")))?;
        let xdp: &mut Xdp = prog(&mut self.ebpf, m::PROG_XDP)?;
        let tries: &[XdpMode] = match mode {
            XdpAttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttachMode::Native => &[XdpMode::Driver],
            XdpAttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last = None;
        let mut attached = None;
        for &mode in tries {
            match xdp.attach(iface, mode) {
                Ok(id) => {
                    attached = Some((id, mode));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let (xdp_id, xdp_mode) = attached.ok_or_else(|| {
            kerr(
                format!("attaching XDP to {iface}"),
                last.map_or_else(String::new, |e| e.to_string()),
            )
        })?;
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            // Already there (ours from a previous run, or another tool's): reuse it.
            tracing::debug!(iface, error = %e, "clsact qdisc not added");
        }
        let tc_in: &mut SchedClassifier = prog(&mut self.ebpf, m::PROG_TC_INGRESS)?;
        let tc_in = tc_in
            .attach(iface, TcAttachType::Ingress)
            .map_err(|e| kerr(format!("attaching TC ingress to {iface}"), e))?;
        let tc_out: &mut SchedClassifier = prog(&mut self.ebpf, m::PROG_TC_EGRESS)?;
        let tc_out = tc_out
            .attach(iface, TcAttachType::Egress)
            .map_err(|e| kerr(format!("attaching TC egress to {iface}"), e))?;
        self.devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| kerr(format!("adding {iface} to {}", m::MAP_DEVICES), e))?;
        self.attached.push(Attachment {
            name: iface.to_string(),
            xdp: xdp_id,
            mode: xdp_mode,
            tc_in,
            tc_out,
        });
        Ok(xdp_mode)
    }

    /// Interfaces and XDP modes currently attached.
    pub fn attachments(&self) -> Vec<(String, XdpMode)> {
        self.attached
            .iter()
            .map(|a| (a.name.clone(), a.mode))
            .collect()
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| kerr(m::MAP_CONFIG, e))
    }

    /// The eBPF log reader (read it when its fd is readable); `None` after the first call.
    pub fn take_logger(&mut self) -> Option<EbpfLog> {
        self.logger.take()
    }

    /// Counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for (i, stat) in Stat::ALL.iter().enumerate().take(STAT_COUNT as usize) {
            let per_cpu = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|e| kerr(m::MAP_STATS, e))?;
            out.insert(stat.name(), per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// The loaded object, for tests that drive programs directly (BPF_PROG_TEST_RUN).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Maps for Datapath {
    fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()> {
        self.backends
            .insert(id, be, 0)
            .map_err(|e| kerr(format!("{} insert {id}", m::MAP_BACKENDS), e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.backends
            .remove(&id)
            .map_err(|e| kerr(format!("{} remove {id}", m::MAP_BACKENDS), e))
    }

    /// Write a Maglev table into the slots starting at `offset`, then fence so the writes
    /// are visible before any later map update that points packets at them.
    fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        let slots = self.maglev.slots();
        let (start, total) = (offset as usize, slots.len());
        let end = start + ids.len();
        let dst = slots.get_mut(start..end).ok_or_else(|| {
            Error::Kernel(format!(
                "{} range {start}..{end} beyond {total} slots",
                m::MAP_MAGLEV
            ))
        })?;
        dst.copy_from_slice(ids);
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn set_service(&mut self, key: &FrontendKey, val: &Service) -> Result<()> {
        self.services
            .insert(key, val, 0)
            .map_err(|e| kerr(format!("{} insert {key:?}", m::MAP_SERVICES), e))
    }

    fn delete_service(&mut self, key: &FrontendKey) -> Result<()> {
        self.services
            .remove(key)
            .map_err(|e| kerr(format!("{} remove {key:?}", m::MAP_SERVICES), e))
    }

    fn set_node_addr(&mut self, addr: u32) -> Result<()> {
        self.node_addrs
            .insert(addr, NodeAddr { flags: 0 }, 0)
            .map_err(|e| kerr(format!("{} insert", m::MAP_NODE_ADDRS), e))
    }

    fn delete_node_addr(&mut self, addr: u32) -> Result<()> {
        self.node_addrs
            .remove(&addr)
            .map_err(|e| kerr(format!("{} remove", m::MAP_NODE_ADDRS), e))
    }
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Kernel(format!("program {name} missing from the object")))?;
    p.try_into().map_err(|e| kerr(format!("program {name}"), e))
}

fn verifier_err(name: &str, e: aya::programs::ProgramError) -> Error {
    Error::Kernel(format!("the verifier refused {name}: {e:?}"))
}

impl Drop for Datapath {
    fn drop(&mut self) {
        for a in self.attached.drain(..) {
            if let Ok(p) = prog::<Xdp>(&mut self.ebpf, m::PROG_XDP) {
                let _ = p.detach(a.xdp);
            }
            if let Ok(p) = prog::<SchedClassifier>(&mut self.ebpf, m::PROG_TC_INGRESS) {
                let _ = p.detach(a.tc_in);
            }
            if let Ok(p) = prog::<SchedClassifier>(&mut self.ebpf, m::PROG_TC_EGRESS) {
                let _ = p.detach(a.tc_out);
            }
        }
        if let Some(dir) = &self.pin_dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}
