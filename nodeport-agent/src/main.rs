//! nodeport-agent: loads the datapath, attaches it to the node's interfaces and keeps its
//! maps equal to the desired state computed from Services, EndpointSlices and Nodes.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use std::sync::Arc;

use nodeport_agent::{
    datapath::{
        find_tunnels, monotonic_coarse_ns, Datapath, EbpfLog, MapReader, MapSizes, TcAttach,
        Variant, XdpAttachMode,
    },
    family::RawAddr,
    gc, hcnp, health,
    ifaddrs::{interface_addrs, named_interface_addrs, snat_sources},
    inspect,
    kube_source::{self, KubeStats, WatchOptions},
    links::{DatapathLinks, Event as LinkEvent, Links},
    manifests,
    metrics::Metrics,
    model::{self, Inputs, IpCidr, Refusal, Settings},
    names::{self, NameStore},
    node_addrs::{self, InterfaceAddr, InterfacePatterns},
    ports,
    serve::{self, Health, Shared},
    sync::Reconciler,
};
use nodeport_common::{ct::Timeouts, maps as m, Config, Ip6, CFG_F_DEBUG};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{error, info, warn};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Show what the pinned maps of a node hold; works with no agent running.
#[derive(Parser, Debug)]
#[command(name = "nodeport-agent inspect", version)]
struct InspectArgs {
    /// The agent's --pin-path.
    #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
    pin_path: PathBuf,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: Option<What>,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Frontends with their backends and Maglev table sizes (the default).
    Services,
    /// Conntrack entries.
    Conntrack {
        /// Only flows to this frontend port (nodePort or LoadBalancer port).
        #[arg(long)]
        port: Option<u16>,
        /// Only flows of this service id (as `inspect services` shows).
        #[arg(long)]
        svc_id: Option<u32>,
        /// Only flows from this client address (IPv4 or IPv6).
        #[arg(long)]
        client: Option<IpAddr>,
    },
    /// Datapath counters, summed over CPUs.
    Counters,
    /// The interfaces the datapath is attached to and the path serving each (XDP and TC,
    /// or TC alone), from the pinned links. Why a path was chosen: the agent's log.
    Interfaces,
}

/// Print what the pinned maps hold.
fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let maps = MapReader::open(&a.pin_path).with_context(|| {
        format!(
            "no datapath pinned at {} (is --pin-path right?)",
            a.pin_path.display()
        )
    })?;
    // svc_id -> `namespace/name:port/protocol`, as the agent keeps them beside the maps.
    let names = names::read(&a.pin_path);
    let out = match a.what.unwrap_or(What::Services) {
        What::Services => {
            let slots = |off, len| maps.slots(off, len).unwrap_or_default();
            let mut views = inspect::frontends(&maps.services()?, &maps.backends()?, &names, slots);
            views.extend(inspect::frontends(
                &maps.services6()?,
                &maps.backends6()?,
                &names,
                slots,
            ));
            if a.json {
                serde_json::to_string_pretty(&views)?
            } else {
                inspect::frontends_table(&views)
            }
        }
        What::Conntrack {
            port,
            svc_id,
            client,
        } => {
            let filter = inspect::FlowFilter {
                port,
                svc_id,
                client,
            };
            let now = monotonic_coarse_ns();
            let mut views = inspect::flows(&maps.conntrack()?, &filter, &names, now);
            views.extend(inspect::flows(&maps.conntrack6()?, &filter, &names, now));
            if a.json {
                serde_json::to_string_pretty(&views)?
            } else {
                inspect::flows_table(&views)
            }
        }
        What::Interfaces => {
            let links = a.pin_path.join("links");
            let names: Vec<String> = std::fs::read_dir(&links)
                .with_context(|| format!("reading {}", links.display()))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let views = inspect::interfaces(&names);
            if a.json {
                serde_json::to_string_pretty(&views)?
            } else {
                inspect::interfaces_table(&views)
            }
        }
        What::Counters => {
            let counters = maps.counters()?;
            if a.json {
                let map: std::collections::BTreeMap<_, _> = counters.into_iter().collect();
                serde_json::to_string_pretty(&map)?
            } else {
                inspect::counters_table(&counters)
            }
        }
    };
    println!("{}", out.trim_end());
    Ok(())
}

