//! The build state machine. One enum, one transition function: every caller goes through
//! [`BuildState::on`], so an illegal event is an error the caller must handle instead of a silent
//! state corruption (ClusterRunner's FSM failed the build on such events; we refuse the event and
//! leave the build as it was).
use crate::proto;

/// Lifecycle of a build (see `proto/ish/v1/common.proto` for the meaning of each state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BuildState {
    /// Accepted and stored; waiting for a slave to prepare it.
    Queued,
    /// A slave is fetching the project and running the atomizers.
    Preparing,
    /// Atoms grouped into subjobs; no executor has started yet.
    Prepared,
    /// Subjobs are running.
    Building,
    /// All atoms ran and the archives exist.
    Finished,
    /// The build could not run.
    Error,
    /// A client canceled it.
    Canceled,
}

/// Something that happens to a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildEvent {
    /// A slave started preparing it.
    StartPrepare,
    /// The preparing slave was lost (or the master restarted): prepare again.
    Requeue,
    /// Atoms and subjobs are known.
    FinishPrepare,
    /// The first subjob was dispatched.
    StartBuilding,
    /// Every subjob completed and the archives are written.
    Finish,
    /// A client canceled it.
    Cancel,
    /// It cannot go on.
    Fail,
}

/// An event that the current state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event {event:?} is not allowed in state {state:?}")]
pub struct InvalidTransition {
    /// State the build was in (and stays in).
    pub state: BuildState,
    /// The refused event.
    pub event: BuildEvent,
}

impl BuildState {
    /// The state after `event`, or an error if `event` is illegal in this state.
    pub fn on(self, event: BuildEvent) -> Result<BuildState, InvalidTransition> {
        use BuildEvent as E;
        use BuildState as S;
        let next = match (self, event) {
            (S::Queued, E::StartPrepare) => S::Preparing,
            (S::Preparing, E::Requeue) => S::Queued,
            (S::Preparing, E::FinishPrepare) => S::Prepared,
            (S::Prepared, E::StartBuilding) => S::Building,
            // A build with zero atoms finishes straight from PREPARED.
            (S::Prepared | S::Building, E::Finish) => S::Finished,
            (S::Queued | S::Preparing | S::Prepared | S::Building, E::Cancel) => S::Canceled,
            (S::Queued | S::Preparing | S::Prepared | S::Building, E::Fail) => S::Error,
            (state, event) => return Err(InvalidTransition { state, event }),
        };
        Ok(next)
    }

    /// True once nothing more will happen to the build.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Finished | Self::Error | Self::Canceled)
    }

    /// Lower-case name, as used in ClusterRunner's `state_timestamps` keys.
    pub fn name_lower(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Preparing => "preparing",
            Self::Prepared => "prepared",
            Self::Building => "building",
            Self::Finished => "finished",
            Self::Error => "error",
            Self::Canceled => "canceled",
        }
    }

    /// Every state, in lifecycle order.
    pub const ALL: [BuildState; 7] = [
        Self::Queued,
        Self::Preparing,
        Self::Prepared,
        Self::Building,
        Self::Finished,
        Self::Error,
        Self::Canceled,
    ];
}

impl From<BuildState> for proto::BuildState {
    fn from(s: BuildState) -> Self {
        match s {
            BuildState::Queued => Self::Queued,
            BuildState::Preparing => Self::Preparing,
            BuildState::Prepared => Self::Prepared,
            BuildState::Building => Self::Building,
            BuildState::Finished => Self::Finished,
            BuildState::Error => Self::Error,
            BuildState::Canceled => Self::Canceled,
        }
    }
}

impl TryFrom<proto::BuildState> for BuildState {
    type Error = ();
    fn try_from(s: proto::BuildState) -> Result<Self, ()> {
        Ok(match s {
            proto::BuildState::Unspecified => return Err(()),
            proto::BuildState::Queued => Self::Queued,
            proto::BuildState::Preparing => Self::Preparing,
            proto::BuildState::Prepared => Self::Prepared,
            proto::BuildState::Building => Self::Building,
            proto::BuildState::Finished => Self::Finished,
            proto::BuildState::Error => Self::Error,
            proto::BuildState::Canceled => Self::Canceled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [BuildEvent; 7] = [
        BuildEvent::StartPrepare,
        BuildEvent::Requeue,
        BuildEvent::FinishPrepare,
        BuildEvent::StartBuilding,
        BuildEvent::Finish,
        BuildEvent::Cancel,
        BuildEvent::Fail,
    ];

    #[test]
    fn happy_path() {
        let s = BuildState::Queued;
        let s = s.on(BuildEvent::StartPrepare).unwrap();
        let s = s.on(BuildEvent::FinishPrepare).unwrap();
        let s = s.on(BuildEvent::StartBuilding).unwrap();
        assert_eq!(s.on(BuildEvent::Finish).unwrap(), BuildState::Finished);
    }

    #[test]
    fn final_states_accept_nothing() {
        for s in BuildState::ALL.into_iter().filter(|s| s.is_final()) {
            for e in EVENTS {
                assert_eq!(s.on(e), Err(InvalidTransition { state: s, event: e }));
            }
        }
    }

    #[test]
    fn every_live_state_can_be_canceled_or_failed() {
        for s in BuildState::ALL.into_iter().filter(|s| !s.is_final()) {
            assert_eq!(s.on(BuildEvent::Cancel), Ok(BuildState::Canceled));
            assert_eq!(s.on(BuildEvent::Fail), Ok(BuildState::Error));
        }
    }

    #[test]
    fn cannot_skip_preparation() {
        assert!(BuildState::Queued.on(BuildEvent::StartBuilding).is_err());
        assert!(BuildState::Queued.on(BuildEvent::Finish).is_err());
        assert!(BuildState::Preparing.on(BuildEvent::Finish).is_err());
        assert!(BuildState::Building.on(BuildEvent::StartPrepare).is_err());
    }

    /// Random walks over the whole event alphabet: the machine never leaves the set of states
    /// reachable from QUEUED, never leaves a final state, and a refused event changes nothing.
    #[test]
    fn random_walks_respect_invariants() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2_000 {
            let mut s = BuildState::Queued;
            let mut seen_building = false;
            for _ in 0..20 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let e = EVENTS[(seed >> 33) as usize % EVENTS.len()];
                match s.on(e) {
                    Ok(next) => {
                        assert!(!s.is_final(), "left final state {s:?} with {e:?}");
                        if next == BuildState::Finished {
                            assert!(matches!(s, BuildState::Prepared | BuildState::Building));
                        }
                        if next == BuildState::Building {
                            seen_building = true;
                        }
                        if seen_building {
                            assert_ne!(
                                next,
                                BuildState::Queued,
                                "a building build went back to the queue"
                            );
                        }
                        s = next;
                    }
                    Err(err) => assert_eq!(err.state, s),
                }
            }
        }
    }

    #[test]
    fn proto_round_trip() {
        for s in BuildState::ALL {
            let p: proto::BuildState = s.into();
            assert_eq!(BuildState::try_from(p), Ok(s));
        }
        assert!(BuildState::try_from(proto::BuildState::Unspecified).is_err());
    }
}
