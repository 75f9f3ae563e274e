//! Consistency levels and the R/W arithmetic against a tenant's replication factor N.

use crate::reason::{HasReason, Reason};
use crate::validation::MAX_REPLICATION_FACTOR;

/// A named consistency level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    One,
    /// floor(N/2) + 1 replicas.
    Quorum,
    All,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::One => "one",
            Consistency::Quorum => "quorum",
            Consistency::All => "all",
        }
    }

    /// Parses `one`, `quorum`, `all` (any case).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "one" => Some(Consistency::One),
            "quorum" => Some(Consistency::Quorum),
            "all" => Some(Consistency::All),
            _ => None,
        }
    }
}

/// What one request asks for: a level, or an explicit replica count (R or W).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Requirement {
    Level(Consistency),
    Explicit(u32),
}

/// A requirement that cannot be met by the tenant's replication factor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    #[error("asked for {requested} replicas but the tenant's replication factor is {replication_factor}")]
    ExceedsReplicationFactor { requested: u32, replication_factor: usize },
    #[error("an explicit replica count must be at least 1")]
    Zero,
    #[error("replication factor {0} is outside 1..={MAX_REPLICATION_FACTOR}")]
    BadReplicationFactor(usize),
}

impl HasReason for QuorumError {
    fn reason(&self) -> Reason {
        match self {
            QuorumError::ExceedsReplicationFactor { .. } | QuorumError::Zero => Reason::InvalidConsistency,
            QuorumError::BadReplicationFactor(_) => Reason::InvalidReplicationFactor,
        }
    }
}

/// floor(n/2) + 1.
pub fn quorum(replication_factor: usize) -> usize {
    replication_factor / 2 + 1
}

/// How many replica answers (R) or acknowledgements (W) `requirement` needs with `replication_factor`.
pub fn required_replicas(requirement: Requirement, replication_factor: usize) -> Result<usize, QuorumError> {
    if replication_factor == 0 || replication_factor > MAX_REPLICATION_FACTOR {
        return Err(QuorumError::BadReplicationFactor(replication_factor));
    }
    match requirement {
        Requirement::Level(Consistency::One) => Ok(1),
        Requirement::Level(Consistency::Quorum) => Ok(quorum(replication_factor)),
        Requirement::Level(Consistency::All) => Ok(replication_factor),
        Requirement::Explicit(0) => Err(QuorumError::Zero),
        Requirement::Explicit(requested) => {
            let requested_replicas = requested as usize;
            if requested_replicas > replication_factor {
                Err(QuorumError::ExceedsReplicationFactor { requested, replication_factor })
            } else {
                Ok(requested_replicas)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_against_every_replication_factor() {
        for n in 1..=MAX_REPLICATION_FACTOR {
            assert_eq!(required_replicas(Requirement::Level(Consistency::One), n), Ok(1));
            assert_eq!(required_replicas(Requirement::Level(Consistency::Quorum), n), Ok(n / 2 + 1));
            assert_eq!(required_replicas(Requirement::Level(Consistency::All), n), Ok(n));
            // R + W > N for QUORUM on both sides: reads see acknowledged writes.
            assert!(2 * quorum(n) > n);
        }
    }

    #[test]
    fn explicit_counts_are_bounded_by_n() {
        assert_eq!(required_replicas(Requirement::Explicit(2), 3), Ok(2));
        let err = required_replicas(Requirement::Explicit(4), 3).unwrap_err();
        assert_eq!(err.reason(), "INVALID_CONSISTENCY");
        assert_eq!(required_replicas(Requirement::Explicit(0), 3), Err(QuorumError::Zero));
        assert!(required_replicas(Requirement::Level(Consistency::One), 8).is_err());
    }

    #[test]
    fn parse_names() {
        assert_eq!(Consistency::parse("QUORUM"), Some(Consistency::Quorum));
        assert_eq!(Consistency::parse("most"), None);
    }
}
