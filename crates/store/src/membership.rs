//! Changes to an etcd cluster's membership: listing, adding and removing members,
//! each retried while etcd answers "unhealthy cluster" (it does until the member added
//! last has been connected a while). Who may talk to etcd is [`crate::member::access`].

use crate::EtcdTls;
use etcd_client::{Client, ConnectOptions, Error};
use std::time::Duration;

/// A member as etcd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Empty for a member added but not started yet.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// A learner does not vote.
    pub learner: bool,
}

fn members(list: &[etcd_client::Member]) -> Vec<Member> {
    list.iter()
        .map(|m| Member {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            learner: m.is_learner(),
        })
        .collect()
}

/// Every member.
pub async fn list(client: &Client) -> Result<Vec<Member>, Error> {
    let r = client.clone().member_list().await?;
    Ok(members(r.members()))
}

/// Adds a voting member at `peer_url`; every member afterwards (the new one unnamed).
pub async fn add(client: &Client, peer_url: &str) -> Result<Vec<Member>, Error> {
    let r = while_unhealthy(|| {
        let mut c = client.clone();
        let peer = peer_url.to_string();
        async move { c.member_add([peer.as_str()], None).await }
    })
    .await?;
    Ok(members(r.member_list()))
}

/// Removes member `id`.
pub async fn remove(client: &Client, id: u64) -> Result<(), Error> {
    while_unhealthy(|| {
        let mut c = client.clone();
        async move { c.member_remove(id).await }
    })
    .await
    .map(|_| ())
}

/// Promotes learner `id` to a voter, asking the leader itself: a follower forwards a
/// promotion to the leader without the caller's identity, and with auth on the leader
/// refuses it ("auth: user name is empty"; etcd issue #20757, unfixed in Debian 12's
/// etcd), so a promotion that reached a follower only ever timed out.
pub async fn promote(client: &Client, id: u64, tls: Option<&EtcdTls>) -> Result<(), Error> {
    let leader = leader(client).await;
    let urls = list(client)
        .await?
        .into_iter()
        .find(|m| m.id == leader && leader != 0)
        .map(|m| m.client_urls)
        .unwrap_or_default();
    if urls.is_empty() {
        return Err(Error::InvalidArgs(format!(
            "etcd names no leader to promote member {id:x}"
        )));
    }
    let asked = connect_for(&urls, tls, Duration::from_secs(10))
        .await?
        .member_promote(id)
        .await;
    match asked {
        Ok(_) => Ok(()),
        // A promotion whose answer was lost: the member votes already.
        Err(e) => match list(client).await {
            Ok(l) if l.iter().any(|m| m.id == id && !m.learner) => Ok(()),
            _ => Err(e),
        },
    }
}

/// The id of the member etcd says leads (0 when it cannot say).
pub async fn leader(client: &Client) -> u64 {
    client
        .clone()
        .status()
        .await
        .map(|s| s.leader())
        .unwrap_or(0)
}

/// A client of the members at `urls` (with the host's certificate on https).
pub async fn connect(urls: &[String], tls: Option<&EtcdTls>) -> Result<Client, Error> {
    // Generous: a removal waits for the cluster's commit (each call is retried while
    // etcd says "unhealthy cluster").
    connect_for(urls, tls, Duration::from_secs(30)).await
}

/// [`connect`] with calls given up after `timeout`.
async fn connect_for(
    urls: &[String],
    tls: Option<&EtcdTls>,
    timeout: Duration,
) -> Result<Client, Error> {
    let opts = crate::etcd::with_tls(
        ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(Duration::from_secs(5)),
        urls.first().map(String::as_str).unwrap_or(""),
        tls,
    );
    Client::connect(urls, Some(opts)).await
}

/// Runs a membership change, retrying for up to 30 s while etcd refuses it as
/// "unhealthy cluster".
pub async fn while_unhealthy<T, F, Fut>(mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if tries < 60 && e.to_string().contains("unhealthy cluster") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}
