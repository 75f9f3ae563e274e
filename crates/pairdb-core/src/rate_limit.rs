//! Token-bucket rate limiting as a pure state machine: the caller passes the current time (ms on any
//! monotonic clock), the bucket answers "go" or "retry after N ms". Routers keep one bucket per
//! tenant; a rejection never waits, so one tenant over its limit cannot slow another.

/// A bucket refilled at `ops_per_sec` up to `burst` tokens; one operation takes one token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    ops_per_sec: u32,
    burst: u32,
    tokens: f64,
    last_refill_ms: u64,
}

impl TokenBucket {
    /// A full bucket. `burst` 0 means "one second's worth" (at least 1).
    pub fn new(ops_per_sec: u32, burst: u32, now_ms: u64) -> Self {
        let burst = if burst == 0 { ops_per_sec.max(1) } else { burst };
        Self { ops_per_sec, burst, tokens: f64::from(burst), last_refill_ms: now_ms }
    }

    /// Whether this bucket was made for these settings (a settings change replaces the bucket).
    pub fn has_settings(&self, ops_per_sec: u32, burst: u32) -> bool {
        let burst = if burst == 0 { ops_per_sec.max(1) } else { burst };
        self.ops_per_sec == ops_per_sec && self.burst == burst
    }

    /// Takes a token, or says how many milliseconds until one is available. Time going backwards is
    /// treated as no time passing.
    pub fn try_take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed_ms = now_ms.saturating_sub(self.last_refill_ms);
        self.last_refill_ms = self.last_refill_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed_ms as f64 * f64::from(self.ops_per_sec) / 1000.0)
            .min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.ops_per_sec == 0 {
            return Err(1000);
        }
        let missing = 1.0 - self.tokens;
        Err(((missing * 1000.0 / f64::from(self.ops_per_sec)).ceil() as u64).max(1))
    }
}

/// A budget of units per second (keys, bytes) for background work that cannot be split into single
/// tokens: [`Budget::charge`] always admits the work and returns how long to pause so the average
/// stays at the rate (the debt is paid by waiting). A rate of 0 means unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    units_per_sec: u64,
    /// Negative = debt.
    balance: f64,
    burst: f64,
    last_ms: u64,
}

impl Budget {
    /// Starts with one second's worth available.
    pub fn new(units_per_sec: u64, now_ms: u64) -> Self {
        let burst = units_per_sec as f64;
        Self { units_per_sec, balance: burst, burst, last_ms: now_ms }
    }

    /// Spends `units`; returns the milliseconds to wait before doing more.
    pub fn charge(&mut self, units: u64, now_ms: u64) -> u64 {
        if self.units_per_sec == 0 {
            return 0;
        }
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let rate = self.units_per_sec as f64;
        self.balance = (self.balance + elapsed_ms as f64 * rate / 1000.0).min(self.burst);
        self.balance -= units as f64;
        if self.balance >= 0.0 { 0 } else { (-self.balance * 1000.0 / rate).ceil() as u64 }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn budget_paces_large_charges_to_the_rate() {
        let mut budget = Budget::new(1000, 0);
        assert_eq!(budget.charge(1000, 0), 0, "one second's worth is free");
        assert_eq!(budget.charge(500, 0), 500);
        // After waiting the debt off, the next charge starts from zero.
        assert_eq!(budget.charge(100, 500), 100);
        let mut unlimited = Budget::new(0, 0);
        assert_eq!(unlimited.charge(u64::MAX, 0), 0);
    }

    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let mut bucket = TokenBucket::new(10, 5, 0);
        for _ in 0..5 {
            assert_eq!(bucket.try_take(0), Ok(()));
        }
        assert_eq!(bucket.try_take(0), Err(100));
        assert_eq!(bucket.try_take(50), Err(50));
        assert_eq!(bucket.try_take(100), Ok(()));
        // One second admits ten more, never more than the burst at once.
        let admitted = (0..100).filter(|i| bucket.try_take(1100 + i).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn rate_over_a_long_run_matches_the_setting() {
        let mut bucket = TokenBucket::new(100, 10, 0);
        // Ask 400 times a second for 10 seconds: about 100/s get through (plus the initial burst).
        let admitted = (0..4000u64).filter(|i| bucket.try_take(i * 10 / 4).is_ok()).count();
        assert!((1000..=1011).contains(&admitted), "{admitted}");
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let mut bucket = TokenBucket::new(1, 1, 1000);
        assert_eq!(bucket.try_take(1000), Ok(()));
        assert!(bucket.try_take(10).is_err());
        assert!(bucket.try_take(1000).is_err());
        assert_eq!(bucket.try_take(2000), Ok(()));
        assert!(bucket.has_settings(1, 1) && !bucket.has_settings(2, 1));
    }
}
