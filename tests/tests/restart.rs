//! Restart safety: SIGKILL the agent of a node while TCP connections run through its
//! nodePort (a dual-stack Service: over IPv4 and IPv6), start it again, and check that the
//! connections never notice and that no map entry of either family was lost. The pinned
//! links keep the programs attached while no agent runs; the pinned maps keep conntrack;
//! the restarted agent adopts the backend ids it finds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::tc::TcAttachType,
};
use nodeport_common::{maps as m, Backend, Backend6, CtEntry, CtEntry6, FlowKey, FlowKey6};
use tests::{
    client::{self, EchoReply, KeepAliveConn},
    manifests::IpFamily,
    netns::require_root,
    testbed::{default_agent_path, echo_path, poll_until, Testbed, TestbedOptions},
};
use tests::{cluster::LanKind, neighbour::tcx_programs};

const AGENT_WAIT: Duration = Duration::from_secs(30);

fn echo_bin() -> PathBuf {
    echo_path(env!("CARGO_BIN_EXE_np-echo"))
}

fn hash_map<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str, lru: bool) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin.join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    HashMap::try_from(map).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What the pinned maps under `pin` hold, both families.
#[derive(Debug, PartialEq)]
struct MapState {
    conntrack: BTreeSet<FlowKey>,
    conntrack6: BTreeSet<FlowKey6>,
    backends: BTreeMap<u32, Backend>,
    backends6: BTreeMap<u32, Backend6>,
}

fn map_state(pin: &Path) -> MapState {
    let ct: HashMap<MapData, FlowKey, CtEntry> = hash_map(pin, m::MAP_CONNTRACK, true);
    let ct6: HashMap<MapData, FlowKey6, CtEntry6> = hash_map(pin, m::MAP_CONNTRACK6, true);
    let reader = nodeport_agent::datapath::MapReader::open(pin).expect("open pins");
    MapState {
        conntrack: ct.keys().map(|k| k.expect("conntrack key")).collect(),
        conntrack6: ct6.keys().map(|k| k.expect("conntrack6 key")).collect(),
        backends: reader.backends().expect("NP_BE").into_iter().collect(),
        backends6: reader.backends6().expect("NP_BE6").into_iter().collect(),
    }
}

#[test]
fn sigkill_and_restart_keeps_connections_and_map_entries() {
    if !require_root() {
        return;
    }
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.service = opts.service.with_families(&[IpFamily::V4, IpFamily::V6]);
    let mut tb = Testbed::serving(opts);
    // A pod added after the first sync gets the next backend id, so the ids in the maps are
    // no longer in address order: an agent that renumbered from scratch after the restart
    // would hand pb1's id to pa3 and break the flows bound to it.
    tb.add_pod("node1", "pa3", Ipv4Addr::new(198, 19, 1, 9));
    let addrs = [tb.nodeport_addr("node1"), tb.nodeport_addr6("node1")];
    for addr in addrs {
        let served = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
            client::http_get_many(tb.cluster().client(), addr, 10)
                .into_iter()
                .flatten()
                .any(|r| r.from == "pa3")
        });
        assert!(served, "pa3 never served on {addr}\n{}", tb.agent_logs());
    }

    // Long-lived connections through node1, in each family until both kinds of backend
    // are held: local pods (pa1, pa2, pa3: client address kept) and pb1 on node2
    // (source-NATed).
    let mut conns: Vec<(KeepAliveConn, EchoReply)> = Vec::new();
    let mut per_family = [0usize; 2];
    for (family, addr) in addrs.into_iter().enumerate() {
        let mut mine: Vec<(KeepAliveConn, EchoReply)> = Vec::new();
        for _ in 0..40 {
            let mut c = KeepAliveConn::connect(tb.cluster().client(), addr).expect("connect");
            let first = c.request().expect("first request");
            mine.push((c, first));
            let froms: BTreeSet<&str> = mine.iter().map(|(_, r)| r.from.as_str()).collect();
            if froms.contains("pb1")
                && (froms.contains("pa1") || froms.contains("pa2"))
                && mine.len() >= 8
            {
                break;
            }
        }
        let froms: BTreeSet<String> = mine.iter().map(|(_, r)| r.from.clone()).collect();
        assert!(
            froms.contains("pb1") && froms.len() >= 2,
            "{addr}: no mix of local and remote backends: {froms:?}"
        );
        per_family[family] = mine.len();
        conns.extend(mine);
    }

    let check = |tb: &Testbed, conns: &mut Vec<(KeepAliveConn, EchoReply)>, when: &str| {
        for (c, first) in conns.iter_mut() {
            let r = c.request().unwrap_or_else(|e| {
                panic!("{when}: kept connection broke: {e}\n{}", tb.agent_logs())
            });
            assert_eq!(
                &r, first,
                "{when}: kept connection changed backend or address"
            );
        }
    };
    check(&tb, &mut conns, "before the kill");

    let pin = tb
        .agents()
        .iter()
        .find(|a| a.node == "node1")
        .expect("node1 agent")
        .pin_path()
        .to_path_buf();
    let before = map_state(&pin);
    assert!(
        before.conntrack.len() >= per_family[0] && before.conntrack6.len() >= per_family[1],
        "conntrack holds {} (IPv4) and {} (IPv6) entries for {per_family:?} connections",
        before.conntrack.len(),
        before.conntrack6.len(),
    );

    tb.kill_agent("node1");
    // No agent runs now: the pinned links keep the datapath serving.
    check(&tb, &mut conns, "while the agent is dead");
    for addr in addrs {
        let fresh = client::http_get(tb.cluster().client(), addr);
        assert!(
            fresh.is_ok(),
            "new connection to {addr} while the agent is dead: {fresh:?}"
        );
    }

    tb.restart_agent("node1");
    let synced = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        tb.agent_log("node1").contains("synced")
    });
    assert!(synced, "restarted agent never synced\n{}", tb.agent_logs());
    let log = tb.agent_log("node1");
    assert!(
        log.contains("reusing pinned maps"),
        "restarted agent did not reuse the maps:\n{log}"
    );

    check(&tb, &mut conns, "after the restart");
    for addr in addrs {
        for _ in 0..10 {
            let r = client::http_get(tb.cluster().client(), addr);
            assert!(
                r.is_ok(),
                "new connection to {addr} after the restart: {r:?}\n{}",
                tb.agent_logs()
            );
        }
    }

    let after = map_state(&pin);
    let lost: Vec<_> = before.conntrack.difference(&after.conntrack).collect();
    let lost6: Vec<_> = before.conntrack6.difference(&after.conntrack6).collect();
    assert!(
        lost.is_empty() && lost6.is_empty(),
        "conntrack entries lost across the restart: {lost:?} {lost6:?}"
    );
    assert_eq!(
        (&before.backends, &before.backends6),
        (&after.backends, &after.backends6),
        "backend ids changed across the restart"
    );
    drop(conns);
}