/// `--external-ips`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExternalIps {
    Allow,
    Deny,
}

/// eBPF/XDP load balancer for Kubernetes NodePort and LoadBalancer services.
///
/// Runs the agent. `nodeport-agent inspect --help`: read what the pinned maps hold.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Interface to attach to (repeatable): the node's uplinks that receive nodePort traffic.
    #[arg(long = "interface", required = true, value_name = "IF")]
    interfaces: Vec<String>,
    /// Name of this node's Node object (matches EndpointSlice `nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Folder of Kubernetes YAML/JSON (Services, EndpointSlices, Nodes), re-read on change
    /// (dev VMs, tests). Without it, the Kubernetes API is watched.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API (default: the in-cluster service account).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Directory on a BPF filesystem where the maps are pinned.
    #[arg(long, value_name = "DIR")]
    pin_path: PathBuf,
    /// XDP attachment: native (driver) if possible, else generic.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    xdp_mode: XdpAttachMode,
    /// Valid nodePort range, as the API server's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    nodeport_range: (u16, u16),
    /// Only node addresses in these CIDRs (IPv4 or IPv6) take nodePort traffic
    /// (kube-proxy's flag).
    #[arg(long, value_delimiter = ',', num_args = 1.., value_name = "CIDR")]
    nodeport_addresses: Vec<IpCidr>,
    /// Interfaces whose addresses never take nodePorts (nor serve as SNAT sources):
    /// comma-separated glob patterns (`*`, `?`); empty string: none. The default leaves out
    /// the devices that hold Service or DNS-cache addresses (IPVS's kube-ipvs0,
    /// kube-router's kube-dummy-if, NodeLocal DNSCache's nodelocaldns) and Cilium's host
    /// devices.
    #[arg(long, value_name = "PATTERNS", default_value = node_addrs::DEFAULT_EXCLUDE_INTERFACES)]
    exclude_interfaces: InterfacePatterns,
    /// Pod network tunnel devices to serve besides the `--interface`s: those of these
    /// comma-separated glob patterns whose driver is vxlan or geneve (flannel's
    /// flannel.1, Calico's vxlan.calico). Each is attached (TC only) when it appears and
    /// detached when it goes, and a remote backend reached through it is SNATed to its
    /// address, so that replies come back through the tunnel. Empty string: none.
    #[arg(long, value_name = "PATTERNS", default_value = "*")]
    tunnel_interfaces: InterfacePatterns,
    /// Room for this many node addresses per family (the size of NP_NODEADDR and of
    /// NP_NODEADDR6). When more qualify, the Node object's and the uplinks' are kept and
    /// the others are logged by address.
    #[arg(long, value_name = "N", default_value_t = m::DEFAULT_MAX_NODE_ADDRS, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_node_addresses: u32,
    /// How the TC programs attach: `auto` (TCX links where the kernel has them, Linux 6.6
    /// and later; cls_bpf filters on a clsact qdisc elsewhere), `tcx` or `legacy`.
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    tc_attach: TcAttach,
    /// Whether `spec.externalIPs` become frontends. `allow` is kube-proxy's behaviour;
    /// anyone who may create a Service can then claim any address (CVE-2020-8554) unless
    /// the API server runs the DenyServiceExternalIPs admission plugin. `deny` ignores them.
    #[arg(long, value_enum, default_value_t = ExternalIps::Allow)]
    external_ips: ExternalIps,
    /// A Service with more ports than this is refused (the refusal names this flag).
    #[arg(long, value_name = "N", default_value_t = Settings::default().max_ports_per_service)]
    max_ports_per_service: usize,
    /// A Service whose EndpointSlices list more endpoints than this (both families) is
    /// refused (the refusal names this flag).
    #[arg(long, value_name = "N", default_value_t = Settings::default().max_endpoints_per_service)]
    max_endpoints_per_service: usize,
    /// Serve only the Services labelled `service.kubernetes.io/service-proxy-name` with
    /// this name. Unset, as kube-proxy: serve the Services without that label only.
    #[arg(long, value_name = "NAME")]
    service_proxy_name: Option<String>,
    /// Source ports used when forwarding to a backend on another node (SNAT). Must lie
    /// outside the nodePort range; where it overlaps the kernel's ephemeral ports
    /// (net.ipv4.ip_local_port_range) the agent reserves it in
    /// net.ipv4.ip_local_reserved_ports, or refuses to start.
    #[arg(long, default_value = DEFAULT_SNAT_RANGE, value_parser = parse_range)]
    snat_port_range: (u16, u16),
    /// Capacity of the IPv4 conntrack map (NP_CT, LRU: under pressure the least recently
    /// used flows are evicted).
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().conntrack, value_parser = clap::value_parser!(u32).range(1024..=1 << 26))]
    conntrack_max: u32,
    /// Capacity of the IPv4 reverse-NAT map (NP_RNAT, one entry per tracked flow; when
    /// full, new flows are dropped and counted as drop_map_full). Default: --conntrack-max.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=1 << 26))]
    revnat_max: Option<u32>,
    /// --conntrack-max for IPv6 (NP_CT6).
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().conntrack6, value_parser = clap::value_parser!(u32).range(1024..=1 << 26))]
    conntrack_max6: u32,
    /// --revnat-max for IPv6 (NP_RNAT6). Default: --conntrack-max6.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=1 << 26))]
    revnat_max6: Option<u32>,
    /// Time between two sweeps that free the reverse-NAT entries (and SNAT ports) of gone
    /// flows, seconds; sweeps also run every second for 10 s after a drop for a full map or
    /// exhausted SNAT ports, and then end unassured flows idle for 2 s.
    #[arg(long, value_name = "SECONDS", default_value_t = gc::DEFAULT_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    conntrack_gc_interval: u64,
    /// Idle timeout of established TCP flows in conntrack, seconds (kube-proxy's
    /// --conntrack-tcp-timeout-established).
    #[arg(long, value_name = "SECONDS", default_value_t = Config::default().tcp_timeout_s, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_tcp_timeout: u32,
    /// Timeout of TCP flows that saw no ACK from the client yet (SYN floods hold SNAT
    /// ports this long), seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = Config::default().tcp_syn_timeout_s, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_tcp_syn_timeout: u32,
    /// Timeout of TCP flows after a FIN or RST, seconds (kube-proxy's
    /// --conntrack-tcp-timeout-close-wait).
    #[arg(long, value_name = "SECONDS", default_value_t = Config::default().tcp_closing_timeout_s, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_tcp_closing_timeout: u32,
    /// Idle timeout of UDP streams (the client sent again after a reply), seconds
    /// (kube-proxy's --conntrack-udp-timeout-stream).
    #[arg(long, value_name = "SECONDS", default_value_t = Config::default().udp_timeout_s, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_udp_timeout: u32,
    /// Timeout of UDP flows that are no stream: unanswered, or one request and its reply
    /// (they hold their SNAT port this long), seconds (kube-proxy's --conntrack-udp-timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = Config::default().udp_unreplied_timeout_s, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_udp_unreplied_timeout: u32,
    /// On exit, leave the programs attached and the maps pinned (for upgrades: the next
    /// agent takes both over without dropping a connection).
    #[arg(long)]
    keep_datapath: bool,
    /// Log every translated packet from the datapath (aya-log). Loads the debug variants
    /// of the programs, which need CAP_PERFMON besides CAP_BPF and CAP_NET_ADMIN.
    #[arg(long)]
    debug_datapath: bool,
    /// Address of /healthz, /livez and /readyz (kube-proxy's healthz port). An unspecified
    /// address (`0.0.0.0` or `[::]`) takes IPv4 and IPv6 clients, as kube-proxy's Go
    /// listeners do.
    #[arg(long, default_value = "0.0.0.0:10256")]
    health_addr: std::net::SocketAddr,
    /// /healthz and /livez answer 503 once a change from the API has waited this long to be
    /// applied, sync errors have persisted this long, or the sync loop has not turned for
    /// this long (kube-proxy's health timeout, twice its --iptables-sync-period).
    #[arg(long, value_name = "SECONDS", default_value_t = health::DEFAULT_STALE_AFTER.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    healthz_stale_after: u64,
    /// Address of /metrics, Prometheus text format (kube-proxy's metrics port); both
    /// families as `--health-addr`.
    #[arg(long, default_value = "0.0.0.0:10249")]
    metrics_addr: std::net::SocketAddr,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--snat-port-range`'s default: nodeport_common's DEFAULT_SNAT_PORT_MIN-MAX.
const DEFAULT_SNAT_RANGE: &str = "10000-29999";

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range like 30000-32767"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!(
            "{s:?}: the range must be non-empty and start above 0"
        ));
    }
    Ok((a, b))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Checks the configured interfaces (see [`Links::poll`]), logs each transition and
/// reports readiness: not ready while one has no programs.
fn poll_links(
    links: &mut Links,
    dp: &mut Datapath,
    mode: XdpAttachMode,
    health: &Health,
    metrics: &Metrics,
) {
    let events = links.poll(&mut DatapathLinks { dp, mode });
    for e in &events {
        match e {
            LinkEvent::Vanished {
                iface,
                ifindex,
                tunnel: true,
            } => info!(interface = %iface, ifindex, "tunnel device gone: detached"),
            LinkEvent::Vanished { iface, ifindex, .. } => warn!(
                interface = %iface,
                ifindex,
                "interface gone: detached; not ready until it is back"
            ),
            LinkEvent::Recreated { iface, old, new } => warn!(
                interface = %iface,
                old_ifindex = old,
                ifindex = new,
                "interface recreated (new index): re-attaching"
            ),
            LinkEvent::Attached { iface, how, tunnel } => info!(
                interface = %iface,
                ifindex = how.ifindex,
                path = ?how.path,
                tc = %how.tc,
                "{}",
                if *tunnel {
                    "tunnel device attached"
                } else {
                    "re-attached"
                }
            ),
            LinkEvent::AttachFailed { iface, error } => error!(
                interface = %iface,
                "attaching failed, retrying every second: {error}"
            ),
        }
    }
    if events.is_empty() {
        return;
    }
    if links.all_attached() {
        health.set_attached();
    } else {
        health.set_unattached();
    }
    metrics.set_ready(health.ready());
}

/// The SNAT sources of a configuration: for interfaces' addresses and tunnels.
fn sources(c: &Config) -> (u32, Ip6, u32, u32, u32, Ip6) {
    (
        c.snat_addr,
        c.snat_addr6,
        c.tun_ifindex,
        c.tun_addr,
        c.tun_ifindex6,
        c.tun_addr6,
    )
}

/// Forward the datapath's aya-log records to the log facade.
fn spawn_ebpf_log(logger: EbpfLog) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer fd for its whole life and always returns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {}", e.into_parts().1))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `inspect` is dispatched first so that the agent's required flags stay required.
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "inspect") {
        let prog = argv.next().unwrap_or_default();
        return inspect(InspectArgs::parse_from(
            std::iter::once(prog).chain(argv.skip(1)),
        ));
    }
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args).await {
        error!("{e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (lo, hi) = args.snat_port_range;
    if lo <= args.nodeport_range.1 && hi >= args.nodeport_range.0 {
        bail!("--snat-port-range {lo}-{hi} overlaps the nodePort range");
    }
    match ports::reserve_snat_ports((lo, hi))
        .context("keeping the node's sockets off the SNAT ports")?
    {
        ports::Reservation::NotNeeded { ephemeral } => info!(
            snat = %format!("{lo}-{hi}"),
            ephemeral = %format!("{}-{}", ephemeral.0, ephemeral.1),
            "SNAT ports are outside the node's ephemeral ports or reserved already"
        ),
        ports::Reservation::Added { ephemeral, added } => warn!(
            snat = %format!("{lo}-{hi}"),
            ephemeral = %format!("{}-{}", ephemeral.0, ephemeral.1),
            reserved = %ports::render(&added),
            "the SNAT ports overlap the node's ephemeral ports: added them to \
             net.ipv4.ip_local_reserved_ports (kept after exit)"
        ),
    }
    let sizes = MapSizes {
        node_addrs: args.max_node_addresses,
        conntrack: args.conntrack_max,
        revnat: args.revnat_max.unwrap_or(args.conntrack_max),
        conntrack6: args.conntrack_max6,
        revnat6: args.revnat_max6.unwrap_or(args.conntrack_max6),
        ..MapSizes::default()
    };
    for iface in args
        .interfaces
        .iter()
        .filter(|i| args.exclude_interfaces.matches(i))
    {
        warn!(
            interface = %iface,
            patterns = %args.exclude_interfaces,
            "an attached interface matches --exclude-interfaces: its addresses take no nodePorts and are no SNAT source"
        );
    }
    let health = Arc::new(Health::new(Duration::from_secs(args.healthz_stale_after)));
    let metrics = Arc::new(Metrics::new());
    let kube_stats = KubeStats::default();
    health.tick();
    serve::start(
        args.health_addr,
        args.metrics_addr,
        Arc::new(Shared {
            health: health.clone(),
            metrics: metrics.clone(),
            kube: kube_stats.clone(),
            pin_path: args.pin_path.clone(),
        }),
    )
    .await?;
    // The debug variants need CAP_PERFMON (aya-log); the plain ones do not.
    let variant = if args.debug_datapath {
        Variant::Debug
    } else {
        Variant::Plain
    };
    let mut dp = Datapath::load_variant(sizes, Some(&args.pin_path), variant)
        .context("loading the datapath")?;
    dp.keep_on_exit(args.keep_datapath);
    dp.set_tc_attach(args.tc_attach);
    let pins = dp.pin_report().clone();
    if !pins.reused.is_empty() {
        info!(maps = ?pins.reused, "reusing pinned maps of an earlier run");
    }
    for (name, why) in &pins.replaced {
        warn!(map = %name, "replacing pinned map: {why}; its entries are lost");
    }
    // The SNAT sources follow the interfaces' addresses (checked every second below): an
    // interface may get its address after the agent starts.
    let (snat_addr, snat_addr6) = snat_sources(&args.interfaces, &args.exclude_interfaces);
    let mut config = Config {
        snat_addr,
        snat_addr6,
        flags: if args.debug_datapath { CFG_F_DEBUG } else { 0 },
        snat_port_min: lo,
        snat_port_max: hi,
        tcp_timeout_s: args.conntrack_tcp_timeout,
        tcp_syn_timeout_s: args.conntrack_tcp_syn_timeout,
        tcp_closing_timeout_s: args.conntrack_tcp_closing_timeout,
        udp_timeout_s: args.conntrack_udp_timeout,
        udp_unreplied_timeout_s: args.conntrack_udp_unreplied_timeout,
        ..Config::default()
    };
    dp.set_config(&config)?;
    gc::spawn(
        args.pin_path.clone(),
        Timeouts::of(&config),
        Duration::from_secs(args.conntrack_gc_interval),
        metrics.clone(),
    );
    if let Some(logger) = dp.take_logger() {
        spawn_ebpf_log(logger)?;
    }
    let mut links = Links::new(&args.interfaces);
    for iface in &args.interfaces {
        let how = dp
            .attach(iface, args.xdp_mode)
            .with_context(|| format!("attaching to {iface}"))?;
        if how.stale_pins {
            warn!(
                interface = %iface,
                "removed pinned links of an earlier run that no longer held the interface \
                 (it was deleted or recreated while no agent ran)"
            );
        }
        info!(
            interface = %iface,
            ifindex = how.ifindex,
            path = ?how.path,
            why = how.why,
            tc = %how.tc,
            replaced = how.replaced,
            "attached"
        );
        links.set_attached(iface, how.ifindex);
    }
    // Tunnel devices are attached at the first link check below; their links pinned by an
    // earlier run are kept for it to take over.
    let mut tunnel_drivers = HashMap::new();
    let mut keep = args.interfaces.clone();
    keep.extend(find_tunnels(&args.tunnel_interfaces, &mut tunnel_drivers));
    for stale in dp.prune_links(&keep)? {
        info!(link = %stale, "removed pinned link of an interface no longer configured");
    }
    health.set_attached();

    let settings = Settings {
        nodeport_range: args.nodeport_range.0..=args.nodeport_range.1,
        nodeport_cidrs: args.nodeport_addresses.clone(),
        external_ips: args.external_ips == ExternalIps::Allow,
        service_proxy_name: args.service_proxy_name.clone(),
        max_ports_per_service: args.max_ports_per_service,
        max_endpoints_per_service: args.max_endpoints_per_service,
        exclude_interfaces: args.exclude_interfaces.clone(),
        max_node_addrs: args.max_node_addresses as usize,
        uplinks: args.interfaces.clone(),
    };
    // Both sources publish complete snapshots, and only once they have seen everything
    // (the folder read, or the first full list of all three kinds).
    // The sources publish on `tx`; `health::observe` numbers the snapshots, records them as
    // queued (so that a sync loop that stops applying shows in /healthz) and follows this
    // node's Node object, then passes them on to the loop on `rx`.
    let (tx, source_rx) = tokio::sync::watch::channel(manifests::Loaded::default());
    let (queued_tx, mut rx) = tokio::sync::watch::channel(health::Queued::default());
    tokio::spawn(health::observe(
        source_rx,
        queued_tx,
        health.clone(),
        args.node_name.clone(),
    ));
    match &args.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), "reading objects from the manifests folder");
            tokio::spawn(manifests::watch(
                dir.clone(),
                Duration::from_millis(500),
                tx,
            ));
        }
        None => {
            let client = kube_source::client(args.kubeconfig.as_deref()).await?;
            info!("watching Services, EndpointSlices and Nodes through the Kubernetes API");
            let options = WatchOptions {
                node_name: Some(args.node_name.clone()),
                service_proxy_name: args.service_proxy_name.clone(),
                ..WatchOptions::default()
            };
            tokio::spawn(kube_source::watch(client, options, kube_stats.clone(), tx));
        }
    }

    // Adopt what an earlier run programmed (backend ids above all: conntrack entries refer
    // to them). Nothing is deleted until the first complete desired state is applied.
    let snapshot = dp.snapshot()?;
    let mut reconciler = Reconciler::restore(sizes.maglev_slots, sizes.backends, &snapshot);
    // The names of the svc_ids for `inspect`, beside the maps (an earlier run's are taken
    // over and corrected at the first sync). Without them inspect shows ids alone.
    let mut name_store = match NameStore::open(&args.pin_path) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("service names for inspect: {e}; inspect shows service ids only");
            None
        }
    };
    let mut names_gen: Option<u64> = None;
    if !snapshot.is_empty() {
        info!(
            frontends = snapshot.services.len() + snapshot.services6.len(),
            backends = snapshot.backends.len() + snapshot.backends6.len(),
            "restored state from the pinned maps"
        );
    }
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut addr_tick = tokio::time::interval(Duration::from_secs(2));
    // Interfaces deleted and recreated, drivers reloaded, addresses added: checked every
    // second (an index lookup per interface and one address dump).
    let mut link_tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_refusals: Vec<Refusal> = Vec::new();
    let mut last_addrs: Vec<InterfaceAddr> = interface_addrs();
    let mut last_left_out: Vec<IpAddr> = Vec::new();
    let mut have_objects = false;
    // The errors of the last sync: a sync with errors is retried at the next address poll
    // (the reconciler retries what failed), and errors are logged when they change.
    let mut last_errors: Vec<String> = Vec::new();
    // Objects from the API server carry resourceVersions; manifest files may keep one
    // across edits, so they are compared by content.
    let mut desired_model = if args.manifests.is_some() {
        model::Model::by_content()
    } else {
        model::Model::new()
    };
    let health_checks = serve::HealthChecks::new(health.clone(), metrics.clone());
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            changed = rx.changed() => {
                if changed.is_err() { bail!("the object source stopped"); }
                have_objects = true;
            }
            _ = link_tick.tick() => {
                links.add_tunnels(&find_tunnels(&args.tunnel_interfaces, &mut tunnel_drivers));
                poll_links(&mut links, &mut dp, args.xdp_mode, &health, &metrics);
                let snat = snat_sources(&args.interfaces, &args.exclude_interfaces);
                let ((tun, tun_addr), (tun6, tun_addr6)) =
                    links.tunnel_sources(&named_interface_addrs());
                let mut next = config;
                (next.snat_addr, next.snat_addr6) = snat;
                (next.tun_ifindex, next.tun_addr) = (tun, tun_addr);
                (next.tun_ifindex6, next.tun_addr6) = (tun6, tun_addr6);
                if sources(&next) != sources(&config) {
                    // On failure `config` keeps the old sources, so this is retried.
                    match dp.set_config(&next) {
                        Ok(()) => {
                            config = next;
                            info!(
                                snat_addr = %snat.0.to_ip(),
                                snat_addr6 = %snat.1.to_ip(),
                                tunnel_ifindex = tun,
                                tunnel_addr = %tun_addr.to_ip(),
                                tunnel_ifindex6 = tun6,
                                tunnel_addr6 = %tun_addr6.to_ip(),
                                "SNAT sources changed with the interfaces and their addresses"
                            );
                        }
                        Err(e) => error!("updating the SNAT sources: {e}"),
                    }
                }
                continue;
            }
            _ = addr_tick.tick() => {
                health.tick();
                let addrs = interface_addrs();
                if addrs == last_addrs && last_errors.is_empty() { continue; }
                last_addrs = addrs;
            }
        }
        health.tick();
        if !have_objects {
            continue;
        }
        let queued = rx.borrow_and_update().clone();
        let (objects, load_refusals) = &*queued.loaded;
        let started = Instant::now();
        let (_, mut refusals) = desired_model.update(&Inputs {
            services: &objects.services,
            slices: &objects.slices,
            nodes: &objects.nodes,
            node_name: &args.node_name,
            interface_addrs: &last_addrs,
            settings: &settings,
        });
        refusals.extend(load_refusals.iter().cloned());
        refusals.sort();
        if refusals != last_refusals {
            for r in refusals.iter().filter(|r| !last_refusals.contains(r)) {
                warn!("{r}");
            }
            last_refusals = refusals;
        }
        let changes = desired_model.take_changes();
        let desired = desired_model.current();
        if desired.node_addrs_left_out != last_left_out {
            if !desired.node_addrs_left_out.is_empty() {
                let list: Vec<String> = desired
                    .node_addrs_left_out
                    .iter()
                    .map(IpAddr::to_string)
                    .collect();
                error!(
                    left_out = %list.join(","),
                    max = args.max_node_addresses,
                    "node addresses do not fit: these take no nodePort traffic; raise --max-node-addresses or narrow with --nodeport-addresses / --exclude-interfaces"
                );
            }
            last_left_out = desired.node_addrs_left_out.clone();
        }
        let report = reconciler.apply_changes(desired, &changes, &mut dp);
        metrics.update_services(desired, &changes.services);
        if let Some(store) = name_store.as_mut() {
            // Only when a svc_id was taken or given up (or an earlier write failed).
            if names_gen != Some(reconciler.names_generation()) {
                match store.sync(&reconciler.service_names()) {
                    Ok(_) => names_gen = Some(reconciler.names_generation()),
                    Err(errors) => {
                        names_gen = None;
                        for e in errors {
                            warn!("writing a service name for inspect: {e}");
                        }
                    }
                }
            }
        }
        let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        for e in errors.iter().filter(|e| !last_errors.contains(e)) {
            error!("sync: {e}");
        }
        if errors.is_empty() && !last_errors.is_empty() {
            info!("sync: the earlier errors are resolved");
        }
        last_errors = errors;
        health.applied(queued.gen, started, report.errors.len(), Instant::now());
        metrics.set_refused(last_refusals.len());
        metrics.record_sync(
            started.elapsed(),
            report.errors.len(),
            desired.service_count(),
            reconciler.backend_count(),
        );
        health.set_synced();
        metrics.set_ready(health.ready());
        // Health check servers listen where nodePorts are served: not on the addresses of
        // excluded interfaces.
        let served: Vec<IpAddr> = last_addrs
            .iter()
            .filter(|a| !args.exclude_interfaces.matches(&a.interface))
            .map(|a| a.addr)
            .collect();
        health_checks.update(
            &desired.health_checks,
            &hcnp::listen_addrs(&args.nodeport_addresses, &served),
        );
        info!(
            services = desired.service_count(),
            node_addrs = desired.node_addrs.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "synced: {report}"
        );
    }
    drop(dp);
    if args.keep_datapath {
        info!("exiting with the datapath left in place (--keep-datapath)");
    } else {
        info!("detached and unpinned");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 7] = [
        "nodeport-agent",
        "--interface",
        "eth0",
        "--node-name",
        "n1",
        "--pin-path",
        "/sys/fs/bpf/np",
    ];

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(BASE.iter().chain(extra))
    }

    #[test]
    fn default_snat_range_is_the_datapath_default() {
        assert_eq!(
            parse_range(DEFAULT_SNAT_RANGE),
            Ok((m::DEFAULT_SNAT_PORT_MIN, m::DEFAULT_SNAT_PORT_MAX))
        );
        let a = parse(&["--conntrack-max", "4096"]).unwrap();
        assert_eq!((a.conntrack_max, a.revnat_max), (4096, None));
        assert!(parse(&["--conntrack-max", "10"]).is_err());
    }

    #[test]
    fn conntrack_timeouts_default_to_the_datapath_defaults() {
        let a = parse(&[]).unwrap();
        let d = Config::default();
        assert_eq!(
            (
                a.conntrack_tcp_timeout,
                a.conntrack_tcp_syn_timeout,
                a.conntrack_tcp_closing_timeout,
                a.conntrack_udp_timeout
            ),
            (
                d.tcp_timeout_s,
                d.tcp_syn_timeout_s,
                d.tcp_closing_timeout_s,
                d.udp_timeout_s
            )
        );
        let a = parse(&[
            "--conntrack-tcp-syn-timeout",
            "5",
            "--conntrack-udp-timeout=30",
        ])
        .unwrap();
        assert_eq!(
            (a.conntrack_tcp_syn_timeout, a.conntrack_udp_timeout),
            (5, 30)
        );
    }

    #[test]
    fn node_address_flags() {
        let a = parse(&[]).unwrap();
        assert!(a.exclude_interfaces.matches("kube-ipvs0"));
        assert!(a.exclude_interfaces.matches("cilium_host"));
        assert!(!a.exclude_interfaces.matches("eth0"));
        assert_eq!(a.max_node_addresses, m::DEFAULT_MAX_NODE_ADDRS);
        let a = parse(&["--exclude-interfaces", "", "--max-node-addresses", "4096"]).unwrap();
        assert!(a.exclude_interfaces.is_empty());
        assert_eq!(a.max_node_addresses, 4096);
        let e = parse(&["--exclude-interfaces", "bad name"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bad name\""), "{e}");
        assert!(parse(&["--max-node-addresses", "0"]).is_err());
    }

    #[test]
    fn per_service_limits_default_to_the_settings_and_take_flags() {
        let a = parse(&[]).unwrap();
        let d = Settings::default();
        assert_eq!(
            (a.max_ports_per_service, a.max_endpoints_per_service),
            (d.max_ports_per_service, d.max_endpoints_per_service)
        );
        let a = parse(&[
            "--max-ports-per-service",
            "3",
            "--max-endpoints-per-service",
            "50000",
        ])
        .unwrap();
        assert_eq!(
            (a.max_ports_per_service, a.max_endpoints_per_service),
            (3, 50_000)
        );
    }

    #[test]
    fn nodeport_addresses_take_both_families_and_name_a_bad_one() {
        let a = parse(&["--nodeport-addresses", "10.0.0.0/8,2001:db8::/32"]).unwrap();
        let shown: Vec<String> = a.nodeport_addresses.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "2001:db8::/32"]);
        let e = parse(&["--nodeport-addresses", "2001:db8::/129"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2001:db8::/129") && e.contains("128"), "{e}");
    }

    #[test]
    fn healthz_stale_after_defaults_to_kube_proxys_timeout_and_refuses_zero() {
        assert_eq!(parse(&[]).unwrap().healthz_stale_after, 60);
        assert_eq!(
            parse(&["--healthz-stale-after", "15"])
                .unwrap()
                .healthz_stale_after,
            15
        );
        let e = parse(&["--healthz-stale-after", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--healthz-stale-after"), "{e}");
    }

    #[test]
    fn a_zero_timeout_is_refused_by_name() {
        let e = parse(&["--conntrack-udp-timeout", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--conntrack-udp-timeout"), "{e}");
    }
}
