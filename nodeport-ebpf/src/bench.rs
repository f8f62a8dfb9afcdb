//! Benchmark programs of `np-pktbench`, never loaded by the agent. Frames circulate through
//! three namespaces: `bench_gen`, attached to the generator's return veth, writes every
//! header of each arriving frame and redirects it towards the node; the node (the bare
//! forwarder `bench_fwd`, nodeport, or netfilter) sends it to the sink; `bench_sink`
//! counts it and redirects it back to the generator (or drops it). A population injected
//! once thus runs with no per-packet syscall. Settings and counter slots:
//! nodeport_common::bench.
//!
//! The frames are recycled and the node rewrites them in place (DNAT, SNAT), so the
//! generator writes every header of every frame, checksums included.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use nodeport_common::{
    bench::{
        FwdConfig, GenConfig, SinkConfig, CNT_FWD, CNT_GEN, CNT_GEN_STOPPED, CNT_SINK, CNT_SLOTS,
        FWD_F_REWRITE, GEN_F_STOP, SINK_F_RETURN,
    },
    PROTO_TCP,
};

/// NPB_GEN: 0 -> what the generator writes.
#[map(name = "NPB_GEN")]
static GEN: Array<GenConfig> = Array::with_max_entries(1, 0);

/// NPB_FWD: 0 -> where the bare forwarder sends frames.
#[map(name = "NPB_FWD")]
static FWD: Array<FwdConfig> = Array::with_max_entries(1, 0);

/// NPB_SINK: 0 -> what the sink does with counted frames.
#[map(name = "NPB_SINK")]
static SINK: Array<SinkConfig> = Array::with_max_entries(1, 0);

/// NPB_CNT: slot (`CNT_*`) -> per-CPU frame count.
#[map(name = "NPB_CNT")]
static CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(CNT_SLOTS, 0);

const ETH: usize = 14;
const V4_HLEN: usize = 20;
const V6_HLEN: usize = 40;
const TCP_HLEN: u32 = 20;
const UDP_HLEN: u32 = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TTL: u16 = 64;

/// Adds one to a counter slot and returns the value before.
#[inline(always)]
fn bump(slot: u32) -> u64 {
    match CNT.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        Some(c) => unsafe {
            let v = *c;
            *c = v + 1;
            v
        },
        None => 0,
    }
}

/// Raw (network-order) 32- and 16-bit values at byte offset `off` of a byte array in a
/// map value.
#[inline(always)]
fn raw32(bytes: &[u8], off: usize) -> u32 {
    debug_assert!(off + 4 <= bytes.len());
    // SAFETY: callers pass constant offsets that leave 4 bytes inside the array.
    unsafe { bytes.as_ptr().add(off).cast::<u32>().read_unaligned() }
}

#[inline(always)]
fn raw16(bytes: &[u8], off: usize) -> u16 {
    debug_assert!(off + 2 <= bytes.len());
    // SAFETY: as for raw32, 2 bytes.
    unsafe { bytes.as_ptr().add(off).cast::<u16>().read_unaligned() }
}

/// Writes a MAC address (6 bytes) at `off` as a 32- and a 16-bit store (a 6-byte copy
/// would become a memcpy call).
#[inline(always)]
fn put_mac(base: usize, off: usize, mac: &[u8; 6]) {
    put32(base, off, raw32(mac, 0));
    put16(base, off + 4, raw16(mac, 4));
}

/// Stores at `base + off`; the caller checked that the frame holds the whole header.
#[inline(always)]
fn put32(base: usize, off: usize, raw: u32) {
    // SAFETY: bounds checked by the caller against data_end with constant offsets.
    unsafe { ((base + off) as *mut u32).write_unaligned(raw) }
}

#[inline(always)]
fn put16(base: usize, off: usize, raw: u16) {
    // SAFETY: as for put32.
    unsafe { ((base + off) as *mut u16).write_unaligned(raw) }
}

/// The two 16-bit halves of a host-order 32-bit value, for a one's-complement sum.
#[inline(always)]
fn halves(v: u32) -> u32 {
    (v >> 16) + (v & 0xffff)
}

