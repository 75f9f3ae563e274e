//! Listing decisions: which replicas answer for which partitions (the coverage plan), how their
//! answers make one page, and the page token. Pure: the router sends the calls and feeds the answers.
//!
//! A page is correct when, in listing order, it holds every key of the range that a replica set
//! covering each partition holds, up to the page's end, exactly once. Each node answers in key order
//! and says how far its answer is complete (`resume_after`); the page ends at the earliest such point
//! of any incomplete answer, so no key beyond it is listed before every node has been read that far.
//! A key lives in one partition, so the answers naming it are replicas of one partition: their sets
//! merge into one.
//!
//! Invariants: a listing never repeats a key across pages (the next page starts strictly after the
//! token's key) and never skips one held by an answering replica (the page ends before any key an
//! incomplete answer might still hold). It is not a snapshot: a key written or deleted between pages
//! may or may not appear.

use std::collections::{BTreeMap, BTreeSet};

use crate::dvv::VersionSet;
use crate::ring::NodeId;
use crate::token::PartitionId;

/// Token format version (the first two characters of every page token).
const PAGE_TOKEN_VERSION: &str = "k1";

/// A page token: where the next page starts (strictly after `last_key`, in the listing's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken {
    pub last_key: String,
}

/// A page token that this release did not issue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("page token is not one this service issued (pass `next_page_token` of the previous page unchanged)")]
pub struct InvalidPageToken;

impl PageToken {
    /// Opaque text: the version, then the key in lowercase hex.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(2 + self.last_key.len() * 2);
        out.push_str(PAGE_TOKEN_VERSION);
        for byte in self.last_key.as_bytes() {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    pub fn decode(text: &str) -> Result<PageToken, InvalidPageToken> {
        let hex = text.strip_prefix(PAGE_TOKEN_VERSION).ok_or(InvalidPageToken)?.as_bytes();
        let well_formed = !hex.is_empty()
            && hex.len() % 2 == 0
            && hex.len() <= 2 * crate::validation::MAX_KEY_BYTES
            && hex.iter().all(u8::is_ascii_hexdigit);
        if !well_formed {
            return Err(InvalidPageToken);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => c - b'A' + 10,
        };
        let bytes: Vec<u8> = hex.chunks(2).map(|pair| (digit(pair[0]) << 4) | digit(pair[1])).collect();
        let last_key = String::from_utf8(bytes).map_err(|_| InvalidPageToken)?;
        Ok(PageToken { last_key })
    }
}

/// Which replicas still have to answer for each partition of a listing.
#[derive(Debug, Clone)]
pub struct Coverage {
    partitions: BTreeMap<PartitionId, PartitionCover>,
    /// Replicas asked only when no live one is left to ask for a partition.
    suspects: BTreeSet<NodeId>,
}

#[derive(Debug, Clone)]
struct PartitionCover {
    /// Replicas to ask, best first (live before suspect, preference order).
    candidates: Vec<NodeId>,
    /// Candidates already asked (answered or failed).
    asked: usize,
    answered: usize,
    needed: usize,
}

impl Coverage {
    /// `needed` answers per partition (1 at ONE, R at a quorum), from `candidates` in order.
    /// The `suspects` (failing or down) are asked last.
    pub fn new(
        partitions: impl IntoIterator<Item = (PartitionId, Vec<NodeId>)>,
        needed: usize,
        suspects: BTreeSet<NodeId>,
    ) -> Self {
        let partitions = partitions
            .into_iter()
            .map(|(partition, candidates)| {
                let needed = needed.max(1);
                (partition, PartitionCover { candidates, asked: 0, answered: 0, needed })
            })
            .collect();
        Self { partitions, suspects }
    }

