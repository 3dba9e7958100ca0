//! The migration phase machine: a pure function from (phase, event) to the next
//! phase and the actions that keep "exactly one running copy" true. The agent
//! records the phase (DIR/migration.json; later the control plane, through
//! Raft) before acting, so whoever picks up after a crash calls [`recover`]
//! and performs idempotent actions.

use serde::{Deserialize, Serialize};

/// Where a migration stands, from the source's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asking the target to prepare; the source runs.
    Preparing,
    /// Memory and disk stream while the source runs; the target VM waits.
    Precopy,
    /// The source is paused for the final pass; the target VM has not started.
    Switchover,
    /// The commit was sent: the target may be starting the guest.
    Committing,
    /// The target runs the sandbox; the source is released. Terminal.
    Completed,
    /// The target's VM is gone; the source runs. Terminal.
    Aborted,
    /// The target was unreachable after the commit; the source stays paused
    /// until the target answers.
    Unresolved,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The target has an incoming VM and a ticket for the stream.
    Prepared,
    /// The source VM paused for the switch-over.
    Paused,
    /// The whole state is on the target (the source VMM said completed).
    Transferred,
    /// Anything failed before the commit was sent.
    Failed,
    /// The target says it runs the guest.
    TargetRunning,
    /// The target says its VM is removed (it refused the commit, or an abort succeeded).
    TargetGone,
    /// No answer from the target.
    TargetUnreachable,
}

/// What to do, in order. Every action is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Kill and remove the target's incoming VM (ask the target).
    DestroyTarget,
    /// Let the source VM run (cancel the migration, `cont`).
    ResumeSource,
    /// Kill the source VM and forget the sandbox here.
    ReleaseSource,
    /// Ask the target whether it runs the guest (abort if it does not).
    AskTarget,
}

/// A transition the machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration event {event:?} is not valid in phase {phase:?}")]
pub struct InvalidTransition {
    pub phase: Phase,
    pub event: Event,
}

/// The next phase and what to do to get there.
pub fn step(phase: Phase, event: Event) -> Result<(Phase, Vec<Action>), InvalidTransition> {
    use Action::*;
    use Event::*;
    use Phase::*;
    let r = match (phase, event) {
        (Preparing, Prepared) => (Precopy, vec![]),
        (Preparing, Failed) => (Aborted, vec![DestroyTarget]),
        (Precopy, Paused) => (Switchover, vec![]),
        (Precopy, Transferred) | (Switchover, Transferred) => (Committing, vec![]),
        (Precopy | Switchover, Failed) => (Aborted, vec![DestroyTarget, ResumeSource]),
        (Committing | Unresolved, TargetRunning) => (Completed, vec![ReleaseSource]),
        (Committing | Unresolved, TargetGone) => (Aborted, vec![ResumeSource]),
        (Committing | Unresolved, TargetUnreachable) => (Unresolved, vec![AskTarget]),
        _ => return Err(InvalidTransition { phase, event }),
    };
    Ok(r)
}

impl Phase {
    /// The commit may have been sent (or the target said it runs the
    /// sandbox): the target may run it, with its address. Before it, the
    /// address never moved.
    pub fn may_have_committed(self) -> bool {
        matches!(
            self,
            Phase::Committing | Phase::Unresolved | Phase::Completed
        )
    }
}

/// What a coordinator that crashed in `phase` does on restart.
pub fn recover(phase: Phase) -> Vec<Action> {
    use Action::*;
    match phase {
        Phase::Preparing | Phase::Precopy | Phase::Switchover | Phase::Aborted => {
            vec![DestroyTarget, ResumeSource]
        }
        Phase::Committing | Phase::Unresolved => vec![AskTarget],
        Phase::Completed => vec![ReleaseSource],
    }
}

