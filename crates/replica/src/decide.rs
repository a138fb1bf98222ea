//! What happens when a primary meets a peer's copy, decided from both generation
//! histories, sans-IO. DRBD's lesson (and Ganeti users' data loss): never throw away
//! writes automatically. A copy behind the primary is resynced (by bitmap when the
//! primary's bitmap starts where the peer stopped, else in full); a primary whose data
//! is older than the peer's is refused; two copies that both took writes the other
//! lacks are a split brain, reported and left for the admin to resolve.

use ferry_types::GenId;

/// What one side knows about itself.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub host: &'a str,
    pub history: &'a [GenId],
    pub uptodate: bool,
    /// While not up to date: the generation of the primary it was syncing from.
    pub sync_source: Option<&'a GenId>,
    /// This side's bitmap for the other side: the other's generation it starts at.
    pub bitmap_base: Option<&'a GenId>,
    /// That bitmap has bits set (this side wrote what the other lacks).
    pub bitmap_dirty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Copy the regions in the primary's bitmap for the peer plus both activity logs
    /// (possibly nothing), then the peer is up to date.
    Bitmap,
    /// Copy everything.
    Full(String),
    /// The primary's data is older than the peer's: it must not write.
    StalePrimary(String),
    /// Both took writes the other lacks.
    SplitBrain(String),
}

pub fn decide(p: &Side, s: &Side) -> Decision {
    let Some(pc) = p.history.last() else {
        return Decision::StalePrimary(format!("{} has no generation", p.host));
    };
    let Some(sc) = s.history.last() else {
        return Decision::Full(format!("{} has a new, empty copy", s.host));
    };
    if sc == pc {
        if !s.uptodate && s.sync_source != Some(pc) {
            return Decision::Full(format!(
                "{} was cut off in a resync from another source",
                s.host
            ));
        }
        return if p.bitmap_base == Some(sc) {
            Decision::Bitmap
        } else {
            Decision::Full(format!("{} keeps no bitmap for {}", p.host, s.host))
        };
    }
    if p.history.contains(sc) {
        // The peer is behind. Did it write while cut off (it was primary of `sc`)?
        if sc.host == s.host && s.bitmap_dirty {
            return Decision::SplitBrain(format!(
                "{} wrote in generation {sc} without {}, which went on to generation {pc}",
                s.host, p.host
            ));
        }
        let resumable = s.uptodate || s.sync_source == Some(pc);
        return if resumable && p.bitmap_base == Some(sc) {
            Decision::Bitmap
        } else {
            Decision::Full(format!(
                "{} is at generation {sc}; {} has no bitmap from there",
                s.host, p.host
            ))
        };
    }
    if s.history.contains(pc) {
        if p.bitmap_dirty {
            return Decision::SplitBrain(format!(
                "{} wrote in generation {pc} without {}, which went on to generation {sc}",
                p.host, s.host
            ));
        }
        return Decision::StalePrimary(format!(
            "{}'s copy is at generation {pc}, {} has the newer generation {sc}",
            p.host, s.host
        ));
    }
    let common = p
        .history
        .iter()
        .rev()
        .find(|g| s.history.contains(g))
        .map(|g| g.to_string())
        .unwrap_or_else(|| "nothing".into());
    Decision::SplitBrain(format!(
        "{} (generation {pc}) and {} (generation {sc}) both went on after generation {common}",
        p.host, s.host
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u64, h: &str) -> GenId {
        GenId { n, host: h.into() }
    }

    fn side<'a>(host: &'a str, history: &'a [GenId]) -> Side<'a> {
        Side {
            host,
            history,
            uptodate: true,
            sync_source: None,
            bitmap_base: None,
            bitmap_dirty: false,
        }
    }

    #[test]
    fn peer_in_the_same_generation_resyncs_by_bitmap() {
        let h = [g(1, "a"), g(2, "a")];
        let p = Side {
            bitmap_base: Some(&h[1]),
            ..side("a", &h)
        };
        assert_eq!(decide(&p, &side("b", &h)), Decision::Bitmap);
        // no valid bitmap: full
        assert!(matches!(
            decide(&side("a", &h), &side("b", &h)),
            Decision::Full(_)
        ));
        // a peer cut off in a resync from elsewhere: full
        let other = g(2, "c");
        let s = Side {
            uptodate: false,
            sync_source: Some(&other),
            ..side("b", &h)
        };
        assert!(matches!(decide(&p, &s), Decision::Full(_)));
        // ... from this primary: resume by bitmap
        let s = Side {
            uptodate: false,
            sync_source: Some(&h[1]),
            ..side("b", &h)
        };
        assert_eq!(decide(&p, &s), Decision::Bitmap);
    }

    #[test]
    fn peer_behind() {
        let ph = [g(1, "a"), g(2, "b")];
        let sh = [g(1, "a")];
        let p = Side {
            bitmap_base: Some(&sh[0]),
            ..side("b", &ph)
        };
        assert_eq!(decide(&p, &side("a", &sh)), Decision::Bitmap);
        // the old primary had written without b: split brain
        let s = Side {
            bitmap_dirty: true,
            ..side("a", &sh)
        };
        assert!(matches!(decide(&p, &s), Decision::SplitBrain(_)));
        // a secondary of generation 1 with stale bits from long ago: not split brain
        let sh2 = [g(1, "c")];
        let ph2 = [g(1, "c"), g(2, "b")];
        let p2 = Side {
            bitmap_base: Some(&sh2[0]),
            ..side("b", &ph2)
        };
        let s2 = Side {
            bitmap_dirty: true,
            ..side("a", &sh2)
        };
        assert_eq!(decide(&p2, &s2), Decision::Bitmap);
        // a new copy: full
        assert!(matches!(decide(&p, &side("c", &[])), Decision::Full(_)));
    }

    #[test]
    fn stale_primary_and_split_brain() {
        let old = [g(1, "a")];
        let new = [g(1, "a"), g(2, "b")];
        assert!(matches!(
            decide(&side("a", &old), &side("b", &new)),
            Decision::StalePrimary(_)
        ));
        let dirty = Side {
            bitmap_dirty: true,
            ..side("a", &old)
        };
        assert!(matches!(
            decide(&dirty, &side("b", &new)),
            Decision::SplitBrain(_)
        ));
        let a = [g(1, "a"), g(2, "a")];
        let b = [g(1, "a"), g(2, "b")];
        match decide(&side("a", &a), &side("b", &b)) {
            Decision::SplitBrain(m) => assert!(m.contains("after generation 1@a"), "{m}"),
            d => panic!("{d:?}"),
        }
        assert!(matches!(
            decide(&side("a", &[]), &side("b", &b)),
            Decision::StalePrimary(_)
        ));
    }
}