    /// The next round of calls: for each partition still short of answers, as many untried candidates
    /// as it lacks, spread so each node serves as few partitions as the candidates allow (at ONE a
    /// listing then reads every node a little rather than one node a lot).
    pub fn next_round(&mut self) -> BTreeMap<NodeId, Vec<PartitionId>> {
        let mut round: BTreeMap<NodeId, Vec<PartitionId>> = BTreeMap::new();
        for (partition, cover) in &mut self.partitions {
            let short = cover.needed.saturating_sub(cover.answered);
            for _ in 0..short {
                let untried = &cover.candidates[cover.asked.min(cover.candidates.len())..];
                let Some(choice) = untried
                    .iter()
                    .enumerate()
                    .min_by_key(|(position, node)| {
                        (self.suspects.contains(node), round.get(node).map_or(0, Vec::len), *position)
                    })
                    .map(|(position, _)| position)
                else {
                    break;
                };
                // Move the choice to the front of the untried candidates, then count it asked.
                cover.candidates[cover.asked..].swap(0, choice);
                let node = cover.candidates[cover.asked];
                cover.asked += 1;
                round.entry(node).or_default().push(*partition);
            }
        }
        round
    }

    /// `node` answered for `partitions`.
    pub fn answered(&mut self, partitions: &[PartitionId]) {
        for partition in partitions {
            if let Some(cover) = self.partitions.get_mut(partition) {
                cover.answered += 1;
            }
        }
    }

    /// Partitions still short of answers: once no round is left to send (every candidate asked, or
    /// the deadline reached), no replica answered for them, and a page must not list past them as if
    /// they were empty.
    pub fn unavailable(&self) -> Vec<PartitionId> {
        self.partitions.iter().filter(|(_, c)| c.answered < c.needed).map(|(p, _)| *p).collect()
    }

    /// Every partition has its answers.
    pub fn complete(&self) -> bool {
        self.partitions.values().all(|c| c.answered >= c.needed)
    }
}

/// One node's answer for its partitions: records in listing order, complete or up to `resume_after`.
#[derive(Debug, Clone)]
pub struct NodeAnswer {
    pub records: Vec<(String, VersionSet)>,
    pub complete: bool,
    pub resume_after: Option<String>,
}

/// Answers merged into one page (before the caller's filters and limit).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedPage {
    /// Keys in listing order, each with its replicas' sets merged.
    pub records: Vec<(String, VersionSet)>,
    /// Where the merged records stop being complete: `None` when every answer was complete.
    pub complete_through: Option<String>,
}

/// Merges node answers (see the module docs). `reverse`: descending key order.
pub fn merge_answers(answers: Vec<NodeAnswer>, reverse: bool) -> MergedPage {
    let before = |a: &str, b: &str| if reverse { a > b } else { a < b };
    let mut complete_through: Option<String> = None;
    for answer in answers.iter().filter(|a| !a.complete) {
        let Some(point) = &answer.resume_after else { continue };
        if complete_through.as_deref().is_none_or(|current| before(point, current)) {
            complete_through = Some(point.clone());
        }
    }
    let mut merged: BTreeMap<String, VersionSet> = BTreeMap::new();
    for answer in answers {
        for (key, set) in answer.records {
            if complete_through.as_deref().is_some_and(|end| before(end, &key)) {
                continue;
            }
            match merged.get_mut(&key) {
                Some(existing) => {
                    existing.merge_from(&set);
                }
                None => {
                    merged.insert(key, set);
                }
            }
        }
    }
    let mut records: Vec<(String, VersionSet)> = merged.into_iter().collect();
    if reverse {
        records.reverse();
    }
    MergedPage { records, complete_through }
}

