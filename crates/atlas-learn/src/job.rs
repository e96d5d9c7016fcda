//! What to learn: the [`Objective`], and the [`Job`] that pairs it with its data ([`Task`]s).
//! How to learn it (the recipe) is in [`crate::recipe`].

use crate::data::Dataset;
use crate::{LearnError, Result};
use atlas_clip::{Backbone, ZeroShotHead};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A data set with its zero-shot head (from its class names) and, optionally, its own held-out
/// split; without one, `LearnConfig::val_fraction` of the data is held out.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub data: Dataset,
    pub val: Option<Dataset>,
    pub head: ZeroShotHead,
    /// Accuracy of the task's own fine-tuned model, to report normalised accuracy.
    pub reference_accuracy: Option<f64>,
}

impl Task {
    pub fn new(backbone: &Backbone, name: &str, data: Dataset, templates: &[&str]) -> Result<Self> {
        if data.classes.is_empty() {
            return Err(LearnError::Data(format!("task {name} has no class names")));
        }
        let head = ZeroShotHead::build(backbone, &data.classes, templates)?;
        Ok(Task {
            name: name.to_string(),
            data,
            val: None,
            head,
            reference_accuracy: None,
        })
    }

    pub fn with_val(mut self, val: Dataset) -> Self {
        self.val = Some(val);
        self
    }
}

/// The learning objectives, by one name each: `few_shot`, `task_addition` (also accepted as
/// `multi_task`, its name in the multi-task merging literature), `negation`, `entropy`, `ufm`,
/// `adamerging`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy on labelled images of one task.
    FewShot,
    /// Multi-task merge: summed cross-entropy over per-task slices of each batch.
    #[serde(alias = "multi_task")]
    TaskAddition,
    /// −CE(target) + CE(control); kept only while control accuracy stays ≥ guard × zero-shot.
    Negation,
    /// Test-time adaptation: entropy minimisation on unlabelled images (SAR-style filtering).
    Entropy,
    /// Test-time adaptation: UFM pseudo-labelling (weak view → pseudo-labels, strong view → loss).
    Ufm,
    /// AdaMerging (Yang et al., ICLR 2024): a multi-task merge learned from the tasks'
    /// unlabelled images by the summed mean entropy of each task's predictions; layer-wise with
    /// a per-block layout, task-wise with an isotropic one.
    #[serde(rename = "adamerging")]
    AdaMerging,
}

impl Objective {
    pub const ALL: [Objective; 6] = [
        Objective::FewShot,
        Objective::TaskAddition,
        Objective::Negation,
        Objective::Entropy,
        Objective::Ufm,
        Objective::AdaMerging,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Objective::FewShot => "few_shot",
            Objective::TaskAddition => "task_addition",
            Objective::Negation => "negation",
            Objective::Entropy => "entropy",
            Objective::Ufm => "ufm",
            Objective::AdaMerging => "adamerging",
        }
    }

    /// Learns from unlabelled images.
    pub fn is_unsupervised(self) -> bool {
        matches!(
            self,
            Objective::Entropy | Objective::Ufm | Objective::AdaMerging
        )
    }

    /// Checks that `n` tasks fit the objective: one, two (negation: target then control), or at
    /// least one (task addition).
    pub fn check_task_count(self, n: usize) -> Result<()> {
        let (ok, want) = match self {
            Objective::TaskAddition | Objective::AdaMerging => (n >= 1, "at least one"),
            Objective::Negation => (n == 2, "two (target, then control)"),
            _ => (n == 1, "exactly one"),
        };
        if ok {
            return Ok(());
        }
        Err(LearnError::Job(format!(
            "objective {self} takes {want} task(s), got {n}"
        )))
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Objective {
    type Err = LearnError;

    /// The serde names, with `-` accepted for `_` (command-line spelling).
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().replace('-', "_");
        let found = Objective::ALL.into_iter().find(|o| o.as_str() == name);
        match (found, name.as_str()) {
            (Some(o), _) => Ok(o),
            (None, "multi_task") => Ok(Objective::TaskAddition),
            _ => Err(LearnError::Job(format!(
                "unknown objective {s:?}; use one of few_shot, task_addition, negation, entropy, ufm, adamerging"
            ))),
        }
    }
}

