//! The one place the agent touches the kernel: loads the embedded eBPF object, sizes and
//! pins its maps, attaches XDP and TC to interfaces, writes map entries, reads counters.
//! Dropping a [`Datapath`] detaches the programs and removes the pins.

use std::{
    collections::BTreeMap,
    fs,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMapHash, HashMap, IterableMap, Map, MapData, PerCpuArray,
    },
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions, TcAttachType},
        xdp::XdpLink,
        ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use nodeport_common::{
    maps as m, stats::STAT_COUNT, Addr, Backend, Backend6, Config, CtEntry, CtEntry6, FlowKey,
    FlowKey6, FrontendKey, FrontendKey6, Ip6, NodeAddr, RevNat, RevNat6, Service, SrcRange, Stat,
    SRC_RANGE_SVC_BITS,
};

use crate::{
    error::{Error, Result},
    family::{Family, IpCidr, RawAddr},
    gc::FlowTables,
    sync::{MapSnapshot, Maps},
    tc_legacy::{self, LegacyTc},
};

/// The eBPF object built from nodeport-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport-ebpf"));

/// Reader of the datapath's aya-log ring buffer, forwarding records to the `log` facade.
pub type EbpfLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Which program variants to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// The production programs: they verify with CAP_BPF and CAP_NET_ADMIN.
    #[default]
    Plain,
    /// XDP and TC ingress able to log every packet (aya-log) when the debug switch is on;
    /// the verifier needs CAP_PERFMON for them.
    Debug,
}

impl Variant {
    fn xdp(self) -> &'static str {
        match self {
            Variant::Plain => m::PROG_XDP,
            Variant::Debug => m::PROG_XDP_DEBUG,
        }
    }
    fn tc_ingress(self) -> &'static str {
        match self {
            Variant::Plain => m::PROG_TC_INGRESS,
            Variant::Debug => m::PROG_TC_INGRESS_DEBUG,
        }
    }
}

/// Map capacities chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// NP_SVC and NP_SVC6, each.
    pub services: u32,
    /// NP_BE and NP_BE6 (one id space over both).
    pub backends: u32,
    pub maglev_slots: u32,
    /// NP_CT (`--conntrack-max`).
    pub conntrack: u32,
    /// NP_RNAT (`--revnat-max`).
    pub revnat: u32,
    /// NP_CT6 (`--conntrack-max6`).
    pub conntrack6: u32,
    /// NP_RNAT6 (`--revnat-max6`).
    pub revnat6: u32,
    /// NP_NODEADDR and NP_NODEADDR6, each (`--max-node-addresses`).
    pub node_addrs: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: m::DEFAULT_MAX_SERVICES,
            backends: m::DEFAULT_MAX_BACKENDS,
            maglev_slots: m::DEFAULT_MAGLEV_SLOTS,
            conntrack: m::DEFAULT_CT_ENTRIES,
            revnat: m::DEFAULT_CT_ENTRIES,
            conntrack6: m::DEFAULT_CT6_ENTRIES,
            revnat6: m::DEFAULT_CT6_ENTRIES,
            node_addrs: m::DEFAULT_MAX_NODE_ADDRS,
        }
    }
}

/// `--xdp-mode`: how the agent serves its interfaces (see [`choose_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native XDP where it delivers, TC alone elsewhere (veth uplinks, drivers without
    /// native XDP).
    Auto,
    /// Native XDP, or fail.
    Native,
    /// Served by TC alone, like `tc`: generic XDP runs after GRO on socket buffers whose
    /// checksums may be partial, which an XDP program cannot tell.
    Generic,
    /// TC alone: no XDP program.
    Tc,
}

/// `--tc-attach`: how the TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (Linux >= 6.6), cls_bpf filters elsewhere.
    Auto,
    /// TCX links, or fail.
    Tcx,
    /// cls_bpf filters on a clsact qdisc (what kernels before 6.6 get).
    Legacy,
}

/// How the datapath serves an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMode {
    /// XDP in the driver; TC ingress for what XDP leaves to the stack, TC egress.
    Xdp,
    /// TC ingress and egress only: every decision and translation on socket buffers,
    /// forwarding with `bpf_redirect_neigh`.
    Tc,
}

/// The path `mode` gives an interface whose driver is `driver` (from ethtool), and why.
/// `Xdp` under `Auto` is a wish: if the driver refuses native XDP, TC serves it.
pub fn choose_path(mode: XdpAttachMode, driver: Option<&str>) -> (PathMode, &'static str) {
    match (mode, driver) {
        (XdpAttachMode::Native, _) => (PathMode::Xdp, "--xdp-mode native"),
        (XdpAttachMode::Tc, _) => (PathMode::Tc, "--xdp-mode tc"),
        (XdpAttachMode::Generic, _) => (
            PathMode::Tc,
            "--xdp-mode generic: generic XDP runs after GRO, on packets whose checksums may be partial, which XDP cannot tell; TC serves the interface",
        ),
        (XdpAttachMode::Auto, Some("veth")) => (
            PathMode::Tc,
            "veth uplink: frames sent back with XDP_TX or redirected into it are dropped unless its peer runs XDP or GRO, and XDP cannot tell the partial checksums of a sender with tx offload",
        ),
        (XdpAttachMode::Auto, _) => (PathMode::Xdp, "native XDP"),
    }
}

/// Why TC serves an interface under `Auto` when the driver refused native XDP.
const NO_NATIVE_XDP: &str = "the driver has no native XDP (generic XDP would see GRO-merged packets with partial checksums)";

/// An interface the programs are attached to.
struct Attachment {
    name: String,
    /// The interface's index when it was attached: a link deleted and recreated under the
    /// same name comes back with another.
    ifindex: u32,
    path: PathMode,
    /// XDP (on the XDP path), TC ingress and TC egress links, with their pin paths (when
    /// pinned).
    links: Vec<(FdLink, Option<PathBuf>)>,
    /// The cls_bpf filters where TC is not attached with TCX.
    legacy: Option<LegacyTc>,
}

