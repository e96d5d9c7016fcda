//! Budget selection: with more task vectors than the budget allows, one gradient pass at Λ = 0
//! ranks them by accumulated |∂L/∂Λ|; keep the top b whole, or, per block, build b mixed task
//! vectors from the b highest-ranked task vectors of that block.

use crate::job::Job;
use crate::learner::abs_gradient_pass;
use crate::recipe::LearnConfig;
use crate::{LearnError, Result};
use atlas_clip::Backbone;
use atlas_core::{Buffer, Coefficients, Layout, TaskVector, TaskVectorMeta};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Keep the b task vectors with the largest total |∂L/∂Λ|.
    Whole(usize),
    /// Per block, keep the blocks of the b task vectors with the largest |∂L/∂Λ| there.
    Blockwise(usize),
}

/// Which candidates a budget keeps, by index into them, best first: whole task vectors, or per
/// block (manifest order) the task vectors whose blocks make up the mixed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Whole(Vec<usize>),
    Blockwise(Vec<Vec<usize>>),
}

/// The task vectors to learn on under `budget` (fewer than or as many as the budget: unchanged).
pub fn select(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    job: &Job,
    config: &LearnConfig,
    budget: Budget,
) -> Result<Vec<Arc<TaskVector>>> {
    let selection = rank(backbone, tvs, job, config, budget)?;
    apply(backbone, tvs, &selection)
}

/// The selection of `budget` among `tvs` (fewer than or as many as the budget: all of them,
/// whole, without a gradient pass). Kept apart from [`apply`] so a caller can record it and
/// apply it again later (a resumed job) without another pass.
pub fn rank(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    job: &Job,
    config: &LearnConfig,
    budget: Budget,
) -> Result<Selection> {
    let b = match budget {
        Budget::Whole(b) | Budget::Blockwise(b) => b,
    };
    if b == 0 {
        return Err(LearnError::Job(
            "the budget must be at least one task vector".into(),
        ));
    }
    if tvs.len() <= b {
        return Ok(Selection::Whole((0..tvs.len()).collect()));
    }
    let n_blocks = backbone.manifest().len();
    let zero = Coefficients::zeros(Layout::PerBlock, tvs.len(), n_blocks)?;
    let scores = abs_gradient_pass(backbone, tvs, job, config, &zero)?;
    Ok(match budget {
        Budget::Whole(b) => Selection::Whole(top_whole(tvs.len(), &scores, n_blocks, b)),
        Budget::Blockwise(b) => {
            Selection::Blockwise(ranked_blocks(tvs.len(), &scores, n_blocks, b))
        }
    })
}

/// The task vectors a selection keeps: the whole ones, or the mixed ones built per block.
pub fn apply(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    selection: &Selection,
) -> Result<Vec<Arc<TaskVector>>> {
    let out_of_range =
        || LearnError::Job("a budget selection names a task vector not given".into());
    match selection {
        Selection::Whole(kept) => kept
            .iter()
            .map(|&i| tvs.get(i).cloned().ok_or_else(out_of_range))
            .collect(),
        Selection::Blockwise(ranked) => {
            if ranked.len() != backbone.manifest().len()
                || ranked.iter().flatten().any(|&i| i >= tvs.len())
            {
                return Err(out_of_range());
            }
            mixed(backbone, tvs, ranked)
        }
    }
}

fn top_whole(n_tv: usize, scores: &[f64], n_blocks: usize, b: usize) -> Vec<usize> {
    let totals: Vec<f64> = scores
        .chunks(n_blocks)
        .map(|row| row.iter().sum())
        .collect();
    let mut order: Vec<usize> = (0..n_tv).collect();
    order.sort_by(|&x, &y| totals[y].total_cmp(&totals[x]).then(x.cmp(&y)));
    order.truncate(b);
    order
}

/// Per block, the indices of the `b` task vectors with the largest |∂L/∂Λ| there, best first.
fn ranked_blocks(n_tv: usize, scores: &[f64], n_blocks: usize, b: usize) -> Vec<Vec<usize>> {
    (0..n_blocks)
        .map(|blk| {
            let mut order: Vec<usize> = (0..n_tv).collect();
            order.sort_by(|&x, &y| {
                scores[y * n_blocks + blk]
                    .total_cmp(&scores[x * n_blocks + blk])
                    .then(x.cmp(&y))
            });
            order.truncate(b);
            order
        })
        .collect()
}

fn mixed(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    ranked: &[Vec<usize>],
) -> Result<Vec<Arc<TaskVector>>> {
    let manifest = backbone.manifest();
    let n_blocks = ranked.len();
    let b = ranked.iter().map(Vec::len).min().unwrap_or(0);
    (0..b)
        .map(|j| {
            let blocks: Vec<Buffer> = (0..n_blocks)
                .map(|blk| tvs[ranked[blk][j]].block(blk).clone())
                .collect();
            let sources: Vec<&str> = ranked.iter().map(|r| tvs[r[j]].name()).collect();
            let meta = TaskVectorMeta {
                name: format!("mixed-{j}"),
                base_model: tvs[0].meta.base_model.clone(),
                base_digest: tvs[0].meta.base_digest.clone(),
                source: format!("blockwise budget rank {j}: {}", sources.join(",")),
            };
            Ok(Arc::new(TaskVector::from_buffers(
                manifest,
                meta,
                tvs[0].dtype(),
                blocks,
            )?))
        })
        .collect()
}
