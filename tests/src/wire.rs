//! The "switch" side of the lan: a minimal XDP_PASS program on the bridge-side veth ends.
//!
//! A frame that the datapath sends with XDP_TX (or XDP_REDIRECT) into a veth is only
//! received if the peer runs NAPI, which on these kernels reliably means an XDP program on
//! the peer (GRO alone left XDP_TX frames sitting unflushed). On a real network the peer is
//! a switch port; here it is this two-instruction program. It is loaded with raw bpf(2)
//! calls so the harness needs no compiler and no object file.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 144]) -> io::Result<OwnedFd> {
    // SAFETY: bpf(2) with a zero-initialised, correctly sized attribute union.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Load `r0 = XDP_PASS; exit` as an XDP program.
pub fn load_xdp_pass() -> io::Result<OwnedFd> {
    // BPF_ALU64|BPF_MOV|BPF_K r0 = 2 (XDP_PASS); BPF_JMP|BPF_EXIT.
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut attr = [0u8; 144];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"np_wire\0");
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Attach `prog` to interface `ifindex` of the calling thread's namespace (native mode).
/// The attachment lasts as long as the returned link fd.
pub fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut attr = [0u8; 144];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_when_root() {
        if nix::unistd::geteuid().is_root() {
            super::load_xdp_pass().expect("XDP_PASS program loads");
        }
    }
}
