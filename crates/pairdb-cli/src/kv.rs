//! `pairdb kv`: put, get and delete through a router. Siblings are listed oldest first, and the context
//! is printed so it can be passed back with `--context` to replace what was read.

use pairdb_client::{
    KvClient, ListOptions, ListedKey, ReadOptions, ReadResult, ScannedKey, WriteOptions, WriteResult,
};
use serde_json::{Value, json};

use crate::cli::{Globals, KvCommand, ListArgs};
use crate::output::{self, Output};

pub async fn run(globals: &Globals, command: KvCommand) -> anyhow::Result<()> {
    let client = globals.kv().await?;
    match command {
        KvCommand::Put {
            key,
            value,
            file,
            consistency,
            context,
            overwrite,
            idempotency_key,
            condition,
            ttl,
        } => {
            let value = match (value, file) {
                (Some(value), _) => value.into_bytes(),
                (None, Some(path)) => std::fs::read(&path)
                    .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?,
                (None, None) => anyhow::bail!("INVALID_ARGUMENT: give a value or --file"),
            };
            let options = WriteOptions {
                consistency: crate::cli::consistency(consistency),
                context: context.as_deref().map(output::decode_context).transpose()?.unwrap_or_default(),
                overwrite,
                idempotency_key,
                condition: condition.condition(),
                ttl,
                ..WriteOptions::default()
            };
            let result = client.put(&key, value, options).await?;
            print_write(globals.output, "stored", &key, &result);
        }
        KvCommand::Touch { key, context, ttl, consistency } => {
            let options = WriteOptions {
                consistency: crate::cli::consistency(consistency),
                ttl: Some(ttl),
                ..WriteOptions::default()
            };
            let result = client.touch(&key, output::decode_context(&context)?, options).await?;
            print_write(globals.output, "touched", &key, &result);
        }
        KvCommand::Get { key, consistency } => {
            let options =
                ReadOptions { consistency: crate::cli::consistency(consistency), ..ReadOptions::default() };
            let result = client.get(&key, options).await?;
            print_read(globals.output, &key, result.as_ref());
        }
        KvCommand::Delete { key, consistency, context, idempotency_key, condition } => {
            let options = WriteOptions {
                consistency: crate::cli::consistency(consistency),
                context: context.as_deref().map(output::decode_context).transpose()?.unwrap_or_default(),
                idempotency_key,
                condition: condition.condition(),
                ..WriteOptions::default()
            };
            let result = client.delete(&key, options).await?;
            print_write(globals.output, "deleted", &key, &result);
        }
        KvCommand::List(args) => list(globals.output, &client, args).await?,
        KvCommand::PutMany { file, consistency } => {
            let options =
                WriteOptions { consistency: crate::cli::consistency(consistency), ..WriteOptions::default() };
            crate::put_many::run(globals.output, &client, &file, options).await?;
        }
    }
    Ok(())
}

/// `pairdb kv list`: prints each page as it arrives (JSON: one line per key, then one with the next
/// page token when there is one and `--all` was not given).
async fn list(format: Output, client: &KvClient, args: ListArgs) -> anyhow::Result<()> {
    let options = ListOptions {
        prefix: args.prefix,
        start_after: args.start_after,
        end_before: args.end_before,
        limit: args.limit,
        group: args.group,
        reverse: args.reverse,
        include_tombstones: args.include_tombstones,
        conflicts_only: args.conflicts_only,
        consistency: crate::cli::consistency(args.consistency),
        allow_partial: args.allow_partial,
        ..ListOptions::default()
    };
    let mut token = args.page_token;
    loop {
        let next = if args.values {
            let page = client.scan(&options, token.as_deref()).await?;
            warn_partial(&page.unavailable_partitions);
            page.keys.iter().for_each(|key| print_scanned(format, key));
            page.next_page_token
        } else {
            let page = client.list_keys(&options, token.as_deref()).await?;
            warn_partial(&page.unavailable_partitions);
            page.keys.iter().for_each(|key| print_listed(format, key));
            page.next_page_token
        };
        match (next, args.all) {
            (Some(next), true) => token = Some(next),
            (Some(next), false) => {
                match format {
                    Output::Json => println!("{}", json!({ "next_page_token": next })),
                    Output::Table => println!("(more: --page-token {next})"),
                }
                return Ok(());
            }
            (None, _) => return Ok(()),
        }
    }
}

fn warn_partial(partitions: &[u32]) {
    if !partitions.is_empty() {
        eprintln!("warning: {} partitions had no answering replica and were left out", partitions.len());
    }
}

fn listed_json(key: &ListedKey) -> Value {
    json!({
        "key": key.key,
        "sibling_count": key.sibling_count,
        "value_bytes": key.value_bytes,
        "tombstone": key.tombstone,
        "context": output::encode_context(&key.context),
    })
}

