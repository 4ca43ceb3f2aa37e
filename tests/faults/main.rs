//! The fault-injection suite, a test binary of its own: its scenarios load the machine for
//! minutes each, so they run after the other binaries rather than beside them.

#[path = "../support/mod.rs"]
mod support;

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

mod checker;
mod members;
mod scenarios;
