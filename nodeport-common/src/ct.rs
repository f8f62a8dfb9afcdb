//! Conntrack rules both sides apply identically: how long an entry lives, and which
//! NP_CT entry an NP_RNAT entry belongs to. The datapath decides with them per packet; the
//! agent's sweep (nodeport-agent `gc`) frees reverse entries whose flow is gone with them.

use crate::{Addr, Config, CtEntry, FlowKey, RevNat, CT_F_CLOSING, CT_F_STREAM, CT_F_SYN_ONLY};

const NS: u64 = 1_000_000_000;

/// The conntrack timeouts of a [`Config`], seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_syn: u32,
    pub tcp_closing: u32,
    pub udp: u32,
    pub udp_unreplied: u32,
}

impl Timeouts {
    /// Field by field, from a plain copy (host side; the datapath reads NP_CONFIG's
    /// fields with volatile loads and builds this itself).
    pub const fn of(cfg: &Config) -> Self {
        Self {
            tcp: cfg.tcp_timeout_s,
            tcp_syn: cfg.tcp_syn_timeout_s,
            tcp_closing: cfg.tcp_closing_timeout_s,
            udp: cfg.udp_timeout_s,
            udp_unreplied: cfg.udp_unreplied_timeout_s,
        }
    }

    /// The idle timeout of a flow of `proto` with `CT_F_*` `flags`, seconds: a TCP flow
    /// after a FIN or RST, before the client's ACK, established; a UDP flow before and
    /// after it became a stream (netfilter's UDP_CT_UNREPLIED, which also covers a single
    /// request and its reply, and UDP_CT_REPLIED).
    #[inline(always)]
    pub fn for_flow(&self, proto: u8, flags: u16) -> u32 {
        if proto != crate::PROTO_TCP {
            if flags & CT_F_STREAM != 0 {
                self.udp
            } else {
                self.udp_unreplied
            }
        } else if flags & CT_F_CLOSING != 0 {
            self.tcp_closing
        } else if flags & CT_F_SYN_ONLY != 0 {
            self.tcp_syn
        } else {
            self.tcp
        }
    }

    /// Whether `ct`, last seen at `ct.last_seen_ns`, has expired at `now_ns`
    /// (CLOCK_MONOTONIC_COARSE).
    #[inline(always)]
    pub fn expired<A: Addr>(&self, proto: u8, ct: &CtEntry<A>, now_ns: u64) -> bool {
        now_ns.saturating_sub(ct.last_seen_ns) > self.for_flow(proto, ct.flags) as u64 * NS
    }
}

/// Whether a flow is not established yet: a TCP flow whose client has not acknowledged
/// the handshake, a UDP flow that is no stream (netfilter's "not assured"). Spoofed
/// floods consist of such flows; under pressure they are the first to go.
#[inline(always)]
pub fn unassured<A: Addr>(proto: u8, ct: &CtEntry<A>) -> bool {
    if proto == crate::PROTO_TCP {
        ct.flags & CT_F_SYN_ONLY != 0
    } else {
        ct.flags & CT_F_STREAM == 0
    }
}

/// The NP_CT key of the flow that an NP_RNAT entry (`rkey` -> `rev`) was made for: the
/// client's tuple to the frontend.
#[inline(always)]
pub fn revnat_owner<A: Addr>(rkey: &FlowKey<A>, rev: &RevNat<A>) -> FlowKey<A> {
    FlowKey::new(
        rev.client_addr,
        rev.fe_addr,
        rev.client_port,
        rev.fe_port,
        rkey.proto,
    )
}

/// Whether the reply tuple `rkey` (backend -> this node's source for the flow) is the one
/// `ct` translates to: the flow was not reopened towards another backend or source port.
#[inline(always)]
pub fn bound_to<A: Addr>(ct: &CtEntry<A>, rkey: &FlowKey<A>) -> bool {
    ct.backend_addr == rkey.saddr
        && ct.backend_port == rkey.sport
        && ct.nat_addr == rkey.daddr
        && ct.nat_port == rkey.dport
}

/// Whether an NP_RNAT entry still serves a live flow: its owner (`ct`, looked up at
/// [`revnat_owner`]) exists, has not expired and is bound to `rkey`. A dead entry is
/// garbage: its replies are not translated, and the agent's sweep deletes it, which frees
/// its SNAT port.
#[inline(always)]
pub fn revnat_live<A: Addr>(
    t: &Timeouts,
    rkey: &FlowKey<A>,
    ct: Option<&CtEntry<A>>,
    now_ns: u64,
) -> bool {
    match ct {
        Some(ct) => !t.expired(rkey.proto, ct, now_ns) && bound_to(ct, rkey),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CT_F_REPLIED, PROTO_TCP, PROTO_UDP};

    fn entry(last_seen_s: u64, flags: u16) -> CtEntry {
        CtEntry {
            last_seen_ns: last_seen_s * NS,
            backend_addr: 7,
            backend_port: 80,
            nat_addr: 9,
            nat_port: 20_000,
            flags,
            ..CtEntry::default()
        }
    }

    #[test]
    fn timeouts_follow_protocol_and_state() {
        let t = Timeouts::of(&Config::default());
        assert_eq!(t.for_flow(PROTO_UDP, 0), 30, "an unanswered UDP flow");
        assert_eq!(t.for_flow(PROTO_UDP, CT_F_REPLIED), 30, "one exchange");
        assert_eq!(t.for_flow(PROTO_UDP, CT_F_REPLIED | CT_F_STREAM), 60);
        assert_eq!(t.for_flow(PROTO_TCP, CT_F_SYN_ONLY), 60);
        assert_eq!(t.for_flow(PROTO_TCP, CT_F_SYN_ONLY | CT_F_CLOSING), 10);
        assert_eq!(t.for_flow(PROTO_TCP, CT_F_REPLIED), 21_600);
        let e = entry(100, 0);
        assert!(!t.expired(PROTO_UDP, &e, 130 * NS));
        assert!(t.expired(PROTO_UDP, &e, 130 * NS + 1));
        assert!(!t.expired(PROTO_UDP, &entry(100, CT_F_STREAM), 130 * NS + 1));
        assert!(
            !t.expired(PROTO_UDP, &e, 0),
            "a clock behind the entry is not expiry"
        );
    }

    #[test]
    fn a_reverse_entry_lives_only_with_its_bound_owner() {
        let t = Timeouts::of(&Config::default());
        let rkey = FlowKey::new(7, 9, 80, 20_000, PROTO_TCP);
        let rev = RevNat {
            fe_addr: 3,
            client_addr: 4,
            fe_port: 30_080,
            client_port: 5_555,
        };
        assert_eq!(
            revnat_owner(&rkey, &rev),
            FlowKey::new(4, 3, 5_555, 30_080, PROTO_TCP)
        );
        let live = entry(100, 0);
        assert!(revnat_live(&t, &rkey, Some(&live), 101 * NS));
        assert!(!revnat_live(&t, &rkey, None, 101 * NS), "owner evicted");
        assert!(
            !revnat_live(&t, &rkey, Some(&live), 200_000 * NS),
            "owner expired"
        );
        let rebound = CtEntry {
            nat_port: 20_001,
            ..live
        };
        assert!(
            !revnat_live(&t, &rkey, Some(&rebound), 101 * NS),
            "owner reopened with another SNAT port"
        );
        let moved = CtEntry {
            backend_addr: 8,
            ..live
        };
        assert!(!revnat_live(&t, &rkey, Some(&moved), 101 * NS));
    }
}
