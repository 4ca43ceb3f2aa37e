//! The fault-injection suite, a test binary of its own: its scenarios load the machine for
//! minutes each, so they run after the other binaries rather than beside them.
//!
//! Each drill runs one or more daemon processes, a broker and a load, and takes a drill
//! slot first (`testkit::faults::drill_slot`): at most as many drills at once as the
//! machine has cores, whatever `--test-threads` says.

mod members;
mod ordering;
mod payments;
mod scenarios;