fn print_listed(format: Output, key: &ListedKey) {
    match format {
        Output::Json => println!("{}", listed_json(key)),
        Output::Table if key.tombstone => println!("{}\t(deleted)", key.key),
        Output::Table => println!("{}\t{} value(s)\t{} bytes", key.key, key.sibling_count, key.value_bytes),
    }
}

fn print_scanned(format: Output, key: &ScannedKey) {
    match format {
        Output::Json => {
            let siblings: Vec<Value> = key
                .siblings
                .iter()
                .map(|s| {
                    let (field, value) = output::value_json(&s.value);
                    json!({ field: value, "timestamp_ms": s.timestamp_ms, "expires_at_ms": s.expires_at_ms })
                })
                .collect();
            let line = json!({
                "key": key.key,
                "siblings": siblings,
                "tombstone": key.tombstone,
                "context": output::encode_context(&key.context),
            });
            println!("{line}");
        }
        Output::Table => {
            let shown: Vec<String> = key.siblings.iter().map(|s| output::display_value(&s.value)).collect();
            println!("{}\t{}", key.key, shown.join(" | "));
        }
    }
}

fn write_json(key: &str, result: &WriteResult) -> Value {
    json!({
        "key": key,
        "context": output::encode_context(&result.context),
        "version_vector": output::vector_json(&result.version_vector),
        "acks": result.acks,
        "required": result.required,
        "hinted_acks": result.hinted_acks,
        "duplicate": result.duplicate,
        "idempotency_key": result.idempotency_key,
    })
}

fn print_write(format: Output, verb: &str, key: &str, result: &WriteResult) {
    match format {
        Output::Json => output::print_json(&write_json(key, result)),
        Output::Table => {
            let duplicate = if result.duplicate { " (duplicate: stored by an earlier request)" } else { "" };
            println!("{verb} {key}{duplicate}");
            println!("context: {}", output::encode_context(&result.context));
        }
    }
}

/// Siblings oldest first (ties by value), so the listing is stable across reads.
fn ordered(result: &ReadResult) -> Vec<&pairdb_client::Sibling> {
    let mut siblings: Vec<_> = result.siblings.iter().collect();
    siblings.sort_by(|a, b| a.timestamp_ms.cmp(&b.timestamp_ms).then_with(|| a.value.cmp(&b.value)));
    siblings
}

fn read_json(key: &str, result: Option<&ReadResult>) -> Value {
    let Some(result) = result else {
        return json!({"key": key, "found": false, "siblings": [], "context": null});
    };
    let siblings: Vec<Value> = ordered(result)
        .into_iter()
        .map(|sibling| {
            let (field, value) = output::value_json(&sibling.value);
            json!({ field: value, "timestamp_ms": sibling.timestamp_ms, "expires_at_ms": sibling.expires_at_ms })
        })
        .collect();
    let mut body = json!({
        "key": key,
        "found": true,
        "siblings": siblings,
        "context": output::encode_context(&result.context),
        "version_vector": output::vector_json(&result.version_vector),
    });
    if let Some(value) = result.single_value() {
        let (field, value) = output::value_json(value);
        body[field] = value;
    }
    body
}

fn print_read(format: Output, key: &str, result: Option<&ReadResult>) {
    if format == Output::Json {
        output::print_json(&read_json(key, result));
        return;
    }
    let Some(result) = result else {
        println!("{key}: not found");
        return;
    };
    match ordered(result).as_slice() {
        [only] => println!("{key} = {}", output::display_value(&only.value)),
        siblings => {
            println!(
                "{key} has {} siblings (concurrent writes; put with this context to replace them):",
                siblings.len()
            );
            for sibling in siblings {
                println!("  {}", output::display_value(&sibling.value));
            }
        }
    }
    println!("context: {}", output::encode_context(&result.context));
}

#[cfg(test)]
mod tests {
    use pairdb_client::Sibling;

    use super::*;

    #[test]
    fn read_json_lists_siblings_oldest_first_and_value_only_when_single() {
        let sibling = |value: &[u8], timestamp_ms| Sibling {
            value: value.to_vec(),
            timestamp_ms,
            dot: None,
            expires_at_ms: None,
        };
        let two = ReadResult {
            siblings: vec![sibling(b"later", 20), sibling(b"earlier", 10)],
            context: vec![1, 2],
            version_vector: vec![(1, 2)],
        };
        let body = read_json("k", Some(&two));
        assert_eq!(body["siblings"][0]["value"], "earlier");
        assert_eq!(body["siblings"][1]["value"], "later");
        assert!(body.get("value").is_none());
        let one = ReadResult { siblings: vec![sibling(&[0xff], 1)], ..two };
        assert_eq!(read_json("k", Some(&one))["value_base64"], "/w==");
        assert_eq!(read_json("k", None)["found"], false);
    }
}
