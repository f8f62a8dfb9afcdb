//! Incremental Internet checksum updates (RFC 1624, eqn. 3): `HC' = ~(~HC + ~m + m')`.
//! Values are raw words as they sit in packet memory; one's-complement sums are byte-order
//! independent (RFC 1071 section 2), so no conversion is needed on either side.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Update `check` for a 16-bit field changing from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// Update `check` for a 32-bit field changing from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum =
        (!check as u32) + (!(old >> 16) & 0xffff) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub fn udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !fold(sum)
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut words = [
            0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4001, 0, 0xc612, 0x0001, 0xc612, 0x0002,
        ];
        let check = full(&words);
        let old = ((words[8] as u32) << 16) | words[9] as u32;
        let new = 0xc613_0105u32;
        words[8] = (new >> 16) as u16;
        words[9] = new as u16;
        assert_eq!(replace4(check, old, new), full(&words));
        let old16 = words[3];
        words[3] = 0xbeef;
        assert_eq!(replace2(full(&words[..]), 0xbeef, 0xbeef), full(&words));
        let before = {
            let mut w = words;
            w[3] = old16;
            full(&w)
        };
        assert_eq!(replace2(before, old16, 0xbeef), full(&words));
    }

    #[test]
    fn udp_zero_stays_zero() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x1111, 0), 0xffff);
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }
}