/// What [`Datapath::attach`] did to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The interface's index at attachment.
    pub ifindex: u32,
    pub path: PathMode,
    /// Why this path (for the log).
    pub why: &'static str,
    /// How TC is attached: `tcx`, or cls_bpf filters and why.
    pub tc: String,
    /// The pinned links of an earlier run were taken over: the programs were replaced
    /// atomically (bpf_link_update), without a moment with no program attached.
    pub replaced: bool,
    /// Pinned links of an earlier run that no longer held this interface (it was deleted
    /// and recreated, or its driver reloaded, while no agent ran) were removed first.
    pub stale_pins: bool,
}

/// The index of interface `iface` in this network namespace, `None` when there is none.
pub fn ifindex_of(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok()
}

/// The interface index an XDP or TCX link pinned at `path` is attached to, from
/// BPF_OBJ_GET_INFO_BY_FD (`bpf_link_info.xdp.ifindex` and `.tcx.ifindex`, which share an
/// offset); 0 once the interface is gone: deleting a device detaches its links and leaves
/// them defunct (net/core/dev.c, dev_xdp_uninstall; kernel/bpf/tcx.c, tcx_uninstall), and
/// updating such a link fails with ENOLINK. aya's `LinkInfo` does not expose the union.
fn pinned_link_ifindex(path: &Path) -> Result<u32> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // The kernel refuses (EINVAL) an attr whose bytes after the command's last field are
    // not zero (kernel/bpf/syscall.c CHECK_ATTR): the tail padding is an explicit zero.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let err = |what: &str| kerr(format!("{what} {}", path.display()), io_error());
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| kerr(path.display(), e))?;
    let get = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `get` (and the path it points to, alive here) and returns
    // a new fd, owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(err("BPF_OBJ_GET"));
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: plain data, all-zero is valid.
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    let req = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<aya_obj::generated::bpf_link_info>() as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &req as *const InfoByFd,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(err("BPF_OBJ_GET_INFO_BY_FD"));
    }
    // SAFETY: every member of the union is plain integers; `xdp.ifindex` and
    // `tcx.ifindex` are the first u32 of it.
    Ok(unsafe { info.__bindgen_anon_1.xdp.ifindex })
}

fn io_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// What to do with a link pinned by an earlier run, attached to `pinned_ifindex` (0:
/// defunct), for the interface now at `ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedFate {
    /// It holds this interface: replace its program in place.
    TakeOver,
    /// It held an interface that is gone (or another one now): remove the pin, attach anew.
    Stale,
}

pub fn pinned_fate(pinned_ifindex: u32, ifindex: u32) -> PinnedFate {
    if pinned_ifindex != 0 && pinned_ifindex == ifindex {
        PinnedFate::TakeOver
    } else {
        PinnedFate::Stale
    }
}

/// The driver of `iface` as ethtool names it (`veth`, `mlx5_core`, ...); `None` when the
/// kernel does not say (ETHTOOL_GDRVINFO, include/uapi/linux/ethtool.h).
pub fn driver_of(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 4 * 5],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a plain datagram socket, closed below; the ioctl writes into `info`, which
    // outlives the call, through the pointer in `req`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq);
        libc::close(fd);
        if rc < 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The stem of `iface`'s pin names (`<stem>-xdp`, ...): bpffs refuses names with a dot
/// (kernel/bpf/inode.c, bpf_lookup), which tunnel devices have (`flannel.1`), so a dot
/// becomes `%`.
pub fn pin_stem(iface: &str) -> String {
    iface.replace('.', "%")
}

/// The interface whose pin names have stem `stem` ([`pin_stem`] undone).
pub fn iface_of_pin(stem: &str) -> String {
    stem.replace('%', ".")
}

/// The pod network tunnel devices of this network namespace whose names match `patterns`
/// (see [`crate::links::is_tunnel_driver`]), in index order. `drivers` remembers each
/// (name, index) seen, so that an ethtool query runs once per new interface, not once per
/// pod veth per call.
pub fn find_tunnels(
    patterns: &crate::node_addrs::InterfacePatterns,
    drivers: &mut std::collections::HashMap<(String, u32), bool>,
) -> Vec<String> {
    if patterns.is_empty() {
        return Vec::new();
    }
    let Ok(list) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let now: Vec<(String, u32)> = list
        .iter()
        .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
        .filter(|(n, _)| patterns.matches(n))
        .collect();
    drivers.retain(|k, _| now.contains(k));
    now.into_iter()
        .filter(|k| {
            *drivers
                .entry(k.clone())
                .or_insert_with(|| crate::links::is_tunnel_driver(driver_of(&k.0).as_deref()))
        })
        .map(|(n, _)| n)
        .collect()
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
    variant: Variant,
    pin_dir: Option<PathBuf>,
    keep: bool,
    tc_attach: TcAttach,
    pins: PinReport,
    attached: Vec<Attachment>,
    services: HashMap<MapData, FrontendKey, Service>,
    backends: Array<MapData, Backend>,
    node_addrs: HashMap<MapData, u32, NodeAddr>,
    src_ranges: LpmTrie<MapData, SrcRange, u32>,
    services6: HashMap<MapData, FrontendKey6, Service>,
    backends6: Array<MapData, Backend6>,
    node_addrs6: HashMap<MapData, Ip6, NodeAddr>,
    src_ranges6: LpmTrie<MapData, SrcRange<Ip6>, u32>,
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
        .ok_or_else(|| Error::Kernel(format!("map {name} not found in the eBPF object")))
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

/// The layout of a map as the kernel reports it. A pinned map is reused only when its
/// layout equals what this build expects (aya would reuse any pinned map by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max_entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What happened to each pinned map at load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    /// Pinned maps whose layout matched: their entries (conntrack included) carry over.
    pub reused: Vec<String>,
    /// Pinned maps with another layout, replaced by fresh ones: (name, why).
    pub replaced: Vec<(String, String)>,
    /// Maps created and pinned for the first time.
    pub created: Vec<String>,
}

