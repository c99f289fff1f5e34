//! The VM's lifecycle: one state and one table of what each action may do
//! from it (the shape of Cloud Hypervisor's `VmState::valid_transition`).
//! Every API request, migration step, throttle hold and stop goes through
//! [`Lifecycle::next`]; nothing else decides whether the VM may run.
//!
//! ```text
//!            Pause                BeginMigration
//!  Running <-------> Paused  ----------------------> Migrating{before, vcpus}
//!     |      Resume    |      <----------------------   |  Throttle/Unthrottle
//!     |                |          EndMigration          |  MigrationPause/Resume
//!     |                |                                |  Retire (vcpus paused)
//!     +---- Stop ------+------------ Stop --------------+--> Retired
//!                      v                                          | Stop
//!                   Stopped <-------------------------------------+
//! ```
//!
//! `vm.shutdown` during a migration is refused (409): the migration owns
//! the VM until it ends, and stopping the guest under it would leave the
//! source with nothing to resume and the destination with half a VM. Cancel
//! the migration (`vm.migration-cancel`) or wait, then shut down. A signal
//! to the VMM process still stops everything ([`Action::Stop`]): the
//! migration then fails before its commit and the destination discards.

use serde::{Deserialize, Serialize};

/// Whether the guest runs, as a migration carries it to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        })
    }
}

/// What the vCPUs do while a migration owns the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VcpuActivity {
    Running,
    /// Held for part of every slice by auto-converge; devices keep running.
    Throttled,
    Paused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Lifecycle {
    Running,
    Paused,
    /// A migration owns the VM. `before` is its run state when the
    /// migration began: what it returns to on failure, and what the
    /// destination restores.
    Migrating {
        before: RunState,
        vcpus: VcpuActivity,
    },
    /// Committed to another host: never runs here again.
    Retired,
    /// Stopped for good.
    Stopped,
}

/// Everything that can change or needs the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// API: park the vCPUs.
    Pause,
    /// API: let them run.
    Resume,
    /// API: save state and memory (pauses, leaves the VM paused).
    Snapshot,
    /// API: RARP for the guest's MACs.
    Announce,
    /// API: stop the VM and let the VMM exit.
    Shutdown,
    BeginMigration,
    Throttle,
    Unthrottle,
    /// The switchover pause.
    MigrationPause,
    /// A failed switchover gives the VM its vCPUs back.
    MigrationResume,
    /// The migration failed before its commit: the VM is the source's again.
    EndMigration,
    /// The commit: the VM belongs to the destination.
    Retire,
    /// The process is going away (guest exit, signal, shutdown).
    Stop,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Snapshot => "snapshot",
            Action::Announce => "announce",
            Action::Shutdown => "shut down",
            Action::BeginMigration => "start a migration",
            Action::Throttle => "throttle the vCPUs",
            Action::Unthrottle => "release the throttle",
            Action::MigrationPause => "pause for the switchover",
            Action::MigrationResume => "resume after a failed switchover",
            Action::EndMigration => "end the migration",
            Action::Retire => "retire the VM",
            Action::Stop => "stop",
        })
    }
}

/// Why an action is refused in this state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action}: {why}")]
pub struct Refused {
    pub action: Action,
    pub state: Lifecycle,
    pub why: &'static str,
}

impl Lifecycle {
    /// The state `action` leads to from this one, or why it may not happen.
    pub fn next(self, action: Action) -> Result<Lifecycle, Refused> {
        use Action as A;
        use Lifecycle as L;
        use VcpuActivity as V;
        let refuse = |why| Err(Refused { action, state: self, why });
        match (self, action) {
            (_, A::Stop) => Ok(L::Stopped),
            (L::Stopped, _) => refuse("the VM has stopped"),
            (L::Retired, A::Shutdown) => Ok(L::Stopped),
            (L::Retired, _) => refuse("the VM was handed to another host and never runs here again"),

            (L::Running, A::Pause) => Ok(L::Paused),
            (L::Paused, A::Pause) => refuse("the VM is already paused"),
            (L::Paused, A::Resume) => Ok(L::Running),
            (L::Running, A::Resume) => refuse("the VM is already running"),
            (L::Running | L::Paused, A::Snapshot) => Ok(L::Paused),
            (L::Running | L::Paused, A::Announce) => Ok(self),
            (L::Running | L::Paused, A::Shutdown) => Ok(L::Stopped),
            (L::Running, A::BeginMigration) => Ok(L::Migrating { before: RunState::Running, vcpus: V::Running }),
            (L::Paused, A::BeginMigration) => Ok(L::Migrating { before: RunState::Paused, vcpus: V::Paused }),
            (L::Running | L::Paused, _) => refuse("no migration is running"),

            (L::Migrating { .. }, A::BeginMigration) => refuse("a migration is already running"),
            (L::Migrating { .. }, A::Shutdown) => refuse(
                "a migration is running and owns the VM until it ends: cancel it (ferry migrate-cancel) or wait, \
                 then shut down",
            ),
            (L::Migrating { .. }, A::Pause | A::Resume | A::Snapshot | A::Announce) => {
                refuse("a migration is running: the VM's run state belongs to it until it ends")
            }
            (L::Migrating { before, vcpus: V::Running }, A::Throttle) => {
                Ok(L::Migrating { before, vcpus: V::Throttled })
            }
            (L::Migrating { before, vcpus: V::Throttled }, A::Unthrottle) => {
                Ok(L::Migrating { before, vcpus: V::Running })
            }
            (L::Migrating { before, vcpus: V::Running | V::Throttled }, A::MigrationPause) => {
                Ok(L::Migrating { before, vcpus: V::Paused })
            }
            (L::Migrating { before: RunState::Running, vcpus: V::Paused }, A::MigrationResume) => {
                Ok(L::Migrating { before: RunState::Running, vcpus: V::Running })
            }
            (L::Migrating { vcpus: V::Paused, .. }, A::Retire) => Ok(L::Retired),
            (L::Migrating { vcpus: V::Running, .. }, A::EndMigration) => Ok(L::Running),
            (L::Migrating { before: RunState::Paused, vcpus: V::Paused }, A::EndMigration) => Ok(L::Paused),
            (L::Migrating { vcpus: V::Throttled, .. }, _) => refuse("the vCPUs are held by the throttle"),
            (L::Migrating { vcpus: V::Paused, .. }, A::Throttle | A::Unthrottle) => {
                refuse("the vCPUs are paused for the switchover")
            }
            (L::Migrating { .. }, _) => refuse("not at this point of a migration"),
        }
    }

