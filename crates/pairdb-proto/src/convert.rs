//! Wire enums ↔ domain types, written once for every service and the client. `UNSPECIFIED` decodes
//! to `None` (the caller applies its default); a number this release does not know is an error, so
//! the caller decides whether that is the client's mistake or a newer peer's.

use pairdb_core::condition::WriteCondition;
use pairdb_core::quorum::Consistency;
use pairdb_core::tenant::{ConflictMode, KeyGroups};

use crate::common::v1 as common;

/// An enum value this release does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownEnumValue {
    pub kind: &'static str,
    pub value: i32,
}

impl std::fmt::Display for UnknownEnumValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown {} {}", self.kind, self.value)
    }
}

impl std::error::Error for UnknownEnumValue {}

pub fn consistency_from_wire(value: i32) -> Result<Option<Consistency>, UnknownEnumValue> {
    match common::Consistency::try_from(value) {
        Ok(common::Consistency::Unspecified) => Ok(None),
        Ok(common::Consistency::One) => Ok(Some(Consistency::One)),
        Ok(common::Consistency::Quorum) => Ok(Some(Consistency::Quorum)),
        Ok(common::Consistency::All) => Ok(Some(Consistency::All)),
        Err(_) => Err(UnknownEnumValue { kind: "consistency level", value }),
    }
}

pub fn consistency_to_wire(consistency: Option<Consistency>) -> i32 {
    let wire = match consistency {
        None => common::Consistency::Unspecified,
        Some(Consistency::One) => common::Consistency::One,
        Some(Consistency::Quorum) => common::Consistency::Quorum,
        Some(Consistency::All) => common::Consistency::All,
    };
    wire as i32
}

pub fn write_condition_from_wire(value: i32) -> Result<Option<WriteCondition>, UnknownEnumValue> {
    match common::WriteCondition::try_from(value) {
        Ok(common::WriteCondition::Unspecified) => Ok(None),
        Ok(common::WriteCondition::IfAbsent) => Ok(Some(WriteCondition::IfAbsent)),
        Ok(common::WriteCondition::IfPresent) => Ok(Some(WriteCondition::IfPresent)),
        Ok(common::WriteCondition::IfContextMatches) => Ok(Some(WriteCondition::IfContextMatches)),
        Err(_) => Err(UnknownEnumValue { kind: "write condition", value }),
    }
}

pub fn write_condition_to_wire(condition: Option<WriteCondition>) -> i32 {
    let wire = match condition {
        None => common::WriteCondition::Unspecified,
        Some(WriteCondition::IfAbsent) => common::WriteCondition::IfAbsent,
        Some(WriteCondition::IfPresent) => common::WriteCondition::IfPresent,
        Some(WriteCondition::IfContextMatches) => common::WriteCondition::IfContextMatches,
    };
    wire as i32
}

pub fn conflict_mode_from_wire(value: i32) -> Result<Option<ConflictMode>, UnknownEnumValue> {
    match common::ConflictMode::try_from(value) {
        Ok(common::ConflictMode::Unspecified) => Ok(None),
        Ok(common::ConflictMode::Siblings) => Ok(Some(ConflictMode::Siblings)),
        Ok(common::ConflictMode::Lww) => Ok(Some(ConflictMode::Lww)),
        Err(_) => Err(UnknownEnumValue { kind: "conflict mode", value }),
    }
}

pub fn conflict_mode_to_wire(mode: Option<ConflictMode>) -> i32 {
    let wire = match mode {
        None => common::ConflictMode::Unspecified,
        Some(ConflictMode::Siblings) => common::ConflictMode::Siblings,
        Some(ConflictMode::Lww) => common::ConflictMode::Lww,
    };
    wire as i32
}

pub fn key_groups_from_wire(value: i32) -> Result<Option<KeyGroups>, UnknownEnumValue> {
    match common::KeyGroups::try_from(value) {
        Ok(common::KeyGroups::Unspecified) => Ok(None),
        Ok(common::KeyGroups::None) => Ok(Some(KeyGroups::None)),
        Ok(common::KeyGroups::HashTag) => Ok(Some(KeyGroups::HashTag)),
        Err(_) => Err(UnknownEnumValue { kind: "key groups mode", value }),
    }
}

pub fn key_groups_to_wire(groups: Option<KeyGroups>) -> i32 {
    let wire = match groups {
        None => common::KeyGroups::Unspecified,
        Some(KeyGroups::None) => common::KeyGroups::None,
        Some(KeyGroups::HashTag) => common::KeyGroups::HashTag,
    };
    wire as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_and_unknown_numbers_are_refused() {
        for level in [None, Some(Consistency::One), Some(Consistency::Quorum), Some(Consistency::All)] {
            assert_eq!(consistency_from_wire(consistency_to_wire(level)), Ok(level));
        }
        for mode in [None, Some(ConflictMode::Siblings), Some(ConflictMode::Lww)] {
            assert_eq!(conflict_mode_from_wire(conflict_mode_to_wire(mode)), Ok(mode));
        }
        assert_eq!(consistency_from_wire(99).unwrap_err().to_string(), "unknown consistency level 99");
        assert!(conflict_mode_from_wire(-1).is_err());
        for groups in [None, Some(KeyGroups::None), Some(KeyGroups::HashTag)] {
            assert_eq!(key_groups_from_wire(key_groups_to_wire(groups)), Ok(groups));
        }
        assert!(key_groups_from_wire(7).is_err());
    }
}