/// The migration record persisted beside the sandbox (`migration.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub version: u32,
    pub sandbox: String,
    pub target: String,
    pub phase: Phase,
    /// The target's API token, to ask it how the migration ended after a restart.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [Event; 7] = [
        Event::Prepared,
        Event::Paused,
        Event::Transferred,
        Event::Failed,
        Event::TargetRunning,
        Event::TargetGone,
        Event::TargetUnreachable,
    ];

    /// Where the guest may run, as far as the source can know.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct World {
        source_may_run: bool,
        target_may_run: bool,
    }

    /// Every sequence of up to 6 events: the source never resumes while the
    /// target may run, never is released unless the target runs, and a terminal
    /// phase leaves exactly one copy.
    #[test]
    fn no_event_sequence_yields_zero_or_two_copies() {
        fn walk(phase: Phase, w: World, depth: usize, seen: &mut usize) {
            *seen += 1;
            match phase {
                Phase::Completed => assert!(w.target_may_run && !w.source_may_run, "{w:?}"),
                Phase::Aborted => assert!(w.source_may_run && !w.target_may_run, "{w:?}"),
                _ => assert!(
                    w.source_may_run || w.target_may_run,
                    "zero copies in {phase:?}"
                ),
            }
            if depth == 0 {
                return;
            }
            for ev in EVENTS {
                let Ok((next, actions)) = step(phase, ev) else {
                    continue;
                };
                let mut w = w;
                if next == Phase::Committing {
                    w.target_may_run = true;
                }
                if ev == Event::TargetGone {
                    w.target_may_run = false;
                }
                for a in actions {
                    match a {
                        Action::ResumeSource => {
                            assert!(
                                !w.target_may_run,
                                "resumed the source in {phase:?} on {ev:?}"
                            );
                            w.source_may_run = true;
                        }
                        Action::ReleaseSource => {
                            assert_eq!(ev, Event::TargetRunning, "released without the target");
                            w.source_may_run = false;
                        }
                        Action::DestroyTarget => {
                            assert!(phase != Phase::Committing && phase != Phase::Unresolved);
                            w.target_may_run = false;
                        }
                        Action::AskTarget => {}
                    }
                }
                walk(next, w, depth - 1, seen);
            }
        }
        let mut seen = 0;
        let w = World {
            source_may_run: true,
            target_may_run: false,
        };
        walk(Phase::Preparing, w, 6, &mut seen);
        assert!(seen > 20, "explored {seen} states");
    }

    #[test]
    fn happy_path_ends_completed_with_the_source_released() {
        let mut p = Phase::Preparing;
        let mut last = vec![];
        for ev in [
            Event::Prepared,
            Event::Paused,
            Event::Transferred,
            Event::TargetRunning,
        ] {
            (p, last) = step(p, ev).unwrap();
        }
        assert_eq!((p, last), (Phase::Completed, vec![Action::ReleaseSource]));
    }

    #[test]
    fn a_crash_after_the_commit_asks_the_target_before_touching_the_source() {
        assert_eq!(recover(Phase::Committing), vec![Action::AskTarget]);
        assert_eq!(recover(Phase::Unresolved), vec![Action::AskTarget]);
        assert_eq!(
            recover(Phase::Switchover),
            vec![Action::DestroyTarget, Action::ResumeSource]
        );
    }

    #[test]
    fn terminal_phases_accept_no_events() {
        for ev in EVENTS {
            assert!(step(Phase::Completed, ev).is_err());
            assert!(step(Phase::Aborted, ev).is_err());
        }
    }

    /// A settled copy keeps its address exactly when the restart of its
    /// migration would not resume it here (review14 F6).
    #[test]
    fn a_phase_may_have_committed_exactly_when_its_recovery_does_not_resume_the_source() {
        for p in [
            Phase::Preparing,
            Phase::Precopy,
            Phase::Switchover,
            Phase::Committing,
            Phase::Completed,
            Phase::Aborted,
            Phase::Unresolved,
        ] {
            assert_eq!(
                p.may_have_committed(),
                !recover(p).contains(&Action::ResumeSource),
                "{p:?}"
            );
        }
    }
}