/// How a page ends: the keys it returns (at most `limit`) and the token of the next page, if any.
pub fn cut_page<T>(
    mut kept: Vec<(String, T)>,
    limit: usize,
    complete_through: Option<String>,
) -> (Vec<(String, T)>, Option<PageToken>) {
    if kept.len() > limit {
        kept.truncate(limit);
        let last_key = kept.last().map(|(k, _)| k.clone()).unwrap_or_default();
        return (kept, Some(PageToken { last_key }));
    }
    (kept, complete_through.map(|last_key| PageToken { last_key }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dvv::{Actor, VersionVector};

    fn set(actor: u64) -> VersionSet {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), Actor(actor), Some(vec![actor as u8]), 1, None).unwrap();
        set
    }

    #[test]
    fn page_tokens_round_trip_and_forgeries_are_refused() {
        for key in ["a", "orders:{c}:1", "ü→✓", &"x".repeat(1024)] {
            let token = PageToken { last_key: key.into() };
            assert_eq!(PageToken::decode(&token.encode()), Ok(token));
        }
        let too_long = format!("k1{}", "61".repeat(1025));
        for bad in ["", "k1", "k1zz", "k1abc", "x1ab", "k1ff", "k1aéb", "k1+f", "k1é", &too_long] {
            assert_eq!(PageToken::decode(bad), Err(InvalidPageToken), "{bad}");
        }
    }

    #[test]
    fn coverage_spreads_partitions_and_falls_back_to_the_next_replica() {
        let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
        let partitions = (0..6).map(|p| (PartitionId(p), vec![a, b, c]));
        let mut one = Coverage::new(partitions.clone(), 1, BTreeSet::new());
        let round = one.next_round();
        assert_eq!(round.values().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2], "spread over the nodes");
        // Node a fails: its partitions go to the next candidates; the rest answered.
        for (node, parts) in &round {
            if *node != a {
                one.answered(parts);
            }
        }
        let retry = one.next_round();
        assert!(!retry.contains_key(&a));
        assert_eq!(retry.values().map(Vec::len).sum::<usize>(), 2);
        for parts in retry.values() {
            one.answered(parts);
        }
        assert!(one.complete() && one.unavailable().is_empty());

        let mut quorum = Coverage::new(partitions.clone(), 2, BTreeSet::new());
        let round = quorum.next_round();
        assert_eq!(round.values().map(Vec::len).sum::<usize>(), 12);
        // Only one node answers: every partition is one short, and one candidate is left each.
        quorum.answered(&round[&b]);
        assert!(!quorum.complete());
        let retry = quorum.next_round();
        assert_eq!(retry.values().map(Vec::len).sum::<usize>(), 6);
        let _ = quorum.next_round();
        assert!(quorum.next_round().is_empty());
        assert_eq!(quorum.unavailable().len(), 6, "nobody else answered");

        // A suspect replica is asked only for partitions no live replica can answer.
        let mut avoiding = Coverage::new(partitions, 1, BTreeSet::from([c]));
        let round = avoiding.next_round();
        assert!(!round.contains_key(&c), "{round:?}");
        assert_eq!(round.values().map(Vec::len).sum::<usize>(), 6);
    }

    #[test]
    fn a_page_ends_where_an_incomplete_answer_ends_and_replicas_merge() {
        let answers = vec![
            NodeAnswer {
                records: vec![("a".into(), set(1)), ("c".into(), set(1)), ("e".into(), set(1))],
                complete: true,
                resume_after: None,
            },
            NodeAnswer {
                records: vec![("b".into(), set(2)), ("c".into(), set(2))],
                complete: false,
                resume_after: Some("c".into()),
            },
        ];
        let page = merge_answers(answers, false);
        let keys: Vec<&str> = page.records.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"], "e waits: the second node may hold d");
        assert_eq!(page.complete_through.as_deref(), Some("c"));
        assert_eq!(page.records[2].1.siblings().len(), 2, "replicas' sets of c merged");

        let reversed = merge_answers(
            vec![
                NodeAnswer {
                    records: vec![("e".into(), set(1)), ("a".into(), set(1))],
                    complete: true,
                    resume_after: None,
                },
                NodeAnswer {
                    records: vec![("d".into(), set(2))],
                    complete: false,
                    resume_after: Some("d".into()),
                },
            ],
            true,
        );
        let keys: Vec<&str> = reversed.records.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["e", "d"]);

        let (kept, token) =
            cut_page(vec![("a".to_string(), ()), ("b".into(), ()), ("c".into(), ())], 2, None);
        assert_eq!((kept.len(), token), (2, Some(PageToken { last_key: "b".into() })));
        let (kept, token) = cut_page(Vec::<(String, ())>::new(), 2, Some("q".into()));
        assert_eq!((kept.len(), token), (0, Some(PageToken { last_key: "q".into() })));
        assert_eq!(cut_page(vec![("a".to_string(), ())], 2, None).1, None);
    }
}
