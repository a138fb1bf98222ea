//! The promotion rules against a model cluster of three copies driven by random
//! sequences of promotions (some cut off before the term starts), demotions,
//! resyncs, writes without a peer, and resolves.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const HOSTS: [&str; 3] = ["h0", "h1", "h2"];

#[derive(Debug, Clone)]
enum Step {
    /// Host i asks; `claim`: 0 normal, 1 takeover from the named primary, 2 force;
    /// `cut`: the daemon dies between the record and the term.
    Promote { i: usize, claim: u8, cut: bool },
    /// Host i's term ends.
    Demote { i: usize },
    /// The primary resyncs host i (it becomes up to date in the primary's generation).
    Sync { i: usize },
    /// The primary writes while host i is away: i is outdated.
    WriteWithout { i: usize },
    /// Host i's copy starts a resync that does not finish.
    HalfSync { i: usize },
    /// The admin resolves a split brain keeping host i.
    Resolve { i: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3usize, 0..3u8, any::<bool>()).prop_map(|(i, claim, cut)| Step::Promote {
            i,
            claim,
            cut
        }),
        (0..3usize).prop_map(|i| Step::Demote { i }),
        (0..3usize).prop_map(|i| Step::Sync { i }),
        (0..3usize).prop_map(|i| Step::WriteWithout { i }),
        (0..3usize).prop_map(|i| Step::HalfSync { i }),
        (0..3usize).prop_map(|i| Step::Resolve { i }),
    ]
}

fn record() -> ReplicatedVolume {
    ReplicatedVolume {
        pool: "rp".into(),
        name: "v".into(),
        size: 1 << 20,
        hosts: HOSTS.iter().map(|h| h.to_string()).collect(),
        primary: None,
        generation: GenId {
            n: 1,
            host: "h0".into(),
        },
        promoted_from: None,
        max_n: 1,
        outdated: BTreeSet::new(),
        split_brain: None,
        disconnected: false,
    }
}

fn start_copies() -> Vec<CopyState> {
    vec![
        CopyState {
            current: Some(GenId {
                n: 1,
                host: "h0".into(),
            }),
            uptodate: true,
            term: None,
        };
        3
    ]
}