/// Folds a one's-complement sum and complements it (RFC 1071).
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One flow's varying fields.
struct Flow {
    sport: u16,
    dport: u16,
    /// Added to the last 32 bits of the configured source address.
    src_idx: u32,
    seq: u32,
}

/// 32-bit arithmetic (x86 divides 32-bit operands faster): flows repeat after 2^32
/// frames, beyond the 264 million distinct flows a /20 of sources gives one port anyway.
#[inline(always)]
fn flow_of(cfg: &GenConfig, n: u64) -> Flow {
    let n = n as u32;
    let f = if cfg.flows == 0 { n } else { n % cfg.flows };
    let ports = (cfg.dst_ports as u32).max(1);
    let srcs = cfg.src_count.max(1);
    let rest = f / ports;
    Flow {
        sport: 1024 + ((rest / srcs) % 64_512) as u16,
        dport: cfg.dst_port.wrapping_add((f % ports) as u16),
        src_idx: rest % srcs,
        seq: n,
    }
}

/// Ethernet header.
#[inline(always)]
fn write_eth(p: usize, cfg: &GenConfig, ethertype: u16) {
    put_mac(p, 0, &cfg.dst_mac);
    put_mac(p, 6, &cfg.src_mac);
    put16(p, 12, ethertype.to_be());
}

/// TCP SYN or UDP header at `l4`; `pseudo` is the pseudo-header sum (addresses, protocol,
/// L4 length).
#[inline(always)]
fn write_l4(p: usize, l4: usize, cfg: &GenConfig, fl: &Flow, l4_len: u32, pseudo: u32) {
    put16(p, l4, fl.sport.to_be());
    put16(p, l4 + 2, fl.dport.to_be());
    let ports = fl.sport as u32 + fl.dport as u32;
    if cfg.proto == PROTO_TCP {
        put32(p, l4 + 4, fl.seq.to_be());
        put32(p, l4 + 8, 0); // ack
        put16(p, l4 + 12, 0x5002u16.to_be()); // data offset 5, SYN
        put16(p, l4 + 14, 0xffffu16.to_be()); // window
        let sum = pseudo + ports + halves(fl.seq) + 0x5002 + 0xffff;
        put16(p, l4 + 16, fold(sum).to_be());
        put16(p, l4 + 18, 0); // urgent pointer
    } else {
        put16(p, l4 + 4, (l4_len as u16).to_be());
        // The payload is the template's zeros, which add nothing to the sum.
        let c = fold(pseudo + ports + l4_len);
        put16(p, l4 + 6, if c == 0 { 0xffff } else { c.to_be() });
    }
}

/// L4 length: a bare TCP SYN, or UDP filling the frame.
#[inline(always)]
fn l4_len(cfg: &GenConfig, l3_hlen: usize) -> u32 {
    if cfg.proto == PROTO_TCP {
        TCP_HLEN
    } else {
        (cfg.frame_len as u32).saturating_sub((ETH + l3_hlen) as u32)
    }
}

