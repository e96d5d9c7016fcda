//! Replay of a committed fuzz corpus for the stable corpus tests of atlas-core and atlas-clip
//! (included with `#[path]`): runs a fuzz target's body on every file of
//! fuzz/corpus/<target>, then checks outcomes against a table of expected messages.

use std::collections::BTreeMap;
use std::panic::catch_unwind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Far above any input's cost (milliseconds); a hang or a huge allocation shows up here.
const SLOW: Duration = Duration::from_secs(5);

pub type Outcome = Result<(), String>;

/// Runs `body` on every file of fuzz/corpus/<target>; fails on a panic or a slow input.
pub fn replay(target: &str, body: fn(&[u8]) -> Outcome) -> BTreeMap<String, Outcome> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out = BTreeMap::new();
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let start = Instant::now();
        match catch_unwind(|| body(&data)) {
            Ok(outcome) => {
                out.insert(name.clone(), outcome);
            }
            Err(_) => failures.push(format!("{name}: panicked")),
        }
        if start.elapsed() > SLOW {
            failures.push(format!("{name}: took {:?}", start.elapsed()));
        }
    }
    assert!(failures.is_empty(), "{target}: {failures:#?}");
    assert!(out.len() >= 20, "{target}: only {} corpus files", out.len());
    out
}

/// Seeds pass, hostile seeds fail with every listed fragment in their message, and every
/// hostile seed is listed.
pub fn check(target: &str, results: &BTreeMap<String, Outcome>, expected: &[(&str, &[&str])]) {
    let mut problems = Vec::new();
    for (name, outcome) in results {
        if name.starts_with("seed-") {
            if let Err(e) = outcome {
                problems.push(format!("{name} was refused: {e}"));
            }
        } else if name.starts_with("hostile-") {
            let Some((_, fragments)) = expected.iter().find(|(n, _)| n == name) else {
                problems.push(format!("{name} has no expected message: {outcome:?}"));
                continue;
            };
            match outcome {
                Ok(()) => problems.push(format!("{name} was accepted")),
                Err(e) => {
                    let missing: Vec<_> = fragments.iter().filter(|f| !e.contains(**f)).collect();
                    if !missing.is_empty() {
                        problems.push(format!("{name}: {missing:?} not in {e:?}"));
                    }
                    if e.len() > 1000 {
                        problems.push(format!("{name}: message of {} bytes", e.len()));
                    }
                }
            }
        }
    }
    for (name, _) in expected {
        if !results.contains_key(*name) {
            problems.push(format!("{name} is listed but not in the corpus"));
        }
    }
    assert!(problems.is_empty(), "{target}: {problems:#?}");
}
