//! Datapath counters: one per-CPU slot per verdict, drop reason and event, indexed by
//! [`Stat`]. Each packet bumps exactly one verdict counter; events are counted besides.

macro_rules! stats {
    ($($(#[$m:meta])* $name:ident = $label:literal,)*) => {
        /// Index into NP_STATS.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat { $($(#[$m])* $name,)* }
        impl Stat {
            /// Every counter, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$name,)*];
            /// Stable snake_case name (used by metrics and `inspect`).
            pub const fn name(self) -> &'static str {
                match self { $(Stat::$name => $label,)* }
            }
        }
    };
}

stats! {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged): passed untouched.
    PassNotIp = "pass_not_ip",
    /// IPv4 fragment of a protocol other than UDP: passed untouched to the stack.
    PassFragment = "pass_fragment",
    /// Truncated or inconsistent headers: passed untouched, the stack validates.
    PassMalformed = "pass_malformed",
    /// IPv4 header with options: XDP passes it untouched, TC ingress translates it.
    PassIpOptions = "pass_ip_options",
    /// IPv6 with an extension header (hop-by-hop, routing, fragment, destination options,
    /// ...) before the transport header: passed untouched to the stack.
    PassIpv6Ext = "pass_ipv6_ext",
    /// Neither TCP nor UDP (nor an ICMP error about a translated flow).
    PassOtherProto = "pass_other_proto",
    /// TCP/UDP that matches no frontend and no translated reply.
    PassNoMatch = "pass_no_match",
    /// Translated towards a backend on this node and handed to the stack for delivery.
    LocalDeliver = "local_deliver",
    /// Translated and sent back out of the receiving interface.
    Tx = "tx",
    /// Translated and redirected to another interface.
    Redirect = "redirect",
    /// FIB lookup needs the stack (no neighbour yet, ...): passed untranslated, TC finishes.
    FibPass = "fib_pass",
    /// Translated in TC (ingress fallback or egress reply) and continued.
    TcNat = "tc_nat",
    /// Dropped: the service has no usable backend.
    DropNoBackend = "drop_no_backend",
    /// Dropped: no free SNAT port after the probe limit.
    DropSnatExhausted = "drop_snat_exhausted",
    /// Dropped: the FIB says the destination is unreachable, blackholed or prohibited.
    DropFib = "drop_fib",
    /// Dropped: a conntrack or reverse-NAT map update failed.
    DropMapFull = "drop_map_full",
    /// Dropped: the client is outside the service's loadBalancerSourceRanges.
    DropSourceRange = "drop_source_range",
    /// Refused: the service has no endpoint at all (kube-proxy's REJECT); a TCP RST or an
    /// ICMP (ICMPv6) port unreachable went back to the client from the frontend address.
    RejectNoEndpoints = "reject_no_endpoints",
    /// Dropped: a refusal (or a path MTU error) was due but this CPU's budget was spent.
    DropRejectRate = "drop_reject_rate",
    /// Answered: a client's packet (IPv4 with don't-fragment, or IPv6) was too big for the
    /// route to its remote backend; an ICMP fragmentation needed (ICMPv6 packet too big)
    /// with the route's MTU went back to the client from the frontend address.
    IcmpFragNeeded = "icmp_frag_needed",
    /// Event: a new flow was bound to a backend.
    NewFlow = "event_new_flow",
    /// Event: a packet of an established flow was translated.
    Established = "event_established",
    /// Event: a reply was reverse-translated.
    Reply = "event_reply",
    /// Event: a flow's backend disappeared and a new one was chosen.
    Reselect = "event_reselect",
    /// Event: a new flow went to the backend its client is stuck to (sessionAffinity).
    AffinityHit = "event_affinity_hit",
    /// Event: an ICMP error about a translated flow was translated (outer and inner).
    IcmpNat = "event_icmp_nat",
    /// Event: a TCP SYN arrived on the tuple of a closing flow and opened a fresh one
    /// (a new backend choice).
    TcpReopen = "event_tcp_reopen",
    /// Event: a TCP FIN or RST was forwarded but left its flow's state alone: its sequence
    /// number was far from the sender's recent ones (spoofed, or not seen from the start).
    TcpOutOfWindow = "event_tcp_out_of_window",
    /// A later IPv4 fragment of UDP whose first fragment this node has not seen (it came
    /// out of order, or the first took another path): passed untouched to the stack.
    PassFragOutOfOrder = "pass_frag_out_of_order",
    /// Event: a later IPv4 fragment of UDP took its datagram's ports from the first
    /// fragment (NP_FRAG) and went through the flow's decision (once per fragment: TC
    /// ingress does not count those XDP saw).
    FragLater = "event_frag_later",
}

/// Number of counters (the NP_STATS array size).
pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;
