//! The client against a scripted agent on a real unix socket: a guest that sends junk,
//! stale replies, errors, nothing, or endless lines.

use super::*;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

/// Serves one connection: each command line is answered by `answer` (None: silence).
fn agent(
    dir: &tempfile::TempDir,
    answer: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
) -> std::path::PathBuf {
    let path = dir.path().join("qga.sock");
    let l = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap_or(0) > 0 {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            if let Some(out) = answer(&cmd) {
                if w.write_all(&out).await.is_err() {
                    return;
                }
            }
            line.clear();
        }
    });
    path
}

fn sync_reply(cmd: &Value) -> Vec<u8> {
    let id = cmd["arguments"]["id"].as_u64().unwrap();
    // junk and a stale reply first, as a guest may have left behind
    let mut out = b"garbage{\"return\": 7}\n".to_vec();
    out.push(0xff);
    out.extend_from_slice(b"{\"return\": 1}\n");
    out.push(0xff);
    out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
    out
}

#[tokio::test]
async fn syncs_past_junk_and_stale_replies_then_answers() {
    let dir = tempfile::tempdir().unwrap();
    let p = agent(&dir, |c| match c["execute"].as_str().unwrap() {
        "guest-sync-delimited" => Some(sync_reply(c)),
        "guest-get-host-name" => {
            Some(b"{\"event\": 1}\n{\"return\": {\"host-name\": \"c1\"}}\n".to_vec())
        }
        "guest-fsfreeze-freeze" => Some(
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nothing to freeze\"}}\n"
                .to_vec(),
        ),
        _ => None,
    });
    let mut a = GuestAgent::connect(&p, None).await.unwrap();
    let h: HostName = a
        .call("guest-get-host-name", None, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(h.host_name, "c1");
    let e = a
        .execute("guest-fsfreeze-freeze", None, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing to freeze"), "{e}");
    let t = a
        .execute("guest-info", None, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(t, AgentError::Timeout { .. }), "{t}");
}

#[tokio::test]
async fn a_silent_agent_times_out_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let p = agent(&dir, |_| None);
    let e = match GuestAgent::connect(&p, None).await {
        Err(e) => e,
        Ok(_) => panic!("synced with nobody"),
    };
    assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn an_endless_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = agent(&dir, |c| match c["execute"].as_str().unwrap() {
        "guest-sync-delimited" => Some(sync_reply(c)),
        _ => Some(vec![b'x'; MAX_LINE + 10]),
    });
    let mut a = GuestAgent::connect(&p, None).await.unwrap();
    let e = a
        .execute("guest-get-osinfo", None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::TooLong), "{e}");
}

#[tokio::test]
async fn shutdown_is_accepted_by_silence_and_refused_by_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = agent(&dir, |c| match c["execute"].as_str().unwrap() {
        "guest-sync-delimited" => Some(sync_reply(c)),
        "guest-shutdown" if c["arguments"]["mode"] == "halt" => {
            Some(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n".to_vec())
        }
        _ => None,
    });
    let mut a = GuestAgent::connect(&p, None).await.unwrap();
    a.execute_silent(
        "guest-shutdown",
        Some(json!({"mode": "powerdown"})),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    assert!(a
        .execute_silent(
            "guest-shutdown",
            Some(json!({"mode": "halt"})),
            Duration::from_millis(500)
        )
        .await
        .is_err());
}

#[tokio::test]
async fn a_socket_served_by_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = agent(&dir, |c| Some(sync_reply(c)));
    let e = match GuestAgent::connect(&p, Some(1)).await {
        Err(e) => e,
        Ok(_) => panic!("accepted a peer that is not the VM's QEMU"),
    };
    assert!(matches!(e, AgentError::WrongPeer), "{e}");
    // the listener is this process: with our pid it syncs
    let dir2 = tempfile::tempdir().unwrap();
    let p2 = agent(&dir2, |c| Some(sync_reply(c)));
    let pid = i32::try_from(std::process::id()).unwrap();
    let mut a = GuestAgent::connect(&p2, Some(pid)).await.unwrap();
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_millis(10), a.reader.read(&mut buf)).await;
}
