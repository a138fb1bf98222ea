//! The client against an in-process fake QMP server that interleaves events and replies.

use super::*;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixListener;

/// A fake QEMU: greets, then answers each command through `respond`, which returns the
/// lines to send (events, replies in any order).
async fn fake(
    respond: impl Fn(&Value) -> Vec<Value> + Send + 'static,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = s.into_split();
        wr.write_all(
            b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10}}, \"capabilities\": []}}\r\n",
        )
        .await
        .unwrap();
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&l).unwrap();
            for out in respond(&cmd) {
                if out == json!("CLOSE") {
                    return;
                }
                wr.write_all(format!("{out}\r\n").as_bytes()).await.unwrap();
            }
        }
    });
    (dir, path)
}

fn ret(cmd: &Value, v: Value) -> Value {
    json!({"return": v, "id": cmd["id"]})
}

#[tokio::test]
async fn execute_reply_after_event_matched_by_id() {
    let (_d, path) = fake(|cmd| match cmd["execute"].as_str().unwrap() {
        "quit" => vec![
            json!({"event": "SHUTDOWN", "data": {"guest": false}, "timestamp": {"seconds": 1, "microseconds": 2}}),
            ret(cmd, json!({})),
        ],
        _ => vec![ret(cmd, json!({}))],
    })
    .await;
    let q = Qmp::connect(&path).await.unwrap();
    let mut ev = q.events();
    q.execute("quit", None).await.unwrap();
    let e = ev.recv().await.unwrap();
    assert_eq!(e.name, "SHUTDOWN");
    assert_eq!(e.data["guest"], json!(false));
}

#[tokio::test]
async fn concurrent_commands_answered_out_of_order() {
    // "slow" is only answered together with the next command, after that one's reply.
    let held = Arc::new(Mutex::new(None::<Value>));
    let (_d, path) = fake(move |cmd| {
        let mut h = held.lock().unwrap();
        match cmd["execute"].as_str().unwrap() {
            "slow" => {
                *h = Some(ret(cmd, json!("slow-result")));
                vec![]
            }
            "fast" => {
                let mut v = vec![ret(cmd, json!("fast-result"))];
                v.extend(h.take());
                v
            }
            _ => vec![ret(cmd, json!({}))],
        }
    })
    .await;
    let q = Qmp::connect(&path).await.unwrap();
    let q2 = q.clone();
    let slow = tokio::spawn(async move { q2.execute("slow", None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = q.execute("fast", None).await.unwrap();
    assert_eq!(fast, json!("fast-result"));
    assert_eq!(slow.await.unwrap().unwrap(), json!("slow-result"));
}

#[tokio::test]
async fn command_error_carries_class_and_desc() {
    let (_d, path) = fake(|cmd| match cmd["execute"].as_str().unwrap() {
        "qmp_capabilities" => vec![ret(cmd, json!({}))],
        _ => vec![json!({"id": cmd["id"], "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})],
    })
    .await;
    let q = Qmp::connect(&path).await.unwrap();
    match q.execute("nope", None).await {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("nope"));
        }
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn unanswered_command_times_out() {
    let (_d, path) = fake(|cmd| match cmd["execute"].as_str().unwrap() {
        "qmp_capabilities" => vec![ret(cmd, json!({}))],
        _ => vec![],
    })
    .await;
    let q = Qmp::connect(&path)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(100));
    assert!(matches!(
        q.execute("hang", None).await,
        Err(QmpError::Timeout { .. })
    ));
}

#[tokio::test]
async fn server_close_wakes_waiters_and_closed() {
    let (_d, path) = fake(|cmd| match cmd["execute"].as_str().unwrap() {
        "qmp_capabilities" => vec![ret(cmd, json!({}))],
        _ => vec![json!("CLOSE")],
    })
    .await;
    let q = Qmp::connect(&path).await.unwrap();
    let e = q.execute("die", None).await.unwrap_err();
    assert!(e.should_reconnect(), "{e:?}");
    tokio::time::timeout(Duration::from_secs(2), q.closed())
        .await
        .unwrap();
    assert!(q.is_closed());
    assert!(matches!(
        q.execute("again", None).await,
        Err(QmpError::Closed)
    ));
}

#[tokio::test]
async fn garbage_lines_are_skipped() {
    let (_d, path) =
        fake(|cmd| vec![json!("not qmp"), json!({"weird": true}), ret(cmd, json!(5))]).await;
    let q = Qmp::connect(&path).await.unwrap();
    assert_eq!(q.call::<u32>("x", None).await.unwrap(), 5);
}

#[tokio::test]
async fn connect_retry_gives_up_with_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Qmp::connect_retry(dir.path().join("none.sock"), Duration::from_millis(100))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, QmpError::Connect { .. }));
}
