//! May this host become the primary of a replicated volume? Decided from the
//! cluster's record and this host's copy, sans-IO; the caller commits the answer by
//! compare-and-swap on the record ([`apply`]) and only then starts the term.
//!
//! What must never happen: two hosts writing in one generation, or a copy that
//! misses writes becoming the one that writes. So, unless the admin forces it: no
//! promotion in a split brain, none while another host is named primary (except the
//! one being taken over from), none from an outdated, stale, half-synced or empty
//! copy; and every promotion makes a generation no one made before.

use ferry_types::{GenId, ReplicatedVolume};

/// What this host knows of its copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyState {
    /// The generation its data belongs to (none: never synced).
    pub current: Option<GenId>,
    /// Its last resync finished.
    pub uptodate: bool,
    /// The generation of a term this host still holds (a primary not stopped).
    pub term: Option<GenId>,
}

/// On what grounds this host asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim<'a> {
    /// A start here: no other host may be named primary.
    Normal,
    /// Taking over from `from`, which may still be named primary: a host HA fenced
    /// (the caller makes its lease's absence part of the compare-and-swap) or a
    /// migration's source handing over.
    Takeover { from: &'a str },
    /// The admin's word (`ferry volume promote --force`): every safety check off.
    Force,
}

/// The answer when promotion may go ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// This host's running term is the volume's: nothing to change.
    AlreadyPrimary(GenId),
    /// Record `generation` with this host as primary, then start the term.
    New { generation: GenId },
}

/// Why not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{volume} is in split brain ({reason}); pick the copy to keep with `ferry volume resolve {pool} {name} --keep HOST`")]
    SplitBrain {
        volume: String,
        pool: String,
        name: String,
        reason: String,
    },
    #[error("{volume} is in use on {primary}")]
    InUse { volume: String, primary: String },
    #[error("the copy of {volume} on {me} is outdated (a primary wrote without it); start where an up-to-date copy is ({up_to_date})")]
    Outdated {
        volume: String,
        me: String,
        up_to_date: String,
    },
    #[error("the copy of {volume} on {me} is stale (generation {mine}, the volume is at {record}); start where an up-to-date copy is ({up_to_date})")]
    Stale {
        volume: String,
        me: String,
        mine: String,
        record: GenId,
        up_to_date: String,
    },
    #[error("the copy of {volume} on {me} is not up to date (a resync did not finish)")]
    NotUpToDate { volume: String, me: String },
    #[error("{me}'s term {term} on {volume} is no longer the volume's (it is at {record}, primary {primary}); stop what writes there")]
    TermSuperseded {
        volume: String,
        me: String,
        term: GenId,
        record: GenId,
        primary: String,
    },
}

/// The hosts whose copy is not outdated, for the messages.
pub fn up_to_date_hosts(r: &ReplicatedVolume) -> String {
    let v: Vec<&str> = r
        .hosts
        .iter()
        .filter(|h| !r.outdated.contains(*h))
        .map(String::as_str)
        .collect();
    v.join(", ")
}

/// Decides whether `me` may become primary of `r`.
pub fn may_promote(
    r: &ReplicatedVolume,
    me: &str,
    copy: &CopyState,
    claim: Claim<'_>,
) -> Result<Promotion, Box<Refusal>> {
    let volume = format!("{}/{}", r.pool, r.name);
    let force = claim == Claim::Force;
    if let Some(term) = &copy.term {
        if r.primary.as_deref() == Some(me) && &r.generation == term {
            return Ok(Promotion::AlreadyPrimary(term.clone()));
        }
        // A term the record no longer names must end before anything else here.
        return Err(Box::new(Refusal::TermSuperseded {
            volume,
            me: me.to_string(),
            term: term.clone(),
            record: r.generation.clone(),
            primary: r.primary.clone().unwrap_or_else(|| "none".into()),
        }));
    }
    if !force {
        if let Some(reason) = &r.split_brain {
            return Err(Box::new(Refusal::SplitBrain {
                volume,
                pool: r.pool.clone(),
                name: r.name.clone(),
                reason: reason.clone(),
            }));
        }
        if let Some(p) = &r.primary {
            let from = match claim {
                Claim::Takeover { from } => Some(from),
                _ => None,
            };
            if p != me && Some(p.as_str()) != from {
                return Err(Box::new(Refusal::InUse {
                    volume,
                    primary: p.clone(),
                }));
            }
        }
        if r.outdated.contains(me) {
            return Err(Box::new(Refusal::Outdated {
                volume,
                me: me.to_string(),
                up_to_date: up_to_date_hosts(r),
            }));
        }
        // This host's own promotion, recorded but cut off before its copy took the
        // new generation, may be taken up again from where its copy is.
        let resumed = r.primary.as_deref() == Some(me)
            && r.generation.host == me
            && copy.current.is_some()
            && copy.current == r.promoted_from;
        if copy.current.as_ref() != Some(&r.generation) && !resumed {
            return Err(Box::new(Refusal::Stale {
                volume,
                me: me.to_string(),
                mine: copy
                    .current
                    .as_ref()
                    .map_or_else(|| "none".into(), GenId::to_string),
                record: r.generation.clone(),
                up_to_date: up_to_date_hosts(r),
            }));
        }
        if !copy.uptodate {
            return Err(Box::new(Refusal::NotUpToDate {
                volume,
                me: me.to_string(),
            }));
        }
    }
    let n = r
        .generation
        .n
        .max(r.max_n)
        .max(copy.current.as_ref().map_or(0, |g| g.n))
        + 1;
    Ok(Promotion::New {
        generation: GenId {
            n,
            host: me.to_string(),
        },
    })
}

/// Writes a [`Promotion::New`] into the record (what the compare-and-swap commits).
pub fn apply(
    r: &mut ReplicatedVolume,
    me: &str,
    copy: &CopyState,
    generation: &GenId,
    force: bool,
) {
    r.promoted_from = copy.current.clone();
    r.primary = Some(me.to_string());
    r.max_n = r.max_n.max(generation.n);
    r.generation = generation.clone();
    if force {
        r.outdated.remove(me);
    }
}

/// Undoes [`apply`] after the term could not start, if the record still holds it:
/// the generation no copy took goes, so the copies are not all stale.
pub fn undo(r: &mut ReplicatedVolume, me: &str, before: &ReplicatedVolume, generation: &GenId) {
    if r.primary.as_deref() == Some(me) && &r.generation == generation {
        r.primary = before.primary.clone();
        r.generation = before.generation.clone();
        r.promoted_from = before.promoted_from.clone();
        r.outdated = before.outdated.clone();
        // max_n stays: the number was used.
    }
}

#[cfg(test)]
mod tests;
