use super::*;
use proptest::prelude::*;

fn grant(path: &str, user: &str, role: Role) -> AclEntry {
    AclEntry {
        path: path.into(),
        user: user.into(),
        role,
    }
}

#[test]
fn the_issue_s_examples() {
    let acl = vec![
        grant("/", "olga", Role::Operator),
        grant("/", "audrey", Role::Auditor),
        grant("/vms/web1", "wendy", Role::Operator),
        grant("/pools/fast", "paul", Role::Administrator),
    ];
    let may = |u: &str, m: &str, p: &str| permits(&acl, u, &need(m, p));
    // An Operator cannot delete a pool; an Auditor cannot start a VM.
    assert!(!may("olga", "DELETE", "/api/v1/pools/local"));
    assert!(may("olga", "POST", "/api/v1/vms/db/start"));
    assert!(may("olga", "POST", "/api/v1/vms/db/migrate"));
    assert!(may("olga", "POST", "/api/v1/vms/db/snapshots"));
    assert!(may("olga", "GET", "/api/v1/vms/db/console"));
    assert!(!may("olga", "DELETE", "/api/v1/vms/db"));
    assert!(!may("olga", "POST", "/api/v1/vms"));
    assert!(!may("audrey", "POST", "/api/v1/vms/db/start"));
    assert!(may("audrey", "GET", "/api/v1/vms/db"));
    assert!(may("audrey", "GET", "/api/v1/pools"));
    assert!(!may("audrey", "GET", "/api/v1/vms/db/console"));
    // A grant on one VM: that VM, not its neighbour with a longer name, not the list.
    assert!(may("wendy", "POST", "/api/v1/vms/web1/stop"));
    assert!(!may("wendy", "POST", "/api/v1/vms/web10/stop"));
    assert!(!may("wendy", "GET", "/api/v1/vms"));
    assert!(!may("wendy", "PUT", "/api/v1/vms/web1"));
    // Through another host's proxy: the same.
    assert!(may(
        "wendy",
        "POST",
        "/api/v1/nodes/h2/api/v1/vms/web1/stop"
    ));
    assert!(!may(
        "wendy",
        "POST",
        "/api/v1/nodes/h2/api/v1/vms/web2/stop"
    ));
    assert!(may("paul", "DELETE", "/api/v1/pools/fast/volumes/x"));
    assert!(!may("paul", "DELETE", "/api/v1/pools/slow"));
    // Users and grants are administrators' (and root's) business ...
    assert!(!may("olga", "POST", "/api/v1/access/users"));
    assert!(!may("olga", "POST", "/api/v1/access/acl"));
    assert!(may("root", "POST", "/api/v1/access/acl"));
    // ... but each user's own password and tokens are its own.
    assert!(may("wendy", "PUT", "/api/v1/access/users/wendy/password"));
    assert!(may("wendy", "POST", "/api/v1/access/users/wendy/tokens"));
    assert!(may(
        "wendy",
        "DELETE",
        "/api/v1/access/users/wendy/tokens/ci"
    ));
    assert!(!may("wendy", "PUT", "/api/v1/access/users/olga/password"));
    assert!(!may("wendy", "DELETE", "/api/v1/access/users/wendy"));
    // Unknown API paths are closed; the UI, login and docs open.
    assert!(!may("olga", "POST", "/api/v2/anything"));
    assert!(!may("olga", "GET", "/api/v1/new-thing"));
    assert_eq!(need("GET", "/"), Need::Open);
    assert_eq!(need("POST", "/api/v1/login"), Need::Open);
    assert_eq!(need("GET", "/api/docs/index.html"), Need::Open);
    assert_ne!(
        need("GET", "/api/v1/nodes/h2/api/v1/nodes/h3/api/v1/vms"),
        Need::Open
    );
    assert_eq!(
        need("GET", "/api/v1/nodes/h2/ui/index.html"),
        Need::On(Privilege::Modify, "/".into())
    );
    assert_eq!(
        need("GET", "/api/v1/nodes/h2/vms"),
        Need::On(Privilege::Modify, "/".into())
    );
    // Making a host an etcd voter is between hosts (and root-level administrators);
    // the cluster's figures are the auditor's.
    assert_eq!(
        need("POST", "/api/v1/cluster/etcd/promote"),
        Need::On(Privilege::Modify, "/".into())
    );
    // Every VM's load, whatever the VM grants: hosts (DRS) only.
    assert_eq!(
        need("GET", "/api/v1/host/loads"),
        Need::On(Privilege::Modify, "/".into())
    );
    assert!(!may("audrey", "GET", "/api/v1/host/loads"));
    assert!(may("audrey", "GET", "/api/v1/host/metrics"));
    assert!(may("audrey", "GET", "/api/v1/cluster/summary"));
    assert!(may("audrey", "GET", "/api/v1/vms"));
    // A backup store names a folder of the hosts: root-level only; backups themselves
    // are the backup operator's (`/backup-stores`), never a VM grant's.
    assert_eq!(
        need("POST", "/api/v1/backup-stores"),
        Need::On(Privilege::Modify, "/".into())
    );
    assert_eq!(
        need("POST", "/api/v1/backups/b1/restore"),
        Need::On(Privilege::Modify, "/backup-stores".into())
    );
    assert_eq!(
        need("GET", "/api/v1/backups"),
        Need::On(Privilege::Audit, "/backup-stores".into())
    );
    // Listing or downloading a backup's files reads a VM's data.
    assert_eq!(
        need("GET", "/api/v1/backups/b1/files"),
        Need::On(Privilege::Modify, "/backup-stores".into())
    );
    assert_eq!(
        need("GET", "/api/v1/backups/b1/files/download"),
        Need::On(Privilege::Modify, "/backup-stores".into())
    );
    assert_eq!(
        need("GET", "/api/v1/backups/b1/index"),
        Need::On(Privilege::Modify, "/backup-stores".into())
    );
    assert_eq!(
        need("GET", "/api/v1/backup-stores/bs/chunks/ab12"),
        Need::On(Privilege::Modify, "/backup-stores".into())
    );
    assert_eq!(
        need("POST", "/api/v1/backup-stores/bs/sync"),
        Need::On(Privilege::Modify, "/".into())
    );
    assert!(!may("olga", "POST", "/api/v1/backups"));
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        Just("/vms".to_string()),
        Just("/pools".to_string()),
        Just("/cluster".to_string()),
        Just("/access".to_string()),
        "[a-c]{1,3}".prop_map(|n| format!("/vms/{n}")),
        "[a-c]{1,3}".prop_map(|n| format!("/pools/{n}")),
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Administrator),
        Just(Role::Operator),
        Just(Role::Auditor)
    ]
}

