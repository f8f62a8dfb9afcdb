//! `sessionAffinity: ClientIP` end to end: one client keeps its backend across new
//! connections until it has been idle for `timeoutSeconds`; then a new choice is made; a
//! removed backend means a new choice too.
//!
//! To make "a new choice" observable without chance, the test reads node1's pinned maps
//! and computes, as the datapath does, which backend the Maglev table gives to a UDP
//! source port. Sending from a port whose table choice differs from the sticky backend
//! shows which of the two won.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use nodeport_agent::datapath::MapReader;
use nodeport_common::{hash::flow_hash, PROTO_UDP};
use tests::{
    client,
    netns::require_root,
    testbed::{default_agent_path, echo_path, Testbed, TestbedOptions},
};

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

const TIMEOUT_S: u32 = 3;

/// The pod the Maglev table of node1 gives to a UDP packet from the client to the
/// nodePort, by source port, ignoring affinity: node1's pinned maps as they are now.
fn table_choice(tb: &Testbed) -> impl Fn(u16) -> String + '_ {
    let agent = tb.agents().iter().find(|a| a.node == "node1").unwrap();
    let maps = MapReader::open(agent.pin_path()).expect("open node1's pinned maps");
    let node_port = tb.nodeport_addr("node1").port();
    let (_, svc) = maps
        .services()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.addr == 0 && k.port == node_port.to_be() && k.proto == PROTO_UDP)
        .expect("UDP nodePort frontend");
    assert_ne!(svc.table_size, 0, "UDP service without a table");
    let slots = maps.slots(svc.table_off, svc.table_size).unwrap();
    let backends: BTreeMap<u32, Ipv4Addr> = maps
        .backends()
        .unwrap()
        .into_iter()
        .map(|(id, b)| (id, Ipv4Addr::from(b.addr.to_ne_bytes())))
        .collect();
    let client = u32::from_ne_bytes(tb.cluster().client_ip().octets());
    move |sport| {
        let h = flow_hash(client, sport.to_be(), node_port.to_be(), PROTO_UDP);
        let be = backends[&slots[(h % svc.table_size) as usize]];
        tb.cluster()
            .pods()
            .iter()
            .find(|p| p.ip == be)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| panic!("no pod has {be}"))
    }
}

/// The first source port from `from` whose table choice is not `avoid`.
fn port_not_choosing(tb: &Testbed, from: u16, avoid: &str) -> u16 {
    let choice = table_choice(tb);
    (from..from + 500)
        .find(|p| choice(*p) != avoid)
        .expect("some port hashes elsewhere")
}

#[test]
fn client_ip_affinity_sticks_expires_and_follows_removal() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service.session_affinity_timeout = Some(TIMEOUT_S);
    let mut tb = Testbed::start(opts);
    tb.wait_for_service(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    // wait_for_service itself bound the client: let that binding expire first.
    std::thread::sleep(Duration::from_secs(u64::from(TIMEOUT_S) + 1));
    let addr: SocketAddr = tb.nodeport_addr("node1");
    let udp =
        |tb: &Testbed, sport: u16| client::udp_request_from(tb.cluster().client(), addr, sport);

    // TCP: a dozen new connections (new source ports) all reach one backend. Without
    // affinity, three backends would give that with probability 3^-11.
    let tcp: BTreeSet<String> = client::http_get_many(tb.cluster().client(), addr, 12)
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| panic!("{e}\n{}", tb.agent_logs()))
                .from
        })
        .collect();
    assert_eq!(tcp.len(), 1, "TCP connections spread: {tcp:?}");

    // UDP: the first request binds the client; a port the table sends elsewhere still
    // reaches the sticky backend.
    let sticky = udp(&tb, 41000).unwrap().from;
    let p = port_not_choosing(&tb, 41001, &sticky);
    let r = udp(&tb, p).unwrap();
    assert_eq!(r.from, sticky, "port {p}: affinity must beat the table");

    // Idle for longer than the timeout: the table decides again.
    std::thread::sleep(Duration::from_secs(u64::from(TIMEOUT_S) + 1));
    let p = port_not_choosing(&tb, p + 1, &sticky);
    let fresh = udp(&tb, p).unwrap().from;
    assert_eq!(
        fresh,
        table_choice(&tb)(p),
        "after {TIMEOUT_S}s idle the binding must have expired"
    );
    assert_ne!(fresh, sticky);

    // The new binding holds; then its backend is removed: a new choice, which sticks.
    let q = port_not_choosing(&tb, p + 1, &fresh);
    assert_eq!(udp(&tb, q).unwrap().from, fresh);
    tb.remove_endpoint(&fresh);
    let mut port = q + 1;
    let mut chosen = String::new();
    let moved =
        tests::testbed::poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
            port += 1;
            match udp(&tb, port) {
                Ok(r) if r.from != fresh => {
                    chosen = r.from;
                    true
                }
                _ => false,
            }
        });
    assert!(moved, "{fresh} removed, still chosen\n{}", tb.agent_logs());
    // The new choice sticks: a port the (new) table sends elsewhere still reaches it.
    let p = port_not_choosing(&tb, port + 1, &chosen);
    assert_eq!(
        udp(&tb, p).unwrap().from,
        chosen,
        "port {p}: after the removal the new choice must stick"
    );
}
