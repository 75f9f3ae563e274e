//! `pairdb kv put-many FILE`: stores a JSON-lines file (or stdin, `-`) with PutMany, in batches of
//! at most [`BATCH_ITEMS`] items and [`BATCH_VALUE_BYTES`] of values. One line per key:
//! `{"key": "k", "value": "text" | "value_base64": "...", "context"?: "...", "ttl"?: "30s",
//! "condition"?: "if_absent"}`. A progress bar on stderr (when it is a terminal) advances after each
//! batch; the summary names every failed line (up to [`SHOWN_FAILURES`]) with its reason, and the
//! command fails if any did.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pairdb_client::{KvClient, PutManyItem, WriteCondition, WriteOptions};
use serde::Deserialize;
use serde_json::json;

use crate::output::{self, Output};

/// Items per PutMany call (the router takes up to 1,000).
pub const BATCH_ITEMS: usize = 500;
/// Value bytes per PutMany call (the router takes up to 4 MiB).
pub const BATCH_VALUE_BYTES: usize = 3 << 20;
/// Failures the summary lists.
const SHOWN_FAILURES: usize = 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    value: Option<String>,
    value_base64: Option<String>,
    context: Option<String>,
    ttl: Option<String>,
    condition: Option<String>,
}

impl Line {
    fn item(self) -> Result<PutManyItem, String> {
        let value = match (self.value, self.value_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => BASE64.decode(encoded).map_err(|e| format!("value_base64: {e}"))?,
            _ => return Err("give value or value_base64".to_owned()),
        };
        let context = match self.context {
            Some(text) => BASE64.decode(text.trim()).map_err(|e| format!("context: {e}"))?,
            None => Vec::new(),
        };
        let ttl = self.ttl.map(|text| crate::duration::parse_duration(&text)).transpose()?;
        let condition =
            match self.condition {
                Some(text) => Some(WriteCondition::parse(&text.to_ascii_lowercase()).ok_or_else(|| {
                    format!("condition {text:?}: if_absent, if_present or if_context_matches")
                })?),
                None => None,
            };
        Ok(PutManyItem { key: self.key, value, context, condition, ttl, ..PutManyItem::default() })
    }
}

/// A line that was not stored: its number, key and why.
struct Failure {
    line: usize,
    key: String,
    reason: String,
}

pub async fn run(
    format: Output,
    client: &KvClient,
    file: &Path,
    options: WriteOptions,
) -> anyhow::Result<()> {
    let open = || {
        std::fs::File::open(file).with_context(|| format!("INVALID_ARGUMENT: cannot open {}", file.display()))
    };
    let (reader, progress): (Box<dyn BufRead>, indicatif::ProgressBar) = match file.to_str() {
        Some("-") => {
            (Box::new(std::io::BufReader::new(std::io::stdin())), indicatif::ProgressBar::new_spinner())
        }
        _ => {
            let lines = std::io::BufReader::new(open()?).lines().count() as u64;
            (Box::new(std::io::BufReader::new(open()?)), indicatif::ProgressBar::new(lines))
        }
    };
    progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let (mut stored, mut failures, mut batch, mut bytes) = (0usize, Vec::new(), Vec::new(), 0usize);
    for (index, line) in reader.lines().enumerate() {
        let line = line.context("reading the input")?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Line>(&line).map_err(|e| e.to_string()).and_then(Line::item);
        match parsed {
            Ok(item) => {
                bytes += item.value.len();
                batch.push((index + 1, item));
            }
            Err(reason) => failures.push(Failure {
                line: index + 1,
                key: String::new(),
                reason: format!("INVALID_ARGUMENT: {reason}"),
            }),
        }
        if batch.len() >= BATCH_ITEMS || bytes >= BATCH_VALUE_BYTES {
            stored += send(client, std::mem::take(&mut batch), &options, &mut failures).await?;
            bytes = 0;
            progress.set_position((stored + failures.len()) as u64);
            progress.set_message(format!("{} failed", failures.len()));
        }
    }
    if !batch.is_empty() {
        stored += send(client, batch, &options, &mut failures).await?;
    }
    progress.finish_and_clear();
    report(format, stored, &failures)
}

/// One PutMany; returns how many items were stored and records the others.
async fn send(
    client: &KvClient,
    batch: Vec<(usize, PutManyItem)>,
    options: &WriteOptions,
    failures: &mut Vec<Failure>,
) -> anyhow::Result<usize> {
    let (lines, items): (Vec<(usize, String)>, Vec<PutManyItem>) =
        batch.into_iter().map(|(line, item)| ((line, item.key.clone()), item)).unzip();
    let reply = client.put_many(items, options.clone()).await?;
    let mut stored = 0;
    for ((line, key), result) in lines.into_iter().zip(reply.results) {
        match result {
            Ok(_) => stored += 1,
            Err(error) => {
                failures.push(Failure { line, key, reason: format!("{}: {}", error.reason(), error) })
            }
        }
    }
    Ok(stored)
}

fn report(format: Output, stored: usize, failures: &[Failure]) -> anyhow::Result<()> {
    match format {
        Output::Json => output::print_json(&json!({
            "stored": stored,
            "failed": failures.len(),
            "failures": failures.iter().take(SHOWN_FAILURES).map(|f| json!({"line": f.line, "key": f.key, "error": f.reason})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!("stored {stored}, failed {}", failures.len());
            for failure in failures.iter().take(SHOWN_FAILURES) {
                println!("  line {} {:?}: {}", failure.line, failure.key, failure.reason);
            }
        }
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "PUT_MANY_INCOMPLETE: {} of {} lines were not stored",
            failures.len(),
            failures.len() + stored
        );
    }
    Ok(())
}