const BPF_MAP_TYPE_DEVMAP: u32 = 14;
const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// The layouts this build's object declares for its `NP_` maps, with `sizes` applied.
pub fn expected_layouts(sizes: &MapSizes) -> Result<Vec<(String, Layout)>> {
    let obj =
        aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| kerr("parsing the eBPF object", e))?;
    let mut out: Vec<(String, Layout)> = obj
        .maps
        .iter()
        .filter(|(name, _)| name.starts_with("NP_"))
        .map(|(name, map)| {
            let max_entries = match name.as_str() {
                m::MAP_SERVICES | m::MAP_SERVICES6 => sizes.services,
                m::MAP_BACKENDS | m::MAP_BACKENDS6 => sizes.backends,
                m::MAP_MAGLEV => sizes.maglev_slots.div_ceil(m::MAGLEV_SLOTS_PER_ENTRY),
                m::MAP_CONNTRACK => sizes.conntrack,
                m::MAP_REVNAT => sizes.revnat,
                m::MAP_CONNTRACK6 => sizes.conntrack6,
                m::MAP_REVNAT6 => sizes.revnat6,
                m::MAP_NODE_ADDRS | m::MAP_NODE_ADDRS6 => sizes.node_addrs,
                _ => map.max_entries(),
            };
            let mut flags = map.map_flags();
            if matches!(
                map.map_type(),
                BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_DEVMAP_HASH
            ) {
                // The kernel forces this flag on device maps (kernel/bpf/devmap.c,
                // dev_map_init_map), so a pinned devmap always reports it.
                flags |= BPF_F_RDONLY_PROG;
            }
            let layout = Layout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags,
            };
            (name.clone(), layout)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Why a pinned map of layout `found` cannot stand in for one of layout `want`.
pub fn layout_mismatch(want: &Layout, found: &Layout) -> Option<String> {
    (want != found).then(|| format!("pinned map has {found}, this build needs {want}"))
}

fn pinned_layout(path: &Path) -> Result<Layout> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| kerr(path.display(), e))?;
    let map_type = info.map_type().map_err(|e| kerr(path.display(), e))? as u32;
    Ok(Layout {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

impl Datapath {
    /// Load the programs and create the maps. With `pin_dir`, every `NP_` map is pinned
    /// there, and a map already pinned by an earlier run is reused when its layout matches
    /// (so conntrack and the service tables survive a restart) or replaced when not.
    pub fn load(sizes: MapSizes, pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_variant(sizes, pin_dir, Variant::Plain)
    }

    /// [`Datapath::load`] with a choice of program variant.
    pub fn load_variant(sizes: MapSizes, pin_dir: Option<&Path>, variant: Variant) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::Kernel(
                "this binary was built with AYA_BUILD_SKIP and carries no eBPF object".into(),
            ));
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(m::MAP_SERVICES, sizes.services)
            .map_max_entries(m::MAP_BACKENDS, sizes.backends)
            .map_max_entries(
                m::MAP_MAGLEV,
                sizes.maglev_slots.div_ceil(m::MAGLEV_SLOTS_PER_ENTRY),
            )
            .map_max_entries(m::MAP_CONNTRACK, sizes.conntrack)
            .map_max_entries(m::MAP_REVNAT, sizes.revnat)
            .map_max_entries(m::MAP_SERVICES6, sizes.services)
            .map_max_entries(m::MAP_BACKENDS6, sizes.backends)
            .map_max_entries(m::MAP_CONNTRACK6, sizes.conntrack6)
            .map_max_entries(m::MAP_REVNAT6, sizes.revnat6)
            .map_max_entries(m::MAP_NODE_ADDRS, sizes.node_addrs)
            .map_max_entries(m::MAP_NODE_ADDRS6, sizes.node_addrs);
        let mut report = PinReport::default();
        let layouts = expected_layouts(&sizes)?;
        if let Some(dir) = pin_dir {
            ensure_bpffs()?;
            fs::create_dir_all(dir).map_err(|e| kerr(dir.display(), e))?;
            for (name, want) in &layouts {
                let path = dir.join(name);
                if path.exists() {
                    let found = pinned_layout(&path)?;
                    match layout_mismatch(want, &found) {
                        None => report.reused.push(name.clone()),
                        Some(why) => {
                            fs::remove_file(&path).map_err(|e| kerr(path.display(), e))?;
                            report.replaced.push((name.clone(), why));
                        }
                    }
                } else {
                    report.created.push(name.clone());
                }
            }
            for (name, _) in &layouts {
                loader.map_pin_path(name.as_str(), dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| kerr("loading the eBPF object", e))?;
        let xdp: &mut Xdp = prog(&mut ebpf, variant.xdp())?;
        load_retrying(variant.xdp(), || xdp.load())?;
        for name in [variant.tc_ingress(), m::PROG_TC_EGRESS] {
            let p: &mut SchedClassifier = prog(&mut ebpf, name)?;
            load_retrying(name, || p.load())?;
        }
        // Per-packet logs (only emitted when the debug switch is on) drain into `log`.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| tracing::debug!(error = %e, "no eBPF log buffer"))
            .ok();
        let services = HashMap::try_from(take(&mut ebpf, m::MAP_SERVICES)?)
            .map_err(|e| kerr(m::MAP_SERVICES, e))?;
        let backends = Array::try_from(take(&mut ebpf, m::MAP_BACKENDS)?)
            .map_err(|e| kerr(m::MAP_BACKENDS, e))?;
        let node_addrs = HashMap::try_from(take(&mut ebpf, m::MAP_NODE_ADDRS)?)
            .map_err(|e| kerr(m::MAP_NODE_ADDRS, e))?;
        let src_ranges = LpmTrie::try_from(take(&mut ebpf, m::MAP_SRC_RANGES)?)
            .map_err(|e| kerr(m::MAP_SRC_RANGES, e))?;
        let services6 = HashMap::try_from(take(&mut ebpf, m::MAP_SERVICES6)?)
            .map_err(|e| kerr(m::MAP_SERVICES6, e))?;
        let backends6 = Array::try_from(take(&mut ebpf, m::MAP_BACKENDS6)?)
            .map_err(|e| kerr(m::MAP_BACKENDS6, e))?;
        let node_addrs6 = HashMap::try_from(take(&mut ebpf, m::MAP_NODE_ADDRS6)?)
            .map_err(|e| kerr(m::MAP_NODE_ADDRS6, e))?;
        let src_ranges6 = LpmTrie::try_from(take(&mut ebpf, m::MAP_SRC_RANGES6)?)
            .map_err(|e| kerr(m::MAP_SRC_RANGES6, e))?;
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
        Ok(Self {
            ebpf,
            variant,
            pin_dir: pin_dir.map(Path::to_path_buf),
            keep: false,
            tc_attach: TcAttach::Auto,
            pins: report,
            attached: Vec::new(),
            services,
            backends,
            node_addrs,
            src_ranges,
            services6,
            backends6,
            node_addrs6,
            src_ranges6,
            config,
            stats,
            devices,
            maglev,
            logger,
        })
    }

    /// What happened to the pinned maps at load.
    pub fn pin_report(&self) -> &PinReport {
        &self.pins
    }

    /// How TC programs are attached from now on (`--tc-attach`).
    pub fn set_tc_attach(&mut self, how: TcAttach) {
        self.tc_attach = how;
    }

    /// Leave the programs attached and the maps pinned when this value is dropped (for
    /// upgrades: the next agent picks both up and replaces the programs atomically).
    pub fn keep_on_exit(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// Attach XDP (ingress), TC ingress and TC egress to `iface`. With a pin directory the
    /// links are pinned under `<pin_dir>/links/`, and links pinned by an earlier run are
    /// taken over: the new programs replace the old ones atomically.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<Attached> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|e| Error::Kernel(format!("interface {iface}: {e}")))?;
        // Attaching again (the interface came back): what is left of the old attachment
        // goes first.
        self.detach(iface);
        let link_dir = self.pin_dir.as_ref().map(|d| d.join("links"));
        if let Some(dir) = &link_dir {
            fs::create_dir_all(dir).map_err(|e| kerr(dir.display(), e))?;
        }
        let stem = pin_stem(iface);
        let pin = |kind: &str| link_dir.as_ref().map(|d| d.join(format!("{stem}-{kind}")));
        let (xdp_pin, in_pin, out_pin) = (pin("xdp"), pin("tc-in"), pin("tc-out"));
        // An earlier run's links that no longer hold this interface (deleted and recreated,
        // or its driver reloaded, while no agent ran) cannot be updated: remove their pins
        // (which releases them) and attach anew.
        let mut stale_pins = false;
        for p in [&xdp_pin, &in_pin, &out_pin].into_iter().flatten() {
            if !p.exists() {
                continue;
            }
            let fate = match pinned_link_ifindex(p) {
                Ok(held) => pinned_fate(held, ifindex),
                Err(e) => {
                    tracing::warn!("{e}: treating the pinned link as stale");
                    PinnedFate::Stale
                }
            };
            if fate == PinnedFate::Stale {
                fs::remove_file(p).map_err(|e| kerr(p.display(), e))?;
                stale_pins = true;
            }
        }
        let pinned = |p: &Option<PathBuf>| -> Result<Option<FdLink>> {
            match p {
                Some(p) if p.exists() => PinnedLink::from_pin(p)
                    .map(|l| Some(FdLink::from(l)))
                    .map_err(|e| kerr(p.display(), e)),
                _ => Ok(None),
            }
        };

        let variant = self.variant;
        let (mut path, mut why) = choose_path(mode, driver_of(iface).as_deref());
        let mut replaced = in_pin.as_ref().is_some_and(|p| p.exists());
        let mut xdp_link = None;
        if path == PathMode::Xdp {
            let xdp: &mut Xdp = prog(&mut self.ebpf, variant.xdp())?;
            let id = match pinned(&xdp_pin)? {
                Some(old) => {
                    let link = XdpLink::try_from(old)
                        .map_err(|e| kerr(format!("pinned XDP link of {iface}"), e))?;
                    replaced = true;
                    Some(
                        xdp.attach_to_link(link)
                            .map_err(|e| kerr(format!("replacing XDP on {iface}"), e))?,
                    )
                }
                None => match xdp.attach(iface, XdpMode::Driver) {
                    Ok(id) => Some(id),
                    Err(_) if mode == XdpAttachMode::Auto => {
                        (path, why) = (PathMode::Tc, NO_NATIVE_XDP);
                        None
                    }
                    Err(e) => return Err(kerr(format!("attaching XDP (native) to {iface}"), e)),
                },
            };
            if let Some(id) = id {
                xdp_link = Some(
                    FdLink::try_from(xdp.take_link(id).map_err(|e| kerr(iface, e))?)
                        .map_err(|e| kerr(format!("XDP link of {iface}"), e))?,
                );
            }
        }
        if path == PathMode::Tc {
            // An earlier run's XDP link on this interface goes with its pin.
            if let Some(p) = xdp_pin.as_ref().filter(|p| p.exists()) {
                fs::remove_file(p).map_err(|e| kerr(p.display(), e))?;
            }
        }

        // TC: TCX links (Linux >= 6.6), pinned like XDP's; where the kernel has no TCX
        // (or `--tc-attach legacy`), cls_bpf filters on a clsact qdisc (tc_legacy.rs).
        let mut tcx: Vec<(FdLink, Option<PathBuf>)> = Vec::new();
        let mut legacy: Option<LegacyTc> = None;
        let mut legacy_why = None;
        let tc_progs = [
            (variant.tc_ingress(), TcAttachType::Ingress, in_pin),
            (m::PROG_TC_EGRESS, TcAttachType::Egress, out_pin),
        ];
        for (name, ty, p) in tc_progs {
            let prog: &mut SchedClassifier = prog(&mut self.ebpf, name)?;
            if self.tc_attach != TcAttach::Legacy {
                let id = match pinned(&p)? {
                    Some(old) => {
                        let link = SchedClassifierLink::try_from(old)
                            .map_err(|e| kerr(format!("pinned {name} link of {iface}"), e))?;
                        Some(
                            prog.attach_to_link(link)
                                .map_err(|e| kerr(format!("replacing {name} on {iface}"), e))?,
                        )
                    }
                    None => match prog.attach_with_options(
                        iface,
                        ty,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    ) {
                        Ok(id) => Some(id),
                        Err(ProgramError::SyscallError(e)) if self.tc_attach == TcAttach::Auto => {
                            legacy_why = Some(format!("no TCX ({}: {})", e.call, e.io_error));
                            None
                        }
                        Err(e) => return Err(kerr(format!("attaching {name} to {iface}"), e)),
                    },
                };
                if let Some(id) = id {
                    let link = FdLink::try_from(prog.take_link(id).map_err(|e| kerr(iface, e))?)
                        .map_err(|e| kerr(format!("{name} link of {iface}"), e))?;
                    tcx.push((link, p));
                    continue;
                }
            }
            let l = match &mut legacy {
                Some(l) => l,
                None => legacy.insert(LegacyTc::new(iface, ifindex, link_dir.as_deref())?),
            };
            replaced |= l.attach(prog, ty)?;
        }
        let tc_how = match (&legacy, legacy_why) {
            (None, _) => "tcx".to_string(),
            (Some(_), Some(why)) => format!("cls_bpf filters: {why}"),
            (Some(_), None) => "cls_bpf filters: --tc-attach legacy".to_string(),
        };

        let mut links = Vec::new();
        let all = xdp_link.map(|l| (l, xdp_pin)).into_iter().chain(tcx);
        for (link, path) in all {
            if let Some(path) = &path {
                if !path.exists() {
                    link.pin(path)
                        .map_err(|e| kerr(format!("pinning {}", path.display()), e))?;
                    // `pin` consumed the fd link; reopen it from the pin to hold it.
                    let held = FdLink::from(
                        PinnedLink::from_pin(path).map_err(|e| kerr(path.display(), e))?,
                    );
                    links.push((held, Some(path.clone())));
                    continue;
                }
            }
            links.push((link, path));
        }
        // NP_DEV lists the interfaces XDP serves: XDP redirects only into those (a
        // TC-only interface may not take XDP frames), and TC ingress translates ICMP
        // errors only on the others.
        if path == PathMode::Xdp {
            self.devices
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| kerr(format!("adding {iface} to {}", m::MAP_DEVICES), e))?;
        }
        self.attached.push(Attachment {
            name: iface.to_string(),
            ifindex,
            path,
            links,
            legacy,
        });
        self.prune_devices();
        Ok(Attached {
            ifindex,
            path,
            why,
            tc: tc_how,
            replaced,
            stale_pins,
        })
    }

    /// Detach everything nodeport attached to `iface` (after the interface vanished or was
    /// recreated with another index: what is left of it) and remove its pins and its
    /// NP_DEV entry. Returns the index it was attached at; `None` when it was not.
    pub fn detach(&mut self, iface: &str) -> Option<u32> {
        let i = self.attached.iter().position(|a| a.name == iface)?;
        let mut a = self.attached.remove(i);
        // Filters (and the qdisc if nodeport added it) first, then the links; on a device
        // that is gone, the kernel has removed them already and the calls fail harmlessly.
        drop(a.legacy.take());
        for (link, path) in a.links.drain(..) {
            if let Some(path) = path {
                let _ = fs::remove_file(path);
            }
            drop(link);
        }
        self.prune_devices();
        Some(a.ifindex)
    }

    /// NP_DEV holds exactly the interfaces XDP serves now. (The kernel drops the entry of
    /// a device that is unregistered, kernel/bpf/devmap.c dev_map_notification; an entry
    /// of an interface now served by TC alone, or of an earlier run's, goes here.)
    fn prune_devices(&mut self) {
        let want: Vec<u32> = self
            .attached
            .iter()
            .filter(|a| a.path == PathMode::Xdp)
            .map(|a| a.ifindex)
            .collect();
        let have: Vec<u32> = self.devices.keys().filter_map(|k| k.ok()).collect();
        for k in have.into_iter().filter(|k| !want.contains(k)) {
            let _ = self.devices.remove(k);
        }
    }

    /// Remove pinned links of interfaces no longer configured (an earlier run's), and the
    /// cls_bpf filters (and qdisc, when nodeport added it) that its markers name.
    pub fn prune_links(&mut self, keep: &[String]) -> Result<Vec<String>> {
        let Some(dir) = self.pin_dir.as_ref().map(|d| d.join("links")) else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for entry in fs::read_dir(&dir)
            .map_err(|e| kerr(dir.display(), e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(tc_legacy::FILTER_MARKER) {
                let iface = iface_of_pin(stem);
                if !keep.contains(&iface) {
                    tc_legacy::remove_stale(&iface, &dir)?;
                    removed.push(name);
                }
                continue;
            }
            if name.ends_with(tc_legacy::QDISC_MARKER) {
                continue; // handled with its interface's filters
            }
            let iface = iface_of_pin(
                ["-xdp", "-tc-in", "-tc-out"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name.as_str()),
            );
            if !keep.contains(&iface) {
                fs::remove_file(entry.path()).map_err(|e| kerr(entry.path().display(), e))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Interfaces attached and the path serving each.
    pub fn attachments(&self) -> Vec<(String, PathMode)> {
        self.attached
            .iter()
            .map(|a| (a.name.clone(), a.path))
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

    /// What the maps hold now (after a restart: what the earlier run programmed).
    pub fn snapshot(&self) -> Result<MapSnapshot> {
        let mut src_ranges = src_ranges_of(&self.src_ranges, m::MAP_SRC_RANGES)?;
        src_ranges.extend(src_ranges_of(&self.src_ranges6, m::MAP_SRC_RANGES6)?);
        Ok(MapSnapshot {
            node_addrs: keys(entries(&self.node_addrs, m::MAP_NODE_ADDRS)?),
            backends: programmed_backends(&self.backends, m::MAP_BACKENDS)?,
            services: entries(&self.services, m::MAP_SERVICES)?,
            node_addrs6: keys(entries(&self.node_addrs6, m::MAP_NODE_ADDRS6)?),
            backends6: programmed_backends(&self.backends6, m::MAP_BACKENDS6)?,
            services6: entries(&self.services6, m::MAP_SERVICES6)?,
            src_ranges,
        })
    }

    /// Counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        Ok(sum_counters(&self.stats)?.into_iter().collect())
    }

    /// The loaded object, for tests that drive programs directly (BPF_PROG_TEST_RUN).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Maps for Datapath {
    fn read_slots(&mut self, offset: u32, len: u32) -> Option<Vec<u32>> {
        let start = offset as usize;
        self.maglev
            .slots()
            .get(start..start + len as usize)
            .map(<[u32]>::to_vec)
    }

    fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()> {
        self.backends
            .set(id, be, 0)
            .map_err(|e| kerr(format!("{} set {id}", m::MAP_BACKENDS), e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        // A free id reads as all zero (the datapath's test for "no backend").
        self.backends
            .set(id, Backend::default(), 0)
            .map_err(|e| kerr(format!("{} clear {id}", m::MAP_BACKENDS), e))
    }

    fn set_backend6(&mut self, id: u32, be: &Backend6) -> Result<()> {
        self.backends6
            .set(id, be, 0)
            .map_err(|e| kerr(format!("{} set {id}", m::MAP_BACKENDS6), e))
    }

    fn delete_backend6(&mut self, id: u32) -> Result<()> {
        self.backends6
            .set(id, Backend6::default(), 0)
            .map_err(|e| kerr(format!("{} clear {id}", m::MAP_BACKENDS6), e))
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

    fn set_service6(&mut self, key: &FrontendKey6, val: &Service) -> Result<()> {
        self.services6
            .insert(key, val, 0)
            .map_err(|e| kerr(format!("{} insert {key:?}", m::MAP_SERVICES6), e))
    }

    fn delete_service6(&mut self, key: &FrontendKey6) -> Result<()> {
        self.services6
            .remove(key)
            .map_err(|e| kerr(format!("{} remove {key:?}", m::MAP_SERVICES6), e))
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

    fn set_node_addr6(&mut self, addr: Ip6) -> Result<()> {
        self.node_addrs6
            .insert(addr, NodeAddr { flags: 0 }, 0)
            .map_err(|e| kerr(format!("{} insert", m::MAP_NODE_ADDRS6), e))
    }

    fn delete_node_addr6(&mut self, addr: Ip6) -> Result<()> {
        self.node_addrs6
            .remove(&addr)
            .map_err(|e| kerr(format!("{} remove", m::MAP_NODE_ADDRS6), e))
    }

    fn set_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()> {
        let err = |name: &str, e| kerr(format!("{name} insert {svc_id} {cidr}"), e);
        match cidr.family() {
            Family::V4 => self
                .src_ranges
                .insert(&src_range_key::<u32>(svc_id, cidr), 0, 0)
                .map_err(|e| err(m::MAP_SRC_RANGES, e)),
            Family::V6 => self
                .src_ranges6
                .insert(&src_range_key::<Ip6>(svc_id, cidr), 0, 0)
                .map_err(|e| err(m::MAP_SRC_RANGES6, e)),
        }
    }

    fn delete_src_range(&mut self, svc_id: u32, cidr: IpCidr) -> Result<()> {
        let err = |name: &str, e| kerr(format!("{name} remove {svc_id} {cidr}"), e);
        match cidr.family() {
            Family::V4 => self
                .src_ranges
                .remove(&src_range_key::<u32>(svc_id, cidr))
                .map_err(|e| err(m::MAP_SRC_RANGES, e)),
            Family::V6 => self
                .src_ranges6
                .remove(&src_range_key::<Ip6>(svc_id, cidr))
                .map_err(|e| err(m::MAP_SRC_RANGES6, e)),
        }
    }
}

/// The NP_SRCRANGE (NP_SRCRANGE6) key of an allowed range of service port `svc_id`; `cidr`
/// is of family `A` (the caller picks the map by its family).
fn src_range_key<A: RawAddr>(svc_id: u32, cidr: IpCidr) -> LpmKey<SrcRange<A>> {
    LpmKey::new(
        SRC_RANGE_SVC_BITS + u32::from(cidr.prefix()),
        SrcRange {
            svc_id_be: svc_id.to_be(),
            addr: A::from_ip(cidr.addr()).unwrap_or_default(),
        },
    )
}

/// The keys of `(key, value)` pairs.
fn keys<K, V>(entries: Vec<(K, V)>) -> Vec<K> {
    entries.into_iter().map(|(k, _)| k).collect()
}

/// Every entry of a hash map (plain or LRU) named `name`.
fn entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<Vec<(K, V)>> {
    map.iter().map(|kv| kv.map_err(|e| kerr(name, e))).collect()
}

/// Every (service id, range) of an NP_SRCRANGE(6) trie named `name`.
fn src_ranges_of<A: RawAddr>(
    trie: &LpmTrie<MapData, SrcRange<A>, u32>,
    name: &str,
) -> Result<Vec<(u32, IpCidr)>> {
    let mut out = Vec::new();
    for key in trie.keys() {
        let (svc_id, cidr) = src_range_of(&key.map_err(|e| kerr(name, e))?);
        out.extend(cidr.map(|c| (svc_id, c)));
    }
    Ok(out)
}

/// The service id and range of an NP_SRCRANGE(6) key (`None` for a malformed prefix).
fn src_range_of<A: RawAddr>(key: &LpmKey<SrcRange<A>>) -> (u32, Option<IpCidr>) {
    let data = key.data();
    let prefix = key.prefix_len().checked_sub(SRC_RANGE_SVC_BITS);
    let cidr = prefix
        .and_then(|p| u8::try_from(p).ok())
        .and_then(|p| IpCidr::new(data.addr.to_ip(), p));
    (u32::from_be(data.svc_id_be), cidr)
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of conntrack timestamps
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sum_counters(stats: &PerCpuArray<MapData, u64>) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for (i, stat) in Stat::ALL.iter().enumerate().take(STAT_COUNT as usize) {
        let per_cpu = stats
            .get(&(i as u32), 0)
            .map_err(|e| kerr(m::MAP_STATS, e))?;
        out.push((stat.name(), per_cpu.iter().sum()));
    }
    Ok(out)
}

fn occupancy<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<(u64, u32)> {
    let capacity = map.map().info().map_err(|e| kerr(name, e))?.max_entries();
    Ok((map.keys().filter(|k| k.is_ok()).count() as u64, capacity))
}

/// (entries, capacity) of a map.
pub type Occupancy = (u64, u32);

/// Read-only handles on the maps pinned by a running (or kept) datapath: what metrics
/// scrapes and `inspect` read, without the agent's own handles and without an agent.
pub struct MapReader {
    dir: PathBuf,
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
}

fn open_pinned(dir: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(dir.join(name)).map_err(|e| kerr(format!("{}/{name}", dir.display()), e))
}

impl MapReader {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let stats = PerCpuArray::try_from(Map::PerCpuArray(open_pinned(pin_dir, m::MAP_STATS)?))
            .map_err(|e| kerr(m::MAP_STATS, e))?;
        let conntrack = HashMap::try_from(Map::LruHashMap(open_pinned(pin_dir, m::MAP_CONNTRACK)?))
            .map_err(|e| kerr(m::MAP_CONNTRACK, e))?;
        Ok(Self {
            dir: pin_dir.to_path_buf(),
            stats,
            conntrack,
        })
    }

    /// Every entry of the pinned hash map `name` (`kind`: `Map::HashMap` or
    /// `Map::LruHashMap`).
    fn hash_entries<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
        kind: fn(MapData) -> Map,
    ) -> Result<Vec<(K, V)>> {
        let map: HashMap<MapData, K, V> =
            HashMap::try_from(kind(open_pinned(&self.dir, name)?)).map_err(|e| kerr(name, e))?;
        entries(&map, name)
    }

    /// Every programmed backend of the pinned array `name` (NP_BE or NP_BE6).
    fn backend_entries<A: RawAddr>(&self, name: &str) -> Result<Vec<(u32, Backend<A>)>> {
        let map: Array<MapData, Backend<A>> =
            Array::try_from(Map::Array(open_pinned(&self.dir, name)?))
                .map_err(|e| kerr(name, e))?;
        programmed_backends(&map, name)
    }

    /// `read` when the IPv6 map `name` is pinned; empty when not (pinned by an agent of
    /// before IPv6: the IPv4 views still work).
    fn v6<T>(&self, name: &str, read: impl FnOnce() -> Result<Vec<T>>) -> Result<Vec<T>> {
        if self.dir.join(name).exists() {
            read()
        } else {
            Ok(Vec::new())
        }
    }

    /// Every frontend and its service entry (NP_SVC).
    pub fn services(&self) -> Result<Vec<(FrontendKey, Service)>> {
        self.hash_entries(m::MAP_SERVICES, Map::HashMap)
    }

    /// Every backend by id (NP_BE).
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        self.backend_entries(m::MAP_BACKENDS)
    }

    /// The backend ids of `len` Maglev slots from `offset` (NP_MAGLEV, two per element).
    pub fn slots(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        let map: aya::maps::Array<MapData, m::MaglevEntry> =
            aya::maps::Array::try_from(Map::Array(open_pinned(&self.dir, m::MAP_MAGLEV)?))
                .map_err(|e| kerr(m::MAP_MAGLEV, e))?;
        let per = m::MAGLEV_SLOTS_PER_ENTRY;
        let mut out = Vec::with_capacity(len as usize);
        for slot in offset..offset.saturating_add(len) {
            let pair = map
                .get(&(slot / per), 0)
                .map_err(|e| kerr(m::MAP_MAGLEV, e))?;
            out.push(pair[(slot % per) as usize]);
        }
        Ok(out)
    }

    /// Every conntrack entry (NP_CT).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>> {
        self.conntrack
            .iter()
            .map(|kv| kv.map_err(|e| kerr(m::MAP_CONNTRACK, e)))
            .collect()
    }

    /// Datapath counters summed over CPUs, in `Stat` order.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        sum_counters(&self.stats)
    }

    /// (entries, capacity) of the conntrack map. Counting walks the keys.
    pub fn conntrack_occupancy(&self) -> Result<(u64, u32)> {
        occupancy(&self.conntrack, m::MAP_CONNTRACK)
    }

    /// (entries, capacity) of the reverse-NAT map (one entry per translated flow).
    pub fn revnat_occupancy(&self) -> Result<(u64, u32)> {
        let map: HashMap<MapData, FlowKey, RevNat> =
            HashMap::try_from(Map::HashMap(open_pinned(&self.dir, m::MAP_REVNAT)?))
                .map_err(|e| kerr(m::MAP_REVNAT, e))?;
        occupancy(&map, m::MAP_REVNAT)
    }

    /// An IPv6 map of the pinned datapath; `None` when it has none (pinned by an agent of
    /// before IPv6: the IPv4 views still work).
    fn open_v6(&self, name: &str) -> Result<Option<MapData>> {
        if !self.dir.join(name).exists() {
            return Ok(None);
        }
        open_pinned(&self.dir, name).map(Some)
    }

    /// Every IPv6 frontend and its service entry (NP_SVC6).
    pub fn services6(&self) -> Result<Vec<(FrontendKey6, Service)>> {
        self.v6(m::MAP_SERVICES6, || {
            self.hash_entries(m::MAP_SERVICES6, Map::HashMap)
        })
    }

    /// Every IPv6 backend by id (NP_BE6).
    pub fn backends6(&self) -> Result<Vec<(u32, Backend6)>> {
        self.v6(m::MAP_BACKENDS6, || self.backend_entries(m::MAP_BACKENDS6))
    }

    /// Every IPv6 conntrack entry (NP_CT6).
    pub fn conntrack6(&self) -> Result<Vec<(FlowKey6, CtEntry6)>> {
        self.v6(m::MAP_CONNTRACK6, || {
            self.hash_entries(m::MAP_CONNTRACK6, Map::LruHashMap)
        })
    }

    /// (entries, capacity) of NP_CT6 and NP_RNAT6; `None` without IPv6 maps.
    pub fn conntrack6_occupancy(&self) -> Result<Option<(Occupancy, Occupancy)>> {
        let (Some(ct), Some(rnat)) = (
            self.open_v6(m::MAP_CONNTRACK6)?,
            self.open_v6(m::MAP_REVNAT6)?,
        ) else {
            return Ok(None);
        };
        let ct: HashMap<MapData, FlowKey6, CtEntry6> =
            HashMap::try_from(Map::LruHashMap(ct)).map_err(|e| kerr(m::MAP_CONNTRACK6, e))?;
        let rnat: HashMap<MapData, FlowKey6, RevNat6> =
            HashMap::try_from(Map::HashMap(rnat)).map_err(|e| kerr(m::MAP_REVNAT6, e))?;
        Ok(Some((
            occupancy(&ct, m::MAP_CONNTRACK6)?,
            occupancy(&rnat, m::MAP_REVNAT6)?,
        )))
    }
}

/// One family's NP_CT and NP_RNAT, opened on their own (the sweep runs beside the
/// agent's other handles).
pub struct KernelFlowTables<A: RawAddr> {
    conntrack: HashMap<MapData, FlowKey<A>, CtEntry<A>>,
    revnat: HashMap<MapData, FlowKey<A>, RevNat<A>>,
    /// The last error, kept for the caller to report once per sweep.
    error: Option<Error>,
}

impl<A: RawAddr> KernelFlowTables<A> {
    fn names() -> (&'static str, &'static str) {
        match A::FAMILY {
            Family::V4 => (m::MAP_CONNTRACK, m::MAP_REVNAT),
            Family::V6 => (m::MAP_CONNTRACK6, m::MAP_REVNAT6),
        }
    }

    fn new(ct: MapData, rnat: MapData) -> Result<Self> {
        let (ct_name, rnat_name) = Self::names();
        Ok(Self {
            conntrack: HashMap::try_from(Map::LruHashMap(ct)).map_err(|e| kerr(ct_name, e))?,
            revnat: HashMap::try_from(Map::HashMap(rnat)).map_err(|e| kerr(rnat_name, e))?,
            error: None,
        })
    }

    /// The maps of `A`'s family pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let (ct, rnat) = Self::names();
        Self::new(open_pinned(pin_dir, ct)?, open_pinned(pin_dir, rnat)?)
    }

    /// The maps of `A`'s family of a loaded datapath (pinned or not).
    pub fn of(dp: &Datapath) -> Result<Self> {
        let by_id = |name: &str| -> Result<MapData> {
            let map = dp
                .ebpf
                .map(name)
                .ok_or_else(|| Error::Kernel(format!("the eBPF object has no map {name}")))?;
            let id = match map {
                Map::HashMap(d) | Map::LruHashMap(d) => d.info().map_err(|e| kerr(name, e))?.id(),
                _ => return Err(Error::Kernel(format!("{name} is no hash map"))),
            };
            MapData::from_id(id).map_err(|e| kerr(name, e))
        };
        let (ct, rnat) = Self::names();
        Self::new(by_id(ct)?, by_id(rnat)?)
    }

    /// The first error met since the last call, if any.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    fn note<T>(&mut self, r: std::result::Result<T, aya::maps::MapError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => {
                self.error.get_or_insert(kerr("sweeping reverse NAT", e));
                None
            }
        }
    }
}

