//! Parsing of the lines QEMU sends on a QMP socket.

use serde_json::Value;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Value),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event {
        name: String,
        data: Value,
        timestamp_us: u64,
    },
}

/// Parses one line; `None` for anything that is not a QMP message (garbage is skipped, never
/// fatal).
pub fn parse_message(line: &str) -> Option<Message> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let obj = v.as_object()?;
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(g) = obj.get("QMP") {
        return Some(Message::Greeting(g.clone()));
    }
    if let Some(r) = obj.get("return") {
        return Some(Message::Return {
            id,
            value: r.clone(),
        });
    }
    if let Some(e) = obj.get("error") {
        return Some(Message::Error {
            id,
            class: e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("GenericError")
                .to_string(),
            desc: e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        let ts = obj.get("timestamp");
        let secs = ts
            .and_then(|t| t.get("seconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let us = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        return Some(Message::Event {
            name: name.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: secs.saturating_mul(1_000_000).saturating_add(us),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reply_error_event_greeting() {
        assert!(matches!(
            parse_message(r#"{"QMP": {"version": {}, "capabilities": []}}"#),
            Some(Message::Greeting(_))
        ));
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 7}"#),
            Some(Message::Return {
                id: Some(7),
                value: serde_json::json!({})
            })
        );
        assert_eq!(
            parse_message(r#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "nope"}}"#),
            Some(Message::Error {
                id: Some(3),
                class: "CommandNotFound".into(),
                desc: "nope".into()
            })
        );
        match parse_message(r#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "STOP"}"#)
        {
            Some(Message::Event {
                name, timestamp_us, ..
            }) => {
                assert_eq!(name, "STOP");
                assert_eq!(timestamp_us, 2_000_005);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn parse_garbage_is_none() {
        for l in ["", "{", "[]", "42", r#"{"foo": 1}"#, "\u{0}\u{1}"] {
            assert_eq!(parse_message(l), None, "{l:?}");
        }
    }
}
