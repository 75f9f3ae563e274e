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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for mode in [ConflictMode::Siblings, ConflictMode::Lww] {
            assert_eq!(ConflictMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(ConflictMode::parse("LWW"), None);
    }
}
