//! Measurements of one benchmark phase: a latency histogram per operation (microseconds, 3
//! significant digits, up to 60 s) and error counts by reason, merged from every worker.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Operation kinds the workloads issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Read,
    Update,
    ReadModifyWrite,
    /// One listing page (ListKeys).
    ListPage,
    /// One listing page with values (Scan).
    ScanPage,
    /// One PutMany of `--batch-size` updates.
    PutMany,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Read => "read",
            Op::Update => "update",
            Op::ReadModifyWrite => "read_modify_write",
            Op::ListPage => "list_page",
            Op::ScanPage => "scan_page",
            Op::PutMany => "put_many",
        }
    }
}

const MAX_LATENCY_US: u64 = 60_000_000;

/// One worker's (or the merged) measurements.
#[derive(Debug, Default)]
pub struct Recorder {
    latencies: BTreeMap<Op, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    /// Reads that found no value (not errors, but unexpected after a load phase).
    pub not_found: u64,
    /// Keys returned by listing pages.
    pub listed_keys: u64,
    /// Items PutMany batches stored.
    pub batched_items: u64,
}

impl Recorder {
    pub fn record(&mut self, op: Op, latency: Duration) {
        let histogram = self.latencies.entry(op).or_insert_with(|| {
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds")
        });
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_US);
        histogram.saturating_record(micros);
    }

    pub fn error(&mut self, reason: &str) {
        *self.errors.entry(reason.to_owned()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        for (op, histogram) in other.latencies {
            match self.latencies.get_mut(&op) {
                Some(mine) => {
                    // Same bounds on both sides, so adding cannot fail.
                    let _ = mine.add(&histogram);
                }
                None => {
                    self.latencies.insert(op, histogram);
                }
            }
        }
        for (reason, count) in other.errors {
            *self.errors.entry(reason).or_default() += count;
        }
        self.not_found += other.not_found;
        self.listed_keys += other.listed_keys;
        self.batched_items += other.batched_items;
    }

    pub fn operations(&self) -> u64 {
        self.latencies.values().map(Histogram::len).sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The phase as JSON: throughput and latency percentiles (ms) per operation, errors by reason.
    pub fn to_json(&self, elapsed: Duration) -> Value {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let per_operation: serde_json::Map<String, Value> = self
            .latencies
            .iter()
            .map(|(op, histogram)| {
                let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
                (
                    op.name().to_owned(),
                    json!({
                        "count": histogram.len(),
                        "throughput_ops_per_sec": round(histogram.len() as f64 / seconds),
                        "latency_ms": {
                            "p50": ms(0.50),
                            "p95": ms(0.95),
                            "p99": ms(0.99),
                            "p99_9": ms(0.999),
                            "max": histogram.max() as f64 / 1000.0,
                        },
                    }),
                )
            })
            .collect();
        json!({
            "duration_secs": round(seconds),
            "operations": self.operations(),
            "throughput_ops_per_sec": round(self.operations() as f64 / seconds),
            "errors": self.errors,
            "not_found": self.not_found,
            "listed_keys": self.listed_keys,
            "listed_keys_per_sec": round(self.listed_keys as f64 / seconds),
            "batched_items": self.batched_items,
            "batched_items_per_sec": round(self.batched_items as f64 / seconds),
            "per_operation": per_operation,
        })
    }
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Prints a phase as a table.
pub fn print_table(phase: &str, report: &Value) {
    if report["batched_items"].as_u64().unwrap_or(0) > 0 {
        println!(
            "{phase}: {} items in batches = {} items/s",
            report["batched_items"], report["batched_items_per_sec"]
        );
    }
    if report["listed_keys"].as_u64().unwrap_or(0) > 0 {
        println!("{phase}: {} keys listed = {} keys/s", report["listed_keys"], report["listed_keys_per_sec"]);
    }
    println!(
        "{phase}: {} ops in {:.1} s = {} ops/s, {} errors",
        report["operations"],
        report["duration_secs"].as_f64().unwrap_or_default(),
        report["throughput_ops_per_sec"],
        report["errors"]
            .as_object()
            .map_or(0, |errors| errors.values().filter_map(Value::as_u64).sum::<u64>()),
    );
    let mut rows = Vec::new();
    if let Some(operations) = report["per_operation"].as_object() {
        for (name, op) in operations {
            let latency = &op["latency_ms"];
            rows.push(vec![
                name.clone(),
                op["count"].to_string(),
                op["throughput_ops_per_sec"].to_string(),
                latency["p50"].to_string(),
                latency["p95"].to_string(),
                latency["p99"].to_string(),
                latency["p99_9"].to_string(),
                latency["max"].to_string(),
            ]);
        }
    }
    crate::output::print_table(
        &["OPERATION", "COUNT", "OPS/S", "P50 MS", "P95 MS", "P99 MS", "P99.9 MS", "MAX MS"],
        &rows,
    );
    if let Some(errors) = report["errors"].as_object()
        && !errors.is_empty()
    {
        for (reason, count) in errors {
            println!("  error {reason}: {count}");
        }
    }
    if report["not_found"].as_u64().unwrap_or(0) > 0 {
        println!("  reads that found no value: {}", report["not_found"]);
    }
}

/// The gRPC floor lines of a `--ratio-to-floor` run.
pub fn print_floor(floor: &serde_json::Map<String, Value>) {
    let echo_rate = |run: &Value| {
        run.as_array()
            .and_then(|cases| cases.iter().find(|c| c["channels"] == floor["echo_channels"]))
            .map_or(Value::Null, |case| case["req_per_s"].clone())
    };
    println!(
        "floor: {}-connection gRPC echo {} RPC/s before, {} after (mean {})",
        floor["echo_channels"],
        echo_rate(&floor["before"]),
        echo_rate(&floor["after"]),
        floor["echo_rpc_per_sec"]
    );
    if let Some(ratios) = floor["ratio"].as_object() {
        let ratios: Vec<String> = ratios.iter().map(|(phase, ratio)| format!("{phase} {ratio}")).collect();
        println!("ratio to the floor: {}", ratios.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_recorders_report_percentiles_and_errors() {
        let mut total = Recorder::default();
        let mut worker = Recorder::default();
        for ms in 1..=100 {
            worker.record(Op::Read, Duration::from_millis(ms));
        }
        worker.error("QUORUM_NOT_REACHED");
        let mut other = Recorder::default();
        other.record(Op::Update, Duration::from_millis(5));
        other.error("QUORUM_NOT_REACHED");
        total.merge(worker);
        total.merge(other);
        let report = total.to_json(Duration::from_secs(1));
        assert_eq!(report["operations"], 101);
        assert_eq!(report["errors"]["QUORUM_NOT_REACHED"], 2);
        let p50 = report["per_operation"]["read"]["latency_ms"]["p50"].as_f64().unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert!(report["per_operation"]["read"]["latency_ms"]["max"].as_f64().unwrap() >= 99.9);
    }
}
