//! Celery protocol v2 (being written).
