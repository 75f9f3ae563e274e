//! Clock offsets between cluster members, as NTP estimates them: a node sends at `sent`, the peer
//! stamps `remote` on its own clock, the answer arrives at `received`; assuming the two legs took
//! equally long, the node's clock is `remote - (sent + received) / 2` behind the peer's. The error is
//! at most half the round trip. Expiry and LWW timestamps come from wall clocks, so operators need to
//! know when a node's clock drifts; no causality decision ever reads one.

/// How far the local clock is **ahead** of the remote one (negative: behind), in ms.
pub fn offset_ms(sent_ms: u64, remote_ms: u64, received_ms: u64) -> i64 {
    debug_assert!(received_ms >= sent_ms, "the answer arrives after the request left");
    let midpoint = i128::from(sent_ms) + (i128::from(received_ms) - i128::from(sent_ms)) / 2;
    let offset = midpoint - i128::from(remote_ms);
    i64::try_from(offset).unwrap_or(if offset > 0 { i64::MAX } else { i64::MIN })
}

/// True when `offset_ms` is beyond `bound_ms` either way.
pub fn skewed(offset_ms: i64, bound_ms: u64) -> bool {
    offset_ms.unsigned_abs() > bound_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_delays_give_the_exact_offset() {
        // Local clock 300 ms ahead: sent at 1_000 local (700 remote), 10 ms each way.
        assert_eq!(offset_ms(1_000, 710, 1_020), 300);
        // Behind by 2 s.
        assert_eq!(offset_ms(1_000, 3_010, 1_020), -2_000);
        assert_eq!(offset_ms(5, 5, 5), 0);
        assert_eq!(offset_ms(0, u64::MAX, 0), i64::MIN);
    }

    #[test]
    fn skew_is_beyond_the_bound_either_way() {
        assert!(!skewed(1_000, 1_000));
        assert!(skewed(1_001, 1_000));
        assert!(skewed(-1_001, 1_000));
        assert!(skewed(i64::MIN, 1_000));
    }
}
