//! TC attachment where the kernel has no TCX (Linux before 6.6): a clsact qdisc and
//! `cls_bpf` filters in direct-action mode at a fixed priority and handle, the netlink
//! equivalent of `tc filter add dev IF ingress prio 4096 handle 0x6e70 bpf da`.
//!
//! - The qdisc is added when missing, and removed on exit only if this agent (or an
//!   earlier run of it, which left a marker directory under the pin path) added it: a
//!   CNI's qdisc and its filters are never touched.
//! - A filter already at nodeport's priority and handle (an earlier run's, after SIGKILL or
//!   with `--keep-datapath`) gets the new program in place (`tc filter replace`: cls_bpf
//!   swaps the program under RCU, the old one serves until the new one is in).
//! - The filters are not links: they stay in the kernel until removed, so the agent removes
//!   them on exit (unless `--keep-datapath`), and also when its start fails.

use std::{
    fs, io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::Link as _,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcError, TcHandle},
    ProgramError, SchedClassifier,
};

use crate::error::{Error, Result};

/// Priority of nodeport's filters (lower numbers run first).
pub const PRIORITY: u16 = 4096;
/// Handle of nodeport's filters ("np").
pub const HANDLE: TcHandle = TcHandle::new(0, 0x6e70);

/// What nodeport attached to one interface the legacy way.
#[derive(Debug)]
pub struct LegacyTc {
    iface: String,
    ifindex: u32,
    /// The ingress and egress filters.
    filters: Vec<SchedClassifierLink>,
    /// The marker directory saying the clsact qdisc is nodeport's, when it is.
    qdisc_marker: Option<PathBuf>,
    qdisc_ours: bool,
    /// The marker directory saying nodeport has filters on this interface (for `inspect`,
    /// and for removing them once the interface is no longer configured).
    filter_marker: Option<PathBuf>,
}

/// Marker directory names under the pin path's `links/`.
pub const FILTER_MARKER: &str = "-tc-legacy";
pub const QDISC_MARKER: &str = "-clsact";

fn kerr(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("{what}: {e}"))
}

fn is_eexist(e: &TcError) -> bool {
    matches!(e, TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
}

impl LegacyTc {
    /// Adds the clsact qdisc of `iface` if missing; `markers` is the directory where the
    /// ownership marker lives (the pin path's `links/`), if any.
    pub fn new(iface: &str, ifindex: u32, markers: Option<&Path>) -> Result<LegacyTc> {
        let marker = markers.map(|d| {
            d.join(format!(
                "{}{QDISC_MARKER}",
                crate::datapath::pin_stem(iface)
            ))
        });
        let filter_marker = markers.map(|d| {
            d.join(format!(
                "{}{FILTER_MARKER}",
                crate::datapath::pin_stem(iface)
            ))
        });
        if let Some(m) = &filter_marker {
            fs::create_dir_all(m).map_err(|e| kerr(m.display(), e))?;
        }
        let qdisc_ours = match tc::qdisc_add_clsact(iface) {
            Ok(()) => {
                if let Some(m) = &marker {
                    fs::create_dir_all(m).map_err(|e| kerr(m.display(), e))?;
                }
                true
            }
            // Someone's qdisc: ours only if an earlier run of this agent added it.
            Err(e) if is_eexist(&e) => marker.as_ref().is_some_and(|m| m.exists()),
            Err(e) => return Err(kerr(format!("adding the clsact qdisc to {iface}"), e)),
        };
        Ok(LegacyTc {
            iface: iface.to_string(),
            ifindex,
            filters: Vec::new(),
            qdisc_marker: marker,
            qdisc_ours,
            filter_marker,
        })
    }

    /// Attaches `prog` at `dir`: a new filter, or the program replaced in an earlier run's
    /// filter at the same priority and handle. Returns whether it replaced one.
    pub fn attach(&mut self, prog: &mut SchedClassifier, dir: TcAttachType) -> Result<bool> {
        let iface = self.iface.as_str();
        let options = NlOptions {
            priority: PRIORITY,
            handle: HANDLE,
            ..NlOptions::default()
        };
        let (id, replaced) =
            match prog.attach_with_options(iface, dir, TcAttachOptions::Netlink(options)) {
                Ok(id) => (id, false),
                Err(ProgramError::TcError(e)) if is_eexist(&e) => {
                    let old = SchedClassifierLink::attached(iface, dir, PRIORITY, HANDLE, None)
                        .map_err(|e| kerr(format!("filter on {iface}"), e))?;
                    let id = prog.attach_to_link(old).map_err(|e| {
                        kerr(format!("replacing the filter on {iface} ({dir:?})"), e)
                    })?;
                    (id, true)
                }
                Err(e) => {
                    return Err(kerr(
                        format!("attaching a cls_bpf filter to {iface} ({dir:?})"),
                        e,
                    ))
                }
            };
        let link = prog
            .take_link(id)
            .map_err(|e| kerr(format!("filter on {iface}"), e))?;
        self.filters.push(link);
        Ok(replaced)
    }

    /// Leaves the filters and the qdisc in the kernel (`--keep-datapath`).
    pub fn keep(mut self) {
        for f in self.filters.drain(..) {
            // A filter link detaches when dropped; forgetting it leaves the filter in place.
            std::mem::forget(f);
        }
        self.qdisc_ours = false;
        self.qdisc_marker = None;
        self.filter_marker = None;
    }
}

impl Drop for LegacyTc {
    /// Removes exactly what nodeport added: its filters, and the qdisc if it added that.
    fn drop(&mut self) {
        for f in self.filters.drain(..) {
            let _ = f.detach();
        }
        if self.qdisc_ours {
            let _ = del_clsact(self.ifindex);
            if let Some(m) = &self.qdisc_marker {
                let _ = fs::remove_dir(m);
            }
        }
        if let Some(m) = &self.filter_marker {
            let _ = fs::remove_dir(m);
        }
    }
}

/// Removes what an earlier run left on `iface`, an interface no longer configured: its
/// filters, and the qdisc if the marker in `markers` says nodeport added it.
pub fn remove_stale(iface: &str, markers: &Path) -> Result<()> {
    for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
        if let Ok(f) = SchedClassifierLink::attached(iface, dir, PRIORITY, HANDLE, None) {
            let _ = f.detach();
        }
    }
    let qdisc = markers.join(format!(
        "{}{QDISC_MARKER}",
        crate::datapath::pin_stem(iface)
    ));
    if qdisc.exists() {
        if let Ok(ifindex) = nix::net::if_::if_nametoindex(iface) {
            let _ = del_clsact(ifindex);
        }
        fs::remove_dir(&qdisc).map_err(|e| kerr(qdisc.display(), e))?;
    }
    let filters = markers.join(format!(
        "{}{FILTER_MARKER}",
        crate::datapath::pin_stem(iface)
    ));
    fs::remove_dir(&filters).map_err(|e| kerr(filters.display(), e))?;
    Ok(())
}

