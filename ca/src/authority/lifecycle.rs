//! The authority lifecycle as pure functions: which rotation steps are due ([`plan`]) and
//! which state changes an operator's request makes ([`transition`]).

use std::time::SystemTime;

use super::{AuthorityState, Kind, View};
use crate::error::ApiError;

/// Lifecycle step chosen by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and publish a successor.
    Prepare,
    /// Make the prepared authority `0` active; the current active becomes old.
    Activate(String),
    /// Forget the expired authority `0` (old, tainted or revoked).
    Drop(String),
}

/// Lifetime fractions at which rotation steps happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Rotate on the schedule at all.
    pub automatic: bool,
    /// Fraction of the active authority's lifetime at which a successor is prepared.
    pub prepare_at: f64,
    /// Fraction at which the successor becomes active.
    pub activate_at: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        let r = crate::config::RotationConfig::default();
        Self {
            automatic: r.automatic,
            prepare_at: r.prepare_at,
            activate_at: r.activate_at,
        }
    }
}

/// Decides the rotation steps due at `now`. Pure. With no active authority (an empty store) the
/// first one is prepared and activated even when the schedule is not automatic.
pub fn plan(authorities: &[View], schedule: Schedule, now: SystemTime) -> Vec<Step> {
    use AuthorityState::*;
    let mut steps = Vec::new();
    for a in authorities {
        if matches!(a.state, Old | Tainted | Revoked) && a.not_after <= now {
            steps.push(Step::Drop(a.id.clone()));
        }
    }
    let active = authorities.iter().find(|a| a.state == Active);
    let prepared = authorities.iter().find(|a| a.state == Prepared);
    let Some(active) = active else {
        match prepared {
            Some(p) => steps.push(Step::Activate(p.id.clone())),
            None => steps.push(Step::Prepare),
        }
        return steps;
    };
    if !schedule.automatic {
        return steps;
    }
    let life = active
        .not_after
        .duration_since(active.not_before)
        .unwrap_or_default();
    let at = |f: f64| active.not_before + life.mul_f64(f);
    match prepared {
        None if now >= at(schedule.prepare_at) => steps.push(Step::Prepare),
        Some(p) if now >= at(schedule.activate_at) => {
            // A successor must be published for as long as the schedule intends (prepare_at →
            // activate_at) before it signs, so every peer holds its root first — unless the
            // active authority is about to expire (after an outage, or a late prepare).
            let gap = life.mul_f64(schedule.activate_at - schedule.prepare_at);
            let deadline = active.not_after - life.mul_f64((1.0 - schedule.activate_at) / 2.0);
            if now >= p.not_before + gap || now >= deadline {
                steps.push(Step::Activate(p.id.clone()));
            }
        }
        _ => {}
    }
    steps
}

/// A state change an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a successor (published, not signing).
    Prepare,
    /// Make the prepared authority (the named one, or the only one) active.
    Activate(Option<String>),
    /// Have agents replace everything the authority signed, at once.
    Taint(String),
    /// Remove the authority from the bundle.
    Revoke(String),
}

