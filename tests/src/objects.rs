//! The agent's embedded eBPF object, loaded for programs that are not the datapath's (the
//! benchmark's generator, forwarder and sink; the tests' neighbour program). aya creates
//! every map of an object, so the datapath's big maps are shrunk to one entry: these
//! programs never touch them.

use aya::{Ebpf, EbpfLoader};
use nodeport_agent::datapath::EBPF_OBJECT;
use nodeport_common::maps as m;

/// The object, loaded with the datapath's maps shrunk; no program loaded yet.
pub fn load_small() -> Ebpf {
    assert!(
        !EBPF_OBJECT.is_empty(),
        "nodeport-agent was built with AYA_BUILD_SKIP: no eBPF object"
    );
    let mut loader = EbpfLoader::new();
    for name in [
        m::MAP_SERVICES,
        m::MAP_BACKENDS,
        m::MAP_MAGLEV,
        m::MAP_CONNTRACK,
        m::MAP_REVNAT,
        m::MAP_AFFINITY,
        m::MAP_SERVICES6,
        m::MAP_BACKENDS6,
        m::MAP_CONNTRACK6,
        m::MAP_REVNAT6,
        m::MAP_AFFINITY6,
    ] {
        loader.map_max_entries(name, 1);
    }
    loader.load(EBPF_OBJECT).expect("loading the eBPF object")
}