/// An objective with its data.
#[derive(Debug, Clone)]
pub enum Job {
    FewShot(Task),
    TaskAddition(Vec<Task>),
    Negation { target: Task, control: Task },
    Entropy(Task),
    Ufm(Task),
    AdaMerging(Vec<Task>),
}

impl Job {
    /// The job of `objective` over `tasks` (negation: the target, then the control).
    pub fn from_tasks(objective: Objective, mut tasks: Vec<Task>) -> Result<Job> {
        objective.check_task_count(tasks.len())?;
        let mut one = || tasks.remove(0);
        Ok(match objective {
            Objective::FewShot => Job::FewShot(one()),
            Objective::Entropy => Job::Entropy(one()),
            Objective::Ufm => Job::Ufm(one()),
            Objective::Negation => {
                let target = one();
                Job::Negation {
                    target,
                    control: one(),
                }
            }
            Objective::TaskAddition => Job::TaskAddition(tasks),
            Objective::AdaMerging => Job::AdaMerging(tasks),
        })
    }

    pub fn tasks(&self) -> Vec<&Task> {
        match self {
            Job::FewShot(t) | Job::Entropy(t) | Job::Ufm(t) => vec![t],
            Job::TaskAddition(ts) | Job::AdaMerging(ts) => ts.iter().collect(),
            Job::Negation { target, control } => vec![target, control],
        }
    }

    pub fn objective(&self) -> Objective {
        match self {
            Job::FewShot(_) => Objective::FewShot,
            Job::TaskAddition(_) => Objective::TaskAddition,
            Job::Negation { .. } => Objective::Negation,
            Job::Entropy(_) => Objective::Entropy,
            Job::Ufm(_) => Objective::Ufm,
            Job::AdaMerging(_) => Objective::AdaMerging,
        }
    }

    /// Checks the data fit the objective.
    pub fn validate(&self) -> Result<()> {
        let objective = self.objective();
        objective.check_task_count(self.tasks().len())?;
        for t in self.tasks() {
            if t.data.is_empty() {
                return Err(LearnError::Data(format!("task {} has no images", t.name)));
            }
            if !objective.is_unsupervised() && !t.data.is_labelled() {
                return Err(LearnError::Data(format!(
                    "task {} needs a label for every image for {objective}",
                    t.name,
                )));
            }
            if t.head.classes.len() != t.data.classes.len() {
                return Err(LearnError::Data(format!(
                    "task {}: the head has {} classes, the data {}",
                    t.name,
                    t.head.classes.len(),
                    t.data.classes.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Objective;

    #[test]
    fn objective_names_round_trip_and_accept_the_other_spellings() {
        for o in Objective::ALL {
            assert_eq!(o.as_str().parse::<Objective>().unwrap(), o);
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
            let json = serde_json::Value::String(o.as_str().into());
            assert_eq!(serde_json::from_value::<Objective>(json).unwrap(), o);
        }
        for s in ["multi_task", "multi-task", "task-addition"] {
            assert_eq!(s.parse::<Objective>().unwrap(), Objective::TaskAddition);
        }
        let alias = serde_json::from_str::<Objective>("\"multi_task\"").unwrap();
        assert_eq!(alias, Objective::TaskAddition);
        assert!("multitask".parse::<Objective>().is_err());
    }

    #[test]
    fn task_counts() {
        assert!(Objective::FewShot.check_task_count(1).is_ok());
        assert!(Objective::FewShot.check_task_count(2).is_err());
        assert!(Objective::Negation.check_task_count(2).is_ok());
        assert!(Objective::Negation.check_task_count(1).is_err());
        assert!(Objective::TaskAddition.check_task_count(0).is_err());
        assert!(Objective::TaskAddition.check_task_count(5).is_ok());
    }
}