fn privilege() -> impl Strategy<Value = Privilege> {
    proptest::sample::select(Privilege::ALL.to_vec())
}

fn entry() -> impl Strategy<Value = AclEntry> {
    (path(), prop_oneof![Just("u"), Just("v")], role()).prop_map(|(p, u, r)| grant(&p, u, r))
}

proptest! {
    /// A grant only ever adds: more entries never take a privilege away.
    #[test]
    fn grants_only_add(acl in proptest::collection::vec(entry(), 0..6), extra in entry(),
                       p in privilege(), at in path()) {
        let before = allows(&acl, "u", p, &at);
        let mut more = acl.clone();
        more.push(extra);
        prop_assert!(!before || allows(&more, "u", p, &at));
    }

    /// Another user's grants never help; root needs none.
    #[test]
    fn grants_are_personal(acl in proptest::collection::vec(entry(), 0..6), p in privilege(),
                           at in path()) {
        let only_v: Vec<AclEntry> = acl.iter().filter(|e| e.user == "v").cloned().collect();
        prop_assert!(!allows(&only_v, "u", p, &at));
        prop_assert!(allows(&[], "root", p, &at));
    }

    /// Whatever an Auditor or Operator is granted, an Auditor only reads and an
    /// Operator never modifies.
    #[test]
    fn roles_bound_what_they_give(paths in proptest::collection::vec(path(), 1..4),
                                  p in privilege(), at in path()) {
        let aud: Vec<AclEntry> = paths.iter().map(|x| grant(x, "u", Role::Auditor)).collect();
        let op: Vec<AclEntry> = paths.iter().map(|x| grant(x, "u", Role::Operator)).collect();
        prop_assert!(!allows(&aud, "u", p, &at) || p == Privilege::Audit);
        prop_assert!(!allows(&op, "u", Privilege::Modify, &at));
    }

    /// A grant covers its subtree: what it gives on a path it gives below it, and a
    /// grant below a path gives nothing on the path itself.
    #[test]
    fn grants_cover_subtrees(e in entry(), p in privilege(), child in "[a-c]{1,3}") {
        let acl = vec![e.clone()];
        let below = if e.path == "/" { format!("/vms/{child}") } else { format!("{}/{child}", e.path) };
        prop_assert_eq!(allows(&acl, "u", p, &e.path), allows(&acl, "u", p, &below) && e.user == "u");
        if e.path != "/" {
            let parent = e.path.rsplit_once('/').map(|(a, _)| if a.is_empty() { "/" } else { a }).unwrap();
            prop_assert!(!allows(&acl, "u", p, parent));
        }
    }

    /// No path the router could see is open except the fixed few, and a call through
    /// the proxy needs exactly what the call itself needs.
    #[test]
    fn proxied_calls_need_what_direct_ones_do(m in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
                                             rest in "[a-z]{1,6}(/[a-z0-9]{1,6}){0,4}") {
        let direct = need(m, &format!("/api/v1/{rest}"));
        if !rest.starts_with("nodes") {
            prop_assert_eq!(need(m, &format!("/api/v1/nodes/h2/api/v1/{rest}")), direct.clone());
        }
        if direct == Need::Open {
            prop_assert!(matches!(rest.as_str(), "login" | "logout" | "session" | "openapi.json" | "cluster/members"), "{}", rest);
        }
    }
}
