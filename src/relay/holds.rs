//! An operator's holds on the relay: a pause, and a forced breaker state.
//! They are the relay's and the breaker's decisions; the outbox only keeps
//! their record (`m/operator_holds`, [`Outbox::operator_holds_record`]) so
//! that a restart (a deploy, a crash) does not silently undo one.
//!
//! Invariants: a record that does not decode is an error, never read as
//! "no hold" (guessing could publish what an operator held back); no holds
//! at all is stored as no record.

use crate::outbox::{Outbox, OutboxError};
use serde::{Deserialize, Serialize};

/// An operator's override of the breaker's own decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerOverride {
    /// Nothing is published until it is released or closed.
    Open,
    /// Failures no longer open the breaker.
    Closed,
}

/// What an operator told the relay to do until told otherwise. Stored, so
/// a restart (a deploy, a crash) does not silently undo it: a pause taken
/// to inspect a poison task must not end with the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OperatorHolds {
    pub relay_paused: bool,
    pub breaker: Option<BreakerOverride>,
}

impl OperatorHolds {
    /// Decodes a stored record.
    pub fn decode(record: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(record)
    }

    /// The holds as last saved in `outbox` (none when never saved).
    pub fn load(outbox: &Outbox) -> Result<Self, OutboxError> {
        match outbox.operator_holds_record()? {
            Some(record) => Ok(Self::decode(&record)?),
            None => Ok(Self::default()),
        }
    }

    /// Saves the holds in `outbox` and flushes before returning, so an
    /// acknowledged pause survives a crash. Blocking.
    pub fn save(&self, outbox: &Outbox) -> Result<(), OutboxError> {
        let record = if *self == Self::default() {
            None
        } else {
            Some(serde_json::to_vec(self)?)
        };
        outbox.save_operator_holds_record(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let holds = OperatorHolds {
            relay_paused: true,
            breaker: Some(BreakerOverride::Closed),
        };
        let record = serde_json::to_vec(&holds).unwrap();
        assert_eq!(OperatorHolds::decode(&record).unwrap(), holds);
        assert_eq!(OperatorHolds::decode(b"{}").unwrap(), OperatorHolds::default());
        assert!(OperatorHolds::decode(b"{\"relay_paused\": \"yes\"}").is_err());
        assert!(OperatorHolds::decode(b"\xff").is_err());
    }
}