/// Whether XDP is attached to `lan0` of `node` (as `ip link` reports it).
/// Whether the datapath is attached to `node`'s lan0: TC ingress always, and XDP where
/// the lan is wire-like (on a lan of default veths TC serves it alone).
fn datapath_attached(tb: &Testbed, node: &str) -> bool {
    let ns = tb.cluster().node(node).ns();
    let tc = tcx_programs(ns, "lan0", TcAttachType::Ingress)
        .iter()
        .any(|p| p == "np_tc_in");
    tc && xdp_attached(tb, node) == (tb.cluster().spec().lan == LanKind::Wire)
}

fn xdp_attached(tb: &Testbed, node: &str) -> bool {
    let out = tb
        .cluster()
        .node(node)
        .ns()
        .exec(&["ip", "link", "show", "dev", "lan0"]);
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

#[test]
fn sigterm_detaches_and_keep_datapath_hands_over() {
    if !require_root() {
        return;
    }
    // A plain SIGTERM: the agent detaches its programs and removes its pins.
    let mut tb =
        Testbed::serving(TestbedOptions::standard(echo_bin()).with_agent(default_agent_path()));
    let pin = tb
        .agents()
        .iter()
        .find(|a| a.node == "node1")
        .unwrap()
        .pin_path()
        .to_path_buf();
    assert!(datapath_attached(&tb, "node1"));
    let status = tb.stop_agent("node1").expect("agent exits on SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        tb.agent_logs()
    );
    let ns = tb.cluster().node("node1").ns();
    let left = [TcAttachType::Ingress, TcAttachType::Egress].map(|d| tcx_programs(ns, "lan0", d));
    assert!(
        !xdp_attached(&tb, "node1") && left.iter().all(|p| p.is_empty()),
        "programs still attached after SIGTERM: {left:?}"
    );
    assert!(!pin.exists(), "pins left after SIGTERM: {}", pin.display());
    assert!(tb.agent_log("node1").contains("detached and unpinned"));
    drop(tb);

    // With --keep-datapath: the datapath stays and keeps serving with no agent; the next
    // agent takes the pinned links over and replaces the programs atomically.
    let mut opts = TestbedOptions::standard(echo_bin()).with_agent(default_agent_path());
    opts.agent_args.push("--keep-datapath".into());
    let mut tb = Testbed::serving(opts);
    let addr = tb.nodeport_addr("node1");
    let mut conn = KeepAliveConn::connect(tb.cluster().client(), addr).expect("connect");
    let first = conn.request().expect("first request");
    let status = tb.stop_agent("node1").expect("agent exits on SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        tb.agent_logs()
    );
    assert!(
        datapath_attached(&tb, "node1"),
        "--keep-datapath detached the programs"
    );
    assert_eq!(conn.request().expect("kept connection, no agent"), first);
    assert!(
        client::http_get(tb.cluster().client(), addr).is_ok(),
        "new connection, no agent"
    );
    tb.restart_agent("node1");
    let taken_over = poll_until(AGENT_WAIT, Duration::from_millis(100), || {
        let log = tb.agent_log("node1");
        log.contains("replaced=true") && log.contains("synced")
    });
    assert!(
        taken_over,
        "restarted agent did not take the links over:\n{}",
        tb.agent_logs()
    );
    assert_eq!(
        conn.request().expect("kept connection after the hand-over"),
        first
    );
}
