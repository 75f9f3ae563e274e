//! What a tenant decides about its own data that the rest of the core reads.

/// How concurrent writes to one key are presented (DESIGN §3): all concurrent values as siblings, or
/// only the newest by timestamp (last writer wins, ties broken by the dot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConflictMode {
    #[default]
    Siblings,
    Lww,
}

impl ConflictMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictMode::Siblings => "siblings",
            ConflictMode::Lww => "lww",
        }
    }

    /// Parses `siblings` or `lww` (exactly; edges lowercase user input first).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "siblings" => Some(ConflictMode::Siblings),
            "lww" => Some(ConflictMode::Lww),
            _ => None,
        }
    }
}

/// How a tenant's keys are placed on the ring, fixed when the tenant is created (a change would move
/// every grouped key). See [`crate::token::placement_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyGroups {
    /// Every key is placed by its whole text (token rule v1).
    #[default]
    None,
    /// A key holding a hash tag (`{tag}`, non-empty, the first braces) is placed by its tag alone, so
    /// a group's keys share one partition and lie in one ordered range (the Redis Cluster rule).
    HashTag,
}

impl KeyGroups {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyGroups::None => "none",
            KeyGroups::HashTag => "hash_tag",
        }
    }

    /// Parses `none` or `hash_tag` (exactly).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(KeyGroups::None),
            "hash_tag" => Some(KeyGroups::HashTag),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_group_names_parse_back() {
        for groups in [KeyGroups::None, KeyGroups::HashTag] {
            assert_eq!(KeyGroups::parse(groups.as_str()), Some(groups));
        }
        assert_eq!(KeyGroups::parse("HASH_TAG"), None);
    }

    #[test]
    fn names_parse_back() {
        for mode in [ConflictMode::Siblings, ConflictMode::Lww] {
            assert_eq!(ConflictMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(ConflictMode::parse("LWW"), None);
    }
}
