//! The leaves every other module uses: identifiers, how values travel in columns, time as a
//! dependency, how failures are classed, and the connections to MySQL and Redis.

pub mod clock;
pub mod columns;
pub mod connections;
pub mod error;
pub mod grouped;
pub mod ids;
