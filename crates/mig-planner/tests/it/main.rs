//! Planner tests, linked into one binary.

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

mod brute;
mod cases;
mod check;
mod fixtures;
mod invariants;
mod reservations;
mod schema;
