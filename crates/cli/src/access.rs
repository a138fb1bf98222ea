//! `ferry login|logout`, `ferry user`, `ferry token`, `ferry acl`: users, their API
//! tokens, and what they may do where.
//!
//! `ferry login --server URL` keeps the ticket and the cluster CA it checked the server
//! against in `~/.config/ferry/sessions.json` (0600); later commands for that server
//! use them when no token is given.

use crate::client::{read_secret, Client};
use crate::{print_json, table, Global};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_types::{
    AclEntry, ApiToken, LoginRequest, PasswordChange, Session, TokenCreate, TokenCreated, User,
    UserCreate, UserUpdate,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// The users.
    List,
    /// Make a user (its password from --password-file or FERRY_PASSWORD; without
    /// either it logs in with tokens only until `ferry user passwd`).
    Add {
        name: String,
        #[arg(long)]
        comment: Option<String>,
        /// A file holding the password (`-`: standard input).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Delete a user with its tokens and grants.
    Delete { name: String },
    /// Set a password (default: your own; asked for when not in --password-file or
    /// FERRY_PASSWORD). Changing your own asks for the current one too.
    Passwd {
        name: Option<String>,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// A file holding the current password (your own only).
        #[arg(long)]
        current_password_file: Option<PathBuf>,
    },
    /// Disable a user: no login, its tokens stop working, its sessions end.
    Disable { name: String },
    /// Enable a user again.
    Enable { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make an API token for USER (its value is shown once).
    Create {
        user: String,
        id: String,
        /// Valid for this many days (default: until revoked).
        #[arg(long)]
        expires_days: Option<u32>,
        #[arg(long)]
        comment: Option<String>,
    },
    /// The tokens of USER (default: yours).
    List { user: Option<String> },
    /// Revoke a token at once (it stays listed).
    Revoke { user: String, id: String },
}

#[derive(Subcommand, Debug)]
pub enum AclCmd {
    /// Grant ROLE (Administrator, Operator, Auditor) on PATH (/, /vms, /vms/NAME,
    /// /pools, /pools/NAME, /cluster, /access) to USER.
    Grant {
        role: String,
        path: String,
        user: String,
    },
    /// Take a grant back.
    Revoke {
        role: String,
        path: String,
        user: String,
    },
    /// Every grant.
    List,
}

/// What `ferry login` keeps per server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub user: String,
    pub ticket: String,
    /// The cluster CA the server was checked against (PEM).
    #[serde(default)]
    pub ca: Option<String>,
}

fn sessions_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry").join("sessions.json"))
}

fn load_sessions() -> BTreeMap<String, Saved> {
    sessions_file()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn store_sessions(all: &BTreeMap<String, Saved>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let f = sessions_file().context("No home directory to keep the session in")?;
    let dir = f.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("Create {}", dir.display()))?;
    let tmp = f.with_extension("json.new");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("Write {}", tmp.display()))?;
    out.write_all(&serde_json::to_vec_pretty(all)?)?;
    std::fs::rename(&tmp, &f).with_context(|| format!("Write {}", f.display()))?;
    Ok(())
}

fn key(server: &str) -> String {
    server.trim_end_matches('/').to_string()
}

/// The session `ferry login` kept for `server`, if any.
pub fn saved(server: &str) -> Option<Saved> {
    load_sessions().remove(&key(server))
}

/// A password: from the file (or `env`), else asked on the terminal (twice when
/// `confirm`).
fn password(
    file: Option<&std::path::Path>,
    env: &str,
    prompt: &str,
    confirm: bool,
) -> Result<String> {
    if let Some(p) = read_secret(file, env)? {
        return Ok(p);
    }
    let p = rpassword::prompt_password(prompt).context("Read the password from the terminal")?;
    if confirm {
        let again = rpassword::prompt_password("Again: ").context("Read the password")?;
        if again != p {
            bail!("the passwords differ");
        }
    }
    Ok(p)
}

