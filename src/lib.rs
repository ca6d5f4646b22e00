//! taskgate (crate map written as modules land).
pub mod celery;
pub mod task;
