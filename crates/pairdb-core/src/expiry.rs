//! When a written value expires: the one rule that turns what a write asked for and the tenant's
//! settings into the absolute `expires_at_ms` the router stamps on the new sibling (docs/api.md,
//! "Expiry"). Time enters as `now_ms` (the router's wall clock when it received the write).
//!
//! Invariants: the result is never in the past of `now_ms` for an accepted write; it is never later
//! than `now_ms + max_ttl_ms` when the tenant caps expiry (a write that asks for more, or for none,
//! gets the cap); a tenant without settings and a write without expiry give `None` (never expires).

use crate::reason::{HasReason, Reason};

/// The longest expiry a write or a tenant may ask for: 100 years.
pub const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// What a write asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Requested {
    /// Nothing: the tenant's default (which may be "never").
    #[default]
    TenantDefault,
    /// This many ms after the router received the write.
    AfterMs(u64),
    /// At this wall-clock time (ms since the Unix epoch).
    AtMs(u64),
}

impl Requested {
    /// The wire form: `ttl_ms` and `expires_at_ms`, 0 meaning unset; both set is an error.
    pub fn from_wire(ttl_ms: u64, expires_at_ms: u64) -> Result<Self, ExpiryError> {
        match (ttl_ms, expires_at_ms) {
            (0, 0) => Ok(Requested::TenantDefault),
            (ttl, 0) => Ok(Requested::AfterMs(ttl)),
            (0, at) => Ok(Requested::AtMs(at)),
            _ => Err(ExpiryError::Both),
        }
    }
}

/// Why a write's expiry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    #[error("give ttl_ms or expires_at_ms, not both")]
    Both,
    #[error("ttl_ms {0} is above the maximum {MAX_TTL_MS} (100 years)")]
    TooLong(u64),
    #[error("expires_at_ms {at_ms} is not after the router's clock ({now_ms})")]
    InThePast { at_ms: u64, now_ms: u64 },
}

impl HasReason for ExpiryError {
    fn reason(&self) -> Reason {
        Reason::InvalidArgument
    }
}

/// The absolute expiry of a write received at `now_ms` (`None`: never), from what it asked and the
/// tenant's `default_ttl_ms` / `max_ttl_ms` (0 = none).
pub fn resolve(
    requested: Requested,
    default_ttl_ms: u64,
    max_ttl_ms: u64,
    now_ms: u64,
) -> Result<Option<u64>, ExpiryError> {
    let asked = match requested {
        Requested::TenantDefault => (default_ttl_ms > 0).then(|| now_ms.saturating_add(default_ttl_ms)),
        Requested::AfterMs(ttl) if ttl > MAX_TTL_MS => return Err(ExpiryError::TooLong(ttl)),
        Requested::AfterMs(ttl) => Some(now_ms.saturating_add(ttl)),
        Requested::AtMs(at_ms) if at_ms <= now_ms => return Err(ExpiryError::InThePast { at_ms, now_ms }),
        Requested::AtMs(at_ms) if at_ms - now_ms > MAX_TTL_MS => {
            return Err(ExpiryError::TooLong(at_ms - now_ms));
        }
        Requested::AtMs(at_ms) => Some(at_ms),
    };
    let cap = (max_ttl_ms > 0).then(|| now_ms.saturating_add(max_ttl_ms));
    let resolved = match (asked, cap) {
        (Some(at), Some(cap)) => Some(at.min(cap)),
        (asked, cap) => asked.or(cap),
    };
    debug_assert!(resolved.is_none_or(|at| at > now_ms));
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    #[test]
    fn every_combination_of_request_and_tenant_settings() {
        use Requested::*;
        type Case = (Requested, u64, u64, Result<Option<u64>, ExpiryError>);
        let cases: &[Case] = &[
            (TenantDefault, 0, 0, Ok(None)),
            (TenantDefault, 500, 0, Ok(Some(NOW + 500))),
            // A cap bounds "never" too.
            (TenantDefault, 0, 900, Ok(Some(NOW + 900))),
            (TenantDefault, 500, 900, Ok(Some(NOW + 500))),
            (AfterMs(100), 500, 0, Ok(Some(NOW + 100))),
            (AfterMs(5_000), 0, 900, Ok(Some(NOW + 900))),
            (AtMs(NOW + 50), 0, 0, Ok(Some(NOW + 50))),
            (AtMs(NOW + 5_000), 0, 900, Ok(Some(NOW + 900))),
            (AtMs(NOW), 0, 0, Err(ExpiryError::InThePast { at_ms: NOW, now_ms: NOW })),
            (AfterMs(MAX_TTL_MS + 1), 0, 0, Err(ExpiryError::TooLong(MAX_TTL_MS + 1))),
            (AtMs(NOW + MAX_TTL_MS + 1), 0, 0, Err(ExpiryError::TooLong(MAX_TTL_MS + 1))),
        ];
        for (requested, default_ttl, max_ttl, expected) in cases {
            assert_eq!(
                &resolve(*requested, *default_ttl, *max_ttl, NOW),
                expected,
                "{requested:?} {default_ttl} {max_ttl}"
            );
        }
    }

    #[test]
    fn wire_form_takes_one_of_the_two() {
        assert_eq!(Requested::from_wire(0, 0), Ok(Requested::TenantDefault));
        assert_eq!(Requested::from_wire(5, 0), Ok(Requested::AfterMs(5)));
        assert_eq!(Requested::from_wire(0, 9), Ok(Requested::AtMs(9)));
        assert_eq!(Requested::from_wire(5, 9), Err(ExpiryError::Both));
    }
}
