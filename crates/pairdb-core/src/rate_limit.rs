//! Token-bucket rate limiting as a pure state machine: the caller passes the current time (ms on any
//! monotonic clock), the bucket answers "go" or "retry after N ms". Routers keep one bucket per
//! tenant; a rejection never waits, so one tenant over its limit cannot slow another.

/// A bucket refilled at `ops_per_sec` up to `burst` tokens; one operation takes one token.
///
/// A tenant's limit is cluster-wide while each router keeps its own bucket: a router's bucket holds
/// its [`share`](TokenBucket::set_share) of the limit (refill rate and burst scaled by it), and the
/// shares of all routers add up to one ([`router_share`]). The bucket counts the tokens asked of it
/// (admitted or not, plus charged work) as the router's demand, from which shares are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    ops_per_sec: u32,
    burst: u32,
    /// This router's share of the limit, in (0, 1].
    share: f64,
    tokens: f64,
    last_refill_ms: u64,
    /// Tokens asked for since the last [`TokenBucket::take_demand`].
    demand: f64,
}

impl TokenBucket {
    /// A full bucket holding the whole limit (share 1). `burst` 0 means "one second's worth" (at
    /// least 1).
    pub fn new(ops_per_sec: u32, burst: u32, now_ms: u64) -> Self {
        let burst = if burst == 0 { ops_per_sec.max(1) } else { burst };
        Self { ops_per_sec, burst, share: 1.0, tokens: f64::from(burst), last_refill_ms: now_ms, demand: 0.0 }
    }

    /// Whether this bucket was made for these settings (a settings change replaces the bucket).
    pub fn has_settings(&self, ops_per_sec: u32, burst: u32) -> bool {
        let burst = if burst == 0 { ops_per_sec.max(1) } else { burst };
        self.ops_per_sec == ops_per_sec && self.burst == burst
    }

    /// Scales the bucket to this router's `share` of the limit from now on (tokens already earned are
    /// kept, capped by the new burst).
    pub fn set_share(&mut self, share: f64, now_ms: u64) {
        self.refill(now_ms);
        self.share = if share.is_finite() { share.clamp(f64::MIN_POSITIVE, 1.0) } else { 1.0 };
        self.tokens = self.tokens.min(self.burst_tokens());
    }

    pub fn share(&self) -> f64 {
        self.share
    }

    /// Tokens asked of this bucket since the last call (the router's demand for the tenant).
    pub fn take_demand(&mut self) -> f64 {
        std::mem::take(&mut self.demand)
    }

    fn rate_per_ms(&self) -> f64 {
        f64::from(self.ops_per_sec) * self.share / 1000.0
    }

    fn burst_tokens(&self) -> f64 {
        (f64::from(self.burst) * self.share).max(1.0)
    }

    /// Charges `units` of work already done (a listing page's examined keys): taken even if the bucket
    /// runs into debt, down to one burst below empty, so the tenant's next operations wait it out.
    pub fn charge(&mut self, units: u32, now_ms: u64) {
        self.refill(now_ms);
        self.demand += f64::from(units);
        self.tokens = (self.tokens - f64::from(units)).max(-self.burst_tokens());
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_refill_ms);
        self.last_refill_ms = self.last_refill_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed_ms as f64 * self.rate_per_ms()).min(self.burst_tokens());
    }

    /// Takes a token, or says how many milliseconds until one is available. Time going backwards is
    /// treated as no time passing.
    pub fn try_take(&mut self, now_ms: u64) -> Result<(), u64> {
        self.refill(now_ms);
        self.demand += 1.0;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.ops_per_sec == 0 {
            return Err(1000);
        }
        let missing = 1.0 - self.tokens;
        Err(((missing / self.rate_per_ms()).ceil() as u64).max(1))
    }
}

/// The smallest share a router gets, as a fraction of an even split: a router that saw no demand
/// lately still admits some requests until the next exchange raises its share. The shares then add
/// up to at most `1 + MIN_SHARE_OF_EVEN_SPLIT` (the bound's only slack besides one exchange period).
pub const MIN_SHARE_OF_EVEN_SPLIT: f64 = 0.05;