/// Writes every header of frame `n`; false when the frame is too short (it must hold a
/// TCP header's worth after the IP header, also for UDP: one bounds check for both).
#[inline(always)]
fn write_frame(ctx: &XdpContext, cfg: &GenConfig, n: u64) -> bool {
    let (p, end) = (ctx.data(), ctx.data_end());
    let fl = flow_of(cfg, n);
    let proto = cfg.proto as u32;
    if cfg.ipv6 == 0 {
        const L4: usize = ETH + V4_HLEN;
        if p + L4 + TCP_HLEN as usize > end {
            return false;
        }
        let l4_len = l4_len(cfg, V4_HLEN).max(UDP_HLEN);
        let tot = V4_HLEN as u32 + l4_len;
        let src = u32::from_be(raw32(&cfg.src_addr, 0)).wrapping_add(fl.src_idx);
        let dst = u32::from_be(raw32(&cfg.dst_addr, 0));
        let id = fl.seq & 0xffff;
        write_eth(p, cfg, ETH_P_IP);
        put16(p, ETH, 0x4500u16.to_be());
        put16(p, ETH + 2, (tot as u16).to_be());
        put16(p, ETH + 4, (id as u16).to_be());
        put16(p, ETH + 6, 0x4000u16.to_be()); // DF
        put16(p, ETH + 8, ((TTL << 8) | proto as u16).to_be());
        let ip_sum = 0x4500 + tot + id + 0x4000 + ((TTL as u32) << 8 | proto);
        put16(
            p,
            ETH + 10,
            fold(ip_sum + halves(src) + halves(dst)).to_be(),
        );
        put32(p, ETH + 12, src.to_be());
        put32(p, ETH + 16, dst.to_be());
        let pseudo = halves(src) + halves(dst) + proto + l4_len;
        write_l4(p, L4, cfg, &fl, l4_len, pseudo);
    } else {
        const L4: usize = ETH + V6_HLEN;
        if p + L4 + TCP_HLEN as usize > end {
            return false;
        }
        let l4_len = l4_len(cfg, V6_HLEN).max(UDP_HLEN);
        write_eth(p, cfg, ETH_P_IPV6);
        put32(p, ETH, 0x6000_0000u32.to_be());
        put16(p, ETH + 4, (l4_len as u16).to_be());
        put16(p, ETH + 6, ((proto as u16) << 8 | TTL).to_be());
        let mut pseudo = proto + l4_len;
        let mut i = 0;
        while i < 4 {
            let mut s = u32::from_be(raw32(&cfg.src_addr, i * 4));
            if i == 3 {
                s = s.wrapping_add(fl.src_idx);
            }
            let d = u32::from_be(raw32(&cfg.dst_addr, i * 4));
            put32(p, ETH + 8 + i * 4, s.to_be());
            put32(p, ETH + 24 + i * 4, d.to_be());
            pseudo += halves(s) + halves(d);
            i += 1;
        }
        write_l4(p, L4, cfg, &fl, l4_len, pseudo);
    }
    true
}

/// The generator: rewrites the arriving frame as frame `n` of flow `f(n)` (see
/// `GenConfig`) and redirects it to the node. A frame of another length (the injected
/// ones are the right length; a stray one the sink returned may not be) is resized first.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let Some(cfg) = GEN.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if cfg.flags & GEN_F_STOP != 0 {
        bump(CNT_GEN_STOPPED);
        return xdp_action::XDP_DROP;
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let want = cfg.frame_len as i32;
    if len != want {
        // SAFETY: plain helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    let n = bump(CNT_GEN);
    if !write_frame(&ctx, cfg, n) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: plain helper call; the kernel checks the ifindex.
    unsafe { bpf_redirect(cfg.out_ifindex, 0) as u32 }
}

/// The bare forwarder: new Ethernet addresses (unless configured to leave the frame
/// untouched, the "ceiling" run), then a redirect into the egress veth.
#[xdp]
pub fn bench_fwd(ctx: XdpContext) -> u32 {
    let Some(cfg) = FWD.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if cfg.flags & FWD_F_REWRITE != 0 {
        let p = ctx.data();
        if p + ETH > ctx.data_end() {
            return xdp_action::XDP_DROP;
        }
        put_mac(p, 0, &cfg.dst_mac);
        put_mac(p, 6, &cfg.src_mac);
    }
    bump(CNT_FWD);
    // SAFETY: plain helper call; the kernel checks the ifindex.
    unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
}

/// The sink: counts, then returns the frame to the generator (or drops it). Multicast
/// frames (the node's own IPv6 neighbour and listener messages) are dropped uncounted:
/// they are not the generator's.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let p = ctx.data();
    if p + ETH > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the frame holds an Ethernet header (checked above).
    if unsafe { *(p as *const u8) } & 1 != 0 {
        return xdp_action::XDP_DROP;
    }
    bump(CNT_SINK);
    match SINK.get(0) {
        // SAFETY: plain helper call; the kernel checks the ifindex.
        Some(c) if c.flags & SINK_F_RETURN != 0 => unsafe { bpf_redirect(c.ifindex, 0) as u32 },
        _ => xdp_action::XDP_DROP,
    }
}
