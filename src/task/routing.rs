//! Topic routing (being written).
