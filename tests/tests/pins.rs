//! The upgrade path of pinned maps: a map whose layout matches is reused with its entries;
//! a map whose layout differs (here: another conntrack size) is replaced, and the report
//! says so. Also: a datapath dropped with `keep_on_exit` leaves its pins in place, and a
//! plain drop removes them.

use nodeport_agent::{
    datapath::{Datapath, MapSizes},
    sync::Maps,
};
use nodeport_common::{maps as m, Backend};
use tests::netns::{require_root, run_id, PinPath};

fn small(conntrack: u32) -> MapSizes {
    MapSizes {
        services: 64,
        backends: 64,
        maglev_slots: 1024,
        conntrack,
        ..MapSizes::default()
    }
}

#[test]
fn layout_change_replaces_only_that_map_and_keeps_the_others_entries() {
    if !require_root() {
        return;
    }
    let pin = PinPath::new(&format!("np-{}-pins", run_id()));
    let be = Backend {
        addr: u32::from_ne_bytes([198, 19, 1, 10]),
        port: 80u16.to_be(),
        flags: 0,
        pad: 0,
    };
    {
        let mut dp = Datapath::load(small(1024), Some(pin.path())).expect("first load");
        assert!(dp
            .pin_report()
            .created
            .contains(&m::MAP_CONNTRACK.to_string()));
        assert!(dp.pin_report().reused.is_empty() && dp.pin_report().replaced.is_empty());
        dp.set_backend(7, &be).expect("backend");
        dp.keep_on_exit(true);
    }
    assert!(
        pin.path().join(m::MAP_CONNTRACK).exists(),
        "kept pins must survive the drop"
    );

    // Same layout: everything reused, the backend is still there.
    {
        let mut dp = Datapath::load(small(1024), Some(pin.path())).expect("second load");
        let report = dp.pin_report().clone();
        assert!(report.replaced.is_empty(), "{report:?}");
        assert!(
            report.reused.contains(&m::MAP_BACKENDS.to_string()),
            "{report:?}"
        );
        assert!(dp.snapshot().unwrap().backends.contains(&(7, be)));
        dp.keep_on_exit(true);
    }

    // A bigger conntrack (`--conntrack-max`): that map alone is replaced (the reverse-NAT
    // map has a size of its own, `--revnat-max`), the others are reused and keep their
    // entries.
    {
        let dp = Datapath::load(small(2048), Some(pin.path())).expect("third load");
        let report = dp.pin_report().clone();
        let replaced: Vec<&str> = report.replaced.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(replaced, [m::MAP_CONNTRACK], "{report:?}");
        assert!(
            report.replaced[0].1.contains("max_entries 1024"),
            "reason names the old layout: {report:?}"
        );
        assert!(
            report.reused.contains(&m::MAP_BACKENDS.to_string()),
            "{report:?}"
        );
        assert!(
            dp.snapshot().unwrap().backends.contains(&(7, be)),
            "backends carried over"
        );
    }
    // Dropped without keep_on_exit: the pins are gone.
    assert!(!pin.path().exists(), "a plain drop must remove the pins");
}
