//! The packet benchmark's own checks, fast enough for `cargo xtask test`: the generator
//! writes well-formed frames (every checksum right, the flow fields as documented) for
//! all four frame kinds, and circulating frames lap generator -> bare XDP forwarder ->
//! sink -> generator tens of thousands of times, every lap counted, none lost, and the
//! population drains when told to. Privileged: under CI=true they fail instead of
//! skipping.

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use nodeport_common::bench::CNT_GEN;
use tests::{
    netns::{require_root, run_id},
    pktbench::{
        circulate::{Mode, POPULATION},
        progs::BenchProgs,
        run::{gen_config, Bed, Kind, Setup, Traffic},
        services::{ServiceSet, NODE_PORT_BASE},
        topo,
    },
    testbed::default_agent_path,
};

const XDP_REDIRECT: u32 = 4;

#[test]
fn generator_frames_are_well_formed() {
    if !require_root() {
        return;
    }
    let mut progs = BenchProgs::load();
    for kind in Kind::ALL {
        // 3 services, new flows: frame n goes to port base + n % 3 from source n / 3.
        progs.set_gen(&gen_config(kind, Traffic::NewFlows, 3));
        for n in 0..5u16 {
            let before = progs.count(CNT_GEN);
            let (verdict, frame) = progs.gen_frame(kind.frame_len());
            assert_eq!(verdict, XDP_REDIRECT, "{}: verdict", kind.label());
            let seq = before as u16;
            assert_eq!(frame.len(), kind.frame_len());
            assert_eq!(&frame[0..6], &topo::NODE_GEN_MAC);
            assert_eq!(&frame[6..12], &topo::GEN_MAC);
            let h = PacketHeaders::from_ethernet_slice(&frame)
                .unwrap_or_else(|e| panic!("{}: frame {n} does not parse: {e}", kind.label()));
            let payload = h.payload.slice();
            let src_idx = (seq / 3) as u32;
            let (sport, dport, csum_ok) = match (&h.net, &h.transport) {
                (Some(NetHeaders::Ipv4(ip, _)), Some(t)) => {
                    assert!(!kind.ipv6);
                    assert_eq!(
                        ip.header_checksum,
                        ip.calc_header_checksum(),
                        "IPv4 checksum"
                    );
                    assert_eq!(ip.destination, topo::NODE_ADDR.octets());
                    assert_eq!(
                        u32::from_be_bytes(ip.source),
                        u32::from(topo::SRC_BASE) + src_idx
                    );
                    match t {
                        TransportHeader::Tcp(t) => {
                            assert!(t.syn && !t.ack);
                            (
                                t.source_port,
                                t.destination_port,
                                t.checksum == t.calc_checksum_ipv4(ip, payload).unwrap(),
                            )
                        }
                        TransportHeader::Udp(u) => (
                            u.source_port,
                            u.destination_port,
                            u.checksum == u.calc_checksum_ipv4(ip, payload).unwrap(),
                        ),
                        _ => panic!("unexpected transport"),
                    }
                }
                (Some(NetHeaders::Ipv6(ip, _)), Some(t)) => {
                    assert!(kind.ipv6);
                    let last = u32::from_be_bytes(ip.source[12..16].try_into().unwrap());
                    assert_eq!(last, src_idx);
                    match t {
                        TransportHeader::Tcp(t) => (
                            t.source_port,
                            t.destination_port,
                            t.checksum == t.calc_checksum_ipv6(ip, payload).unwrap(),
                        ),
                        TransportHeader::Udp(u) => (
                            u.source_port,
                            u.destination_port,
                            u.checksum == u.calc_checksum_ipv6(ip, payload).unwrap(),
                        ),
                        _ => panic!("unexpected transport"),
                    }
                }
                other => panic!("{}: unexpected headers {other:?}", kind.label()),
            };
            assert!(csum_ok, "{}: L4 checksum of frame {n}", kind.label());
            assert_eq!(
                kind.udp,
                matches!(h.transport, Some(TransportHeader::Udp(_)))
            );
            assert_eq!(dport, NODE_PORT_BASE + seq % 3, "{}", kind.label());
            assert_eq!(sport, 1024, "{}", kind.label());
        }
    }
}

/// The bare XDP forwarder's node, its generator in `mode`.
fn bare_bed(mode: Mode) -> Bed {
    Bed::new(
        &run_id(),
        Setup::Bare,
        ServiceSet::new(1),
        Traffic::NewFlows,
        &default_agent_path(),
        mode,
    )
}

#[test]
fn frames_circulate_through_the_bare_forwarder_without_loss() {
    if !require_root() {
        return;
    }
    let mut bed = bare_bed(Mode::Circulate);
    for kind in Kind::ALL {
        let want = 50_000;
        let s = bed.send(kind, Traffic::NewFlows, want, 0);
        let label = kind.label();
        // The population was injected once and lapped: far more frames than injected.
        assert!(
            s.sent >= want,
            "{label}: the generator sent {} of {want}",
            s.sent
        );
        assert_eq!(
            s.injected, POPULATION,
            "{label}: frames had to be topped up ({} injected): some were lost",
            s.injected
        );
        // Every frame the generator sent reached the sink, and after the stop the whole
        // population came back to the generator and was dropped there.
        assert_eq!(
            s.delivered, s.sent,
            "{label}: the sink counted {} of {}",
            s.delivered, s.sent
        );
        assert_eq!(
            s.drained, POPULATION,
            "{label}: {} frames drained",
            s.drained
        );
    }
}

/// The fallback mode: every frame sent by AF_PACKET, rewritten by the generator, dropped
/// by the sink: all of them counted there.
#[test]
fn sent_frames_cross_the_bare_forwarder() {
    if !require_root() {
        return;
    }
    let mut bed = bare_bed(Mode::Send);
    for kind in [Kind::ALL[0], Kind::ALL[3]] {
        let s = bed.send(kind, Traffic::NewFlows, 5_000, 0);
        let label = kind.label();
        assert!(s.sent >= 5_000, "{label}: the generator sent {}", s.sent);
        assert_eq!(s.injected, s.sent, "{label}: one send per frame");
        assert_eq!(
            s.delivered, s.sent,
            "{label}: the sink counted {} of {}",
            s.delivered, s.sent
        );
        assert_eq!(s.drained, 0, "{label}: nothing circulates");
    }
}
