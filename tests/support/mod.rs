//! Shared helpers for the integration tests (`mod support;` in a test file):
//! `fault_proxy` injects broker faults over TCP, `crashfs` is a FUSE
//! filesystem that keeps only what was synced (power-loss tests), `celery`
//! runs a real Celery worker from the test virtualenv, `moto` runs the SQS
//! server (moto) and reads back what taskgate sent, `operator` runs a
//! gateway whose state operator-tooling tests reach and the CLI binary
//! against it, `postgres` gives a test its own PostgreSQL database. Each test binary uses only part of this.
#![allow(dead_code)]

pub mod app;
pub mod celery;
pub mod crashfs;
pub mod fault_proxy;
pub mod moto;
pub mod operator;
pub mod postgres;
