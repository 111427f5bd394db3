//! The report of a run, as text for the caller to write to files: the figures `report.json`
//! embeds and `report.txt` prints ([`stats`]), and the timeline picture with the page around it
//! ([`svg`]). Nothing here reads a clock or touches the file system.

pub mod stats;
pub mod svg;

pub use stats::{figures, Figures};
pub use svg::{html_page, timeline_svg};
