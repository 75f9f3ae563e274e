//! `pairdb kv`: put, get and delete through a router. Siblings are listed oldest first, and the context
//! is printed so it can be passed back with `--context` to replace what was read.

use pairdb_client::{ReadOptions, ReadResult, WriteOptions, WriteResult};
use serde_json::{Value, json};

use crate::cli::{Globals, KvCommand};
use crate::output::{self, Output};

pub async fn run(globals: &Globals, command: KvCommand) -> anyhow::Result<()> {
    let client = globals.kv().await?;
    match command {
        KvCommand::Put { key, value, file, consistency, context, overwrite, idempotency_key } => {
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
                ..WriteOptions::default()
            };
            let result = client.put(&key, value, options).await?;
            print_write(globals.output, "stored", &key, &result);
        }
        KvCommand::Get { key, consistency } => {
            let options =
                ReadOptions { consistency: crate::cli::consistency(consistency), ..ReadOptions::default() };
            let result = client.get(&key, options).await?;
            print_read(globals.output, &key, result.as_ref());
        }
        KvCommand::Delete { key, consistency, context, idempotency_key } => {
            let options = WriteOptions {
                consistency: crate::cli::consistency(consistency),
                context: context.as_deref().map(output::decode_context).transpose()?.unwrap_or_default(),
                idempotency_key,
                ..WriteOptions::default()
            };
            let result = client.delete(&key, options).await?;
            print_write(globals.output, "deleted", &key, &result);
        }
    }
    Ok(())
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
            json!({ field: value, "timestamp_ms": sibling.timestamp_ms })
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
        let sibling = |value: &[u8], timestamp_ms| Sibling { value: value.to_vec(), timestamp_ms, dot: None };
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