/// `ferry login`: a ticket for a user of the server, kept for later commands.
pub async fn login(g: &Global, user: Option<String>, password_file: Option<PathBuf>) -> Result<()> {
    let Some(server) = &g.server else {
        bail!("ferry login needs --server https://HOST:8470 (or FERRY_SERVER); on a host, root uses the local socket without logging in");
    };
    let ca = if server.starts_with("https://") {
        let path =
            g.ca.clone()
                .unwrap_or_else(|| PathBuf::from(crate::client::DEFAULT_CA));
        Some(crate::client::read_ca(&path)?)
    } else {
        None
    };
    let c = Client::with_ca_pem(server, None, ca.clone().map(|p| (p, "--ca".into())))?;
    let user = match user {
        Some(u) => u,
        None => {
            eprint!("User: ");
            let mut u = String::new();
            std::io::stdin()
                .read_line(&mut u)
                .context("Read the user name")?;
            u.trim().to_string()
        }
    };
    let pw = password(
        password_file.as_deref(),
        "FERRY_PASSWORD",
        "Password: ",
        false,
    )?;
    let s: Session = c
        .send(
            Method::POST,
            "/api/v1/login",
            &LoginRequest {
                user: Some(user.clone()),
                password: Some(pw),
                token: None,
            },
        )
        .await?;
    let ticket = s
        .ticket
        .clone()
        .context("The server answered without a ticket")?;
    let mut all = load_sessions();
    all.insert(
        key(server),
        Saved {
            user: user.clone(),
            ticket,
            ca,
        },
    );
    store_sessions(&all)?;
    if g.json {
        let mut v = serde_json::to_value(&s)?;
        v["ticket"] = Value::Null;
        return print_json(&v);
    }
    println!(
        "logged in to {} (host {}) as {user}; the ticket is valid 2 hours",
        key(server),
        s.host
    );
    Ok(())
}

/// `ferry logout`: ends the kept session of the server (its ticket is void on every
/// host from now on) and forgets it.
pub async fn logout(g: &Global) -> Result<()> {
    let Some(server) = &g.server else {
        bail!("ferry logout needs --server (or FERRY_SERVER)");
    };
    let mut all = load_sessions();
    let Some(saved) = all.remove(&key(server)) else {
        println!("no session kept for {}", key(server));
        return Ok(());
    };
    let ca = saved
        .ca
        .clone()
        .map(|p| (p, "the kept session".to_string()));
    let ended = match Client::with_ca_pem(server, Some(saved.ticket), ca) {
        Ok(c) => c
            .request::<Value>(Method::POST, "/api/v1/logout", None)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    store_sessions(&all)?;
    match ended {
        Ok(()) => println!("logged out of {}", key(server)),
        Err(e) => println!(
            "forgot the session of {} (the server did not confirm: {e:#}; the ticket expires by itself)",
            key(server)
        ),
    }
    Ok(())
}

/// Who the client is to the server.
async fn me(c: &Client) -> Result<String> {
    let s: Session = c.get("/api/v1/session").await?;
    s.user
        .context("The server does not know who this is (log in)")
}

pub async fn user(c: &Client, g: &Global, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::List => {
            let v: Vec<User> = c.get("/api/v1/access/users").await?;
            if g.json {
                return print_json(&v);
            }
            let mut t = table(&["NAME", "ENABLED", "PASSWORD", "CREATED BY", "COMMENT"]);
            for u in v {
                t.add_row(vec![
                    u.name,
                    if u.enabled { "yes" } else { "no" }.into(),
                    if u.has_password { "set" } else { "-" }.into(),
                    u.created_by,
                    u.comment,
                ]);
            }
            println!("{t}");
            Ok(())
        }
        UserCmd::Add {
            name,
            comment,
            password_file,
        } => {
            let body = UserCreate {
                name: name.clone(),
                password: read_secret(password_file.as_deref(), "FERRY_PASSWORD")?,
                comment: comment.unwrap_or_default(),
            };
            let u: User = c.send(Method::POST, "/api/v1/access/users", &body).await?;
            if g.json {
                return print_json(&u);
            }
            println!(
                "user {} made{}",
                u.name,
                if u.has_password {
                    ""
                } else {
                    " (no password: tokens only until `ferry user passwd`)"
                }
            );
            Ok(())
        }
        UserCmd::Delete { name } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/access/users/{name}"),
                    None,
                )
                .await?;
            println!("user {name} deleted, with its tokens and grants");
            Ok(())
        }
        UserCmd::Passwd {
            name,
            password_file,
            current_password_file,
        } => {
            let who = me(c).await.ok();
            let name = match name.or_else(|| who.clone()) {
                Some(n) => n,
                None => bail!("name the user"),
            };
            // The local socket's root sets any password; a user its own with the
            // current one.
            let own = who.as_deref() == Some(name.as_str()) && c.socket().is_none();
            let mut body = PasswordChange {
                password: password(
                    password_file.as_deref(),
                    "FERRY_PASSWORD",
                    &format!("New password for {name}: "),
                    true,
                )?,
                current: None,
            };
            if own {
                body.current = Some(password(
                    current_password_file.as_deref(),
                    "FERRY_CURRENT_PASSWORD",
                    "Current password: ",
                    false,
                )?);
            }
            let _: Value = c
                .send(
                    Method::PUT,
                    &format!("/api/v1/access/users/{name}/password"),
                    &body,
                )
                .await?;
            println!("password of {name} set; its sessions ended");
            Ok(())
        }
        UserCmd::Disable { name } => set_enabled(c, g, &name, false).await,
        UserCmd::Enable { name } => set_enabled(c, g, &name, true).await,
    }
}