/// A router's share of a cluster-wide limit: its part of the tenant's recent demand over all
/// routers (`demands`, its own included), or an even split over `routers` when nobody asked lately.
pub fn router_share(mine: f64, demands: &[f64], routers: usize) -> f64 {
    let routers = routers.max(demands.len()).max(1) as f64;
    let floor = MIN_SHARE_OF_EVEN_SPLIT / routers;
    let total: f64 = demands.iter().filter(|d| d.is_finite() && **d > 0.0).sum();
    if total <= 0.0 || !mine.is_finite() {
        return 1.0 / routers;
    }
    (mine.max(0.0) / total).clamp(floor, 1.0)
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

/// Paces background work (listings) to a `share` of wall time while foreground work (point reads
/// and writes) is present, and lets it run freely otherwise: the work runs in short slices, reports
/// each slice's busy time with [`BusyShare::charge`], and asks [`BusyShare::wait_us`] before the
/// next one. One pacer per node, shared by every worker of the class, so the share is the node's,
/// not each worker's.
///
/// It is a virtual clock: each contended slice of `busy` µs pushes the moment the class may work
/// again by `busy × (1 − share) / share`, from now or from where the clock already stood. One
/// worker then works exactly `share` of the time; `k` workers charging concurrently work a little
/// more than `share` together (their slices overlap the pause they repay), never `k × share`.
#[derive(Debug, Clone, PartialEq)]
pub struct BusyShare {
    /// In (0, 1]; 1 never pauses.
    share: f64,
    /// The background class may start its next slice at this moment (µs on the caller's clock).
    next_free_us: u64,
}

impl BusyShare {
    /// `share` is clamped to [0.01, 1].
    pub fn new(share: f64) -> Self {
        Self { share: share.clamp(0.01, 1.0), next_free_us: 0 }
    }

    pub fn share(&self) -> f64 {
        self.share
    }

    /// A slice of `busy_us` ended at `now_us`; `contended`: foreground work ran meanwhile.
    pub fn charge(&mut self, busy_us: u64, contended: bool, now_us: u64) {
        if !contended {
            return;
        }
        let pause_us = (busy_us as f64 * (1.0 - self.share) / self.share).ceil() as u64;
        self.next_free_us = self.next_free_us.max(now_us).saturating_add(pause_us);
    }

    /// How long to wait before the next slice (0 when foreground work is absent: the class may then
    /// use the whole machine, and its debt is forgiven).
    pub fn wait_us(&mut self, contended: bool, now_us: u64) -> u64 {
        if !contended {
            self.next_free_us = self.next_free_us.min(now_us);
            return 0;
        }
        self.next_free_us.saturating_sub(now_us)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_busy_worker_gets_its_share_of_the_time() {
        let mut pacer = BusyShare::new(0.2);
        let (mut now, mut busy) = (0u64, 0u64);
        for _ in 0..1000 {
            now += pacer.wait_us(true, now);
            now += 500;
            busy += 500;
            pacer.charge(500, true, now);
        }
        let share = busy as f64 / now as f64;
        assert!((share - 0.2).abs() < 0.001, "{share}");
    }

    #[test]
    fn concurrent_workers_share_the_node_share_not_each() {
        // Two workers whose slices overlap: each waits out the pause both caused.
        let mut pacer = BusyShare::new(0.1);
        let (mut now, mut busy) = (0u64, 0u64);
        for _ in 0..1000 {
            now += pacer.wait_us(true, now);
            now += 1000;
            busy += 2000;
            pacer.charge(1000, true, now);
            pacer.charge(1000, true, now);
        }
        let share = busy as f64 / (2.0 * now as f64);
        assert!(share <= 0.11, "per-worker share {share}");
        assert!(busy as f64 / now as f64 <= 0.22, "node share {}", busy as f64 / now as f64);
    }

    #[test]
    fn without_foreground_work_there_is_no_pause_and_no_debt() {
        let mut pacer = BusyShare::new(0.1);
        pacer.charge(10_000, false, 10_000);
        assert_eq!(pacer.wait_us(true, 10_000), 0, "uncontended work is not charged");
        pacer.charge(10_000, true, 20_000);
        assert_eq!(pacer.wait_us(true, 20_000), 90_000);
        assert_eq!(pacer.wait_us(false, 21_000), 0, "foreground gone: go at once");
        assert_eq!(pacer.wait_us(true, 21_000), 0, "and the debt is forgiven");
        let mut whole = BusyShare::new(1.0);
        whole.charge(5_000, true, 5_000);
        assert_eq!(whole.wait_us(true, 5_000), 0);
    }

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
    fn charged_work_is_paid_for_by_waiting() {
        let mut bucket = TokenBucket::new(100, 100, 0);
        bucket.charge(150, 0);
        // 50 below empty: the next token comes after 51 tokens' refill (510 ms).
        assert_eq!(bucket.try_take(0), Err(510));
        assert!(bucket.try_take(509).is_err());
        assert_eq!(bucket.try_take(510), Ok(()));
        // Debt is capped at one burst.
        let mut bucket = TokenBucket::new(10, 10, 0);
        bucket.charge(1_000_000, 0);
        assert_eq!(bucket.try_take(0), Err(1100));
    }

    #[test]
    fn shares_split_a_limit_by_demand_and_add_up_to_about_one() {
        assert_eq!(router_share(0.0, &[], 3), 1.0 / 3.0, "no demand: an even split");
        assert_eq!(router_share(300.0, &[300.0, 100.0], 2), 0.75);
        let shares: Vec<f64> =
            [500.0, 0.0, 0.0].iter().map(|d| router_share(*d, &[500.0, 0.0, 0.0], 3)).collect();
        let total: f64 = shares.iter().sum();
        assert!(total <= 1.0 + MIN_SHARE_OF_EVEN_SPLIT + 1e-9, "{shares:?}");
        assert!(shares[1] > 0.0, "an idle router still admits a little");
    }

    #[test]
    fn a_shared_bucket_refills_at_its_share_and_counts_demand() {
        let mut bucket = TokenBucket::new(1000, 1000, 0);
        bucket.set_share(0.25, 0);
        assert_eq!(bucket.tokens, 250.0, "burst scaled to the share");
        let admitted = (0..1000).filter(|_| bucket.try_take(0).is_ok()).count();
        assert_eq!(admitted, 250);
        // One second at a quarter of 1,000/s.
        let admitted = (0..1000).filter(|_| bucket.try_take(1000).is_ok()).count();
        assert_eq!(admitted, 250);
        assert_eq!(bucket.take_demand(), 2000.0);
        assert_eq!(bucket.take_demand(), 0.0);
    }

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
