//! SQS's naming rules and limits, as kombu applies them: a leaf (it
//! imports nothing of taskgate's), so configuration checks, the publisher
//! and the tracking consumer share one spelling of each rule.

/// Longest SQS queue name, `.fifo` included.
pub const MAX_QUEUE_NAME_CHARS: usize = 80;
/// Longest `MessageGroupId` / `MessageDeduplicationId`.
pub const MAX_MESSAGE_ID_CHARS: usize = 128;

const FIFO_SUFFIX: &str = ".fifo";

/// kombu's `entity_name(queue_name_prefix + name)`: `.` becomes `-`, other
/// ASCII punctuation except `-` and `_` becomes `_`, and a `.fifo` suffix
/// is kept as it is.
pub fn sqs_queue_name(prefix: &str, queue: &str) -> String {
    let full = format!("{prefix}{queue}");
    let (stem, suffix) = match full.strip_suffix(FIFO_SUFFIX) {
        Some(stem) => (stem, FIFO_SUFFIX),
        None => (full.as_str(), ""),
    };
    let translated: String = stem
        .chars()
        .map(|c| match c {
            '.' => '-',
            '-' | '_' => c,
            c if c.is_ascii_punctuation() => '_',
            c => c,
        })
        .collect();
    translated + suffix
}

/// Whether an SQS queue name denotes a FIFO queue.
pub fn is_fifo(sqs_name: &str) -> bool {
    sqs_name.ends_with(FIFO_SUFFIX)
}

/// Checks a name [`sqs_queue_name`] produced against SQS's rules: 1 to 80
/// characters, ASCII letters, digits, `-` and `_`, plus a `.fifo` suffix.
pub fn validate_sqs_queue_name(sqs_name: &str) -> Result<(), String> {
    let stem = sqs_name.strip_suffix(FIFO_SUFFIX).unwrap_or(sqs_name);
    if stem.is_empty() || sqs_name.chars().count() > MAX_QUEUE_NAME_CHARS {
        return Err(format!(
            "SQS queue name {sqs_name:?} must be 1 to {MAX_QUEUE_NAME_CHARS} characters long"
        ));
    }
    if let Some(bad) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(format!(
            "SQS queue name {sqs_name:?} contains {bad:?}; SQS allows only ASCII letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Whether `text` may be a `MessageGroupId` or `MessageDeduplicationId`:
/// 1 to 128 ASCII letters, digits or punctuation.
pub fn is_valid_message_id(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_MESSAGE_ID_CHARS && text.bytes().all(|b| b.is_ascii_graphic())
}
