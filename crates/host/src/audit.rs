//! Who a piece of work is done for: the API sets it around each request (a user,
//! `host:NAME`); tasks keep it for the work they run in the background, and every
//! event and task they make records it. The daemon's own loops (HA, DRS, fencing) run
//! outside any request and record nobody.

use std::future::Future;

/// The header a host's call to another names the user it acts for (recorded there,
/// believed only from a cluster host's certificate).
pub const ON_BEHALF_HEADER: &str = "x-ferry-user";

/// The header a host passing on a user's request (the web UI's calls for another host)
/// names that user with: the other host holds the request to that user's grants
/// (believed only from a cluster host's certificate).
pub const PROXIED_FOR_HEADER: &str = "x-ferry-proxied-for";
use std::sync::Arc;

tokio::task_local! {
    static ACTOR: Arc<str>;
}

/// Runs `f` on behalf of `who`.
pub async fn acting_as<F: Future>(who: &str, f: F) -> F::Output {
    ACTOR.scope(Arc::from(who), f).await
}

/// The user the current work is done for, if a request started it.
pub fn actor() -> Option<String> {
    ACTOR.try_with(|a| a.to_string()).ok()
}

/// `f` on behalf of whoever the current work is for (for work handed to a new task).
pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let who = ACTOR.try_with(|a| a.clone()).ok();
    async move {
        match who {
            Some(w) => ACTOR.scope(w, f).await,
            None => f.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_actor_follows_the_work_it_was_set_for() {
        assert_eq!(actor(), None);
        acting_as("alice", async {
            assert_eq!(actor().as_deref(), Some("alice"));
            let carried = tokio::spawn(carry(async { actor() }));
            let plain = tokio::spawn(async { actor() });
            assert_eq!(carried.await.unwrap().as_deref(), Some("alice"));
            assert_eq!(plain.await.unwrap(), None);
        })
        .await;
        assert_eq!(actor(), None);
    }
}