impl<A: RawAddr> FlowTables<A> for KernelFlowTables<A> {
    fn reverse_entries(&self) -> Vec<(FlowKey<A>, RevNat<A>)> {
        // An entry deleted while the walk passes it ends that step with an error (the
        // kernel then restarts from the first key, so duplicates are possible): skip it.
        self.revnat.iter().filter_map(|kv| kv.ok()).collect()
    }
    fn reverse(&self, key: &FlowKey<A>) -> Option<RevNat<A>> {
        self.revnat.get(key, 0).ok()
    }
    fn flow(&self, key: &FlowKey<A>) -> Option<CtEntry<A>> {
        self.conntrack.get(key, 0).ok()
    }
    fn delete_flow(&mut self, key: &FlowKey<A>) -> bool {
        let r = self.conntrack.remove(key);
        self.note(r).is_some()
    }
    fn delete_reverse(&mut self, key: &FlowKey<A>) -> bool {
        let r = self.revnat.remove(key);
        self.note(r).is_some()
    }
    fn restore_reverse(&mut self, key: &FlowKey<A>, value: &RevNat<A>) {
        const BPF_NOEXIST: u64 = 1;
        let r = self.revnat.insert(key, value, BPF_NOEXIST);
        if !matches!(&r, Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST))
        {
            self.note(r);
        }
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

/// The programmed elements of NP_BE or NP_BE6 (`name`; arrays: free ids read as all
/// zero), by id.
fn programmed_backends<A: Addr>(
    map: &Array<MapData, Backend<A>>,
    name: &str,
) -> Result<Vec<(u32, Backend<A>)>> {
    let mut out = Vec::new();
    for (id, be) in map.iter().enumerate() {
        let be = be.map_err(|e| kerr(name, e))?;
        if be != Backend::default() {
            out.push((id as u32, be));
        }
    }
    Ok(out)
}

/// How often a load interrupted by a signal is tried again.
const LOAD_ATTEMPTS: u32 = 5;

/// Load program `name`, again when the kernel gave up with EAGAIN: the verifier stops when
/// a signal is pending (a child exiting, a timer), which a long verification under load
/// meets now and then. libbpf retries the same way.
fn load_retrying(
    name: &str,
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(program = name, attempt, "load interrupted (EAGAIN), again");
                attempt += 1;
            }
            r => return r.map_err(|e| verifier_err(name, e)),
        }
    }
}