/// Runs `steps`; `force` allowed or not. Checks the invariants after every step.
fn run(steps: &[Step], allow_force: bool) -> Result<(), TestCaseError> {
    let mut r = record();
    let mut copies = start_copies();
    let mut made: BTreeSet<GenId> = [r.generation.clone()].into();
    for s in steps {
        match *s {
            Step::Promote { i, claim, cut } => {
                let claim = match claim {
                    0 => Claim::Normal,
                    1 => Claim::Takeover {
                        from: r.primary.as_deref().map_or("h9", |p| {
                            HOSTS.iter().find(|h| **h == p).copied().unwrap_or("h9")
                        }),
                    },
                    _ if allow_force => Claim::Force,
                    _ => Claim::Normal,
                };
                // A takeover only ever comes when the old primary's term is gone
                // (HA: it fenced itself and its lease is gone; migration: it
                // stopped) — the model ends it.
                if let Claim::Takeover { from } = claim {
                    if let Some(j) = HOSTS.iter().position(|h| *h == from) {
                        if j != i {
                            copies[j].term = None;
                        }
                    }
                }
                let me = HOSTS[i];
                let before = r.clone();
                match may_promote(&r, me, &copies[i], claim) {
                    Ok(Promotion::AlreadyPrimary(g)) => {
                        prop_assert_eq!(copies[i].term.as_ref(), Some(&g));
                        prop_assert_eq!(&r.generation, &g);
                    }
                    Ok(Promotion::New { generation }) => {
                        prop_assert!(
                            generation.n > before.max_n,
                            "{generation} not above {}",
                            before.max_n
                        );
                        prop_assert!(
                            made.insert(generation.clone()),
                            "generation {generation} made twice"
                        );
                        if claim != Claim::Force {
                            prop_assert!(before.split_brain.is_none());
                            prop_assert!(!before.outdated.contains(me));
                            prop_assert!(copies[i].uptodate);
                        }
                        apply(&mut r, me, &copies[i], &generation, claim == Claim::Force);
                        if cut {
                            // Recorded, but the term never started (and maybe undone).
                            if i % 2 == 0 {
                                undo(&mut r, me, &before, &generation);
                            }
                        } else {
                            copies[i].current = Some(generation.clone());
                            copies[i].term = Some(generation);
                        }
                    }
                    Err(_) => prop_assert_eq!(&r, &before),
                }
            }
            Step::Demote { i } => {
                copies[i].term = None;
                if r.primary.as_deref() == Some(HOSTS[i]) {
                    r.primary = None;
                }
            }
            Step::Sync { i } => {
                if let Some(p) = r.primary.as_deref() {
                    let j = HOSTS.iter().position(|h| *h == p).unwrap_or(0);
                    if j != i && copies[j].term.as_ref() == Some(&r.generation) {
                        copies[i].current = Some(r.generation.clone());
                        copies[i].uptodate = true;
                        r.outdated.remove(HOSTS[i]);
                    }
                }
            }
            Step::WriteWithout { i } => {
                if let Some(p) = r.primary.clone() {
                    if p != HOSTS[i] {
                        r.outdated.insert(HOSTS[i].to_string());
                    }
                }
            }
            Step::HalfSync { i } => {
                if copies[i].term.is_none() {
                    copies[i].uptodate = false;
                }
            }
            Step::Resolve { i } => {
                if r.primary.is_none() {
                    if let Some(g) = copies[i].current.clone() {
                        r.split_brain = None;
                        r.generation = g;
                        r.promoted_from = None;
                        r.outdated = HOSTS
                            .iter()
                            .filter(|h| **h != HOSTS[i])
                            .map(|h| h.to_string())
                            .collect();
                    }
                }
            }
        }
        // Never two terms in one generation.
        let terms: Vec<&GenId> = copies.iter().filter_map(|c| c.term.as_ref()).collect();
        let distinct: BTreeSet<&GenId> = terms.iter().copied().collect();
        prop_assert_eq!(
            terms.len(),
            distinct.len(),
            "two terms share a generation: {:?}",
            terms
        );
        if !allow_force {
            // At most one host writes in the record's generation, and it is the one
            // the record names.
            for (i, c) in copies.iter().enumerate() {
                if c.term.as_ref() == Some(&r.generation) {
                    prop_assert_eq!(r.primary.as_deref(), Some(HOSTS[i]));
                }
            }
            // Whoever the record names as primary in its generation holds data of
            // that generation or of the one it resumes from.
            if let Some(p) = r.primary.as_deref() {
                let j = HOSTS.iter().position(|h| *h == p).unwrap_or(0);
                let cur = copies[j].current.as_ref();
                prop_assert!(
                    cur == Some(&r.generation) || cur == r.promoted_from.as_ref(),
                    "primary {p} at {:?}, record at {}",
                    cur,
                    r.generation
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn without_force_one_writer_per_generation(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps, false)?;
    }

    #[test]
    fn even_forced_no_generation_is_made_twice(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps, true)?;
    }

    /// A refusal is what the rules say, whatever the record and copy.
    #[test]
    fn refusals_match_the_rules(
        primary in proptest::option::of(0..4usize),
        outdated in any::<bool>(),
        split in any::<bool>(),
        same_gen in any::<bool>(),
        uptodate in any::<bool>(),
    ) {
        let mut r = record();
        r.primary = primary.map(|p| ["h0", "h1", "h2", "h3"][p].to_string());
        if outdated { r.outdated.insert("h1".into()); }
        if split { r.split_brain = Some("both wrote".into()); }
        let copy = CopyState {
            current: Some(if same_gen { r.generation.clone() } else { GenId { n: 0, host: "h0".into() } }),
            uptodate,
            term: None,
        };
        let got = may_promote(&r, "h1", &copy, Claim::Normal);
        let other_primary = r.primary.as_deref().is_some_and(|p| p != "h1");
        let ok = !split && !other_primary && !outdated && same_gen && uptodate;
        prop_assert_eq!(got.is_ok(), ok, "{:?}", got);
        // Force overrides every one of them.
        prop_assert!(may_promote(&r, "h1", &copy, Claim::Force).is_ok());
    }
}

#[test]
fn a_promotion_cut_off_before_its_term_can_be_taken_up_again() {
    let mut r = record();
    let copy = start_copies().remove(0);
    let Ok(Promotion::New { generation }) = may_promote(&r, "h0", &copy, Claim::Normal) else {
        panic!("refused");
    };
    apply(&mut r, "h0", &copy, &generation, false);
    // The daemon died here: the copy is still at 1@h0, the record at 2@h0.
    let again = may_promote(&r, "h0", &copy, Claim::Normal).expect("resumed");
    assert_eq!(
        again,
        Promotion::New {
            generation: GenId {
                n: 3,
                host: "h0".into()
            }
        }
    );
    // Another host with the same data may not: the record names h0.
    let e = may_promote(&r, "h1", &copy, Claim::Normal).unwrap_err();
    assert!(e.to_string().contains("in use on h0"), "{e}");
}

#[test]
fn a_term_the_record_no_longer_names_is_refused() {
    let mut r = record();
    r.primary = Some("h2".into());
    r.generation = GenId {
        n: 7,
        host: "h2".into(),
    };
    let copy = CopyState {
        current: Some(GenId {
            n: 5,
            host: "h0".into(),
        }),
        uptodate: true,
        term: Some(GenId {
            n: 5,
            host: "h0".into(),
        }),
    };
    let e = may_promote(&r, "h0", &copy, Claim::Force).unwrap_err();
    assert!(matches!(*e, Refusal::TermSuperseded { .. }), "{e}");
}