/// Checks an operator's `op` against the lifecycle rules and returns the state changes it makes
/// (none for `Prepare`, which creates an authority). Pure; the rails that need the store (live
/// SVIDs) or crypto (a usable root) are checked by [`Authorities::operate`].
pub fn transition(
    kind: Kind,
    authorities: &[View],
    op: &Op,
) -> Result<Vec<(String, AuthorityState)>, ApiError> {
    use AuthorityState::*;
    let k = kind.as_str();
    let find = |id: &str| {
        authorities.iter().find(|a| a.id == id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no {k} authority {id:?} (see `ward-ca authority {k} show`)"
            ))
        })
    };
    let refuse = |m: String| Err(ApiError::FailedPrecondition(m));
    match op {
        Op::Prepare => match authorities.iter().find(|a| a.state == Prepared) {
            Some(p) => refuse(format!(
                "{k} authority {} is already prepared; activate it or taint it first",
                p.id
            )),
            None => Ok(Vec::new()),
        },
        Op::Activate(id) => {
            let target = match id {
                Some(id) => find(id)?,
                None => authorities
                    .iter()
                    .find(|a| a.state == Prepared)
                    .ok_or_else(|| {
                        ApiError::FailedPrecondition(format!(
                            "no prepared {k} authority to activate; run `ward-ca authority {k} \
                             prepare` first"
                        ))
                    })?,
            };
            if target.state != Prepared {
                return refuse(format!(
                    "{k} authority {} is {}; only a prepared authority can be activated",
                    target.id,
                    target.state.as_str()
                ));
            }
            let mut changes = vec![(target.id.clone(), Active)];
            changes.extend(
                authorities
                    .iter()
                    .filter(|a| a.state == Active)
                    .map(|a| (a.id.clone(), Old)),
            );
            Ok(changes)
        }
        Op::Taint(id) => {
            let a = find(id)?;
            match a.state {
                Active => refuse(format!(
                    "{k} authority {id} is active and signs every new SVID; prepare and activate \
                     a successor first, then taint it"
                )),
                Tainted | Revoked => refuse(format!(
                    "{k} authority {id} is already {}",
                    a.state.as_str()
                )),
                Prepared | Old => Ok(vec![(a.id.clone(), Tainted)]),
            }
        }
        Op::Revoke(id) => {
            let a = find(id)?;
            match a.state {
                Active => refuse(format!(
                    "{k} authority {id} is active; revoking it would leave nothing to sign with \
                     and agents with no usable root. Prepare and activate a successor first"
                )),
                Revoked => refuse(format!("{k} authority {id} is already revoked")),
                Prepared | Old | Tainted => Ok(vec![(a.id.clone(), Revoked)]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuthorityState::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn a(id: &str, state: AuthorityState, nb: u64, na: u64) -> View {
        View {
            id: id.to_owned(),
            state,
            not_before: t(nb),
            not_after: t(na),
            upstream: false,
            holder: String::new(),
        }
    }

    #[test]
    fn rotation_plan_table() {
        let s = Schedule::default();
        let cases: Vec<(Vec<View>, u64, Vec<Step>)> = vec![
            (vec![], 0, vec![Step::Prepare]),
            (
                vec![a("p", Prepared, 0, 600)],
                10,
                vec![Step::Activate("p".into())],
            ),
            (vec![a("a", Active, 0, 600)], 299, vec![]),
            (vec![a("a", Active, 0, 600)], 300, vec![Step::Prepare]),
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 300, 900)],
                499,
                vec![],
            ),
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 300, 900)],
                500,
                vec![Step::Activate("p".into())],
            ),
            (
                vec![a("o", Old, 0, 600), a("a", Active, 300, 900)],
                599,
                vec![],
            ),
            (
                vec![a("o", Old, 0, 600), a("a", Active, 300, 900)],
                600,
                vec![Step::Drop("o".into()), Step::Prepare],
            ),
            // Tainted and revoked authorities are dropped at expiry too; a tainted prepared
            // authority is not activated, a new one is prepared in its place.
            (
                vec![
                    a("t", Tainted, 0, 600),
                    a("r", Revoked, 0, 500),
                    a("a", Active, 300, 900),
                ],
                600,
                vec![
                    Step::Drop("t".into()),
                    Step::Drop("r".into()),
                    Step::Prepare,
                ],
            ),
            (
                vec![a("a", Active, 0, 600), a("t", Tainted, 300, 900)],
                550,
                vec![Step::Prepare],
            ),
            // Prepared late (after an outage): not activated before it has been published for
            // the schedule's gap (200 s here)...
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 510, 1110)],
                520,
                vec![],
            ),
            // ...unless the active authority is about to expire (600 - 100/2 = 550).
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 510, 1110)],
                550,
                vec![Step::Activate("p".into())],
            ),
        ];
        for (i, (auths, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(&auths, s, t(now)), want, "case {i}");
        }
        let manual = Schedule {
            automatic: false,
            ..s
        };
        assert_eq!(plan(&[a("a", Active, 0, 600)], manual, t(590)), vec![]);
        assert_eq!(plan(&[], manual, t(0)), vec![Step::Prepare]);
    }

    #[test]
    fn transitions_follow_the_rails() {
        let k = Kind::X509;
        let set = vec![
            a("a", Active, 0, 600),
            a("p", Prepared, 300, 900),
            a("o", Old, 0, 500),
        ];
        let code = |r: Result<Vec<(String, AuthorityState)>, ApiError>| match r {
            Ok(_) => "ok",
            Err(ApiError::NotFound(_)) => "not-found",
            Err(ApiError::FailedPrecondition(_)) => "refused",
            Err(_) => "other",
        };
        assert_eq!(code(transition(k, &set, &Op::Prepare)), "refused");
        assert_eq!(
            transition(k, &set, &Op::Activate(None)).unwrap(),
            vec![("p".to_owned(), Active), ("a".to_owned(), Old)]
        );
        assert_eq!(
            code(transition(k, &set, &Op::Activate(Some("o".into())))),
            "refused"
        );
        assert_eq!(code(transition(k, &set, &Op::Taint("a".into()))), "refused");
        assert_eq!(
            code(transition(k, &set, &Op::Revoke("a".into()))),
            "refused"
        );
        assert_eq!(
            code(transition(k, &set, &Op::Taint("zz".into()))),
            "not-found"
        );
        assert_eq!(
            transition(k, &set, &Op::Taint("o".into())).unwrap(),
            vec![("o".to_owned(), Tainted)]
        );
        assert_eq!(
            transition(k, &set, &Op::Revoke("o".into())).unwrap(),
            vec![("o".to_owned(), Revoked)]
        );
        let done = vec![a("a", Active, 0, 600), a("r", Revoked, 0, 500)];
        assert_eq!(
            code(transition(k, &done, &Op::Revoke("r".into()))),
            "refused"
        );
        assert_eq!(
            code(transition(k, &done, &Op::Taint("r".into()))),
            "refused"
        );
        assert_eq!(code(transition(k, &done, &Op::Activate(None))), "refused");
        assert_eq!(code(transition(k, &done, &Op::Prepare)), "ok");
    }
}