fn verifier_err(name: &str, e: aya::programs::ProgramError) -> Error {
    Error::Kernel(format!("the verifier refused {name}: {e:?}"))
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.keep {
            // The pins hold the links (programs stay attached) and the maps; cls_bpf
            // filters stay in the kernel.
            for a in &mut self.attached {
                if let Some(l) = a.legacy.take() {
                    l.keep();
                }
            }
            return;
        }
        for mut a in self.attached.drain(..) {
            // Filters first (and the qdisc if nodeport added it), then the links.
            drop(a.legacy.take());
            for (link, path) in a.links {
                if let Some(path) = path {
                    let _ = fs::remove_file(path);
                }
                // Dropping the last fd of an unpinned link detaches it.
                drop(link);
            }
        }
        if let Some(dir) = &self.pin_dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{choose_path, pinned_fate, PathMode, PinnedFate, XdpAttachMode};

    #[test]
    fn a_pinned_link_is_taken_over_only_while_it_holds_the_interface() {
        assert_eq!(pinned_fate(7, 7), PinnedFate::TakeOver);
        // The interface was recreated: the old link held index 7, the new one is 9.
        assert_eq!(pinned_fate(7, 9), PinnedFate::Stale);
        // Defunct: its device is gone.
        assert_eq!(pinned_fate(0, 9), PinnedFate::Stale);
    }

    #[test]
    fn auto_serves_veth_with_tc_and_other_drivers_with_xdp() {
        let path = |m, d| choose_path(m, d).0;
        assert_eq!(path(XdpAttachMode::Auto, Some("veth")), PathMode::Tc);
        assert_eq!(path(XdpAttachMode::Auto, Some("mlx5_core")), PathMode::Xdp);
        assert_eq!(path(XdpAttachMode::Auto, None), PathMode::Xdp);
        assert_eq!(path(XdpAttachMode::Native, Some("veth")), PathMode::Xdp);
        assert_eq!(path(XdpAttachMode::Generic, Some("ena")), PathMode::Tc);
        assert_eq!(path(XdpAttachMode::Tc, Some("ena")), PathMode::Tc);
        assert!(choose_path(XdpAttachMode::Auto, Some("veth"))
            .1
            .contains("veth"));
    }
}
