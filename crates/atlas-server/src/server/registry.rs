//! Compositions by id: explicit ones are ready at once; learned ones move through queued,
//! running, ready or failed, with their latest progress event.

use super::api::{CompositionView, Status};
use atlas_core::{Coefficients, Layout, TaskVector};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub struct Entry {
    pub view: CompositionView,
    pub tvs: Vec<Arc<TaskVector>>,
    pub coefs: Option<Coefficients>,
    pub cancel: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Registry {
    entries: RwLock<HashMap<String, Entry>>,
    next: AtomicU64,
}

impl Registry {
    pub fn insert(
        &self,
        name: Option<String>,
        tvs: Vec<Arc<TaskVector>>,
        layout: Layout,
        coefs: Option<Coefficients>,
        status: Status,
    ) -> String {
        let id = format!("c{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let view = CompositionView {
            id: id.clone(),
            name,
            status,
            task_vectors: tvs.iter().map(|t| t.name().to_string()).collect(),
            layout,
            n_coefficients: coefs.as_ref().map_or(0, |c| c.values.len()),
            progress: None,
            summary: None,
            error: None,
        };
        let entry = Entry {
            view,
            tvs,
            coefs,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        self.entries
            .write()
            .expect("registry lock")
            .insert(id.clone(), entry);
        id
    }

    pub fn view(&self, id: &str) -> Option<CompositionView> {
        self.entries
            .read()
            .expect("registry lock")
            .get(id)
            .map(|e| e.view.clone())
    }

    pub fn list(&self) -> Vec<CompositionView> {
        let mut out: Vec<_> = self
            .entries
            .read()
            .expect("registry lock")
            .values()
            .map(|e| e.view.clone())
            .collect();
        out.sort_by_key(|v| v.id[1..].parse::<u64>().unwrap_or(0));
        out
    }

    /// The task vectors and coefficients of a ready composition.
    pub fn ready(&self, id: &str) -> Result<(Vec<Arc<TaskVector>>, Coefficients), String> {
        let map = self.entries.read().expect("registry lock");
        let e = map.get(id).ok_or_else(|| format!("no composition {id}"))?;
        match (&e.coefs, e.view.status) {
            (Some(c), Status::Ready) => Ok((e.tvs.clone(), c.clone())),
            (_, status) => Err(format!("composition {id} is {status:?}, not ready").to_lowercase()),
        }
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.entries.write().expect("registry lock").get_mut(id) {
            f(e);
        }
    }

    pub fn remove(&self, id: &str) -> Option<CompositionView> {
        self.entries
            .write()
            .expect("registry lock")
            .remove(id)
            .map(|e| e.view)
    }

    pub fn cancel_flag(&self, id: &str) -> Option<Arc<AtomicBool>> {
        self.entries
            .read()
            .expect("registry lock")
            .get(id)
            .map(|e| e.cancel.clone())
    }
}
