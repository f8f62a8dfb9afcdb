//! The flow hash that picks a Maglev slot. It leaves out the destination address so that a
//! flow lands on the same backend whichever node (or LoadBalancer IP) it enters through.

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3-style hash of (client address, client port, frontend port, protocol), all
/// as raw network-order values. IPv6 clients pass their address folded (`Addr::fold`).
#[inline(always)]
pub fn flow_hash(saddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x6e70_6c62; // seed "nplb"
    h = mix(h, saddr);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    fmix(h ^ 12)
}

/// Hash of the client address alone (sessionAffinity ClientIP).
#[inline(always)]
pub fn client_hash(saddr: u32) -> u32 {
    fmix(mix(0x6e70_6166, saddr) ^ 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_ports_evenly() {
        let mut buckets = [0u32; 7];
        for port in 1024..(1024 + 7000u16) {
            buckets[(flow_hash(0x0100_12c6, port.to_be(), 30080u16.to_be(), 6) % 7) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven buckets: {buckets:?}");
        }
    }

    #[test]
    fn depends_on_every_field_but_destination() {
        let base = flow_hash(1, 2, 3, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 17));
    }
}