    /// The name `vm.info` reports.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Running => "Running",
            Lifecycle::Paused => "Paused",
            Lifecycle::Migrating { .. } => "Migrating",
            Lifecycle::Retired => "Retired",
            Lifecycle::Stopped => "Stopped",
        }
    }

    /// Whether the vCPUs are parked in this state.
    pub fn vcpus_parked(self) -> bool {
        match self {
            Lifecycle::Running | Lifecycle::Migrating { vcpus: VcpuActivity::Running, .. } => false,
            Lifecycle::Migrating { vcpus: VcpuActivity::Throttled, .. } => true,
            Lifecycle::Paused
            | Lifecycle::Migrating { vcpus: VcpuActivity::Paused, .. }
            | Lifecycle::Retired
            | Lifecycle::Stopped => true,
        }
    }

    /// The run state a saved image of the VM carries: what it should be
    /// doing when it comes back.
    pub fn run_state(self) -> RunState {
        match self {
            Lifecycle::Running => RunState::Running,
            Lifecycle::Migrating { before, .. } => before,
            _ => RunState::Paused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use Lifecycle as L;

    fn walk(mut s: Lifecycle, actions: &[Action]) -> Result<Lifecycle, Refused> {
        for a in actions {
            s = s.next(*a)?;
        }
        Ok(s)
    }

    #[test]
    fn a_live_migration_walks_the_table_and_retires() {
        let end = walk(
            L::Running,
            &[A::BeginMigration, A::Throttle, A::Unthrottle, A::Throttle, A::MigrationPause, A::Retire],
        );
        assert_eq!(end, Ok(L::Retired));
        assert!(L::Retired.next(A::Resume).is_err(), "a retired VM never runs here again");
        assert!(L::Retired.next(A::Announce).is_err(), "nor pulls its traffic back");
        assert_eq!(L::Retired.next(A::Stop), Ok(L::Stopped));
    }

    #[test]
    fn a_failed_switchover_goes_back_to_how_the_vm_was() {
        let s = walk(L::Running, &[A::BeginMigration, A::MigrationPause, A::MigrationResume, A::EndMigration]);
        assert_eq!(s, Ok(L::Running));
        let s = walk(L::Paused, &[A::BeginMigration, A::EndMigration]);
        assert_eq!(s, Ok(L::Paused), "a paused VM stays paused");
        assert!(walk(L::Paused, &[A::BeginMigration, A::MigrationResume]).is_err(), "never resumed by a rollback");
    }

    #[test]
    fn the_api_is_refused_while_a_migration_owns_the_vm() {
        let m = L::Running.next(A::BeginMigration).unwrap();
        for a in [A::Pause, A::Resume, A::Snapshot, A::Announce, A::Shutdown, A::BeginMigration] {
            let e = m.next(a).unwrap_err();
            assert!(e.why.contains("migration"), "{a}: {e}");
        }
        assert_eq!(m.next(A::Stop), Ok(L::Stopped), "a signal still stops the process");
    }

    #[test]
    fn run_state_travels_and_redundant_requests_are_named() {
        assert_eq!(L::Paused.next(A::BeginMigration).unwrap().run_state(), RunState::Paused);
        assert_eq!(L::Running.next(A::BeginMigration).unwrap().run_state(), RunState::Running);
        assert!(L::Paused.next(A::Pause).unwrap_err().why.contains("already paused"));
        assert!(L::Running.next(A::Resume).unwrap_err().why.contains("already running"));
        assert!(L::Stopped.next(A::Resume).is_err());
        assert!(L::Running.next(A::Retire).is_err(), "only a migration retires");
        assert_eq!(L::Running.next(A::Snapshot), Ok(L::Paused));
    }
}
