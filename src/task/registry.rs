//! Task registry (being written).