async fn set_enabled(c: &Client, g: &Global, name: &str, on: bool) -> Result<()> {
    let u: User = c
        .send(
            Method::PUT,
            &format!("/api/v1/access/users/{name}"),
            &UserUpdate {
                enabled: Some(on),
                ..Default::default()
            },
        )
        .await?;
    if g.json {
        return print_json(&u);
    }
    println!("user {name} {}", if on { "enabled" } else { "disabled" });
    Ok(())
}

fn when(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format!("{}", m / 1000))
}

pub async fn token(c: &Client, g: &Global, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            user,
            id,
            expires_days,
            comment,
        } => {
            let body = TokenCreate {
                id: id.clone(),
                expires_days,
                comment: comment.unwrap_or_default(),
            };
            let t: TokenCreated = c
                .send(
                    Method::POST,
                    &format!("/api/v1/access/users/{user}/tokens"),
                    &body,
                )
                .await?;
            if g.json {
                return print_json(&t);
            }
            eprintln!(
                "token {user}!{id} made{}; its value, shown only now (send it as `Authorization: Bearer VALUE`, or keep it in a file for --token-file):",
                t.token
                    .expires_ms
                    .map(|e| format!(", valid until {} (Unix time)", e / 1000))
                    .unwrap_or_default()
            );
            println!("{}", t.value);
            Ok(())
        }
        TokenCmd::List { user } => {
            let user = match user {
                Some(u) => u,
                None => me(c).await?,
            };
            let v: Vec<ApiToken> = c
                .get(&format!("/api/v1/access/users/{user}/tokens"))
                .await?;
            if g.json {
                return print_json(&v);
            }
            let mut t = table(&["TOKEN", "EXPIRES", "REVOKED", "CREATED BY", "COMMENT"]);
            for k in v {
                t.add_row(vec![
                    format!("{}!{}", k.user, k.id),
                    when(k.expires_ms),
                    when(k.revoked_ms),
                    k.created_by,
                    k.comment,
                ]);
            }
            println!("{t}");
            Ok(())
        }
        TokenCmd::Revoke { user, id } => {
            let t: ApiToken = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/access/users/{user}/tokens/{id}"),
                    None,
                )
                .await?;
            if g.json {
                return print_json(&t);
            }
            println!("token {user}!{id} revoked");
            Ok(())
        }
    }
}

fn entry(role: &str, path: String, user: String) -> Result<AclEntry> {
    let role = ferry_types::Role::parse(role)
        .with_context(|| format!("role {role}: give Administrator, Operator or Auditor"))?;
    Ok(AclEntry { path, user, role })
}

pub async fn acl(c: &Client, g: &Global, cmd: AclCmd) -> Result<()> {
    let (path, body, what) = match cmd {
        AclCmd::List => {
            let v: Vec<AclEntry> = c.get("/api/v1/access/acl").await?;
            if g.json {
                return print_json(&v);
            }
            let mut t = table(&["PATH", "USER", "ROLE"]);
            for e in v {
                t.add_row(vec![e.path, e.user, e.role.as_str().to_string()]);
            }
            println!("{t}");
            return Ok(());
        }
        AclCmd::Grant { role, path, user } => (
            "/api/v1/access/acl",
            entry(&role, path, user)?,
            "granted to",
        ),
        AclCmd::Revoke { role, path, user } => (
            "/api/v1/access/acl/revoke",
            entry(&role, path, user)?,
            "taken from",
        ),
    };
    let v: Vec<AclEntry> = c
        .request(Method::POST, path, Some(&serde_json::to_value(&body)?))
        .await?;
    if g.json {
        return print_json(&v);
    }
    println!(
        "{} {what} {} on {}",
        body.role.as_str(),
        body.user,
        body.path
    );
    Ok(())
}
