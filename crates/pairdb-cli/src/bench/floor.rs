//! `pairdb bench --ratio-to-floor`: the cost of one gRPC hop on this machine, measured in the same
//! sitting as the workload, so throughput can be stated as a ratio that holds on a shared, noisy
//! machine where absolute figures do not.
//!
//! The floor is `shared/bench/floor.sh` (a minimal tonic unary echo: 1 KiB payloads, 64 requests in
//! flight, over 1 and 4 HTTP/2 connections). It runs once before the load phase and once after the
//! run phase; the ratio divides PairDB's operations per second by the mean of the two 4-connection
//! echo rates.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The echo's connection count the ratio is stated against.
pub const RATIO_CHANNELS: u64 = 4;

/// Where the floor script is: the path given, else `$PAIRDB_FLOOR_SCRIPT`, else
/// `shared/bench/floor.sh` next to the working directory or one of its ancestors.
pub fn locate(given: &Path) -> anyhow::Result<PathBuf> {
    if !given.as_os_str().is_empty() {
        return Ok(given.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PAIRDB_FLOOR_SCRIPT") {
        return Ok(PathBuf::from(path));
    }
    let here = std::env::current_dir()?;
    here.ancestors()
        .map(|dir| dir.join("shared/bench/floor.sh"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "NOT_FOUND: no shared/bench/floor.sh above {}; pass --ratio-to-floor PATH or set PAIRDB_FLOOR_SCRIPT",
                here.display()
            )
        })
}

/// One run of the floor script: its JSON lines (one per connection count).
pub async fn measure(script: &Path, seconds: u64) -> anyhow::Result<Value> {
    let output = tokio::process::Command::new("bash")
        .arg(script)
        .env("SECS", seconds.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("UNAVAILABLE: cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "UNAVAILABLE: {} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let cases: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .filter(|case| case["bench"] == "grpc-echo")
        .collect();
    if rate(&cases).is_none() {
        anyhow::bail!("UNAVAILABLE: {} printed no {RATIO_CHANNELS}-channel echo rate", script.display());
    }
    Ok(Value::Array(cases))
}

/// The 4-connection echo rate of one floor run.
fn rate(cases: &[Value]) -> Option<f64> {
    cases.iter().find(|case| case["channels"] == RATIO_CHANNELS).and_then(|case| case["req_per_s"].as_f64())
}

/// The report's `floor` object: both runs, their mean echo rate and each phase's ratio to it.
pub fn report(before: &Value, after: &Value, phases: &[(&str, Option<f64>)]) -> Value {
    let rates: Vec<f64> =
        [before, after].iter().filter_map(|run| run.as_array().and_then(|cases| rate(cases))).collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let ratios: serde_json::Map<String, Value> = phases
        .iter()
        .filter_map(|(phase, ops)| ops.map(|ops| ((*phase).to_owned(), json!(ratio(ops, mean)))))
        .collect();
    json!({
        "before": before,
        "after": after,
        "echo_channels": RATIO_CHANNELS,
        "echo_rpc_per_sec": mean.round(),
        "ratio": ratios,
    })
}

fn ratio(ops_per_sec: f64, echo_per_sec: f64) -> f64 {
    if echo_per_sec > 0.0 { (ops_per_sec / echo_per_sec * 1000.0).round() / 1000.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_against_the_mean_four_channel_rate() {
        let before = json!([{"bench": "grpc-echo", "channels": 1, "req_per_s": 10.0},
                            {"bench": "grpc-echo", "channels": 4, "req_per_s": 40_000.0}]);
        let after = json!([{"bench": "grpc-echo", "channels": 4, "req_per_s": 20_000.0}]);
        let floor = report(&before, &after, &[("load", Some(3_000.0)), ("run", Some(15_000.0)), ("x", None)]);
        assert_eq!(floor["echo_rpc_per_sec"], 30_000.0);
        assert_eq!(floor["ratio"]["load"], 0.1);
        assert_eq!(floor["ratio"]["run"], 0.5);
        assert!(floor["ratio"].get("x").is_none());
    }

    #[test]
    fn a_given_path_wins() {
        assert_eq!(locate(Path::new("/x/floor.sh")).unwrap(), PathBuf::from("/x/floor.sh"));
    }
}
