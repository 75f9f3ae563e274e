//! Input limits of DESIGN §3, checked at every edge before anything is stored.

use crate::expiry::MAX_TTL_MS;
use crate::reason::{HasReason, Reason};
/// Highest replication factor (and the length of a partition's node list).
pub const MAX_REPLICATION_FACTOR: usize = 7;
pub const DEFAULT_REPLICATION_FACTOR: usize = 3;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_TENANT_ID_BYTES: usize = 63;
/// Default per-tenant value cap.
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 1024 * 1024;
/// Hard ceiling of any tenant's value cap; kept below the gRPC message limit with room for metadata
/// and siblings.
pub const ABSOLUTE_MAX_VALUE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest gRPC message any PairDB service accepts.
pub const GRPC_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_SIBLINGS: usize = 64;
pub const ABSOLUTE_MAX_SIBLINGS: usize = 1024;

/// An input outside the limits; `reason()` is the stable code clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("tenant id must match [a-z0-9][a-z0-9_-]{{0,62}}")]
    InvalidTenantId,
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes, above the limit of {MAX_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("key is not valid UTF-8")]
    KeyNotUtf8,
    #[error("value is {len} bytes, above the tenant's limit of {max} bytes")]
    ValueTooLarge { len: usize, max: u64 },
    #[error("replication factor {0} is outside 1..={MAX_REPLICATION_FACTOR}")]
    InvalidReplicationFactor(usize),
    #[error("max value size {0} is outside 1..={ABSOLUTE_MAX_VALUE_BYTES}")]
    InvalidMaxValueBytes(u64),
    #[error("max siblings {0} is outside 1..={ABSOLUTE_MAX_SIBLINGS}")]
    InvalidMaxSiblings(usize),
    #[error("{setting} {value_ms} is above the maximum of {MAX_TTL_MS} ms (100 years; 0 = none)")]
    TtlTooLong { setting: &'static str, value_ms: u64 },
    #[error(
        "default_ttl_ms {default_ttl_ms} is above max_ttl_ms {max_ttl_ms}: the default expiry cannot \
         exceed the cap (raise max_ttl_ms, lower default_ttl_ms, or set either to 0 for none)"
    )]
    DefaultTtlAboveMax { default_ttl_ms: u64, max_ttl_ms: u64 },
}

impl HasReason for ValidationError {
    fn reason(&self) -> Reason {
        match self {
            ValidationError::InvalidTenantId => Reason::InvalidTenantId,
            ValidationError::EmptyKey | ValidationError::KeyTooLong { .. } | ValidationError::KeyNotUtf8 => {
                Reason::InvalidKey
            }
            ValidationError::ValueTooLarge { .. } => Reason::ValueTooLarge,
            ValidationError::InvalidReplicationFactor(_) => Reason::InvalidReplicationFactor,
            ValidationError::InvalidMaxValueBytes(_)
            | ValidationError::InvalidMaxSiblings(_)
            | ValidationError::TtlTooLong { .. }
            | ValidationError::DefaultTtlAboveMax { .. } => Reason::InvalidArgument,
        }
    }
}

/// `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_tenant_id(tenant_id: &str) -> Result<(), ValidationError> {
    let bytes = tenant_id.as_bytes();
    let Some((&first, rest)) = bytes.split_first() else {
        return Err(ValidationError::InvalidTenantId);
    };
    let valid_first = first.is_ascii_lowercase() || first.is_ascii_digit();
    let valid_rest =
        rest.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid_first && valid_rest && bytes.len() <= MAX_TENANT_ID_BYTES {
        Ok(())
    } else {
        Err(ValidationError::InvalidTenantId)
    }
}

/// 1–1024 bytes of UTF-8.
pub fn validate_key(key: &[u8]) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ValidationError::KeyTooLong { len: key.len() });
    }
    if std::str::from_utf8(key).is_err() {
        return Err(ValidationError::KeyNotUtf8);
    }
    Ok(())
}

pub fn validate_value(value: &[u8], max_value_bytes: u64) -> Result<(), ValidationError> {
    if value.len() as u64 > max_value_bytes {
        return Err(ValidationError::ValueTooLarge { len: value.len(), max: max_value_bytes });
    }
    Ok(())
}

pub fn validate_replication_factor(replication_factor: usize) -> Result<(), ValidationError> {
    if (1..=MAX_REPLICATION_FACTOR).contains(&replication_factor) {
        Ok(())
    } else {
        Err(ValidationError::InvalidReplicationFactor(replication_factor))
    }
}

