//! Key choice for the benchmark: uniform, or YCSB's scrambled Zipfian (θ = 0.99, Gray et al.'s
//! generator) whose popular items are spread over the key space by hashing the rank, so hot keys do
//! not all land on one partition.

use rand::Rng;

/// YCSB's default skew.
const ZIPFIAN_THETA: f64 = 0.99;

/// Draws record numbers in `0..records`.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    Uniform { records: u64 },
    Zipfian(Zipfian),
}

impl KeyChooser {
    pub fn uniform(records: u64) -> Self {
        KeyChooser::Uniform { records: records.max(1) }
    }

    pub fn zipfian(records: u64) -> Self {
        KeyChooser::Zipfian(Zipfian::new(records.max(1), ZIPFIAN_THETA))
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform { records } => rng.random_range(0..*records),
            KeyChooser::Zipfian(zipfian) => scramble(zipfian.next(rng), zipfian.items),
        }
    }
}

/// The key of record `index`.
pub fn key_of(index: u64) -> String {
    format!("bench:{index:010}")
}

/// Spreads rank `rank` over `0..items` (FNV-1a of the rank, as YCSB's ScrambledZipfian does).
fn scramble(rank: u64, items: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in rank.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash % items
}

/// Gray et al., "Quickly generating billion-record synthetic databases" (SIGMOD 1994): ranks
/// `0..items` with P(rank) ∝ 1 / (rank + 1)^θ.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

impl Zipfian {
    pub fn new(items: u64, theta: f64) -> Self {
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zeta_n = zeta(items);
        let zeta_2 = zeta(2.min(items));
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Self { items, theta, alpha, zeta_n, eta }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn draws_stay_in_range() {
        let mut rng = StdRng::seed_from_u64(7);
        for records in [1, 2, 3, 1000] {
            for chooser in [KeyChooser::uniform(records), KeyChooser::zipfian(records)] {
                for _ in 0..10_000 {
                    assert!(chooser.next(&mut rng) < records);
                }
            }
        }
    }

    #[test]
    fn zipfian_is_skewed_and_uniform_is_not() {
        let mut rng = StdRng::seed_from_u64(11);
        let records = 10_000;
        let top_share = |chooser: &KeyChooser, rng: &mut StdRng| {
            let mut counts = vec![0u32; records as usize];
            for _ in 0..100_000 {
                counts[chooser.next(rng) as usize] += 1;
            }
            counts.sort_unstable_by(|a, b| b.cmp(a));
            f64::from(counts[..100].iter().sum::<u32>()) / 100_000.0
        };
        // With θ = 0.99 the top 1% of 10k items draw roughly half the requests; uniformly about 1%.
        let zipfian = top_share(&KeyChooser::zipfian(records), &mut rng);
        let uniform = top_share(&KeyChooser::uniform(records), &mut rng);
        assert!(zipfian > 0.35, "zipfian top-1% share {zipfian}");
        assert!(uniform < 0.03, "uniform top-1% share {uniform}");
    }
}
