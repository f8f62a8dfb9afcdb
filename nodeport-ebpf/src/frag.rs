//! IPv4 fragments of UDP: the first fragment of a datagram carries its ports, later ones
//! do not. The first fragment's ports are remembered in NP_FRAG under the datagram's
//! identity as it arrived (addresses, IP id, protocol); a later fragment takes them back,
//! and from there goes through the same conntrack and reverse-NAT decision as its first
//! (`lb::known`), but never opens a flow. Its rewrite is the IP header's alone
//! (`nat::rewrite_*`): the UDP checksum, which covers the pseudo-header and the whole
//! datagram, lives in the first fragment, whose incremental update already accounts for
//! the new addresses and ports. Like Cilium's IPv4 fragment tracking (bpf/lib/ipv4.h),
//! fragments that arrive before their first are not held back: they pass to the stack
//! untouched and are counted (`pass_frag_out_of_order`).

use nodeport_common::{
    frag::{FragKey, FragPorts},
    Addr, Stat,
};

use crate::{
    maps::FRAGS,
    packet::{Flow, FRAG_FIRST, FRAG_LATER},
};

/// [`lookup`]'s answer when the datagram is unknown.
const MISS: u64 = u64::MAX;

/// Record a first fragment's ports, or fill in a later fragment's. `PassFragOutOfOrder`:
/// a later fragment whose first fragment was not seen (yet). Whole datagrams pass through.
/// The caller counts `event_frag_later` (TC ingress only where XDP has not already).
#[inline(always)]
pub fn track<A: Addr>(f: &mut Flow<A>) -> Result<(), Stat> {
    if f.frag == 0 {
        return Ok(());
    }
    let (saddr, daddr) = (f.saddr.fib_words()[0], f.daddr.fib_words()[0]);
    let id_proto = f.ip_id as u32 | (f.proto as u32) << 16;
    if f.frag == FRAG_FIRST {
        record(
            saddr,
            daddr,
            id_proto,
            f.sport as u32 | (f.dport as u32) << 16,
        );
        return Ok(());
    }
    if f.frag != FRAG_LATER {
        return Ok(());
    }
    let ports = lookup(saddr, daddr, id_proto);
    if ports == MISS {
        return Err(Stat::PassFragOutOfOrder);
    }
    f.sport = ports as u16;
    f.dport = (ports >> 16) as u16;
    Ok(())
}

#[inline(always)]
fn key(saddr: u32, daddr: u32, id_proto: u32) -> FragKey {
    FragKey {
        saddr,
        daddr,
        id: id_proto as u16,
        proto: (id_proto >> 16) as u8,
        pad: 0,
    }
}

/// A BPF function of its own (scalars in and out): the map update stays out of the
/// callers' frames and out of the verifier's walk of their paths.
#[inline(never)]
fn record(saddr: u32, daddr: u32, id_proto: u32, ports: u32) -> u32 {
    let v = FragPorts {
        sport: ports as u16,
        dport: (ports >> 16) as u16,
    };
    // An update failure leaves the later fragments to the stack (counted there).
    FRAGS.insert(&key(saddr, daddr, id_proto), &v, 0).is_ok() as u32
}

/// The ports of a datagram's first fragment (sport | dport << 16), or [`MISS`].
#[inline(never)]
fn lookup(saddr: u32, daddr: u32, id_proto: u32) -> u64 {
    // SAFETY: plain data read from the map value.
    match unsafe { FRAGS.get(&key(saddr, daddr, id_proto)) } {
        Some(p) => p.sport as u64 | (p.dport as u64) << 16,
        None => MISS,
    }
}