pub fn validate_max_value_bytes(max_value_bytes: u64) -> Result<(), ValidationError> {
    if (1..=ABSOLUTE_MAX_VALUE_BYTES).contains(&max_value_bytes) {
        Ok(())
    } else {
        Err(ValidationError::InvalidMaxValueBytes(max_value_bytes))
    }
}

pub fn validate_max_siblings(max_siblings: usize) -> Result<(), ValidationError> {
    if (1..=ABSOLUTE_MAX_SIBLINGS).contains(&max_siblings) {
        Ok(())
    } else {
        Err(ValidationError::InvalidMaxSiblings(max_siblings))
    }
}

/// A tenant's expiry settings (ms; 0 = none): each at most [`MAX_TTL_MS`], and a default no later
/// than the cap when both are set (a default above it could never take effect as configured).
pub fn validate_ttl_settings(default_ttl_ms: u64, max_ttl_ms: u64) -> Result<(), ValidationError> {
    for (setting, value_ms) in [("default_ttl_ms", default_ttl_ms), ("max_ttl_ms", max_ttl_ms)] {
        if value_ms > MAX_TTL_MS {
            return Err(ValidationError::TtlTooLong { setting, value_ms });
        }
    }
    if default_ttl_ms != 0 && max_ttl_ms != 0 && default_ttl_ms > max_ttl_ms {
        return Err(ValidationError::DefaultTtlAboveMax { default_ttl_ms, max_ttl_ms });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        for ok in ["a", "demo", "0abc", "a-b_c", &"a".repeat(63)] {
            assert_eq!(validate_tenant_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "_a", "A", "a b", "a.b", "é", &"a".repeat(64)] {
            assert_eq!(validate_tenant_id(bad), Err(ValidationError::InvalidTenantId), "{bad}");
        }
    }

    #[test]
    fn keys() {
        assert_eq!(validate_key(b"k"), Ok(()));
        assert_eq!(validate_key(&[b'k'; 1024]), Ok(()));
        assert_eq!(validate_key(&[b'k'; 1025]), Err(ValidationError::KeyTooLong { len: 1025 }));
        assert_eq!(validate_key(b""), Err(ValidationError::EmptyKey));
        assert_eq!(validate_key(&[0xff, 0xfe]), Err(ValidationError::KeyNotUtf8));
        assert_eq!(validate_key("ключ".as_bytes()), Ok(()));
    }

    #[test]
    fn values_and_factors() {
        assert_eq!(validate_value(&[0; 10], 10), Ok(()));
        let err = validate_value(&[0; 11], 10).unwrap_err();
        assert_eq!(err.reason(), "VALUE_TOO_LARGE");
        assert!(validate_replication_factor(0).is_err());
        assert!(validate_replication_factor(8).is_err());
        assert_eq!(validate_replication_factor(7), Ok(()));
        assert!(validate_max_value_bytes(ABSOLUTE_MAX_VALUE_BYTES + 1).is_err());
        assert!(validate_max_siblings(0).is_err());
    }

    #[test]
    fn ttl_settings() {
        for (default_ttl_ms, max_ttl_ms) in
            [(0, 0), (1_000, 0), (0, 1_000), (1_000, 1_000), (1_000, 2_000), (MAX_TTL_MS, MAX_TTL_MS)]
        {
            assert_eq!(
                validate_ttl_settings(default_ttl_ms, max_ttl_ms),
                Ok(()),
                "{default_ttl_ms} {max_ttl_ms}"
            );
        }
        assert_eq!(MAX_TTL_MS, 3_153_600_000_000);
        let above = validate_ttl_settings(2_000, 1_000).unwrap_err();
        assert_eq!(above, ValidationError::DefaultTtlAboveMax { default_ttl_ms: 2_000, max_ttl_ms: 1_000 });
        assert_eq!(above.reason(), "INVALID_ARGUMENT");
        assert!(above.to_string().starts_with("default_ttl_ms 2000 is above max_ttl_ms 1000"), "{above}");
        assert_eq!(
            validate_ttl_settings(MAX_TTL_MS + 1, 0),
            Err(ValidationError::TtlTooLong { setting: "default_ttl_ms", value_ms: MAX_TTL_MS + 1 })
        );
        let long = validate_ttl_settings(0, u64::MAX).unwrap_err();
        assert!(
            long.to_string().starts_with("max_ttl_ms 18446744073709551615 is above the maximum"),
            "{long}"
        );
    }
}