/// `tc qdisc del dev IFINDEX clsact` over rtnetlink (aya adds a clsact qdisc but does not
/// remove one): RTM_DELQDISC with the clsact parent and handle.
fn del_clsact(ifindex: u32) -> io::Result<()> {
    #[repr(C)]
    struct TcMsg {
        family: u8,
        pad1: u8,
        pad2: u16,
        ifindex: i32,
        handle: u32,
        parent: u32,
        info: u32,
    }
    #[repr(C)]
    struct Req {
        nh: libc::nlmsghdr,
        tc: TcMsg,
        rta_len: u16,
        rta_type: u16,
        kind: [u8; 8],
    }
    const RTM_DELQDISC: u16 = 37;
    const TCA_KIND: u16 = 1;
    const TC_H_CLSACT: u32 = 0xffff_fff1;
    let mut kind = [0u8; 8];
    kind[..6].copy_from_slice(b"clsact");
    let req = Req {
        nh: libc::nlmsghdr {
            nlmsg_len: size_of::<Req>() as u32,
            nlmsg_type: RTM_DELQDISC,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        tc: TcMsg {
            family: libc::AF_UNSPEC as u8,
            pad1: 0,
            pad2: 0,
            ifindex: ifindex as i32,
            handle: 0xffff_0000,
            parent: TC_H_CLSACT,
            info: 0,
        },
        rta_len: 4 + 7,
        rta_type: TCA_KIND,
        kind,
    };
    // SAFETY: a netlink socket owned and closed here; `req` and `buf` outlive the calls
    // that read and write them, with their own lengths.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sent = libc::send(fd, (&req as *const Req).cast(), size_of::<Req>(), 0);
        let mut buf = [0u8; 256];
        let got = if sent < 0 {
            -1
        } else {
            libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        let err = io::Error::last_os_error();
        libc::close(fd);
        if got < 0 {
            return Err(err);
        }
        // The ack: nlmsghdr, then the error code (0: done).
        let hdr = size_of::<libc::nlmsghdr>();
        if (got as usize) >= hdr + 4 {
            let code = i32::from_ne_bytes([buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]]);
            if code < 0 {
                return Err(io::Error::from_raw_os_error(-code));
            }
        }
    }
    Ok(())
}
